"""The server keys a worker trusts, and how that trust follows key rotation.

At registration the worker pins the server's key set (trust on first use,
over the authenticated Ray channel). The server publishes its key set signed
by *every* key in it; a worker accepts a new set only if a key it already
pins endorses it, so rotation never needs a new registration and a stranger's
key set is refused. The pinned set is kept in the worker's state directory.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vela.errors import ConfigError
from vela.security._codec import b64u, canonical, timestamp
from vela.security.errors import Reason, Rejected
from vela.security.identity import prepare_state_dir, read_private_file, write_private_file
from vela.security.keys import KeyRing, jwk_thumbprint, verify_signature

PINNED_FILE = "server-keys.json"
_DOMAIN = "vela-server-key-set-v1"


class PinnedServer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    server_id: str
    keys: dict[str, str] = Field(min_length=1)  # kid -> Ed25519 public key
    issued_at: int


class ServerKeySet(PinnedServer):
    signatures: dict[str, str]  # kid -> signature over the set

    def signed_bytes(self) -> bytes:
        return canonical(_DOMAIN, self.model_dump(mode="json", exclude={"signatures"}))


def publish_key_set(ring: KeyRing, *, server_id: str, now: datetime) -> ServerKeySet:
    """Server side: the current verifying keys, endorsed by each of them."""
    keys = ring.verifying_keys(now)
    unsigned = ServerKeySet(server_id=server_id, keys=keys, issued_at=int(timestamp(now)),
                            signatures={})
    data = unsigned.signed_bytes()
    sigs = {k.kid: b64u(k.sign(data)) for k in ring.keys if k.kid in keys}
    return unsigned.model_copy(update={"signatures": sigs})


def pin_key_set(key_set: object, *, pinned: PinnedServer | None) -> PinnedServer:
    """Worker side: the new pinned set, or ``key_set_untrusted``/``wrong_issuer``.

    With nothing pinned yet (first registration) the set must be endorsed by
    all its keys; afterwards by at least one key already pinned.
    """
    try:
        ks = ServerKeySet.model_validate(key_set)
    except ValidationError:
        raise Rejected(Reason.MALFORMED, "not a server key set") from None
    if any(jwk_thumbprint(pub) != kid for kid, pub in ks.keys.items()):
        raise Rejected(Reason.MALFORMED, "a kid is not its key's thumbprint")
    data = ks.signed_bytes()
    valid = {kid for kid, sig in ks.signatures.items()
             if kid in ks.keys and verify_signature(ks.keys[kid], data, sig)}
    if pinned is None:
        if valid != set(ks.keys):
            raise Rejected(Reason.KEY_SET_UNTRUSTED, "not endorsed by all its keys")
    else:
        if ks.server_id != pinned.server_id:
            raise Rejected(Reason.WRONG_ISSUER, "key set of another server")
        if ks.issued_at < pinned.issued_at:
            raise Rejected(Reason.KEY_SET_UNTRUSTED, "older than the pinned set")
        if not valid & set(pinned.keys):
            raise Rejected(Reason.KEY_SET_UNTRUSTED, "not endorsed by a pinned key")
    return PinnedServer(server_id=ks.server_id, keys=dict(ks.keys), issued_at=ks.issued_at)


def load_pinned_server(state_dir: Path) -> PinnedServer | None:
    path = Path(state_dir) / PINNED_FILE
    data = read_private_file(path)
    if data is None:
        return None
    try:
        return PinnedServer.model_validate(json.loads(data))
    except (ValueError, ValidationError):
        raise ConfigError(f"{path}: unreadable pinned server keys; delete it and register "
                          "the worker again with a new token") from None


def save_pinned_server(state_dir: Path, pinned: PinnedServer) -> None:
    prepare_state_dir(Path(state_dir))
    write_private_file(Path(state_dir) / PINNED_FILE, pinned.model_dump_json().encode(),
                       replace=True)
