"""The worker's own key pairs, created on first start and kept on its host.

Ed25519 signs (challenge answers, proofs of possession); X25519 receives
sealed secrets. Both private halves live in one file in the worker's state
directory, mode 0600, owned by the worker's user. They are never sent
anywhere: a :class:`WorkerIdentity` refuses to be pickled, so it cannot
cross a Ray boundary by accident.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from vela.errors import ConfigError
from vela.security._codec import b64u, b64u_decode
from vela.security.keys import jwk_thumbprint, public_bytes

log = logging.getLogger(__name__)

KEY_FILE = "worker-keys.json"
_FORMAT = "vela-worker-keys-v1"


class WorkerIdentity:
    """A worker's private keys. ``repr`` shows the thumbprint only."""

    __slots__ = ("_sign", "_seal", "sign_public_key", "seal_public_key", "thumbprint")

    def __init__(self, sign_key: Ed25519PrivateKey, seal_key: X25519PrivateKey) -> None:
        self._sign = sign_key
        self._seal = seal_key
        self.sign_public_key = b64u(public_bytes(sign_key.public_key()))
        self.seal_public_key = b64u(seal_key.public_key().public_bytes(Encoding.Raw,
                                                                      PublicFormat.Raw))
        self.thumbprint = jwk_thumbprint(self.sign_public_key)

    @classmethod
    def generate(cls) -> WorkerIdentity:
        return cls(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    def sign(self, data: bytes) -> bytes:
        return self._sign.sign(data)

    def exchange(self, peer_public: bytes) -> bytes:
        """X25519 shared secret with ``peer_public`` (raises ValueError on a bad point)."""
        return self._seal.exchange(X25519PublicKey.from_public_bytes(peer_public))

    def __repr__(self) -> str:
        return f"WorkerIdentity(thumbprint={self.thumbprint})"

    def __reduce__(self):  # type: ignore[no-untyped-def]
        raise TypeError("a worker identity never leaves its host")

    def _to_file(self) -> bytes:
        raw = {
            "format": _FORMAT,
            "ed25519": b64u(self._sign.private_bytes(Encoding.Raw, PrivateFormat.Raw,
                                                     NoEncryption())),
            "x25519": b64u(self._seal.private_bytes(Encoding.Raw, PrivateFormat.Raw,
                                                    NoEncryption())),
        }
        return json.dumps(raw).encode()

    @classmethod
    def _from_file(cls, data: bytes, where: Path) -> WorkerIdentity:
        try:
            raw = json.loads(data)
            if raw.get("format") != _FORMAT:
                raise ValueError("unknown format")
            return cls(Ed25519PrivateKey.from_private_bytes(b64u_decode(raw["ed25519"])),
                       X25519PrivateKey.from_private_bytes(b64u_decode(raw["x25519"])))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"{where}: not a worker key file; move it away and "
                              "register the worker again with a new token") from None


def load_or_create_identity(state_dir: Path) -> WorkerIdentity:
    """The worker's identity from ``state_dir``, created there on first start."""
    state_dir = Path(state_dir)
    prepare_state_dir(state_dir)
    path = state_dir / KEY_FILE
    data = read_private_file(path)
    if data is None:
        identity = WorkerIdentity.generate()
        if write_private_file(path, identity._to_file()):
            log.info("created worker keys", extra={"thumbprint": identity.thumbprint})
            return identity
        data = read_private_file(path)  # another process won the race: use its keys
        assert data is not None
    return WorkerIdentity._from_file(data, path)


def prepare_state_dir(state_dir: Path) -> None:
    # An existing directory is left as it is: each file checks its own mode and owner.
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)


def read_private_file(path: Path) -> bytes | None:
    """Contents of a private file, or None if absent.

    Refuses a symlink, a file of another user or a world-readable file (the
    key may already be copied: re-key the worker); repairs group bits.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError:
        raise ConfigError(f"{path}: cannot open private file (a symlink is refused)") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise ConfigError(f"{path}: must be a regular file owned by the worker's user")
        if mode & 0o007:
            raise ConfigError(
                f"{path}: readable by other users (mode {mode:o}); its keys may be "
                "compromised: delete it and register the worker again with a new token")
        if mode & 0o070:
            log.warning("repaired permissions of a private file",
                        extra={"path": str(path), "mode": f"{mode:o}"})
            os.fchmod(f.fileno(), 0o600)
        return f.read()


def write_private_file(path: Path, data: bytes, *, replace: bool = False) -> bool:
    """Write ``data`` with mode 0600 atomically; False if it exists and not ``replace``."""
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # fails if present: first writer wins
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)
