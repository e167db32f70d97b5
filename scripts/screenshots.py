"""The README's pictures: the MLflow runs view of a study's trials and the study's Pareto plot, as small PNGs in docs/.

    .venv/bin/python scripts/screenshots.py                      # runs the quickstart first (about 10 minutes)
    .venv/bin/python scripts/screenshots.py --study abd_ray_results/quickstart

Serves the study's tracking database with ``mlflow server`` on a free loopback port, opens the trials URL that
``abd-ray study`` prints in headless Chromium (Debian's ``chromium``), and downscales the screenshot and the report's
Pareto PNG. The helpers below also serve the browser tests (tests/test_study_watch.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(argv: list[str], url: str, log: Path, cwd: Path, timeout: float = 120) -> subprocess.Popen:
    """Start a server in a process group of its own and wait until ``url`` answers 200 (stop it with :func:`stop`)."""
    p = subprocess.Popen(argv, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"server ended (rc {p.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return p
        except OSError:
            time.sleep(0.5)
    stop(p)
    raise RuntimeError(f"{url} never answered:\n{log.read_text()[-3000:]}")


def stop(p: subprocess.Popen) -> None:
    """End a server started by :func:`serve`: its process group, by its pid."""
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def mlflow_server(uri: str, port: int, log: Path, cwd: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
            "--port", str(port), "--workers", "1"]
    return serve(argv, f"http://127.0.0.1:{port}/health", log, cwd)


def chromium(url: str, profile: Path, *args: str, budget_ms: int = 30000) -> str:
    """Run headless Chromium on ``url`` for ``budget_ms`` of virtual time (the page's scripts run); its stdout."""
    exe = shutil.which("chromium")
    if exe is None:
        raise RuntimeError("no chromium on PATH: apt-get install chromium")
    out = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
                          *args, url], capture_output=True, text=True, timeout=180)
    return out.stdout


def downscale(src: Path, dst: Path, width: int) -> None:
    from PIL import Image

    im = Image.open(src).convert("RGB")
    if im.width > width:
        im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
    im.save(dst, optimize=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default=None, help="a finished study folder (default: run the quickstart first)")
    ap.add_argument("--out", default=str(ROOT / "docs"), help="where the PNGs go (default docs/)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="abd-shots-") as tmp:
        tmp = Path(tmp)
        study = Path(args.study) if args.study else None
        if study is None:
            env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
            subprocess.run([sys.executable, "-m", "abd_ray.cli", "study", str(ROOT / "studies/quickstart.yaml"),
                            "--storage", str(tmp / "runs")], check=True, env=env, cwd=ROOT)
            study = tmp / "runs" / "quickstart"
        from abd_ray.tracking import ui_links

        st = json.loads((study / "study.json").read_text())
        port = free_port()
        links = ui_links(st["tracking_uri"], st["mlflow_experiment_id"], st["parent_run_id"], port=port)
        srv = mlflow_server(st["tracking_uri"], port, tmp / "mlflow.log", tmp)
        try:
            shot = tmp / "runs.png"
            chromium(links["trials_url"], tmp / "profile", "--window-size=1500,480", f"--screenshot={shot}")
        finally:
            stop(srv)
        out = Path(args.out)
        downscale(shot, out / "mlflow-runs.png", 1000)
        pareto = sorted((study / "report").glob("pareto_*.png"))[0]
        downscale(pareto, out / "pareto.png", 480)
        print(f"{out / 'mlflow-runs.png'}\n{out / 'pareto.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
