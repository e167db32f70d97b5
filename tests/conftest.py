import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Slow tests first, so that under ``pytest -n`` (scripts/test.sh) no long test is left to run alone at the
    end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order within each part


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """The default digits teacher (badnet_grid), trained once per test session."""
    from abd_ray.config import TeacherSpec
    from abd_ray.engine.teacher import get_teacher

    cache = tmp_path_factory.mktemp("cache")
    return get_teacher(TeacherSpec.for_dataset("digits"), cache, progress=False), cache


@pytest.fixture(scope="session")
def finished_study(tmp_path_factory) -> dict:
    """A finished tiny study (the undefended run and two ABD search trials), run once per session (once per worker
    under ``pytest -n 2``) through the ``abd-ray study`` command as a user runs it: its folder, the driver's output,
    the MLflow URI and the study file.

    Shared by the end-to-end and the watch tests; a test that changes the folder works on a copy, or puts back what
    it changed.
    """
    from studyutil import start_driver, wait, write_study

    tmp = tmp_path_factory.mktemp("finished_study")
    f = write_study(tmp)
    uri = f"sqlite:///{tmp}/mlflow.db"
    log = tmp / "driver.log"
    p = start_driver(["study", str(f), "--storage", str(tmp / "runs"), "--cache", str(tmp / "cache")], log, tmp,
                     {"MLFLOW_TRACKING_URI": uri})
    assert wait(p, 400) == 0, log.read_text()[-4000:]
    return {"dir": tmp / "runs" / "tiny", "log": log.read_text(), "uri": uri, "tmp": tmp, "file": f}
