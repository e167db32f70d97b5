"""The named options that reproduce the published ABD code (zskt's KL scale and attention layer, the vaccine's
layer counting, bank mode and stage-2 switch, its detection diagnostics) and the ``paper`` profile."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from abd_ray.config import RunConfig
from abd_ray.data import load_dataset
from abd_ray.defenses import build_defense
from abd_ray.defenses.shuffle import named_conv_indices, resolve_shuffled_layers
from abd_ray.models import build_model, conv_layers
from abd_ray.profiles import profile_values
from abd_ray.synthesizers import Batch, SynthContext, synthesizer_class

SHAPE = (1, 8, 8)


def _model(arch, shape=SHAPE):
    return build_model(arch, num_classes=10, shape=shape, mean=(0.3,), std=(0.4,))


def _frozen(arch):
    torch.manual_seed(0)
    m = _model(arch).eval()
    m.requires_grad_(False)
    return m


def _synth(name, defense, params=None):
    data = load_dataset("digits")
    torch.manual_seed(0)
    ctx = SynthContext(_frozen("cnn_l"), _model("cnn_s").train(), data, torch.device("cpu"), 10, 16, defense,
                       torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    return synthesizer_class(name)(ctx, params or {}), ctx


# --- zskt ----------------------------------------------------------------------------------------------------------


def test_kd_reduction_mean_is_batchmean_over_the_classes_for_kd_and_generator_loss():
    from abd_ray.defenses import Defense

    out = {}
    for form in ("batchmean", "mean"):
        synth, ctx = _synth("zskt", Defense(), {"kd_reduction": form, "beta": 0.0, "T": 1.0})
        torch.manual_seed(3)
        x = torch.rand(16, *SHAPE)
        t = ctx.teacher(x)
        s = torch.randn(16, 10)
        out[form] = (synth.student_loss(s, None, Batch(x, t)).mean(), synth._gen_loss(x, t, None))
    for bm, m in zip(out["batchmean"], out["mean"], strict=True):
        assert m.item() == pytest.approx(bm.item() / 10, rel=1e-5) and bm.item() != 0


def test_pre_bn_attention_map_is_the_wrn_stage_output_before_the_final_bn_relu():
    torch.manual_seed(0)
    m = _model("wrn16_1").eval()
    x = torch.rand(4, *SHAPE)
    logits, post = m(x, return_features=True)
    m.features_pre_bn = True
    logits_pre, pre = m(x, return_features=True)
    h = (x - m.mean) / m.std
    for stage in m.stages():
        h = stage(h)
    assert torch.equal(logits, logits_pre) and torch.equal(pre[-2], h) and not torch.equal(post[-2], h)
    assert torch.equal(pre[-1], post[-1]) and all(torch.equal(a, b) for a, b in zip(pre[:-2], post[:-2], strict=True))


# --- the vaccine's options -----------------------------------------------------------------------------------------


def test_named_conv_skips_resnet_shortcuts_keeps_wrn_and_refuses_vgg():
    resnet = _model("resnet18", (3, 32, 32))
    names = [n for n, c in resnet.named_modules() if isinstance(c, nn.Conv2d)]
    kept = [names[i] for i in named_conv_indices(resnet)]
    assert len(names) == 20 and len(kept) == 17 and not any("shortcut" in n for n in kept)
    last5 = [names[i] for i in resolve_shuffled_layers(resnet, 5, "named_conv")]
    assert last5[0] == "_stages.2.1.conv2" and "_stages.3.0.shortcut.0" not in last5  # the original's last 5
    wrn = _model("wrn16_2", (3, 32, 32))
    assert named_conv_indices(wrn) == list(range(len(conv_layers(wrn)))) == list(range(16))
    sv = build_defense("sv", {"layer_count": "named_conv"})
    with pytest.raises(ValueError, match=r"layer_count='named_conv'.*inert.*layer_count=all_convs"):
        sv.check_teacher(_model("vgg11", (3, 32, 32)))
    build_defense("sv", {"layer_count": "all_convs"}).check_teacher(_model("vgg11", (3, 32, 32)))


@pytest.mark.parametrize("mode", ["synth", "term", "reweight", "both"])
def test_bank_mode_on_deepinversion(mode, monkeypatch):
    import abd_ray.defenses.vaccine as vaccine

    sv = build_defense("sv", {"bank_mode": mode, "coef": 1.0})
    synth, ctx = _synth("deepinversion", sv, {"iters": 3, "round_every": 5, "adi": 0.0})
    sv.bind(ctx.teacher, ctx.student, SHAPE, 10, 10, torch.Generator().manual_seed(0), fixed_data=True)
    terms, reweights = [], []
    real_term, real_rw = sv.generator_term, vaccine.reweighted_loss
    monkeypatch.setattr(sv, "generator_term", lambda b: terms.append(real_term(b)) or terms[-1])
    monkeypatch.setattr(vaccine, "reweighted_loss", lambda *a: reweights.append(1) or real_rw(*a))
    batch = next(synth.student_batches(0))
    per = torch.rand(len(batch.x)) + 0.5
    loss = sv.student_loss(per, batch)
    assert len(terms) == 3  # the synthesis offers the term at every iteration
    assert sum(t is not None for t in terms) == (3 if mode in ("term", "both") else 0)
    assert len(reweights) == (0 if mode == "term" else 1)
    if mode == "term":
        assert torch.equal(loss, per.mean())  # plain KD


def test_sv_in_stage2_false_turns_sv_off_once_sr_runs(monkeypatch):
    teacher, student = _frozen("cnn_l"), _model("cnn_s").train()
    x = torch.rand(8, *SHAPE)
    batch = Batch(x, teacher(x))
    per = torch.rand(8)
    for on in (True, False):
        abd = build_defense("abd", {"sv_in_stage2": on, "sr_start": 0.5})
        abd.bind(teacher, student, SHAPE, 10, 10, torch.Generator().manual_seed(0), fixed_data=True)
        calls = []
        monkeypatch.setattr(abd.sv, "student_loss", lambda p, b, calls=calls: calls.append(1) or p.sum())
        abd.observe(batch, 4)  # the last stage-1 step: step 5's synthesis is already in stage 2
        assert abd.generator_term(batch) is not None if on else abd.generator_term(batch) is None
        assert torch.equal(abd.student_loss(per, batch), per.sum()) and calls == [1]
        abd.observe(batch, 6)
        assert torch.equal(abd.student_loss(per, batch), per.sum() if on else per.mean())
        assert len(calls) == (2 if on else 1)
        resumed = build_defense("abd", {"sv_in_stage2": on, "sr_start": 0.5})
        resumed.bind(teacher, student, SHAPE, 10, 10, torch.Generator().manual_seed(0), fixed_data=True)
        resumed.load_state_dict(abd.state_dict())  # a resume in stage 2 knows it is there before any batch
        assert (resumed.generator_term(batch) is None) is not on
    with pytest.raises(ValueError, match="defense.sv_in_stage2='maybe' must be true or false"):
        build_defense("abd", {"sv_in_stage2": "maybe"})


class _Lin(nn.Module):
    def __init__(self, shift=None):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(64, 10)
        self.shift = shift

    def forward(self, x):
        out = self.fc(x.flatten(1)) * 3
        return out if self.shift is None else out + self.shift(x)


def _probe(shift, n=400):
    sv = build_defense("sv", {})
    sv.teacher, sv.suspect = _Lin(), _Lin(shift)
    g = torch.Generator().manual_seed(0)
    clean, poison = torch.rand(n, *SHAPE, generator=g), torch.rand(n, *SHAPE, generator=g)
    clean[:, :, 0, 0], poison[:, :, 0, 0] = 0.0, 1.0  # the "trigger": pixel (0, 0) lit
    ev = SimpleNamespace(x_test=clean, x_poison=poison)
    return sv, ev


def test_sv_auc_is_one_when_the_suspect_separates_and_half_on_noise(monkeypatch):
    kick = torch.linspace(-4, 4, 10)
    # The suspect equals the teacher exactly on triggered inputs and differs on clean ones.
    sv, ev = _probe(lambda x: (1 - x[:, :, 0, 0]) * kick)
    out = sv.probe(ev, None, None, 0)
    assert out["sv_auc"] == 1.0 and out["sv_mask_poison"] == 100.0 and out["sv_mask_clean"] < 100.0
    # A difference that ignores the trigger: chance.
    sv, ev = _probe(lambda x: x[:, :, 3, 3] * 8 * kick)
    import abd_ray.defenses.vaccine as vaccine

    calls = []
    real = vaccine.detection_diagnostics
    monkeypatch.setattr(vaccine, "detection_diagnostics", lambda *a: calls.append(1) or real(*a))
    first = sv.probe(ev, None, None, 0)
    assert abs(first["sv_auc"] - 0.5) < 0.08
    assert sv.probe(ev, None, None, 10) == first and len(calls) == 1  # one measurement per permutation draw


def test_sv_probe_is_silent_without_an_attack():
    sv, ev = _probe(None)
    assert sv.probe(SimpleNamespace(x_test=ev.x_test, x_poison=ev.x_test[:0]), None, None, 0) == {}


@pytest.mark.parametrize(
    "defense,params,match",
    [
        ("sv", {"layer_count": "convs"}, r"defense.layer_count='convs' is not allowed; allowed: all_convs, named_conv"),
        ("sv", {"bank_mode": "all"}, r"defense.bank_mode='all' is not allowed; allowed: synth, term, reweight, both"),
    ],
)
def test_bad_option_values_are_named(defense, params, match):
    with pytest.raises(ValueError, match=match):
        build_defense(defense, params)


@pytest.mark.parametrize("key,value", [("kd_reduction", "sum"), ("at_layer", "pre")])
def test_bad_zskt_option_values_are_named(key, value):
    with pytest.raises(ValueError, match=rf"synth.{key}='{value}' is not allowed; allowed: "):
        synthesizer_class("zskt").resolve_params({key: value}, "digits")


# --- the paper profile ---------------------------------------------------------------------------------------------


def test_profile_applies_under_explicit_values():
    cfg = RunConfig(synthesizer="zskt", defense="abd", profile="paper", synth={"beta": 0.0},
                    defense_params={"coef": 2.0}).resolved()
    assert cfg.synth["beta"] == 0.0 and cfg.synth["kd_reduction"] == "mean" and cfg.synth["at_layer"] == "pre_bn"
    assert cfg.defense_params["coef"] == 2.0 and cfg.defense_params["n_shuf_ens"] == 3
    assert cfg.defense_params["layer_count"] == "named_conv" and cfg.defense_params["sr_start"] == 0.9925
    assert cfg.to_flat()["profile"] == "paper" and RunConfig.from_flat(cfg.to_flat()).resolved() == cfg
    plain = RunConfig(synthesizer="zskt", defense="abd")
    assert plain.resolved().synth == {} and "profile" not in plain.to_flat()
    gtsrb = RunConfig(dataset="gtsrb", synthesizer="zskt", defense="sv", profile="paper").resolved()
    assert gtsrb.synth["T"] == 0.5 and gtsrb.synth["beta"] == 0.0 and gtsrb.defense_params["pseudo_test_batches"] == 39
    assert "sr_start" not in gtsrb.defense_params  # sv takes SV's values only


def test_unknown_profile_and_uncovered_synthesizer_are_refused():
    with pytest.raises(ValueError, match=r"profile='papr' is unknown; known profiles: default, paper"):
        RunConfig(profile="papr").resolved()
    with pytest.raises(ValueError, match=r"no published values for synthesizer 'dafl'; it covers clean, cmi"):
        RunConfig(synthesizer="dafl", profile="paper").resolved()


@pytest.mark.parametrize("synth", ["zskt", "cmi", "ood", "deepinversion"])
def test_the_paper_profile_builds_its_defense_and_synthesizer(synth):
    synth_values, defense = profile_values("paper", synth, "cifar10", "abd")
    abd = build_defense("abd", defense)
    assert abd.params["coef"] == 0.1 and abd.params["layer_count"] == "named_conv"
    assert abd.params["sv_in_stage2"] is (synth == "zskt")
    assert abd.params["bank_mode"] == {"zskt": "synth", "ood": "reweight"}.get(synth, "term")
    assert abd.params["pert_model"] == "teacher" and abd.params["hg_ref"] == "student"
    synthesizer_class(synth).resolve_params(synth_values, "cifar10")


@pytest.mark.parametrize("name", ["cifar10", "gtsrb"])
def test_paper_zskt_studies_use_the_profile(name):
    from abd_ray.study.spec import load_spec

    spec = load_spec(f"studies/paper-zskt-{name}.yaml")
    assert spec.profile == "paper" and not spec.defense_params
    trials = spec.grid_configs()
    abd = [t for t in trials if t["defense"] == "abd"]
    assert abd and all(t["synth.kd_reduction"] == "mean" and t["defense.coef"] == 0.1 for t in abd)
    assert all(t["profile"] == "paper" for t in trials)


def test_a_study_profile_is_validated():
    from abd_ray.study.spec import StudySpec, StudySpecError

    raw = {"name": "p", "dataset": "digits", "attacks": ["badnet_grid"], "synthesizers": ["zskt"], "profile": "x"}
    with pytest.raises(StudySpecError, match=r"profile.*'x' is unknown; known profiles: default, paper"):
        StudySpec.from_dict(raw)
    with pytest.raises(StudySpecError, match=r"profile.*dafl"):
        StudySpec.from_dict({**raw, "profile": "paper", "synthesizers": ["dafl"]})


def test_abd_forwards_every_hook_its_components_override():
    """ABD is SV + SR: a hook that either component overrides and ABD does not would silently fall back to the
    undefended base (as a stage-2 option of SR would be ignored under abd)."""
    from abd_ray.defenses.abd import ABD
    from abd_ray.defenses.base import Defense
    from abd_ray.defenses.retrospection import SelfRetrospection
    from abd_ray.defenses.vaccine import ShufflingVaccine

    hooks = [n for n, v in vars(Defense).items() if callable(v) and not n.startswith("_")]
    for component in (ShufflingVaccine, SelfRetrospection):
        for hook in hooks:
            if getattr(component, hook) is not getattr(Defense, hook):
                assert getattr(ABD, hook) is not getattr(Defense, hook), f"ABD does not forward {hook}"
    abd = ABD(sr_fresh_opt=True, sr_clip=None)
    assert abd.stage2_fresh_optimizer() is True and abd.stage2_clip(5.0) is None
    assert ABD().stage2_fresh_optimizer() is False and ABD().stage2_clip(5.0) == 5.0
