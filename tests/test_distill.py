"""The KD loop: reports, defense hooks, state files, resumed == uninterrupted, bad input, and the CLI."""

import json
import math

import pytest
import torch

from abd_ray.config import RunConfig, TeacherSpec
from abd_ray.defenses.base import Defense
from abd_ray.engine.distill import DistillResult, check_config, distill, load_state, save_state
from abd_ray.registry import DEFENSES, SYNTHESIZERS

TINY = {"deepinversion": {"iters": 3, "round_every": 2}, "cmi": {"g_steps": 3, "round_every": 2, "n_neg": 32}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """8x8 convolutions: one thread is as fast as two, and does not collapse when the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache holding a 3-epoch digits teacher (badnet_grid), the teacher of every run below."""
    from abd_ray.engine.teacher import get_teacher

    root = tmp_path_factory.mktemp("cache")
    get_teacher(TeacherSpec.for_dataset("digits", epochs=3), root, progress=False)
    return root


@pytest.fixture(scope="module")
def teacher(cache):
    from abd_ray.engine.teacher import get_teacher

    return get_teacher(TeacherSpec.for_dataset("digits", epochs=3), cache, progress=False)


def cfg_for(name="zskt", steps=6, **kw):
    params = {**TINY.get(name, {}), **kw.pop("synth", {})}
    return RunConfig(
        synthesizer=name,
        steps=steps,
        eval_every=kw.pop("eval_every", 2),
        batch_size=16,
        synth=params,
        device="cpu",
        **kw,
    )


def test_report_history_and_result(teacher):
    seen = []
    res = distill(
        cfg_for("zskt", steps=5),
        teacher=teacher,
        progress=False,
        report=lambda m, step, get_state: seen.append((step, m, get_state())),
    )
    assert isinstance(res, DistillResult)
    assert [s for s, _, _ in seen] == [2, 4, 5]  # every eval_every steps and at the end
    for key in (
        "clean_acc",
        "asr",
        "robust_acc",
        "teacher_clean_acc",
        "teacher_asr",
        "teacher_robust_acc",
        "loss_kd",
        "loss_gen",
        "step_time_s",
    ):
        assert key in seen[0][1], key
    assert [h["step"] for h in res.history] == [2, 4, 5]
    assert res.metrics["clean_acc"] == seen[-1][1]["clean_acc"] and res.metrics["wall_s"] > 0
    assert seen[0][1]["teacher_asr"] == seen[-1][1]["teacher_asr"] > 50  # the backdoored teacher, measured once
    assert res.samples.shape == (16, 1, 8, 8)
    assert seen[0][2]["step"] == 2 and seen[1][2]["step"] == 4


@pytest.mark.parametrize("synth", ["zskt", "cmi"])
def test_resumed_run_ends_where_the_uninterrupted_run_ends(synth, teacher, tmp_path):
    states = {}
    cfg = cfg_for(synth, steps=6, seed=3)
    full = distill(
        cfg, teacher=teacher, progress=False, report=lambda m, step, get_state: states.__setitem__(step, get_state())
    )
    path = tmp_path / "state.pt"
    save_state(states[2], path)
    assert not list(tmp_path.glob("*.tmp"))
    resumed = distill(cfg, teacher=teacher, progress=False, resume_state=load_state(path))
    for (k, a), (_, b) in zip(full.student.state_dict().items(), resumed.student.state_dict().items(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), k
    for key in ("clean_acc", "asr", "robust_acc", "loss_kd"):
        assert resumed.metrics[key] == pytest.approx(full.metrics[key], abs=1e-4), key
    assert [h["step"] for h in resumed.history] == [2, 4, 6]
    assert torch.allclose(full.samples, resumed.samples, atol=1e-5)


def test_state_files_are_weights_only(tmp_path, teacher):
    states = []
    distill(
        cfg_for("zskt", steps=2),
        teacher=teacher,
        progress=False,
        report=lambda m, s, get_state: states.append(get_state()),
    )
    path = tmp_path / "s.pt"
    save_state(states[-1], path)
    assert load_state(path)["step"] == 2
    torch.save({"format": "abd-ray-distill/1", "evil": Defense()}, tmp_path / "bad.pt")  # a pickled object
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        load_state(tmp_path / "bad.pt")
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an abd-ray distillation state"):
        load_state(tmp_path / "other.pt")


class Recorder(Defense):
    """A defense that records every hook call the loop makes."""

    defaults = {"start": 3}
    calls: list = []

    def bind(self, teacher, student, shape, num_classes, total_steps, generator, *, fixed_data):
        Recorder.calls.append(("bind", total_steps, fixed_data))

    def observe(self, batch, step):
        Recorder.calls.append(("observe", step))

    def generator_term(self, batch):
        Recorder.calls.append(("generator_term", batch.x.requires_grad))
        return batch.x.sum() * 0.0

    def student_loss(self, per_sample, batch):
        Recorder.calls.append(("student_loss", tuple(per_sample.shape)))
        return per_sample.mean()

    def stage2_start(self, total_steps):
        return self.params["start"]

    def stage2_lr(self):
        return 0.5

    def add_student_grads(self, student, teacher, x, step):
        Recorder.calls.append(("add_student_grads", step, float(next(student.parameters()).grad is None)))

    def metrics(self):
        return {"rec_metric": 1.0}

    def state_dict(self):
        return {"n": len(Recorder.calls)}


@pytest.fixture
def recorder_defense():
    """The recording defense, registered for one test only (other tests read the registry's names)."""
    DEFENSES.register("test_recorder")(Recorder)
    yield "test_recorder"
    DEFENSES.unregister("test_recorder")


def test_every_defense_hook_is_called_where_documented(teacher, recorder_defense):
    Recorder.calls = []
    lrs = []
    res = distill(
        cfg_for("zskt", steps=5, defense=recorder_defense, synth={"n_s": 2}),
        teacher=teacher,
        progress=False,
        report=lambda m, s, g: lrs.append((s, m["lr_s"], g()["defense"])),
    )
    names = [c[0] for c in Recorder.calls]
    assert names.count("bind") == 1 and Recorder.calls[0] == ("bind", 5, False)
    assert [c[1] for c in Recorder.calls if c[0] == "observe"] == [0, 1, 2, 3, 4]  # one batch per pseudo batch
    assert names.count("generator_term") == 5 and all(c[1] for c in Recorder.calls if c[0] == "generator_term")
    assert names.count("student_loss") == 10 and ("student_loss", (16,)) in Recorder.calls
    # after zero_grad (grads are None), from stage2_start on, once per student step
    assert [c[1:] for c in Recorder.calls if c[0] == "add_student_grads"] == [(3, 1.0), (3, 1.0), (4, 1.0), (4, 1.0)]
    assert res.metrics["rec_metric"] == 1.0
    # stage 2 restarts the cosine at stage2_lr: step 3 of 5 runs at 0.5 * (1 + cos(pi * 0 / 2)) / 2 = 0.5
    # (reports come after steps 2, 4 and 5, i.e. after step indices 1, 3 and 4)
    by_step = {s: lr for s, lr, _ in lrs}
    assert by_step[2] == pytest.approx(2e-3 * 0.5 * (1 + math.cos(math.pi * 1 / 5)))
    assert by_step[4] == pytest.approx(0.5) and by_step[5] == pytest.approx(0.25)
    assert all(isinstance(d, dict) and "n" in d for _, _, d in lrs)  # defense.state_dict() is in the loop state


@pytest.mark.parametrize("synth", SYNTHESIZERS.names())
def test_every_synthesizer_runs_through_the_loop(synth, teacher):
    res = distill(cfg_for(synth, steps=3), teacher=teacher, progress=False)
    assert all(v == v for k, v in res.metrics.items() if k not in ("asr", "robust_acc")), res.metrics
    assert res.samples.shape[1:] == (1, 8, 8)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(synthesizer="nope"), r"unknown synthesizer 'nope'; known synthesizers: clean, cmi, dafl"),
        (dict(steps=0), r"steps=0 must be a positive integer"),
        (dict(steps=-5), r"steps=-5 must be a positive integer"),
        (dict(eval_every=0), r"eval_every=0"),
        (dict(synthesizer="ood", synth={"image": "/no/such/image.jpg"}), r"synth.image='/no/such/image.jpg' does not"),
        (dict(synth={"bogus": 1}), r"unknown key\(s\) synth.bogus; allowed"),
        (dict(defense="nope"), r"unknown defense 'nope'"),
        (dict(student_arch="nope"), r"unknown model 'nope'"),
        (dict(teacher_file="/no/teacher.safetensors"), r"does not exist"),
    ],
)
def test_bad_input_is_refused_before_compute(change, match):
    with pytest.raises(ValueError, match=match):
        check_config(RunConfig(**change))


