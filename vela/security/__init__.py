"""Security core: keys, onboarding, challenges, build tokens, sealed packages.

Plain code, no Ray; time is always passed in (``now``). Every refusal raises
:class:`Rejected` with a stable :class:`Reason` code. ``docs/security.md``
has the threat model.
"""

from vela.security.authz import BUILD_TOKEN_ACTIONS, BuildAction, authorize_build_request
from vela.security.challenge import Answer, Challenge, ChallengeBook, Purpose, answer_challenge
from vela.security.errors import PROOF_ONLY, Reason, Rejected
from vela.security.guard import BuildRequestGuard, authorize_all
from vela.security.identity import WorkerIdentity, load_or_create_identity
from vela.security.keys import (
    PURPOSE_TOKEN,
    KeyRing,
    jwk_thumbprint,
    load_or_create_keyring,
    rotate_keyring,
)
from vela.security.onboarding import (
    Registration,
    create_registration_token,
    hash_registration_token,
    mint_registration_token,
    register_worker,
    reregister_worker,
)
from vela.security.package import OpenedPackage, Package, open_package, seal_package
from vela.security.pinning import (
    PinnedServer,
    ServerKeySet,
    load_pinned_server,
    pin_key_set,
    publish_key_set,
    save_pinned_server,
)
from vela.security.proof import ReplayCache, make_proof, reports_hash, verify_proof
from vela.security.tokens import (
    ApiClaims,
    BuildClaims,
    mint_api_token,
    mint_build_token,
    verify_api_token,
    verify_build_token,
)

__all__ = [
    "BUILD_TOKEN_ACTIONS", "PROOF_ONLY", "PURPOSE_TOKEN", "Answer", "ApiClaims", "BuildAction",
    "BuildClaims", "BuildRequestGuard", "Challenge", "ChallengeBook", "KeyRing",
    "OpenedPackage", "Package", "PinnedServer", "Purpose", "Reason", "Registration",
    "Rejected", "ReplayCache", "ServerKeySet", "WorkerIdentity", "answer_challenge",
    "authorize_all", "authorize_build_request", "create_registration_token",
    "hash_registration_token",
    "jwk_thumbprint", "load_or_create_identity", "load_or_create_keyring",
    "load_pinned_server", "make_proof", "mint_api_token", "mint_build_token",
    "mint_registration_token", "open_package", "pin_key_set", "publish_key_set",
    "register_worker", "reports_hash", "reregister_worker", "rotate_keyring", "save_pinned_server",
    "seal_package", "verify_api_token", "verify_build_token", "verify_proof",
]
