"""The sealed build package the server pushes to a worker.

The package carries the build metadata, the executable, the secrets sealed
to the worker's X25519 key and the build token. The server signs canonical
bytes of all of it with its token key; the worker opens it only if the
signature verifies under a key it pinned, the package names it, it has not
expired, and the token inside is bound to its own key. :class:`Package` is
the wire format: plain data that pickles across Ray and round-trips through
:meth:`Package.to_wire` / :meth:`Package.from_wire`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vela.security._codec import b64u, canonical, from_timestamp, timestamp
from vela.security.errors import Reason, Rejected
from vela.security.identity import WorkerIdentity
from vela.security.keys import KeyRing, same, verify_signature
from vela.security.seal import SealedBox, seal, unseal
from vela.security.tokens import BuildClaims, verify_build_token

log = logging.getLogger(__name__)

_DOMAIN = "vela-package-v1"
_AAD_DOMAIN = "vela-package-secrets-v1"
DEFAULT_SKEW_S = 5


class Package(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    version: Literal[1] = 1
    package_id: str = Field(pattern=r"^[A-Za-z0-9_-]{16,64}$")
    server_id: str
    build_id: int
    worker: str
    build: dict[str, Any]
    executable: str
    secrets: SealedBox
    build_token: str = Field(repr=False)
    issued_at: int
    expires_at: int
    kid: str
    signature: str = Field(repr=False)

    def signed_bytes(self) -> bytes:
        return canonical(_DOMAIN, self.model_dump(mode="json", exclude={"signature"}))

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_wire(cls, data: object) -> Package:
        if isinstance(data, Package):
            return data
        try:
            return cls.model_validate(data)
        except ValidationError:
            raise Rejected(Reason.MALFORMED, "not a build package") from None


@dataclass(frozen=True)
class OpenedPackage:
    """A verified package. Secrets and token never show in ``repr``."""

    package_id: str
    server_id: str
    build_id: int
    worker: str
    build: dict[str, Any]
    executable: str
    claims: BuildClaims
    issued_at: datetime
    expires_at: datetime
    build_token: str = field(repr=False)
    secrets: dict[str, str] = field(repr=False)


def _aad(*, package_id: str, build_id: int, worker: str, server_id: str) -> bytes:
    return canonical(_AAD_DOMAIN, {"package_id": package_id, "build_id": build_id,
                                   "worker": worker, "server_id": server_id})


def seal_package(*, ring: KeyRing, server_id: str, build_id: int, worker: str,
                 worker_seal_key: str, build: Mapping[str, Any], executable: str,
                 secrets: Mapping[str, str], build_token: str, now: datetime,
                 ttl_s: int) -> Package:
    """Server side: seal ``secrets`` to ``worker_seal_key`` and sign the package."""
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in secrets.items()):
        raise TypeError("secrets must map names to string values")
    package_id = b64u(os.urandom(16))
    aad = _aad(package_id=package_id, build_id=build_id, worker=worker, server_id=server_id)
    box = seal(worker_seal_key, json.dumps(dict(secrets), sort_keys=True).encode(), aad)
    issued = int(timestamp(now))
    body = dict(package_id=package_id, server_id=server_id, build_id=build_id, worker=worker,
                build=json.loads(json.dumps(dict(build))), executable=executable, secrets=box,
                build_token=build_token, issued_at=issued, expires_at=issued + int(ttl_s),
                kid=ring.active.kid)
    unsigned = Package(**body, signature="")
    return unsigned.model_copy(update={"signature": b64u(ring.active.sign(
        unsigned.signed_bytes()))})


def open_package(package: object, *, identity: WorkerIdentity,
                 pinned_server_keys: Mapping[str, str], hostname: str,
                 now: datetime) -> OpenedPackage:
    """Worker side: verify ``package`` (a :class:`Package` or its wire dict) and
    decrypt its secrets; :class:`Rejected` otherwise."""
    pkg = Package.from_wire(package)
    public_key = pinned_server_keys.get(pkg.kid)
    if public_key is None:
        raise Rejected(Reason.PACKAGE_UNKNOWN_SIGNER)
    try:
        signed = pkg.signed_bytes()
    except ValueError:  # e.g. NaN in the metadata: it cannot have been signed
        raise Rejected(Reason.PACKAGE_TAMPERED) from None
    if not verify_signature(public_key, signed, pkg.signature):
        raise Rejected(Reason.PACKAGE_TAMPERED, f"build {pkg.build_id}")
    if pkg.worker != hostname:
        raise Rejected(Reason.PACKAGE_NOT_FOR_ME, f"addressed to {pkg.worker}")
    t = timestamp(now)
    if t >= pkg.expires_at:
        raise Rejected(Reason.PACKAGE_EXPIRED, f"build {pkg.build_id}")
    if pkg.issued_at > t + DEFAULT_SKEW_S:
        raise Rejected(Reason.NOT_YET_VALID, "package issued in the future")
    claims = verify_build_token(pkg.build_token, keys=pinned_server_keys,
                                issuer=pkg.server_id, now=now)
    if claims.wkr != hostname or not same(claims.cnf.jkt, identity.thumbprint):
        raise Rejected(Reason.PACKAGE_NOT_FOR_ME, "build token is bound to another worker")
    if claims.build_id != pkg.build_id:
        raise Rejected(Reason.WRONG_BUILD, "build token is for another build")
    aad = _aad(package_id=pkg.package_id, build_id=pkg.build_id, worker=pkg.worker,
               server_id=pkg.server_id)
    try:
        secrets = json.loads(unseal(identity, pkg.secrets, aad))
    except ValueError:
        raise Rejected(Reason.SEALED_SECRET_INVALID) from None
    if not isinstance(secrets, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in secrets.items()):
        raise Rejected(Reason.SEALED_SECRET_INVALID)
    log.debug("opened build package", extra={"build_id": pkg.build_id, "kid": pkg.kid})
    return OpenedPackage(package_id=pkg.package_id, server_id=pkg.server_id,
                         build_id=pkg.build_id, worker=pkg.worker, build=pkg.build,
                         executable=pkg.executable, claims=claims,
                         issued_at=from_timestamp(pkg.issued_at),
                         expires_at=from_timestamp(pkg.expires_at),
                         build_token=pkg.build_token, secrets=secrets)
