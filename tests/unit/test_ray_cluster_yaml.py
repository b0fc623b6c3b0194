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


def test_the_directories_and_secrets_of_production_toml_are_provided():
    """configs/production.toml puts server.data_dir and worker.state_dir under
    /var/lib/vela and runs as the SSH user: the setup must make that directory theirs
    (else a non-root worker dies with PermissionError), and `vela serve` on the head
    must get the secrets production.toml leaves to the environment."""
    from vela.config import load_settings

    raw = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    prod = load_settings(ROOT / "configs" / "production.toml", environ={})
    setup = raw["setup_commands"]  # every node: the head and the workers
    made = [c for c in setup if "install -d" in c and '-o "$(id -un)"' in c]
    assert made, setup
    for path in (prod.server.data_dir, prod.worker.state_dir):
        assert any(str(path).startswith(c.split()[-1]) for c in made), path
    # Created before vela is installed and run.
    assert setup.index(made[0]) < next(i for i, c in enumerate(setup) if "pip install" in c)
    serve = next(c for c in raw["head_start_ray_commands"] if "vela serve" in c)
    assert ". ~/vela/server.env" in serve and "set -a" in serve
    checked = " ".join(raw["head_setup_commands"])
    assert "~/vela/server.env" in checked and "exit 1" in checked
    header = (ROOT / "ray_cluster.yaml").read_text().split("cluster_name:")[0]
    for var in ("VELA_SERVER_MASTER_KEY", "VELA_DATABASE_URL", "VELA_QUEUE_REDIS_URL"):
        assert var in header and var in checked
