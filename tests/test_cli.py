"""The abd-ray command: listing, teachers, and one-line errors with exit status 2 for bad input."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from abd_ray.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_json_names_everything(capsys):
    code, out, _ = run(capsys, "list", "--json")
    listing = json.loads(out)
    assert code == 0
    assert len(listing["attacks"]) == 11 and "badnet_grid" in listing["attacks"]
    assert {"wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2", "resnet18", "resnet34", "vgg11", "vgg16"} <= set(
        listing["models"]
    )
    assert "digits" in listing["datasets"] and "none" in listing["defenses"]


def test_teacher_json_then_cached(capsys, digits_teacher):
    _, cache = digits_teacher
    code, out, _ = run(
        capsys, "teacher", "--dataset", "digits", "--attack", "badnet_grid", "--cache", str(cache), "--json"
    )
    res = json.loads(out)
    assert code == 0 and res["cached"] is True and res["clean_acc"] >= 97 and res["asr"] >= 95
    assert {"clean_acc", "asr", "robust_acc", "path", "cached"} <= set(res)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["teacher", "--dataset", "mnist"], "unknown dataset 'mnist'; known datasets: cifar10"),
        (["teacher", "--attack", "badnet"], "unknown attack 'badnet'; known attacks: none, badnet_grid"),
        (["teacher", "--arch", "wrn99"], "unknown model 'wrn99'; known classifiers: cnn_l"),
        (["teacher", "--poison-ratio", "0"], r"poison_ratio=0.0 is outside \(0, 1\]"),
        (["teacher", "--poison-ratio", "1.01"], r"outside \(0, 1\]"),
        (["teacher", "--target", "10"], r"target=10 is not a class; allowed: 0..9"),
        (["teacher", "--epochs", "0"], "epochs=0 must be a positive integer"),
        (["teacher", "--dataset", "cifar10", "--data-root", "/nonexistent/abd"], "missing cifar-10-batches-py"),
        (["teacher", "--pattern-file", "/nonexistent/p.png"], "pattern_file='/nonexistent/p.png' does not exist"),
    ],
)
def test_bad_input_one_line_exit_2(capsys, argv, match, tmp_path):
    code, out, err = run(capsys, *argv, "--cache", str(tmp_path))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    import re

    assert re.search(match, err), err
    assert not (tmp_path / "teachers").exists() or not any((tmp_path / "teachers").iterdir())


def test_bad_teacher_files(capsys, tmp_path, digits_teacher):
    teacher, _ = digits_teacher
    trunc = tmp_path / "t.safetensors"
    trunc.write_bytes((teacher.path / "teacher.safetensors").read_bytes()[:200])
    code, _, err = run(capsys, "teacher", "--teacher-file", str(trunc))
    assert code == 2 and "unreadable or truncated" in err and len(err.strip().splitlines()) == 1

    class Payload:
        def __reduce__(self):
            return (print, ("payload ran",))

    evil = tmp_path / "evil.pt"
    torch.save({"fc.weight": Payload()}, evil)
    code, out, err = run(capsys, "teacher", "--teacher-file", str(evil))
    assert code == 2 and "would run code" in err and "payload ran" not in out + err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "abd_ray.cli", "list"], capture_output=True, text=True, check=True)
    assert "attacks" in out.stdout


def test_the_library_never_imports_the_cli():
    pkg = Path(__file__).resolve().parents[1] / "abd_ray"
    pattern = re.compile(r"^\s*(import|from)\s+abd_ray\.cli\b", re.M)
    offenders = [str(f.relative_to(pkg)) for f in sorted(pkg.rglob("*.py"))
                 if f.relative_to(pkg).parts[0] != "cli" and pattern.search(f.read_text())]
    assert offenders == []
