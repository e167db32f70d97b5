"""cluster.yaml validates against Ray's cluster-launcher schema, and keeps its services private."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_matches_ray_schema():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(_config(), _schema())


def test_cluster_yaml_shape_and_private_services():
    cfg = _config()
    nodes = cfg["available_node_types"]
    head = nodes[cfg["head_node_type"]]
    workers = [n for name, n in nodes.items() if name != cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    assert workers and all(n["resources"].get("GPU", 0) >= 1 for n in workers), "workers carry GPUs"
    setup = " ".join(cfg["setup_commands"])
    assert "pip install" in setup and "~/abd-ray" in setup, "setup installs this package"
    assert cfg["file_mounts"].get("~/abd-ray") == "."
    start = " ".join(cfg["head_start_ray_commands"])
    assert "mlflow server" in start and "0.0.0.0" not in start, "MLflow binds to the private address only"
    assert "--dashboard-host=127.0.0.1" in start
    # Ray 2.60's `ray start` enables token authentication only when told to (or a token is already on the node).
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts), "every node checks the token"
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", "the token reaches every node"
    assert "RAY_AUTH_MODE=disabled" not in (ROOT / "cluster.yaml").read_text()
    assert "/mnt/shared" in " ".join(cfg["initialization_commands"]), "shared storage is mounted"


def test_a_broken_cluster_yaml_is_rejected():
    jsonschema = pytest.importorskip("jsonschema")
    bad = _config()
    bad["available_node_types"]["gpu_worker"]["resources"] = {"GPU": -1}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _schema())
    bad = _config()
    del bad["provider"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, _schema())
