"""A study whose storage is S3 (a local S3-compatible server, moto, on 127.0.0.1): Tune's experiment, trial
results and checkpoints go to the bucket, the study folder (study.json, optuna.db, report) stays on the driver,
and Tune, Optuna and MLflow agree as with a local folder."""

from __future__ import annotations

import pytest
from studyutil import check_agreement, write_study


@pytest.fixture
def s3(monkeypatch):
    """A bucket on a local S3 server; the storage URI that addresses it (pyarrow's endpoint_override form)."""
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "RAY_USAGE_STATS_ENABLED": "0",
                 "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    srv = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
    client.create_bucket(Bucket="abd")
    yield f"s3://abd/studies?endpoint_override={host}:{port}&scheme=http", client
    srv.stop()


@pytest.mark.slow
def test_study_on_s3_storage(tmp_path, s3, monkeypatch):
    from abd_ray.study.runner import join_storage, launch

    uri, client = s3
    assert join_storage(uri, "tiny", "tune") == uri.replace("studies?", "studies/tiny/tune?")
    monkeypatch.chdir(tmp_path)  # the study folder of a remote storage lives under ./abd_ray_results
    f = write_study(tmp_path, mode="grid", search=None, defenses=["none", "abd"], budget={"steps": 8, "eval_every": 4,
                                                                              "batch_size": 32})
    study_dir, finished = launch(f, storage=uri, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                                 cache_dir=str(tmp_path / "cache"))
    assert finished and study_dir == tmp_path / "abd_ray_results" / "tiny"
    check_agreement(study_dir, planned=2, steps=8)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="abd", Prefix="studies/tiny/tune/").get("Contents", [])]
    assert any(k.endswith("result.json") for k in keys), keys  # the trials' results are in the bucket
    assert any("/checkpoint_" in k for k in keys), keys  # and their checkpoints
    assert not (study_dir / "tune").exists()  # nothing of the experiment on the driver's disk
