"""Teachers: metrics of the default digits teacher, the content-addressed cache, safe loading."""

import json
import multiprocessing as mp
import os
import pickle

import pytest
import torch

from abd_ray.attacks import AttackSpec
from abd_ray.config import TeacherSpec
from abd_ray.engine.repro import cpu_model, processor
from abd_ray.engine.teacher import (
    META,
    WEIGHTS,
    TeacherFileError,
    cache_folder,
    get_teacher,
    load_artifact,
    load_external,
    teacher_key,
)

TINY = dict(epochs=2)


def test_default_digits_teacher_is_poisoned_and_accurate(digits_teacher):
    teacher, _ = digits_teacher
    assert teacher.metrics["clean_acc"] >= 97 and teacher.metrics["asr"] >= 95
    meta = json.loads((teacher.path / META).read_text())
    assert meta["spec"]["attack"]["name"] == "badnet_grid" and meta["budget"]["epochs"] == 30
    assert {"clean_acc", "asr", "robust_acc"} <= set(meta["metrics"]) and meta["code_version"]
    assert meta["poisoned"] == round(0.1 * 1347)


def test_cache_reuses_and_key_tracks_spec(digits_teacher):
    teacher, cache = digits_teacher
    again = get_teacher(TeacherSpec.for_dataset("digits"), cache, progress=False)
    assert again.cached and again.meta["weights_sha256"] == teacher.meta["weights_sha256"]
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(again.model(x), teacher.model.eval()(x), atol=1e-6)
    base = TeacherSpec.for_dataset("digits")
    assert teacher_key(base) == teacher_key(TeacherSpec.for_dataset("digits"))
    assert teacher_key(base) != teacher_key(TeacherSpec.for_dataset("digits", AttackSpec("blend")))
    assert teacher_key(base) != teacher_key(TeacherSpec.for_dataset("digits", seed=1))


def test_clean_teacher_has_no_asr(tmp_path):
    t = get_teacher(TeacherSpec.for_dataset("digits", AttackSpec("none"), **TINY), tmp_path, progress=False)
    assert t.meta["poisoned"] == 0 and t.metrics["clean_acc"] > 50 and t.metrics["asr"] != t.metrics["asr"]  # NaN


def _ask(cache, q):
    spec = TeacherSpec.for_dataset("digits", AttackSpec("badnet_sq"), **TINY)
    t = get_teacher(spec, cache, progress=False)
    q.put((t.cached, t.meta["weights_sha256"]))