def test_cli_errors_are_one_line(capsys):
    from abd_ray.cli import main

    for argv, match in (
        (["distill", "--synthesizer", "nope"], "known synthesizers: clean, cmi"),
        (["distill", "--steps", "0"], "steps=0 must be a positive integer"),
        (["distill", "--synthesizer", "ood", "--set", "synth.image=/no/such.png"], "does not exist"),
        (["distill", "--set", "synth.nope=1"], "unknown key(s) synth.nope"),
        (["distill", "--set", "nope=1"], "unknown key 'nope'"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err


def test_cli_json(teacher, tmp_path, capsys):
    from abd_ray.cli import main

    argv = ["distill", "--teacher-file", str(teacher.path), "--cache", str(tmp_path), "--steps", "4"]
    assert main([*argv, "--set", "eval_every=2", "--set", "batch_size=16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out) == {"clean_acc", "asr", "robust_acc", "teacher_clean_acc", "teacher_asr", "wall_s", "details"}
    assert {"loss_kd", "lr_s", "cpu_s"} <= set(out["details"]) and "clean_acc" not in out["details"]
    assert out["teacher_asr"] > 50 and 0 <= out["clean_acc"] <= 100
    assert main(argv) == 0  # the human summary
    text = capsys.readouterr().out
    assert "student clean_acc" in text and "teacher clean_acc" in text


def test_student_file_starts_the_student_from_saved_weights_and_sr_runs_as_a_second_stage(teacher, tmp_path, capsys):
    """A student saved by one run (as a trial's student.safetensors) is where a second run starts: with SR from
    step 0 and a tiny learning rate, it ends where the first left off rather than at a fresh student's accuracy.
    A file that does not fit, or that carries code, is refused before compute."""
    from safetensors.torch import save_file

    from abd_ray.cli import main

    first = distill(cfg_for("clean", steps=30, eval_every=30), teacher=teacher, progress=False)
    path = tmp_path / "student.safetensors"
    save_file({k: v.detach().contiguous() for k, v in first.student.state_dict().items()}, str(path))
    fresh = distill(cfg_for("clean", steps=1, eval_every=1, seed=7), teacher=teacher, progress=False)
    cfg = cfg_for("clean", steps=2, eval_every=2, seed=7, student_file=str(path), defense="sr",
                  defense_params={"sr_start": 0.0, "sup_resume_lr": 1e-6, "inner_round": 2, "K": 1})
    second = distill(cfg, teacher=teacher, progress=False)
    assert second.metrics["sr_steps"] == 2 and math.isfinite(second.metrics["clean_acc"])
    assert abs(second.metrics["clean_acc"] - first.metrics["clean_acc"]) < 2.0
    assert first.metrics["clean_acc"] - fresh.metrics["clean_acc"] > 20  # a saved student is not a fresh one

    with pytest.raises(ValueError, match="student_file='/no/such' does not exist"):
        check_config(cfg_for("clean", student_file="/no/such"))
    misfit = tmp_path / "misfit.safetensors"
    save_file({"fc.weight": torch.zeros(3, 3)}, str(misfit))
    code = tmp_path / "code.pt"
    torch.save({"fc.weight": torch.zeros(1), "x": object.__new__(DistillResult)}, code)
    for bad, match in ((misfit, "does not fit the student architecture"), (code, "refusing student file")):
        argv = ["distill", "--teacher-file", str(teacher.path), "--cache", str(tmp_path), "--student-file", str(bad)]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err



@pytest.mark.slow
def test_distillation_in_process_and_in_a_ray_task_agree(cache):
    """A trial's metrics do not depend on where it runs: in this process (torch at 2 threads beforehand) and in a
    Ray worker (which Ray starts with OMP_NUM_THREADS=1), as a study's workers run it."""
    import ray

    def metrics_of(flat: dict) -> dict:
        """The run's metrics without its timings (what may differ between two identical runs)."""
        res = distill(RunConfig.from_flat(flat), progress=False)
        return {k: v for k, v in res.metrics.items() if not k.endswith(("wall_s", "cpu_s", "time_s"))}

    flat = {**cfg_for("zskt", steps=4, defense="abd").to_flat(), "cache_dir": str(cache)}
    torch.set_num_threads(2)
    try:
        here = metrics_of(flat)
    finally:
        torch.set_num_threads(1)
    ray.init(
        address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR"
    )
    try:
        there = ray.get(ray.remote(metrics_of).remote(flat), timeout=300)
    finally:
        ray.shutdown()
    assert {"clean_acc", "asr", "loss_kd", "teacher_clean_acc"} <= set(here)
    assert here == there


# Every SR option at its non-default value: the original's forms (a CMI-like combination of them).
PAPER_LIKE_SR = {
    "sr_start": 0.5, "inner_round": 3, "K": 2, "pert_model": "teacher", "hg_ref": "student", "sr_max_ratio": None,
    "pert_space": "normalized", "pert_init": "zero", "search_l2": 0.0, "sr_loss": "batchmean_t2", "sr_T": 4.0,
    "sr_bn": "train", "inner_detach_clean": True, "hg_ref_grad": True, "hg_out_rounding": "floor", "sr_clip": None,
    "sr_fresh_opt": True,
}


def test_sr_with_every_original_form_runs_with_a_fresh_optimiser_no_stage2_clip_and_resumes_exactly(
    teacher, tmp_path, monkeypatch
):
    """Stage 2 (from step 3 of 6) starts a fresh Adam and clips nothing; a run stopped before it (state 2) or
    inside it (state 4) and resumed ends where the uninterrupted run ends."""
    import types

    import abd_ray.engine.distill as loop

    clips = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(loop, "nn", types.SimpleNamespace(utils=types.SimpleNamespace(
        clip_grad_norm_=lambda params, max_norm: clips.append(max_norm) or real_clip(params, max_norm))))
    states = {}
    cfg = cfg_for("zskt", steps=6, seed=3, defense="sr", defense_params=PAPER_LIKE_SR)
    full = distill(cfg, teacher=teacher, progress=False,
                   report=lambda m, s, get_state: states.__setitem__(s, get_state()))
    assert full.metrics["sr_steps"] > 0 and all(math.isfinite(v) for k, v in full.metrics.items()
                                                 if k not in ("asr", "robust_acc")), full.metrics
    assert {"sr_flip0", "sr_trigger_target_rate", "sr_student_target_rate", "sr_trigger_cos"} <= set(full.metrics)
    per_step = states[2]["opt_s"]["state"][0]["step"] / 2  # student steps per loop step
    assert states[4]["opt_s"]["state"][0]["step"] == per_step  # new moments from step 3: one loop step's worth
    assert states[6]["opt_s"]["state"][0]["step"] == 3 * per_step
    assert len(clips) == 3 * per_step and set(clips) == {5.0}  # the synthesizer's clip in stage 1 only
    for at in (2, 4):
        path = tmp_path / f"state{at}.pt"
        save_state(states[at], path)
        resumed = distill(cfg, teacher=teacher, progress=False, resume_state=load_state(path))
        for (k, a), (_, b) in zip(full.student.state_dict().items(), resumed.student.state_dict().items(),
                                  strict=True):
            assert torch.allclose(a.float(), b.float(), atol=1e-5), (at, k)
        for key in ("clean_acc", "asr", "loss_kd", "sr_outer", "sr_flip0", "sr_trigger_cos"):
            assert resumed.metrics[key] == pytest.approx(full.metrics[key], abs=1e-4), (at, key)
