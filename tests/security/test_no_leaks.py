"""Representative flows under DEBUG logging: no secret, key or token ever shows.

Looks in every log record (message, arguments and extras), in every
rejection's message and repr, and in the repr of every object handed around.
"""

from __future__ import annotations

import base64
import json
import logging

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from vela.security import (
    PURPOSE_TOKEN,
    BuildRequestGuard,
    ChallengeBook,
    Registration,
    Rejected,
    answer_challenge,
    create_registration_token,
    load_or_create_identity,
    load_or_create_keyring,
    make_proof,
    mint_api_token,
    mint_build_token,
    open_package,
    register_worker,
    seal_package,
    verify_api_token,
    verify_build_token,
)
from vela.security.identity import KEY_FILE

from .conftest import ISSUER

SECRETS = {"api_key": "TOPSECRET-api-value-1234", "db_password": "correct horse battery"}


def forms(raw: bytes) -> list[str]:
    b64u = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    return [b64u, base64.b64encode(raw).decode().rstrip("="), raw.hex(), repr(raw)[2:-1]]


async def test_no_secret_material_in_logs_errors_or_reprs(caplog, tmp_path, fake_store,
                                                          master_key, clock):
    caplog.set_level(logging.DEBUG)
    seen: list[object] = []
    errors: list[Rejected] = []

    def expect_rejected(fn, *args, **kwargs):
        with pytest.raises(Rejected) as e:
            fn(*args, **kwargs)
        errors.append(e.value)

    # Keys on both sides.
    ring = await load_or_create_keyring(fake_store, purpose=PURPOSE_TOKEN,
                                        master_key=master_key, now=clock.now)
    worker = load_or_create_identity(tmp_path / "worker")
    key_file = json.loads((tmp_path / "worker" / KEY_FILE).read_text())
    server_private = ring.active._private.private_bytes(Encoding.Raw, PrivateFormat.Raw,
                                                        NoEncryption())

    # Onboarding, with a reuse attempt.
    reg_token = await create_registration_token(fake_store, routes=["vela"], hostname=None,
                                                ttl_s=60, now=clock.now)
    registration = Registration(hostname="a", routes=["vela"], build_limit=1,
                                sign_public_key=worker.sign_public_key,
                                seal_public_key=worker.seal_public_key)
    seen.append(await register_worker(fake_store, registration, token=reg_token, now=clock.now))
    with pytest.raises(Rejected) as e:
        await register_worker(fake_store, registration, token=reg_token, now=clock.now)
    errors.append(e.value)

    # Challenge.
    book = ChallengeBook(server_id=ISSUER, ttl_s=10)
    ch = book.issue(hostname="a", build_id=7, now=clock.now)
    answer = answer_challenge(ch, identity=worker, hostname="a", free_slots=1)
    book.consume(ch, answer, sign_public_key=worker.sign_public_key, now=clock.now)

    # Token, package, requests.
    token, claims = mint_build_token(ring, issuer=ISSUER, build_id=7, worker="a",
                                     jkt=worker.thumbprint, timeout_s=600, grace_s=60,
                                     now=clock.now)
    pkg = seal_package(ring=ring, server_id=ISSUER, build_id=7, worker="a",
                       worker_seal_key=worker.seal_public_key, build={"repo": "org/app"},
                       executable="{}", secrets=SECRETS, build_token=token, now=clock.now,
                       ttl_s=60)
    opened = open_package(pkg.to_wire(), identity=worker,
                          pinned_server_keys=ring.verifying_keys(clock.now), hostname="a",
                          now=clock.now)
    assert opened.secrets == SECRETS
    expect_rejected(open_package, {**pkg.to_wire(), "worker": "b"}, identity=worker,
                    pinned_server_keys=ring.verifying_keys(clock.now), hostname="a",
                    now=clock.now)

    guard = BuildRequestGuard(issuer=ISSUER, proof_max_age_s=30, started_at=clock.now)
    clock.advance(1)
    reports = [("log.append", {"number": 1, "lines": ["built"]})]
    proof = make_proof(worker, token=token, reports=reports, build_id=7, now=clock.now)
    check = dict(reports=reports, keys=ring.verifying_keys(clock.now), build_id=7,
                 build_status="running", build_worker="a", build_token_jti=claims.jti,
                 worker_sign_key=worker.sign_public_key, now=clock.now)

    guard.check(token=token, proof=proof, **check)
    expect_rejected(guard.check, token=token, proof=proof, **check)  # replayed
    expect_rejected(guard.check, token=token + SECRETS["api_key"], proof=proof, **check)
    expect_rejected(guard.check, token=SECRETS["api_key"], proof=proof, **check)
    expect_rejected(guard.check, token=token, proof=SECRETS["api_key"], **check)
    expect_rejected(guard.check, token=token, proof=proof,
                    **{**check, "reports": [("log.append", {"lines": [SECRETS["api_key"]]})]})
    expect_rejected(verify_build_token, reg_token, keys=ring.verifying_keys(clock.now),
                    issuer=ISSUER, now=clock.now)
    api, _ = mint_api_token(ring, issuer=ISSUER, subject="admin", scopes=["admin"], ttl_s=60,
                            now=clock.now)
    expect_rejected(verify_build_token, api, keys=ring.verifying_keys(clock.now),
                    issuer=ISSUER, now=clock.now)
    expect_rejected(verify_api_token, token, keys=ring.verifying_keys(clock.now),
                    issuer=ISSUER, now=clock.now)

    needles = [*SECRETS.values(), token, proof, reg_token, api,
               key_file["ed25519"], key_file["x25519"], *forms(server_private)]
    for private in (key_file["ed25519"], key_file["x25519"]):
        needles += forms(base64.urlsafe_b64decode(private + "=="))
    assert errors and caplog.records
    seen += [ring, ring.active, worker, pkg, opened, claims, registration, answer, ch, book]
    haystack = [*(str(e) for e in errors), *(repr(e) for e in errors),
                *(repr(o) for o in seen), *(str(o) for o in seen)]
    for record in caplog.records:
        haystack += [record.getMessage(), repr(record.__dict__)]
    for text in haystack:
        for needle in needles:
            assert needle not in text, f"secret material in: {text[:120]}"


