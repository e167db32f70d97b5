import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """The default digits teacher (badnet_grid), trained once per test session."""
    from abd_ray.config import TeacherSpec
    from abd_ray.engine.teacher import get_teacher

    cache = tmp_path_factory.mktemp("cache")
    return get_teacher(TeacherSpec.for_dataset("digits"), cache, progress=False), cache
