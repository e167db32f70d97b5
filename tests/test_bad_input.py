"""The bad-input catalogue (docs/errors.md): every case answered before any compute with one line on stderr,
exit status 2, no traceback, and nothing created (no teacher cache entry, no study folder, no mlflow.db).

Most cases run main() in-process (fast); a few run the installed command in a subprocess, as a user would.
Each case names a fragment of its message, so a case answered for the wrong reason fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from abd_ray.cli import main

GOOD = {"name": "bad", "dataset": "digits", "attacks": ["badnet_grid"], "synthesizers": ["zskt"],
        "defenses": ["none"], "budget": {"steps": 4, "eval_every": 2}, "teacher": {"epochs": 1}}


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PAYLOAD_RAN",))


def _files(tmp: Path) -> None:
    """The inputs the cases point at: damaged, hostile or misfitting files, and study files."""
    from abd_ray.models import build_model

    (tmp / "garbage.png").write_bytes(b"not an image")
    torch.save({"fc.weight": _Payload()}, tmp / "evil.pt")
    small = build_model("cnn_s", num_classes=10, shape=(1, 8, 8), mean=(0.0,), std=(1.0,))
    torch.save(small.state_dict(), tmp / "misfit.pt")  # a cnn_s state_dict named as the cnn_l digits teacher
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(64)}, str(tmp / "t.safetensors"))
    (tmp / "trunc.safetensors").write_bytes((tmp / "t.safetensors").read_bytes()[:40])
    (tmp / "empty_root").mkdir()

    def study(file: str, **over) -> None:
        d = {**GOOD, **over}
        (tmp / f"{file}.yaml").write_text(yaml.safe_dump({k: v for k, v in d.items() if v is not None}))

    study("good")
    study("unknown_key", budgt={"steps": 3})
    study("escape", name="../escape")
    study("absolute", name="/etc/abd")
    study("evil_teacher", teacher_file=str(tmp / "evil.pt"))
    study("misfit_teacher", teacher_file=str(tmp / "misfit.pt"))
    study("no_data_root", data_root=str(tmp / "nowhere"))
    study("empty_root", dataset="cifar10", data_root=str(tmp / "empty_root"))
    study("bad_pattern", attack={"pattern_file": str(tmp / "garbage.png")})
    study("bad_fault", faults=[{"seed": 0}])
    study("eval_gt_steps", budget={"steps": 4, "eval_every": 8})
    study("shuffle_too_deep", defenses=["none", "sv"], defense_params={"sv": {"n_shuf_layer": 99}})
    study("search_too_deep", mode="search", search={"defense": "abd", "num_samples": 2,
                                                    "space": {"n_shuf_layer": {"choices": ["auto", -7]}}})
    study("search_sr_unconditional", mode="search", search={"defense": "abd", "num_samples": 2, "space": {
        "sr": {"choices": ["on", "off"]}, "inner_round": {"low": 3, "high": 10}}})
    study("search_enqueue_outside", mode="search", search={"defense": "abd", "num_samples": 2, "enqueue": [
        {"coef": 20.0}], "space": {"coef": {"low": 1.0, "high": 4.0}}})
    (tmp / "latin1.yaml").write_bytes((tmp / "good.yaml").read_bytes() + "description: caf\xe9\n".encode("latin-1"))
    (tmp / "tag.yaml").write_text((tmp / "good.yaml").read_text() + "x: !!python/object/apply:os.system [echo]\n")
    (tmp / "broken.yaml").write_text("name: [unclosed\n")
    (tmp / "list.yaml").write_text("- a\n- b\n")


# (argv with {tmp} for the case folder, a fragment of the one-line message)
CASES = [
    # abd-ray teacher
    ("teacher --dataset mnist", "unknown dataset 'mnist'; known datasets:"),
    ("teacher --attack badnet", "unknown attack 'badnet'; known attacks:"),
    ("teacher --arch wrn99", "unknown model 'wrn99'; known classifiers:"),
    ("teacher --poison-ratio 0", "is outside (0, 1]"),
    ("teacher --target 10", "target=10 is not a class; allowed: 0..9"),
    ("teacher --epochs 0", "epochs=0 must be a positive integer"),
    ("teacher --epochs abc", "argument --epochs: invalid int value: 'abc'"),
    ("teacher --device cuda", "no CUDA device is visible"),
    ("teacher --dataset cifar10 --data-root {tmp}/nowhere", "cifar-10-batches-py"),
    ("teacher --pattern-file {tmp}/nowhere.png", "does not exist"),
    ("teacher --pattern-file {tmp}/garbage.png", "pattern file"),
    ("teacher --teacher-file {tmp}/evil.pt", "would run code when loaded"),
    ("teacher --teacher-file {tmp}/trunc.safetensors", "unreadable or truncated"),
    ("teacher --teacher-file {tmp}/misfit.pt", "does not fit architecture 'cnn_l'"),
    ("teacher --teacher-file {tmp}/nowhere.pt", "does not exist"),
    # abd-ray distill and --set
    ("distill --synthesizer zsk", "zsk"),
    ("distill --defense abdd", "abdd"),
    ("distill --steps -5", "steps=-5 must be a positive integer"),
    ("distill --set steps=0", "steps=0 must be a positive integer"),
    ("distill --set bogus=1", "unknown key 'bogus'; allowed:"),
    ("distill --set attack.colour=1", "unknown key 'attack.colour'; allowed attack keys:"),
    ("distill --set novalue", "--set 'novalue' is not key=value"),
    ("distill --defense sv --set defense.bogus=1", "unknown hyperparameter(s) ['bogus']"),
    ("distill --defense sv --set defense.n_shuf_layer=99", "defense.n_shuf_layer=99 does not fit a teacher with 3"),
    ("distill --defense abd --set defense.fixed_mode=ignore", "fixed_mode='ignore' is not allowed; allowed: drop"),
    ("distill --teacher-file {tmp}/evil.pt", "would run code when loaded"),
    ("distill --teacher-file {tmp}/misfit.pt", "does not fit architecture"),
    ("distill --pattern-file {tmp}/garbage.png", "pattern file"),
    ("distill --student-file {tmp}/evil.pt", "refusing student file"),
    ("distill --student-file {tmp}/nowhere.pt", "nowhere.pt' does not exist; give a student weights file"),
    # abd-ray study: files, names, services
    ("study {tmp}/nowhere.yaml", "does not exist; e.g. studies/quickstart.yaml"),
    ("study {tmp}/broken.yaml", "not valid YAML"),
    ("study {tmp}/latin1.yaml", "latin1.yaml is not UTF-8 text (byte 0xe9 on line"),
    ("study {tmp}/tag.yaml", "tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed"),
    ("study {tmp}/list.yaml", "must be a YAML mapping"),
    ("study {tmp}/unknown_key.yaml", "budgt: unknown key (did you mean 'budget'?)"),
    ("study {tmp}/escape.yaml", "name: '../escape' is not a valid study name"),
    ("study {tmp}/absolute.yaml", "name: '/etc/abd' is not a valid study name"),
    ("study {tmp}/good.yaml --name ../up", "--name '../up' is not a valid study name"),
    ("study {tmp}/good.yaml --name /abs/x", "--name '/abs/x' is not a valid study name"),
    ("study {tmp}/good.yaml --tracking-uri file:///tmp/mlruns", "is a file store"),
    ("study {tmp}/good.yaml --max-acc-drop -1", "--max-acc-drop -1.0 must be a number >= 0"),
    ("study {tmp}/evil_teacher.yaml", "would run code when loaded"),
    ("study {tmp}/misfit_teacher.yaml", "does not fit architecture"),
    ("study {tmp}/no_data_root.yaml", "data_root: "),
    ("study {tmp}/empty_root.yaml", "cifar-10-batches-py"),
    ("study {tmp}/bad_pattern.yaml", "pattern file"),
    ("study {tmp}/bad_fault.yaml", "faults[0]: names no fault"),
    ("study {tmp}/eval_gt_steps.yaml", "the run would never be evaluated"),
    ("study {tmp}/shuffle_too_deep.yaml", "defense.n_shuf_layer=99 does not fit a teacher with 3 convolutions"),
    ("study {tmp}/search_too_deep.yaml", "defense.n_shuf_layer=-7 does not fit a teacher with 3 convolutions"),
    ("study {tmp}/search_sr_unconditional.yaml", "search.space.inner_round: means nothing with sr off"),
    ("study {tmp}/search_enqueue_outside.yaml", "search.enqueue[0].coef: 20.0 is outside its range 1..4"),
    ("study {tmp}/good.yaml --address 127.0.0.1:1", "no Ray cluster answers at 127.0.0.1:1 (Connection refused)"),
    ("study {tmp}/good.yaml --address head", "--address 'head' is not host:port"),
    # abd-ray resume / report / status / dashboard
    ("resume {tmp}/nowhere", "holds no abd-ray study (study.json is missing)"),
    ("report {tmp}/nowhere", "holds no abd-ray study (study.json is missing)"),
    ("report .", "holds no abd-ray study (study.json is missing)"),
    ("status {tmp}/nowhere", "holds no abd-ray study (study.json is missing)"),
    ("dashboard {tmp}/nowhere", "holds no abd-ray study (study.json is missing)"),
    ("list --bogus", "unrecognized arguments: --bogus"),
]
# Run through the installed command in a subprocess too (exit status and stderr as a shell sees them).
SUBPROCESS = {"teacher --teacher-file {tmp}/evil.pt", "distill --teacher-file {tmp}/evil.pt",
              "study {tmp}/evil_teacher.yaml", "study {tmp}/tag.yaml", "distill --set bogus=1", "teacher --epochs abc"}


@pytest.fixture
def case_dir(tmp_path, monkeypatch):
    _files(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ABD_RAY_CACHE", raising=False)
    monkeypatch.delenv("ABD_RAY_STORAGE", raising=False)
    return tmp_path


def _snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _check(code: int, err: str, needle: str, before: set[str], root: Path) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error:" in lines[0]
    assert needle in lines[0], lines[0]
    created = _snapshot(root) - before
    assert not created, f"created {sorted(created)}"  # no cache entry, study folder, mlflow.db or payload mark


@pytest.mark.parametrize("argv,needle", CASES, ids=[c[0].replace("{tmp}/", "") for c in CASES])
def test_bad_input(case_dir, capsys, argv, needle):
    args = [a.replace("{tmp}", str(case_dir)) for a in argv.split()]
    before = _snapshot(case_dir)
    if argv in SUBPROCESS:
        r = subprocess.run([sys.executable, "-c", "import sys; from abd_ray.cli import main; sys.exit(main())",
                            *args], capture_output=True, text=True, cwd=case_dir, timeout=120)
        assert r.stdout == ""
        _check(r.returncode, r.stderr, needle, before, case_dir)
        return
    try:
        code = main(args)
    except SystemExit as e:  # argparse's own errors exit from inside main()
        code = e.code
    out, err = capsys.readouterr()
    assert out == ""
    _check(code, err, needle, before, case_dir)


def test_debug_shows_the_traceback(case_dir):
    with pytest.raises(ValueError, match="does not exist"):
        main(["--debug", "study", str(case_dir / "nowhere.yaml")])


def test_catalogue_is_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    missing = [argv for argv, _ in CASES if f"`abd-ray {argv.replace('{tmp}/', '')}`" not in doc]
    assert not missing, f"docs/errors.md lacks {missing}"
    assert len(CASES) >= 25
