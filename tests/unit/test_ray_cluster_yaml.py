"""`ray_cluster.yaml` is a valid `ray up` config and keeps our cluster rules."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_ray_up_config_is_valid_and_safe():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(raw))
    head = " ".join(raw["head_start_ray_commands"])
    workers = " ".join(raw["worker_start_ray_commands"])
    # Not 6379 (Redis's port); Ray's token auth on everywhere, same token on every node.
    assert "--port=6390" in head and ":6390" in workers and "6379" not in head + workers
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert '"vela_worker":1' in workers
    assert "vela serve" in head and "vela worker" in workers
    assert any("bubblewrap" in c for c in raw["setup_commands"])