def test_objects_holding_api_secrets_keep_them_out_of_their_reprs():
    """What the API and the CLI hold: a request's secret value or credential, a minted
    token, the CLI's stored credentials — shown by repr() in a log line or a traceback."""
    from vela.api.client import Credentials
    from vela.api.models import (
        LoginRequest,
        RegistrationTokenOut,
        SecretCreate,
        SecretUpdate,
        TokenOut,
    )

    value, token, credential, registration = ("s3cret-VALUE", "eyJ.tok.sig", "vac_" + "C" * 43,
                                              "vrt_" + "R" * 40)
    for obj in (Credentials(url="http://127.0.0.1:8080", token=token, subject="admin"),
                LoginRequest(credential=credential), SecretCreate(name="api_key", value=value),
                SecretUpdate(value=value),
                TokenOut(token=token, subject="ci", scopes=["admin"], expires_at=1),
                RegistrationTokenOut(token=registration, hostname=None, routes=["vela"],
                                     ttl_s=60)):
        for text in (repr(obj), str(obj)):
            for secret in (value, token, credential, registration):
                assert secret not in text, text


async def test_the_server_context_keeps_the_master_key_out_of_its_repr(tmp_path):
    from vela.config import Settings
    from vela.server.context import ServerContext

    settings = Settings.model_validate({"server": {"data_dir": str(tmp_path),
                                                   "master_key": "ab" * 32}})
    ctx = ServerContext.open(settings)
    try:
        text = repr(ctx)
        assert "ab" * 32 not in text and repr(b"\xab" * 32)[2:-1] not in text
    finally:
        await ctx.close()
