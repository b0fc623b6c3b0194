"""Worker keys on disk: created once, private to the worker's user, never pickled."""

from __future__ import annotations

import json
import os
import pickle
import stat

import pytest

from vela.errors import ConfigError
from vela.security import WorkerIdentity, jwk_thumbprint, load_or_create_identity
from vela.security.identity import KEY_FILE


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_created_once_with_private_modes(tmp_path):
    state = tmp_path / "state"
    first = load_or_create_identity(state)
    assert mode(state / KEY_FILE) == 0o600 and mode(state) == 0o700
    again = load_or_create_identity(state)
    assert again.sign_public_key == first.sign_public_key
    assert again.seal_public_key == first.seal_public_key
    assert again.thumbprint == first.thumbprint == jwk_thumbprint(first.sign_public_key)
    assert not list(state.glob(".*.tmp"))


def test_group_readable_key_file_repaired(tmp_path):
    load_or_create_identity(tmp_path)
    os.chmod(tmp_path / KEY_FILE, 0o640)
    load_or_create_identity(tmp_path)
    assert mode(tmp_path / KEY_FILE) == 0o600


def test_world_readable_key_file_refused(tmp_path):
    load_or_create_identity(tmp_path)
    os.chmod(tmp_path / KEY_FILE, 0o644)
    with pytest.raises(ConfigError, match="readable by other users"):
        load_or_create_identity(tmp_path)


def test_symlinked_key_file_refused(tmp_path):
    load_or_create_identity(tmp_path / "real")
    (tmp_path / "link").mkdir()
    os.symlink(tmp_path / "real" / KEY_FILE, tmp_path / "link" / KEY_FILE)
    with pytest.raises(ConfigError, match="symlink"):
        load_or_create_identity(tmp_path / "link")


def test_corrupt_key_file_refused(tmp_path):
    (tmp_path / KEY_FILE).write_text(json.dumps({"format": "other"}))
    os.chmod(tmp_path / KEY_FILE, 0o600)
    with pytest.raises(ConfigError, match="not a worker key file"):
        load_or_create_identity(tmp_path)


def test_private_halves_never_leave(tmp_path):
    ident = load_or_create_identity(tmp_path)
    raw = json.loads((tmp_path / KEY_FILE).read_text())
    for text in (repr(ident), str(ident)):
        assert raw["ed25519"] not in text and raw["x25519"] not in text
        assert ident.thumbprint in text
    with pytest.raises(TypeError):
        pickle.dumps(ident)


def test_rfc8037_thumbprint_vector():
    # RFC 8037 appendix A.3: thumbprint of the example Ed25519 public key.
    x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    assert jwk_thumbprint(x) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_public_keys_are_base64url():
    ident = WorkerIdentity.generate()
    for key in (ident.sign_public_key, ident.seal_public_key):
        assert len(key) == 43 and "=" not in key and "+" not in key and "/" not in key
