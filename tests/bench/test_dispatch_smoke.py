"""The dispatch benchmark's smoke run, `python bench/dispatch.py --quick`, as issue 9
asks of CI: it runs vela, Celery and the Ray floor end to end and prints its tables.
Timing goals are not asserted here; they live in the full runs (docs/performance.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dispatch_quick_completes_and_prints_its_tables():
    res = subprocess.run([sys.executable, "bench/dispatch.py", "--quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    out = res.stdout
    for heading in ("burst (N jobs submitted at once)", "unloaded (3 jobs, one at a time)",
                    "vela stages", "CPU per job in the burst", "sandbox cost per step",
                    "ratios (burst)", "targets"):
        assert heading in out, heading
    rows = [line.split()[0:2] for line in out.splitlines() if line.strip()]
    for system in (["vela", "sqlite"], ["celery", "2"], ["ray", "floor"]):
        assert system in rows, system
    assert "NOT OK" not in out  # every build of the smoke run succeeded


def test_tokens_bench_runs_and_prints_every_row():
    res = subprocess.run([sys.executable, "bench/tokens.py", "--seconds", "0.05"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    for row in ("mint build token", "verify build token", "full check",
                "4 reports in one call"):
        assert row in res.stdout, row


def test_inprocess_bench_runs_and_prints_its_table():
    res = subprocess.run([sys.executable, "bench/inprocess.py", "--builds", "10",
                          "--workers", "2"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    header, row = res.stdout.splitlines()[-2:]
    assert header.split() == ["W", "builds/s", "CPU", "ms/build", "steps", "ms/build"]
    w, rate, cpu, steps = row.split()
    assert w == "2" and float(rate) > 0 and float(cpu) > 0 and float(steps) >= 0
