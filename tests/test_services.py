"""Services and trust: Ray's token auth is never turned off, MLflow listens privately, secrets never reach MLflow,
YAML is read safely, and a trial's config and seed give the same metrics twice on the CPU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = [p for p in [*ROOT.joinpath("abd_ray").rglob("*.py"), *ROOT.joinpath("scripts").glob("*.sh"),
                    ROOT / "README.md", ROOT / "cluster.yaml"] if p.exists()]


def test_ray_token_auth_never_disabled():
    for p in TEXT:
        text = p.read_text()
        assert not re.search(r"RAY_AUTH_MODE\s*[=:]\s*['\"]?disabled", text), p
        assert "auth_mode" not in text.replace("RAY_AUTH_MODE", ""), p


def test_mlflow_servers_listen_privately():
    cmds = [line for p in TEXT for line in p.read_text().splitlines() if re.search(r"mlflow (ui|server)", line)]
    assert cmds, "README / cluster.yaml start an MLflow UI or server"
    for line in cmds:
        assert "0.0.0.0" not in line and "--host ::" not in line, line
        # A laptop UI keeps MLflow's default host (127.0.0.1); the cluster's server binds the head's private address.
        assert "--host" not in line or "hostname -I" in line or "127.0.0.1" in line, line


def test_yaml_is_read_with_the_safe_loader_only():
    for p in ROOT.joinpath("abd_ray").rglob("*.py"):
        text = p.read_text()
        assert not re.search(r"yaml\.(load|unsafe_load|full_load)\(", text), p
        assert "yaml.Loader" not in text and "UnsafeLoader" not in text, p


def test_secrets_are_redacted_from_params_and_tags(tmp_path, monkeypatch):
    from abd_ray.tracking import Tracker, redact

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-3b1f0c9d")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-7e41d2")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "raytok-55aa11")
    assert redact("http://alice:hunter22@mlflow.internal:5000") == "http://***@mlflow.internal:5000"
    t = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    exp = t.experiment("s")
    rid = t.start_parent(exp, "s", {"data_root": "/x/aws-7e41d2/y", "note": "token raytok-55aa11",
                                    "uri": "http://u:pw-3b1f0c9d@h"}, {"who": "pw-3b1f0c9d"})
    data = t.client.get_run(rid).data
    blob = repr(data.params) + repr(data.tags)
    for secret in ("pw-3b1f0c9d", "aws-7e41d2", "raytok-55aa11"):
        assert secret not in blob
    assert data.params["data_root"] == "/x/***/y"


def _tiny_run(teacher, seed: int):
    from abd_ray.config import RunConfig
    from abd_ray.engine.distill import distill

    cfg = RunConfig(dataset="digits", synth={"n_s": 1}, steps=8, eval_every=4, batch_size=32, seed=seed,
                    device="cpu")
    return distill(cfg, teacher=teacher, progress=False)


def test_same_config_and_seed_give_the_same_metrics(tmp_path):
    """So a resumed or retried trial is comparable with its first attempt."""
    from abd_ray.config import TeacherSpec
    from abd_ray.engine.teacher import get_teacher

    teacher = get_teacher(TeacherSpec.for_dataset("digits", epochs=1), tmp_path, progress=False)
    timing = ("wall_s", "cpu_s", "total_wall_s", "step_time_s")
    a, b, c = _tiny_run(teacher, 0), _tiny_run(teacher, 0), _tiny_run(teacher, 1)
    strip = lambda m: {k: v for k, v in m.items() if k not in timing}  # noqa: E731
    assert strip(a.metrics) == strip(b.metrics)
    assert [strip(h) for h in a.history] == [strip(h) for h in b.history]
    assert strip(a.metrics) != strip(c.metrics), "the seed must matter, else the check above proves nothing"
    assert pytest.approx(a.metrics["loss_kd"]) == b.metrics["loss_kd"]
