"""The registry class, and the house rules a test can keep."""

import re
from pathlib import Path

import pytest

from abd_ray.registry import Registry

PKG = Path(__file__).resolve().parents[1] / "abd_ray"
SCIENCE = ["data", "attacks", "models", "synthesizers", "defenses", "engine", "losses.py", "metrics.py"]


def test_registry_register_get_and_errors():
    r = Registry("widget")

    @r.register("a", colour="red")
    def make_a():
        return "A"

    assert r.get("a") is make_a and r.build("a") == "A" and r.meta("a") == {"colour": "red"}
    assert "a" in r and r.names() == ["a"] and len(r) == 1
    with pytest.raises(ValueError, match="registered twice"):
        r.register("a")(lambda: None)
    with pytest.raises(ValueError, match=r"unknown widget 'b'; known widgets: a"):
        r.get("b")
    r.unregister("a")
    assert "a" not in r and r.names() == []
    with pytest.raises(ValueError, match="unknown widget 'a'"):
        r.unregister("a")


def test_science_imports_no_orchestration():
    pattern = re.compile(r"^\s*(import|from)\s+(ray|optuna|mlflow)\b", re.M)
    offenders = []
    for part in SCIENCE:
        p = PKG / part
        for f in [p] if p.is_file() else sorted(p.rglob("*.py")):
            if pattern.search(f.read_text()):
                offenders.append(str(f.relative_to(PKG)))
    assert offenders == []


def test_only_tracking_imports_mlflow():
    pattern = re.compile(r"^\s*(import|from)\s+mlflow\b", re.M)
    found = sorted(str(f.relative_to(PKG)) for f in PKG.rglob("*.py") if pattern.search(f.read_text()))
    assert found in ([], ["tracking.py"])


def test_no_unsafe_loads_in_package():
    unsafe = []
    for f in PKG.rglob("*.py"):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if "# safe-load:" in line:  # an explicit, reviewed exemption that says why the file is trusted
                continue
            if re.search(r"torch\.load\(", line) and "weights_only=True" not in line:
                unsafe.append(f"{f.name}:{i}")
            if re.search(r"\bpickle\.loads?\(|yaml\.load\(|yaml\.unsafe_load|allow_pickle=True", line):
                unsafe.append(f"{f.name}:{i}")
    assert unsafe == []