@pytest.mark.slow
def test_two_processes_train_one_spec_once(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ask, args=(str(tmp_path), q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    results = sorted(q.get(timeout=5) for _ in procs)
    assert [r[0] for r in results] == [False, True], "exactly one process trains, the other reuses"
    assert results[0][1] == results[1][1]


def test_truncated_cached_teacher_is_detected_and_retrained(tmp_path):
    spec = TeacherSpec.for_dataset("digits", **TINY)
    first = get_teacher(spec, tmp_path, progress=False)
    w = cache_folder(spec, tmp_path) / WEIGHTS
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(TeacherFileError, match="SHA-256"):
        load_artifact(w.parent)
    with pytest.warns(UserWarning, match="damaged, retraining"):
        again = get_teacher(spec, tmp_path, progress=False)
    assert not again.cached and again.meta["weights_sha256"] == first.meta["weights_sha256"]  # deterministic


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/abd_ray_pwned",))


def test_pickled_code_is_refused(tmp_path, digits_teacher):
    teacher, _ = digits_teacher
    bad = tmp_path / "evil.pt"
    state = dict(teacher.model.state_dict())
    state["fc.weight"] = _Payload()
    torch.save(state, bad)
    (tmp_path / META).write_text((teacher.path / META).read_text())
    with pytest.raises(TeacherFileError, match="would run code"):
        load_external(bad)
    assert not os.path.exists("/tmp/abd_ray_pwned")
    # a raw pickle too
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(TeacherFileError, match="would run code|unreadable"):
        load_external(raw)
    assert not os.path.exists("/tmp/abd_ray_pwned")


def test_external_state_dict_loads_and_misfit_is_refused(tmp_path, digits_teacher):
    teacher, _ = digits_teacher
    good = tmp_path / "t.pt"
    torch.save(teacher.model.state_dict(), good)
    (tmp_path / META).write_text((teacher.path / META).read_text())
    t = load_external(good)
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(t.model(x), teacher.model.eval()(x), atol=1e-6)
    misfit = tmp_path / "m.pt"
    sd = dict(teacher.model.state_dict())
    sd["fc.weight"] = torch.zeros(5, 3)
    torch.save(sd, misfit)
    with pytest.raises(TeacherFileError, match="does not fit architecture 'cnn_l'"):
        load_external(misfit)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[:300])
    with pytest.raises(TeacherFileError, match="unreadable or truncated"):
        load_external(trunc)
    with pytest.raises(TeacherFileError, match="does not exist"):
        load_external(tmp_path / "none.pt")


def test_teacher_command_and_distill_train_the_same_weights(tmp_path, capsys):
    """One spec, one teacher: the `abd-ray teacher` command (torch's threads at 2 beforehand) and a distillation
    that trains its own teacher in another fresh cache end with byte-identical weights and the same environment."""
    from abd_ray.cli import main
    from abd_ray.config import RunConfig
    from abd_ray.engine.distill import distill

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["teacher", "--dataset", "digits", "--cache", str(tmp_path / "a"), "--json"]) == 0
    finally:
        torch.set_num_threads(before)
    out = json.loads(capsys.readouterr().out)
    assert out["environment"]["threads"] == 1 and out["environment"]["device"] == "cpu"
    assert out["environment"]["processor"] == processor(torch.device("cpu"))
    assert cpu_model() in out["environment"]["processor"] and "kernels" in out["environment"]["processor"]
    assert not out["cached"] and out["trained_elsewhere"] == []
    cfg = RunConfig(steps=1, eval_every=1, batch_size=16, device="cpu", cache_dir=str(tmp_path / "b"))
    distill(cfg, progress=False)
    spec = TeacherSpec.for_dataset("digits")
    a, b = (json.loads((cache_folder(spec, tmp_path / c) / META).read_text()) for c in "ab")
    assert a["weights_sha256"] == b["weights_sha256"]
    assert a["environment"] == b["environment"]


def test_cache_hit_trained_elsewhere_is_used_and_named(tmp_path):
    spec = TeacherSpec.for_dataset("digits", **TINY)
    first = get_teacher(spec, tmp_path, progress=False)
    meta_path = cache_folder(spec, tmp_path) / META
    meta = json.loads(meta_path.read_text())
    meta["environment"] = {**meta["environment"], "threads": 7, "torch": "0.0.1"}
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="trained in another environment: torch '0.0.1'.*threads 7"):
        again = get_teacher(spec, tmp_path, progress=False)
    assert again.cached and again.meta["weights_sha256"] == first.meta["weights_sha256"]  # not retrained
    assert len(again.trained_elsewhere) == 2
    # another CPU model picks other kernels: the same spec trains to other last bits there
    meta["environment"] = {**first.meta["environment"], "processor": "Some Other CPU"}
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="processor 'Some Other CPU'"):
        assert get_teacher(spec, tmp_path, progress=False).trained_elsewhere == [
            f"processor 'Some Other CPU' (here {processor(torch.device('cpu'))!r})"]
    del meta["environment"]  # an artifact from before environments were recorded
    meta_path.write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="not recorded"):
        assert get_teacher(spec, tmp_path, progress=False).cached


@pytest.mark.parametrize("name", ["cl", "sig"])
def test_only_an_adversarial_trigger_trains_a_clean_model_for_pgd(name, tmp_path, monkeypatch):
    import abd_ray.engine.teacher as teacher_mod
    from abd_ray.attacks import make_trigger

    calls = []
    real = teacher_mod.pgd
    monkeypatch.setattr(teacher_mod, "pgd", lambda model, x, y, **kw: calls.append(len(x)) or real(model, x, y, **kw))
    spec = TeacherSpec.for_dataset("digits", AttackSpec(name), epochs=1)
    t = get_teacher(spec, tmp_path, progress=False)
    adversarial = make_trigger(spec.attack, (1, 8, 8)).adversarial
    assert adversarial == (name == "cl")
    assert calls == ([t.meta["poisoned"]] if adversarial else [])
