"""Build-token throughput on one core: mint, verify, and the full check of a report call
(token + proof of possession over the call's reports + authorization of each) per second,
for a call of one report and for a call of the four a no-op build's final call carries
(one proof per call: the token and the proof checked once, each report authorized);
those two rows count calls per second.

    python bench/tokens.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

from vela.domain import BuildStatus
from vela.security import (
    BuildAction,
    BuildRequestGuard,
    KeyRing,
    WorkerIdentity,
    make_proof,
    mint_build_token,
    verify_build_token,
)


def rate(fn: Callable[[int], object], seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        for _ in range(100):
            fn(n)
            n += 1
    return n / elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args(argv)
    now = datetime.now(UTC)
    ring = KeyRing.generate(now)
    worker = WorkerIdentity.generate()
    keys = ring.verifying_keys(now)

    def mint(i: int) -> tuple[str, object]:
        return mint_build_token(ring, issuer="bench", build_id=i + 1, worker="w1",
                                jkt=worker.thumbprint, timeout_s=3600, grace_s=300, now=now)

    token, claims = mint(0)
    guard = BuildRequestGuard(issuer="bench", proof_max_age_s=30,
                              started_at=datetime.fromtimestamp(now.timestamp() - 60, UTC))

    def check(count: int) -> Callable[[int], None]:
        reports = [(BuildAction.LOG_APPEND.value, {"number": 1, "lines": ["x"]})] * count

        def one_call(i: int) -> None:
            t = datetime.now(UTC)
            proof = make_proof(worker, token=token, reports=reports, build_id=1, now=t)
            guard.check(token=token, proof=proof, reports=reports, keys=keys, build_id=1,
                        build_status=BuildStatus.RUNNING, build_worker="w1",
                        build_token_jti=claims.jti, worker_sign_key=worker.sign_public_key,
                        now=t)
        return one_call

    rows = [
        ("mint build token", rate(mint, args.seconds)),
        ("verify build token", rate(lambda i: verify_build_token(
            token, keys=keys, issuer="bench", now=now), args.seconds)),
        # Per call: the worker's one proof over its reports, the server's full check.
        ("call of 1 report: make proof + full check", rate(check(1), args.seconds)),
        ("the same for 4 reports in one call", rate(check(4), args.seconds)),
    ]
    print(f"{'operation (one core)':<42} {'per second':>12}")
    for name, r in rows:
        print(f"{name:<42} {r:>12,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
