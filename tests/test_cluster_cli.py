"""``abd-ray study --address`` and ``abd-ray resume --address`` against a Ray cluster started on its own.

The cluster is what a user starts by hand: ``ray start --head`` and one more node with ``ray start --address``, both
with token authentication on (``RAY_AUTH_MODE=token``, the token in the nodes' ``~/.ray/auth_token``). Everything
runs inside a network namespace that the test creates, holding only a loopback interface, so Ray binds and
advertises 127.0.0.1 and no packet leaves it; the test ends the processes in that namespace by their ids.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from studyutil import check_agreement, kill_when, results, trial_dirs, write_study
from studyutil import cli as _cli

PORT = 6379  # the namespace is the test's own: no other Ray can hold the port


def _ray() -> str:
    return str(Path(os.sys.executable).with_name("ray"))


@pytest.fixture
def netns():
    """A network namespace with loopback only; on exit every process in it is ended, then the namespace."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed (apt-get install iproute2)")
    name = f"abdray{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here (needs root): {made.stderr.strip()}")
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        _end_processes(name)
        subprocess.run(["ip", "netns", "del", name], check=False)


def _pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _end_processes(ns: str) -> None:
    """SIGTERM, then SIGKILL after 10 s, to each process of the namespace (only this test's processes live there)."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in _pids(ns):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while _pids(ns) and time.time() < deadline:
            time.sleep(0.2)
        if not _pids(ns):
            return


def _in(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    return {**env, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
            "PYTHONUNBUFFERED": "1", **extra}


def _start_cluster(ns: str, home: Path, temp_dir: str) -> None:
    """``ray start`` a head and one more node (one CPU each), token authentication on, as a user would."""
    env = _env(home, RAY_AUTH_MODE="token")
    subprocess.run(_in(ns, [_ray(), "get-auth-token", "--generate"]), env=env, check=True, capture_output=True)
    common = ["--num-cpus", "1", "--object-store-memory", "150000000", "--temp-dir", temp_dir, "--disable-usage-stats"]
    for argv in ([_ray(), "start", "--head", "--port", str(PORT), "--include-dashboard", "false", *common],
                 [_ray(), "start", "--address", f"127.0.0.1:{PORT}", *common]):
        r = subprocess.run(_in(ns, argv), env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "Local node IP: 127.0.0.1" in r.stdout + r.stderr, "the node advertises loopback only"


def _refused(ns: str, f: Path, home: Path, tmp: Path, address: str, **env: str) -> str:
    """Run ``abd-ray study`` that must be refused: exit 2, one line on stderr, and no study folder."""
    env = {"RAY_NUM_REDIS_GET_RETRIES": "3", **env}  # Ray's client retries a refused connection 20 times by default
    r = subprocess.run(_in(ns, _cli("study", str(f), "--address", address, "--storage", str(tmp / "runs"),
                                    "--tracking-uri", f"sqlite:///{tmp}/mlflow.db")),
                       env=_env(home, **env), capture_output=True, text=True, timeout=120, cwd=tmp)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("abd-ray study: error: "), r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp / "runs").exists(), "nothing is created before the cluster is joined"
    return lines[0]


def test_token_source_follows_rays_order(tmp_path, monkeypatch):
    from abd_ray.study.cluster import ClusterError, token_source

    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert token_source() is None
    default = tmp_path / ".ray" / "auth_token"
    default.parent.mkdir()
    default.write_text("\n")
    assert token_source() is None, "an empty token file is no token"
    default.write_text("a" * 32)
    assert token_source() == str(default)
    named = tmp_path / "tok"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    with pytest.raises(ClusterError, match="RAY_AUTH_TOKEN_PATH=.* names no readable, non-empty token file"):
        token_source()
    named.write_text("b" * 32)
    assert token_source() == f"RAY_AUTH_TOKEN_PATH ({named})"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "c" * 32)
    assert token_source() == "RAY_AUTH_TOKEN"


def test_the_cli_path_to_a_study_imports_no_ray():
    """Token mode must be set before ray is imported (Ray reads it once), so nothing up to ``connect`` imports it."""
    code = ("import sys; import abd_ray.cli.studies as c, abd_ray.study.runner, abd_ray.study.preflight as p; "
            "from abd_ray.study.spec import load_spec; import abd_ray.study.cluster; "
            "c.set_verbosity(False); p.check_trials(load_spec('studies/quickstart.yaml')); "
            "print('ray' in sys.modules)")
    out = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("address,expected", [("127.0.0.1:6379", ("127.0.0.1", 6379)), ("[::1]:6380", ("::1", 6380)),
                                              ("auto", None), ("ray://head:10001", None)])
def test_addresses_probed(address, expected):
    from abd_ray.study.cluster import _host_port

    assert _host_port(address) == expected


@pytest.mark.parametrize("address", ["head", "head:port", ":6379"])
def test_a_bad_address_is_refused(address):
    from abd_ray.study.cluster import ClusterError, _host_port

    with pytest.raises(ClusterError, match="is not host:port"):
        _host_port(address)


def test_without_an_address_ray_starts_here_even_beside_a_stale_cluster_address():
    """Ray's temp dir names the last `ray start` (or test) cluster, and Ray's own ``init()`` would join it, waiting
    minutes on a cluster long gone. Without an address, a study starts its own Ray on this machine."""
    temp = tempfile.mkdtemp(prefix="abdray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        os.makedirs(os.path.join(temp, "ray"))
        with open(os.path.join(temp, "ray", "ray_current_cluster"), "w") as f:
            f.write("127.0.0.1:9")  # the discard port: no GCS there
        code = ("from abd_ray.study.cluster import connect; connect(None, print); import ray; "
                "print('gcs', ray.get_runtime_context().gcs_address)")
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": temp}
        r = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        gcs = [x for x in r.stdout.splitlines() if x.startswith("gcs ")]
        assert gcs and not gcs[0].endswith(":9"), r.stdout[-2000:]
    finally:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_study_and_resume_on_a_cluster_started_by_ray_start(netns, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    temp_dir = tempfile.mkdtemp(prefix="abdray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    f = write_study(tmp_path, name="oncluster", mode="grid", search=None, seeds=[0, 1],
                    budget={"steps": 48, "eval_every": 4, "batch_size": 32})
    try:
        _start_cluster(netns, home, temp_dir)

        msg = _refused(netns, f, home, tmp_path, f"127.0.0.1:{PORT + 1}")
        assert "no Ray cluster answers at 127.0.0.1:6380" in msg and "ray start --head" in msg
        nohome = tmp_path / "nohome"
        nohome.mkdir()
        msg = _refused(netns, f, nohome, tmp_path, f"127.0.0.1:{PORT}")
        assert "requires its authentication token and none was found" in msg and "RAY_AUTH_TOKEN" in msg
        msg = _refused(netns, f, nohome, tmp_path, f"127.0.0.1:{PORT}", RAY_AUTH_TOKEN="0" * 32)
        assert "refused the token from RAY_AUTH_TOKEN" in msg and "ray get-auth-token" in msg

        # The driver finds the token in ~/.ray/auth_token by itself (RAY_AUTH_MODE is not set in its shell).
        study_dir = tmp_path / "runs" / "oncluster"
        log = tmp_path / "driver.log"
        argv = ["study", str(f), "--address", f"127.0.0.1:{PORT}", "--storage", str(tmp_path / "runs"),
                "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--cache", str(tmp_path / "cache")]
        p = subprocess.Popen(_in(netns, _cli(*argv)), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                             env=_env(home), start_new_session=True, cwd=tmp_path)

        def mid_trial() -> bool:
            return any(rs and not rs[-1].get("final") for rs in map(results, trial_dirs(study_dir)))

        kill_when(p, mid_trial, log, timeout=300)  # the driver dies; the cluster's nodes stay up
        p.wait()
        r = subprocess.run(_in(netns, _cli("resume", str(study_dir), "--address", f"127.0.0.1:{PORT}")),
                           env=_env(home), capture_output=True, text=True, timeout=420, cwd=tmp_path)
        assert r.returncode == 0, log.read_text()[-2000:] + r.stdout[-3000:] + r.stderr[-3000:]
        assert f"joining the Ray cluster at 127.0.0.1:6379 (token from {home}/.ray/auth_token)" in r.stdout
        assert "joined: 2 node(s), 2 CPU(s), 0 GPU(s)" in r.stdout
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)

    check_agreement(study_dir, planned=2, steps=48)
    assert json.loads((study_dir / "study.json").read_text())["attempts"] == 2
    nodes = {rec["node_id"] for d in trial_dirs(study_dir) for rec in results(d)}
    assert len(nodes) == 2, f"the trials ran on both nodes: {nodes}"
