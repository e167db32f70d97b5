"""Tests of ABD's defenses (Hong et al., ICML 2023): the Shuffling Vaccine, Self-Retrospection, the fixed-point
hypergradient, the registry entries and their hyperparameter checks."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from abd_ray.defenses import build_defense
from abd_ray.defenses.diagnostics import detection_diagnostics, roc_auc
from abd_ray.defenses.hypergrad import fixed_point_hypergrad
from abd_ray.defenses.shuffle import ShuffledEnsemble, draw_permutations, resolve_shuffled_layers
from abd_ray.defenses.vaccine_check import check_suspect, tail_ratio
from abd_ray.defenses.vaccine_math import masked_divergence_term, reweighted_loss, suspect_divergence, suspect_mask
from abd_ray.models import build_model, conv_layers
from abd_ray.registry import DEFENSES
from abd_ray.synthesizers import Batch


def _cnn(name: str = "cnn_l", seed: int = 0, shape=(1, 8, 8)) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, num_classes=10, shape=shape, mean=(0.5,) * shape[0], std=(0.25,) * shape[0]).eval()


def _wrn() -> nn.Module:
    torch.manual_seed(0)
    return build_model("wrn16_1", num_classes=10, shape=(3, 8, 8), mean=(0.5,) * 3, std=(0.25,) * 3).eval()


# --- the shuffled ensemble -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 5, -3, "auto"])
def test_shuffled_copies_differ_only_in_input_channel_order_of_chosen_layers(k):
    teacher = _wrn()
    before = {n: v.clone() for n, v in teacher.state_dict().items()}
    layers = resolve_shuffled_layers(teacher, k)
    n_conv = len(conv_layers(teacher))
    expected = {2: [n_conv - 2, n_conv - 1], 5: list(range(n_conv - 5, n_conv)), -3: [0, 1, 2],
                "auto": list(range(n_conv - 5, n_conv))}[k]
    assert layers == expected
    perms = draw_permutations(teacher, layers, 3, torch.Generator().manual_seed(1))
    ens = ShuffledEnsemble(teacher, perms)

    # The teacher is untouched, and each copy is a distinct object (a deep copy).
    for n, v in teacher.state_dict().items():
        assert torch.equal(v, before[n]), n
    t_convs = conv_layers(teacher)
    for copy_model, perm in zip(ens.copies, perms, strict=True):
        assert all(p is not q for p, q in zip(copy_model.parameters(), teacher.parameters(), strict=True))
        c_convs = conv_layers(copy_model)
        for i, (tc, cc) in enumerate(zip(t_convs, c_convs, strict=True)):
            if i in layers:
                # exactly a permutation of the input-channel axis (dim 1), by the drawn permutation
                assert torch.equal(cc.weight, tc.weight[:, perm[i]])
                assert sorted(perm[i].tolist()) == list(range(tc.weight.shape[1]))
            else:
                assert torch.equal(cc.weight, tc.weight)
        # every non-convolution tensor is identical
        conv_w = {id(c.weight) for c in c_convs}
        for (n, p), (_, q) in zip(copy_model.named_parameters(), teacher.named_parameters(), strict=True):
            if id(p) not in conv_w:
                assert torch.equal(p, q), n
        for (n, b), (_, c) in zip(copy_model.named_buffers(), teacher.named_buffers(), strict=True):
            assert torch.equal(b, c), n
    # at least one chosen layer really changed (permutations of >= 16 channels are not all identity)
    assert any(not torch.equal(conv_layers(ens.copies[0])[i].weight, t_convs[i].weight) for i in layers)
    # the suspect is the mean of the copies' logits
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(ens(x), torch.stack([m(x) for m in ens.copies]).mean(0), atol=1e-6)


@pytest.mark.parametrize("arch", ["cnn_l", "wrn16_2", "resnet18", "vgg11"])
def test_suspect_shares_the_unshuffled_trunk_and_equals_the_full_copies(arch):
    """The suspect runs the stages before the first shuffled one once (or takes them from the teacher's features)
    and gives the mean of the full shuffled copies' logits, with the same input gradient."""
    from abd_ray.defenses.shuffle import first_shuffled_stage

    torch.manual_seed(0)
    teacher = build_model(arch, num_classes=10, shape=(3, 8, 8), mean=(0.5,) * 3, std=(0.25,) * 3).eval()
    layers = resolve_shuffled_layers(teacher, "auto")
    ens = ShuffledEnsemble(teacher, draw_permutations(teacher, layers, 3, torch.Generator().manual_seed(1)))
    assert ens.start == first_shuffled_stage(teacher, layers) > 0  # the paper's last third: a trunk to share
    x = torch.rand(5, 3, 8, 8, requires_grad=True)
    full = torch.stack([m(x) for m in ens.copies]).mean(0)
    (g_full,) = torch.autograd.grad(full.square().sum(), x)
    shared = ens(x)
    (g_shared,) = torch.autograd.grad(shared.square().sum(), x)
    _, t_feats = teacher(x, return_features=True)
    from_feats = ens(x, t_feats)
    (g_feats,) = torch.autograd.grad(from_feats.square().sum(), x)
    for out, g in ((shared, g_shared), (from_feats, g_feats)):
        assert torch.allclose(out, full, atol=1e-5)
        assert torch.allclose(g, g_full, atol=1e-5)


def test_auto_layer_count_keeps_the_papers_share_of_the_depth():
    assert resolve_shuffled_layers(_cnn(), "auto") == [2]  # digits CNN: the last 1 of 3
    wrn2 = build_model("wrn16_2", num_classes=10, shape=(3, 8, 8), mean=(0.5,), std=(0.5,))
    assert resolve_shuffled_layers(wrn2, "auto") == list(range(11, 16))  # the paper's last 5 of 16


@pytest.mark.parametrize("k", [4, -4, 100])
def test_n_shuf_layer_beyond_the_models_convolutions_is_refused_at_bind(k):
    d = build_defense("sv", {"n_shuf_layer": k})
    teacher = _cnn()
    with pytest.raises(ValueError, match=r"n_shuf_layer=.*3 convolutions"):
        d.bind(teacher, _cnn("cnn_s"), (1, 8, 8), 10, 100, torch.Generator().manual_seed(0), fixed_data=False)


# --- mask and divergence ---------------------------------------------------------------------------------------------


def test_mask_and_divergence_match_a_hand_computation_on_two_classes():
    t = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 0.0]])

    def softmax2(a, b):
        ea, eb = math.exp(a), math.exp(b)
        return ea / (ea + eb), eb / (ea + eb)

    hand_d, hand_m = [], []
    for (ta, tb), (ua, ub) in zip(t.tolist(), u.tolist(), strict=True):
        p, q = softmax2(ta, tb), softmax2(ua, ub)
        hand_d.append((p[0] * math.log(p[0] / q[0]) + p[1] * math.log(p[1] / q[1])) / 2)  # mean over 2 classes
        hand_m.append((ta > tb) == (ua > ub))
    assert suspect_mask(t, u).tolist() == hand_m == [True, False, True]
    assert torch.allclose(suspect_divergence(t, u), torch.tensor(hand_d), atol=1e-6)

    term, m, d = masked_divergence_term(t, u, coef=0.5)
    expected = -0.5 * (hand_d[0] + hand_d[2]) / 2
    assert math.isclose(float(term), expected, rel_tol=1e-5)

    # nothing masked -> exactly 0
    term0, _, _ = masked_divergence_term(t, -u, coef=0.5)
    assert float(term0) == 0.0

    # the reweighted student loss: mean over unmasked minus coef * mean over masked
    losses = torch.tensor([1.0, 2.0, 3.0])
    assert math.isclose(float(reweighted_loss(losses, m, 0.5)), 2.0 - 0.5 * 2.0)
    assert math.isclose(float(reweighted_loss(losses, torch.zeros(3, dtype=torch.bool), 0.5)), 2.0)
    # m = [True, False, True]: capped at 1.5, the masked losses 1 and 3 count as 1 and 1.5; dropped, they count not
    assert math.isclose(float(reweighted_loss(losses, m, 0.5, "capped", cap=1.5)), 2.0 - 0.5 * 1.25)
    assert math.isclose(float(reweighted_loss(losses, m, 0.5, "drop")), 2.0)
    everything = torch.ones(3, dtype=torch.bool)
    assert float(reweighted_loss(losses, everything, 0.5, "drop")) == 0.0


def test_capped_reweighting_stops_pushing_a_masked_sample_at_the_cap():
    per = torch.tensor([0.5, 1.0, 4.0], requires_grad=True)
    m = torch.tensor([False, True, True])
    reweighted_loss(per, m, 2.0, "capped", cap=2.0).backward()
    # unmasked: +1 (mean of one); masked below the cap: -coef / 2; masked above the cap: no gradient
    assert per.grad.tolist() == [1.0, -1.0, 0.0]
    per.grad = None
    reweighted_loss(per, m, 2.0, "ascent").backward()
    assert per.grad.tolist() == [1.0, -1.0, -1.0]


def test_generator_term_gradient_flows_through_the_suspect_only_when_allowed():
    teacher = _cnn()
    x = torch.rand(16, 1, 8, 8, requires_grad=True)
    grads = {}
    for no_grad in (False, True):
        d = build_defense("sv", {"no_shuf_grad": no_grad, "coef": 1.0})
        d.bind(teacher, _cnn("cnn_s"), (1, 8, 8), 10, 100, torch.Generator().manual_seed(0), fixed_data=False)
        t_logits = teacher(x).detach()  # isolate the suspect's part of the gradient
        # force every sample to be masked so the term is non-zero: use the suspect's own argmax as the teacher's
        with torch.no_grad():
            u = d.suspect(x)
        t_logits = t_logits + 100 * F.one_hot(u.argmax(1), 10)
        term = d.generator_term(Batch(x, t_logits))
        assert term is not None and float(term.detach()) < 0
        grads[no_grad] = term.requires_grad
    assert grads == {False: True, True: False}


def test_student_loss_reweights_only_on_fixed_data():
    teacher = _cnn()
    x = torch.rand(32, 1, 8, 8)
    with torch.no_grad():
        t = teacher(x)
    per = torch.rand(32)
    gen_mode = build_defense("sv")
    gen_mode.bind(teacher, _cnn("cnn_s"), (1, 8, 8), 10, 100, torch.Generator().manual_seed(0), fixed_data=False)
    assert torch.equal(gen_mode.student_loss(per, Batch(x, t)), per.mean())
    fixed = build_defense("sv")
    fixed.bind(teacher, _cnn("cnn_s"), (1, 8, 8), 10, 100, torch.Generator().manual_seed(0), fixed_data=True)
    with torch.no_grad():
        u = fixed.suspect(x)
    # teacher logits that agree with the suspect on the first half of the batch only: both groups present
    t = u + 100 * F.one_hot(u.argmax(1), 10)
    t[16:] = u[16:] + 100 * F.one_hot((u[16:].argmax(1) + 1) % 10, 10)
    m = suspect_mask(t, u)
    assert m.tolist() == [True] * 16 + [False] * 16
    assert fixed.params["fixed_mode"] == "capped"  # the default
    want = per[~m].mean() - fixed.params["coef"] * per[m].clamp(max=math.log(10)).mean()  # auto cap: log(classes)
    assert torch.allclose(fixed.student_loss(per, Batch(x, t)), want)
    for mode in ("drop", "capped", "ascent"):
        d = build_defense("sv", {"fixed_mode": mode})
        d.bind(teacher, _cnn("cnn_s"), (1, 8, 8), 10, 100, torch.Generator().manual_seed(0), fixed_data=True)
        want = reweighted_loss(per, m, d.params["coef"], mode, cap=math.log(10))  # auto cap: log(classes)
        assert torch.allclose(d.student_loss(per, Batch(x, t)), want)
    assert 0.0 <= fixed.metrics()["sv_masked_frac"] <= 1.0


def test_gen_mode_reweights_the_generators_outputs_as_fixed_data():
    teacher = _cnn()
    x = torch.rand(32, 1, 8, 8)
    per = torch.rand(32)
    for mode in ("drop", "capped", "ascent"):
        d = build_defense("sv", {"gen_mode": mode})
        d.bind(teacher, _cnn("cnn_s"), (1, 8, 8), 10, 100, torch.Generator().manual_seed(0), fixed_data=False)
        with torch.no_grad():
            u = d.suspect(x)
        # the teacher agrees with the suspect on the odd rows only: both groups present
        t = u + 100 * F.one_hot((u.argmax(1) + 1 - torch.arange(32) % 2) % 10, 10)
        m = suspect_mask(t, u)
        assert m.tolist() == [False, True] * 16
        want = reweighted_loss(per, m, d.params["coef"], mode, cap=math.log(10))
        assert torch.allclose(d.student_loss(per, Batch(x, t)), want)
        assert d.generator_term(Batch(x, t)) is not None  # the generator term stays
    with pytest.raises(ValueError, match="gen_mode='ignore' is not allowed"):
        build_defense("sv", {"gen_mode": "ignore"})


# --- the vaccine check -----------------------------------------------------------------------------------------------


def _logits_with_kl(log10_kl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-class logits (t, u) whose KL(softmax t || softmax u) is 10**log10_kl (t fixed, u solved numerically)."""
    n = len(log10_kl)
    t = torch.zeros(n, 2, dtype=torch.float64)
    target = 10.0 ** log10_kl.double()
    # KL of (0.5, 0.5) against (q, 1-q) = -0.5 log(4 q (1-q)); solve for q in (0, 0.5]
    q = 0.5 * (1 - torch.sqrt(1 - torch.exp(-2 * target)))
    u = torch.stack([torch.log(q), torch.log1p(-q)], 1)
    return t, u


def test_tail_ratio_and_the_check_accept_a_separating_suspect_and_reject_a_unimodal_one():
    g = torch.Generator().manual_seed(0)
    body = torch.randn(900, generator=g, dtype=torch.float64) * 0.3 - 1.0  # ordinary inputs: KL around 0.1
    tail = torch.randn(100, generator=g, dtype=torch.float64) * 0.3 - 7.0  # backdoor-like: KL around 1e-7
    t, u = _logits_with_kl(torch.cat([body, tail]))
    ok, r = check_suspect(t, u)
    assert ok and r > 0.02
    t, u = _logits_with_kl(torch.cat([body, torch.randn(100, generator=g, dtype=torch.float64) * 0.3 - 1.0]))
    ok, r = check_suspect(t, u)
    assert not ok and r <= 0.02
    assert tail_ratio(torch.ones(10)) == 0.0


class _Marked(nn.Module):
    """A toy 'teacher' whose suspect copies agree with it only on inputs carrying a marker pixel.

    conv(4 -> 4) then a linear readout biased towards class 0. A marker input has the same value in every channel,
    so permuting the conv's input channels leaves its output as it was; ordinary inputs (random channels) change.
    """

    def __init__(self, identical: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, bias=False)
        self.fc = nn.Linear(4, 4)
        torch.manual_seed(3)
        with torch.no_grad():
            if identical:
                self.conv.weight.copy_(torch.ones(4, 4, 1, 1))  # permuting identical columns changes nothing
            else:
                self.conv.weight.copy_(torch.eye(4).view(4, 4, 1, 1) * 3)
            self.fc.weight.copy_(torch.eye(4))
            self.fc.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_vaccine_check_through_observe_accepts_then_reports_and_rejects_a_bad_suspect():
    g = torch.Generator().manual_seed(0)

    def batches(n=20, bs=50, marker_frac=0.06):
        for _ in range(n):
            x = torch.rand(bs, 4, 2, 2, generator=g)
            k = int(bs * marker_frac)
            x[:k] = 5.0  # the marker: every channel alike, so a channel permutation cannot change the prediction
            yield x

    teacher = _Marked()
    d = build_defense("sv", {"pseudo_test_batches": 8, "check_skip": 2, "n_shuf_layer": 1, "n_shuf_ens": 1})
    d.bind(teacher, teacher, (4, 2, 2), 4, 100, torch.Generator().manual_seed(1), fixed_data=False)
    assert d.metrics()["sv_active"] == 0.0 and d.generator_term(Batch(torch.rand(2, 4, 2, 2), torch.rand(2, 4))) is None
    for i, x in enumerate(batches()):
        with torch.no_grad():
            d.observe(Batch(x, teacher(x)), i)
    m = d.metrics()
    assert m["sv_check_done"] == 1.0
    # the marker samples form the low tail: the check accepts (a re-draw may be needed when a permutation
    # happens to leave channel 0 in place for the ordinary samples too)
    assert m["sv_check_accepted"] == 1.0 and m["sv_active"] == 1.0 and m["sv_tail_ratio"] > 0.02
    assert 1 <= m["sv_check_tries"] <= 8

    bad = _Marked(identical=True)  # every permutation leaves the model as it is: nothing separates
    d = build_defense("sv", {"pseudo_test_batches": 4, "check_skip": 0, "n_shuf_layer": 1})
    d.bind(bad, bad, (4, 2, 2), 4, 100, torch.Generator().manual_seed(1), fixed_data=False)
    for i, x in enumerate(batches(4)):
        with torch.no_grad():
            d.observe(Batch(x, bad(x)), i)
    m = d.metrics()
    assert m["sv_check_accepted"] == 0.0 and m["sv_active"] == 0.0 and m["sv_check_tries"] == 8.0
    assert d.generator_term(Batch(torch.rand(2, 4, 2, 2), torch.rand(2, 4))) is None


def test_vaccine_check_agreement_rule_keeps_the_draw_that_agrees_most_with_the_teacher():
    """Of check_tries draws, the agreement rule keeps the one whose suspect agrees with the teacher on the most
    collected samples (whatever its tail), and keeps SV on; the draws are the ones the run's generator gives."""
    from abd_ray.defenses.base import child_seed

    teacher = _Marked()
    xs = [torch.rand(50, 4, 2, 2, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    d = build_defense("sv", {"pseudo_test_batches": 4, "check_skip": 2, "n_shuf_layer": 1, "n_shuf_ens": 1,
                             "check_rule": "agreement", "check_tries": 6})
    d.bind(teacher, teacher, (4, 2, 2), 4, 100, torch.Generator().manual_seed(1), fixed_data=False)
    for i, x in enumerate(xs):
        with torch.no_grad():
            d.observe(Batch(x, teacher(x)), i)
    # the same six draws, from the same seed
    rng = torch.Generator().manual_seed(child_seed(torch.Generator().manual_seed(1)))
    layers = resolve_shuffled_layers(teacher, 1)
    collected = torch.cat(xs[2:])
    t = teacher(collected)
    agreements = []
    for _ in range(6):
        perms = draw_permutations(teacher, layers, 1, rng)
        with torch.no_grad():
            agreements.append(float(suspect_mask(t, ShuffledEnsemble(teacher, perms)(collected)).float().mean()))
    assert len(set(agreements)) > 1, "the draws must differ for the test to mean anything"
    m = d.metrics()
    assert m["sv_check_tries"] == 6.0 and m["sv_check_accepted"] == 1.0 and m["sv_active"] == 1.0
    assert m["sv_check_agreement"] == pytest.approx(max(agreements))
    with torch.no_grad():
        kept = float(suspect_mask(t, d.suspect(collected)).float().mean())
    assert kept == pytest.approx(max(agreements))
    with pytest.raises(ValueError, match="check_rule"):
        build_defense("sv", {"check_rule": "best"})


def test_detection_diagnostics_and_auc():
    assert roc_auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert roc_auc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5
    assert math.isclose(roc_auc(torch.tensor([1.0, 3.0]), torch.tensor([2.0])), 0.5)
    teacher = _Marked()
    suspect = ShuffledEnsemble(teacher, [{0: torch.tensor([1, 2, 3, 0])}])
    clean = torch.rand(64, 4, 2, 2, generator=torch.Generator().manual_seed(0)) + 0.5
    poison = 5.0 + torch.rand(64, 4, 2, 2, generator=torch.Generator().manual_seed(1)) * 0.01
    out = detection_diagnostics(teacher, suspect, clean, poison)
    assert set(out) == {"sv_det_auc", "sv_det_acc", "sv_div_clean", "sv_div_poison", "sv_mask_clean",
                        "sv_mask_poison"}
    assert out["sv_div_poison"] < out["sv_div_clean"] and out["sv_det_auc"] > 0.9


# --- the fixed-point hypergradient -----------------------------------------------------------------------------------


def test_fixed_point_hypergradient_matches_the_closed_form_of_a_quadratic_inner_problem():
    g = torch.Generator().manual_seed(0)
    n, m = 5, 3
    q = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = q @ q.T / n + torch.eye(n, dtype=torch.float64)  # SPD inner Hessian
    b = torch.randn(n, m, generator=g, dtype=torch.float64)
    c = torch.randn(n, generator=g, dtype=torch.float64)
    dm = 0.3 * torch.eye(m, dtype=torch.float64)
    lam = torch.randn(m, generator=g, dtype=torch.float64).requires_grad_(True)
    # inner: 0.5 w'Aw - w'B lam  ->  w* = A^-1 B lam ; outer: 0.5 |w - c|^2 + 0.5 lam' D lam
    w_star = torch.linalg.solve(a, b @ lam.detach()).requires_grad_(True)

    def inner(ws, hs):
        return 0.5 * ws[0] @ a @ ws[0] - ws[0] @ (b @ hs[0])

    def outer(ws, hs):
        return 0.5 * (ws[0] - c).pow(2).sum() + 0.5 * hs[0] @ dm @ hs[0]

    closed = b.T @ torch.linalg.solve(a, w_star.detach() - c) + dm @ lam.detach()
    step = 1.0 / float(torch.linalg.eigvalsh(a).max())
    (hg,) = fixed_point_hypergrad([w_star], [lam], inner, outer, K=300, step=step)
    assert torch.allclose(hg, closed, atol=1e-4, rtol=0)
    # few iterations are only an approximation, and K < 1 is refused
    (rough,) = fixed_point_hypergrad([w_star], [lam], inner, outer, K=1, step=step)
    assert not torch.allclose(rough, closed, atol=1e-4)
    # K iterations are exactly K terms of the Neumann series: v = sum_{j<K} (I - step A)^j (w* - c), and the
    # hypergradient is D lam + step B' v
    jac = torch.eye(n, dtype=torch.float64) - step * a
    for k in (1, 2, 3):
        v = sum(torch.linalg.matrix_power(jac, j) @ (w_star.detach() - c) for j in range(k))
        (hg_k,) = fixed_point_hypergrad([w_star], [lam], inner, outer, K=k, step=step)
        assert torch.allclose(hg_k, dm @ lam.detach() + step * b.T @ v, atol=1e-10, rtol=0), k
    with pytest.raises(ValueError, match="K=0"):
        fixed_point_hypergrad([w_star], [lam], inner, outer, K=0, step=step)


# --- registry and hyperparameters ------------------------------------------------------------------------------------


def test_registry_holds_every_defense_and_abd_routes_its_keys():
    assert {"none", "sv", "sr", "abd"} <= set(DEFENSES.names())
    d = build_defense("abd", {"coef": 0.1, "n_shuf_ens": 2, "n_shuf_layer": -1, "no_shuf_grad": True,
                              "pseudo_test_batches": 50, "inner_round": 20, "pert_lr": 0.05, "pert_model": "teacher",
                              "hg_out_portion": 0.1, "K": 3, "sup_resume_lr": 1e-3, "sr_start": 0.5})
    assert d.sv.params["coef"] == 0.1 and d.sv.params["n_shuf_layer"] == -1 and d.sv.params["no_shuf_grad"] is True
    assert d.sr.params["K"] == 3 and d.sr.params["pert_model"] == "teacher"
    assert d.stage2_start(1000) == 500 and d.stage2_lr() == 1e-3
    assert build_defense("sv").stage2_start(1000) is None


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_defense_runs_its_hooks_and_resumes_from_its_state(name):
    """Every registered defense, at its defaults, on generator batches and on fixed data: the hooks return a finite
    loss, and a copy bound the same way and loaded from the state gives the same student loss."""
    teacher = _cnn()
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        batch = Batch(x, teacher(x))
    per = torch.rand(16, generator=torch.Generator().manual_seed(1))
    for fixed_data in (False, True):
        d, e = build_defense(name), build_defense(name)
        for defense in (d, e):
            defense.check_teacher(teacher)
            defense.bind(teacher, _cnn("cnn_s"), (1, 8, 8), 10, 100, torch.Generator().manual_seed(0),
                         fixed_data=fixed_data)
        d.observe(batch, 0)
        term = d.generator_term(Batch(x.clone().requires_grad_(True), batch.t_logits))
        assert term is None or torch.isfinite(term)
        loss = d.student_loss(per, batch)
        assert loss.dim() == 0 and torch.isfinite(loss)
        e.load_state_dict(copy.deepcopy(d.state_dict()))
        assert torch.equal(e.student_loss(per, batch), loss)
        assert all(math.isfinite(v) for v in d.metrics().values())


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("sr", {"hg_out_portion": 0.0}, r"hg_out_portion=0.0 is outside \(0.0, 1.0\]"),
        ("sr", {"hg_out_portion": 1.5}, r"hg_out_portion=1.5 is outside"),
        ("abd", {"K": 0}, r"K=0 must be an integer in 1\.\."),
        ("sr", {"K": 2.5}, r"K=2.5 must be an integer"),
        ("sr", {"pert_model": "generator"}, r"allowed: student, teacher"),
        ("sr", {"sr_start": 1.5}, r"sr_start"),
        ("sr", {"sr_max_ratio": 0}, r"sr_max_ratio=0 is outside \(0.0, inf\]"),
        ("sr", {"hg_ref": "x"}, r"allowed: student, teacher"),
        ("sv", {"n_shuf_layer": 0}, r"n_shuf_layer=0"),
        ("sv", {"n_shuf_ens": 0}, r"n_shuf_ens"),
        ("sv", {"coef": -1}, r"coef"),
        ("sv", {"no_shuf_grad": "maybe"}, r"true or false"),
        ("abd", {"fixed_mode": "ignore"}, r"fixed_mode='ignore' is not allowed; allowed: drop, capped, ascent"),
        ("sv", {"fixed_cap": 0}, r"fixed_cap=0 is outside \(0.0, inf\]"),
        ("sv", {"K": 5}, r"unknown hyperparameter.*allowed: bank_mode, check_rule, check_skip, check_tries, coef"),
        ("abd", {"bogus": 1}, r"unknown hyperparameter\(s\) \['bogus'\]; allowed: K, "),
    ],
)
def test_bad_hyperparameters_give_clear_errors(name, params, match):
    with pytest.raises(ValueError, match=match):
        build_defense(name, params)


def test_state_dict_round_trip_restores_the_suspect():
    teacher = _cnn()
    a = build_defense("abd")
    a.bind(teacher, _cnn("cnn_s"), (1, 8, 8), 10, 100, torch.Generator().manual_seed(5), fixed_data=False)
    state = copy.deepcopy(a.state_dict())
    b = build_defense("abd")
    b.bind(teacher, _cnn("cnn_s"), (1, 8, 8), 10, 100, torch.Generator().manual_seed(99), fixed_data=False)
    b.load_state_dict(state)  # as a resumed run does: after bind
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(a.sv.suspect(x), b.sv.suspect(x))


# --- Self-Retrospection ----------------------------------------------------------------------------------------------


def test_perturbation_search_flips_predictions_and_sr_adds_its_gradient_only_in_stage_two():
    from abd_ray.defenses.retrospection import find_perturbation

    toy = _Marked()
    xt = torch.rand(32, 4, 2, 2, generator=torch.Generator().manual_seed(0)) * 0.5
    delta = find_perturbation(toy, xt, inner_round=10, lr=0.1, generator=torch.Generator().manual_seed(0))
    assert delta.shape == (1, 4, 2, 2)
    with torch.no_grad():
        flips = (toy((xt + delta).clamp(0, 1)).argmax(1) != toy(xt).argmax(1)).float().mean()
    assert flips > 0.5  # a universal perturbation that changes most predictions

    student = _cnn("cnn_s", seed=1)
    teacher = _cnn("cnn_l", seed=2)
    x = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sr = build_defense("sr", {"sr_start": 0.5, "inner_round": 3, "K": 2})
    student.train()
    sr.bind(teacher, student, (1, 8, 8), 10, 100, torch.Generator().manual_seed(0), fixed_data=False)
    assert sr.stage2_start(100) == 50 and sr.stage2_lr() == 1e-4
    sr.add_student_grads(student, teacher, x, step=10)  # before the second stage: nothing
    assert all(p.grad is None for p in student.parameters())
    for p in student.parameters():
        p.grad = torch.ones_like(p)
    running = [b.clone() for b in student.buffers()]
    sr.add_student_grads(student, teacher, x, step=60)
    assert student.training  # mode restored
    assert all(torch.equal(a, b) for a, b in zip(running, student.buffers(), strict=True))  # BN stats untouched
    changed = [not torch.equal(p.grad, torch.ones_like(p)) for p in student.parameters()]
    assert any(changed) and all(torch.isfinite(p.grad).all() for p in student.parameters())
    m = sr.metrics()
    assert m["sr_steps"] == 1.0 and m["sr_pert_norm"] > 0 and 0 <= m["sr_flip"] <= 100
    assert 0 < m["sr_scale"] <= 1.0 and m["sr_hg_norm"] > 0


def test_sr_lowers_the_asr_of_a_tiny_poisoned_student_where_plain_kd_does_not():
    """A cnn_s trained on badnet_grid-poisoned digits (asr ~100) is distilled for 30 steps on clean digits from a
    copy of itself: plain KD keeps the backdoor; KD + SR (defaults, second stage from step 0) unlearns most of it
    at no cost in clean accuracy."""
    from abd_ray.attacks.poison import AttackSpec, make_trigger, poison_training_set, poisoned_test_set
    from abd_ray.data.datasets import load_dataset
    from abd_ray.engine.teacher import train_classifier

    torch.manual_seed(0)
    d = load_dataset("digits")
    spec = AttackSpec(name="badnet_grid", target=0, poison_ratio=0.1)
    trigger = make_trigger(spec, d.shape)
    xp, yp, _ = poison_training_set(d.x_train, d.y_train, trigger, spec)
    poisoned = build_model("cnn_s", shape=d.shape, num_classes=10, mean=d.mean, std=d.std)
    train_classifier(poisoned, xp, yp, epochs=5, batch_size=64, lr=0.05, seed=0, device=torch.device("cpu"),
                     progress=False)
    x_bd, _ = poisoned_test_set(d.x_test, d.y_test, trigger, spec.target)

    def scores(model: nn.Module) -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            acc = 100 * (model(d.x_test).argmax(1) == d.y_test).float().mean()
            asr = 100 * (model(x_bd).argmax(1) == spec.target).float().mean()
        return float(acc), float(asr)

    acc0, asr0 = scores(poisoned)
    assert acc0 > 90 and asr0 > 95
    teacher = copy.deepcopy(poisoned).eval()
    out = {}
    for name in ("none", "sr"):
        student = copy.deepcopy(poisoned).train()
        defense = build_defense(name, {"sr_start": 0.0} if name == "sr" else {})
        defense.bind(teacher, student, d.shape, 10, 30, torch.Generator().manual_seed(0), fixed_data=False)
        opt = torch.optim.Adam(student.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        for step in range(30):
            x = d.x_train[torch.randint(0, len(d.x_train), (64,), generator=g)]
            opt.zero_grad()
            defense.add_student_grads(student, teacher, x, step)
            with torch.no_grad():
                t = teacher(x)
            kd = F.kl_div(F.log_softmax(student(x), 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean")
            kd.backward()
            opt.step()
        out[name] = scores(student)
    (_, asr_kd), (acc_sr, asr_sr) = out["none"], out["sr"]
    assert asr_kd > 90  # KD on clean inputs alone does not remove the backdoor
    assert asr_sr < asr_kd - 20, out
    assert acc_sr > acc0 - 3, out


# --- Self-Retrospection: the original's forms as options (pert_space ... sr_fresh_opt) -------------------------------


def _sr_bound(params: dict, student: nn.Module | None = None, teacher: nn.Module | None = None):
    """An SR defense in its second stage from step 0, bound to a cnn_s student (std 0.25) and a cnn_l teacher."""
    student = _cnn("cnn_s", seed=1).train() if student is None else student
    teacher = _cnn("cnn_l", seed=2) if teacher is None else teacher
    sr = build_defense("sr", {"sr_start": 0.0, "inner_round": 3, "K": 2, **params})
    sr.bind(teacher, student, (1, 8, 8), 10, 100, torch.Generator().manual_seed(0), fixed_data=False)
    return sr, student, teacher


@pytest.mark.parametrize(
    "params, match",
    [
        ({"pert_space": "pixel"}, r"pert_space='pixel' is not allowed; allowed: pixel_clamp, normalized"),
        ({"pert_init": "gauss"}, r"pert_init='gauss' is not allowed; allowed: noise, zero"),
        ({"search_l2": -1}, r"search_l2=-1 is outside \[0.0, inf\]"),
        ({"sr_loss": "sum"}, r"sr_loss='sum' is not allowed; allowed: batchmean, mean, batchmean_t2"),
        ({"sr_T": 0}, r"sr_T=0 is outside \(0.0, inf\]"),
        ({"sr_bn": "frozen"}, r"sr_bn='frozen' is not allowed; allowed: eval, train"),
        ({"inner_detach_clean": "yes"}, r"inner_detach_clean='yes' must be true or false"),
        ({"hg_ref_grad": True}, r"hg_ref_grad=true needs defense.hg_ref=student"),
        ({"hg_out_rounding": "ceil"}, r"hg_out_rounding='ceil' is not allowed; allowed: round, floor"),
        ({"sr_clip": 0}, r"sr_clip=0 is not allowed; allowed: synth, null \(no clip\) or a number > 0"),
        ({"sr_clip": "none"}, r"sr_clip='none' is not allowed"),
        ({"sr_fresh_opt": 2}, r"sr_fresh_opt=2 must be true or false"),
    ],
)
def test_sr_option_values_are_checked_with_the_key_and_the_allowed_values(params, match):
    for name in ("sr", "abd"):
        with pytest.raises(ValueError, match=match):
            build_defense(name, params)


def test_sr_option_defaults_are_todays_forms_and_abd_accepts_every_key():
    sr = build_defense("sr")
    assert {k: sr.params[k] for k in ("pert_space", "pert_init", "search_l2", "sr_loss", "sr_T", "sr_bn",
                                      "inner_detach_clean", "hg_ref_grad", "hg_out_rounding", "sr_clip",
                                      "sr_fresh_opt")} == {
        "pert_space": "pixel_clamp", "pert_init": "noise", "search_l2": None, "sr_loss": "batchmean", "sr_T": 1.0,
        "sr_bn": "eval", "inner_detach_clean": False, "hg_ref_grad": False, "hg_out_rounding": "round",
        "sr_clip": "synth", "sr_fresh_opt": False}
    assert build_defense("sr", {"sr_max_ratio": None}).params["sr_max_ratio"] is None
    assert (sr.stage2_clip(5.0), sr.stage2_clip(None), sr.stage2_fresh_optimizer()) == (5.0, None, False)
    other = build_defense("sr", {"sr_clip": None, "sr_fresh_opt": True})
    assert (other.stage2_clip(5.0), other.stage2_fresh_optimizer()) == (None, True)
    assert build_defense("sr", {"sr_clip": 2}).stage2_clip(5.0) == 2.0
    abd = build_defense("abd", {"pert_space": "normalized", "sr_loss": "mean", "sr_bn": "train", "sr_clip": None})
    assert abd.sr.params["pert_space"] == "normalized" and abd.sr.params["sr_bn"] == "train"


def test_normalized_space_adds_delta_in_std_units_without_a_clamp_and_zero_changes_no_input():
    from abd_ray.defenses.retrospection import SRForm

    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0)) * 2  # generator outputs leave [0, 1]
    std = torch.tensor([0.2, 0.5, 1.0]).view(1, 3, 1, 1)
    d = torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    norm, pixel = SRForm(std), SRForm()
    assert torch.equal(norm.apply(x, torch.zeros_like(d)), x)
    assert torch.equal(norm.apply(x, d), x + d * std) and torch.equal(norm.pixel(d), d * std)
    assert not torch.equal(pixel.apply(x, torch.zeros_like(d)), x)  # the clamp alone changes inputs
    assert torch.equal(pixel.apply(x, d), (x + d).clamp(0, 1)) and torch.equal(pixel.pixel(d), d)
    sr, student, _ = _sr_bound({"pert_space": "normalized"})
    assert torch.equal(sr.form.std, student.std) and build_defense("sr").form.std is None


def test_zero_start_draws_nothing_and_noise_start_draws_from_the_defense_stream():
    from abd_ray.defenses.retrospection import find_perturbation

    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model = _cnn("cnn_s")
    for init, drawn in (("zero", False), ("noise", True)):
        g = torch.Generator().manual_seed(4)
        before = g.get_state()
        d0 = find_perturbation(model, x, inner_round=0, generator=g, init=init)
        assert (d0.abs().max() == 0) is not drawn and torch.equal(g.get_state(), before) is not drawn
        assert find_perturbation(model, x, inner_round=3, generator=g, init=init).abs().max() > 0  # it moves


def test_search_l2_is_the_searchs_penalty_and_the_inner_loss_keeps_pert_l2(monkeypatch):
    from abd_ray.defenses import retrospection as r

    seen = {}
    search, hyper = r.find_perturbation, r.retrospection_hypergrad
    monkeypatch.setattr(r, "find_perturbation", lambda *a, **k: seen.setdefault("search", a[4]) and search(*a, **k))
    monkeypatch.setattr(r, "retrospection_hypergrad", lambda *a, **k: seen.setdefault("inner", a[4]) and hyper(*a, **k))
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for params, expect in (({"pert_l2": 0.01}, (0.01, 0.01)), ({"pert_l2": 0.01, "search_l2": 0.5}, (0.5, 0.01))):
        seen.clear()
        sr, student, teacher = _sr_bound(params)
        sr.add_student_grads(student, teacher, x, step=0)
        assert (seen["search"], seen["inner"]) == expect


def test_sr_loss_forms_and_temperature():
    from abd_ray.defenses.retrospection import SRForm

    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(6, 10, generator=g) * 3, torch.randn(6, 10, generator=g) * 3
    batchmean = SRForm().divergence(p, q)
    ref = F.kl_div(F.log_softmax(q, 1), F.log_softmax(p, 1), log_target=True, reduction="batchmean")
    assert batchmean == pytest.approx(float(ref), rel=1e-6)
    assert SRForm(loss="mean").divergence(p, q) == pytest.approx(float(batchmean) / 10, rel=1e-6)
    hot = F.kl_div(F.log_softmax(q / 4, 1), F.log_softmax(p / 4, 1), log_target=True, reduction="batchmean")
    assert SRForm(loss="batchmean_t2", T=4.0).divergence(p, q) == pytest.approx(16 * float(hot), rel=1e-6)
    assert SRForm(loss="mean", T=4.0).divergence(p, q) == pytest.approx(float(hot) / 10, rel=1e-6)
    assert torch.equal(SRForm(loss="batchmean_t2").divergence(p, q), batchmean)  # T=1: the same number


def test_sr_bn_train_moves_running_statistics_and_eval_does_not():
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for mode, moved in (("eval", False), ("train", True)):
        for ref in ("teacher", "student"):
            sr, student, teacher = _sr_bound({"sr_bn": mode, "hg_ref": ref})
            before = [b.clone() for b in student.buffers()]
            sr.add_student_grads(student, teacher, x, step=0)
            same = all(torch.equal(a, b) for a, b in zip(before, student.buffers(), strict=True))
            assert same is not moved and student.training, (mode, ref)
            assert all(torch.isfinite(q.grad).all() for q in student.parameters())
            assert math.isfinite(sr.metrics()["sr_outer"])


def _hypergrad(student, x, delta, **kw):
    from abd_ray.defenses.retrospection import retrospection_hypergrad

    return retrospection_hypergrad(student, x, delta, portion=0.25, K=2, generator=torch.Generator().manual_seed(3),
                                   **kw)


def test_detached_clean_side_and_reference_gradient_change_the_gradient_only():
    """Both options leave the outer loss's value as it was. With the reference's gradient, the hypergradient gains
    exactly the derivative of the outer loss through ``S(x)`` (the implicit term sees only the reference's value)."""
    from abd_ray.defenses.retrospection import SRForm

    student = _cnn("cnn_s", seed=1)  # eval mode: every forward is the same function
    with torch.no_grad():
        student.fc.weight.mul_(30)  # confident predictions: an untrained net's are uniform, its gradients ~1e-5
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    delta = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.3
    base, s0 = _hypergrad(student, x, delta)
    detached, s1 = _hypergrad(student, x, delta, detach_clean=True)
    with_ref, s2 = _hypergrad(student, x, delta, ref_grad=True)
    assert s0 == s1 == s2
    assert all((a - b).norm() > 1e-3 * a.norm() for a, b in zip(base, detached, strict=True))
    sel = torch.zeros(16, 1, 1, 1)
    sel[torch.randperm(16, generator=torch.Generator().manual_seed(3))[:4]] = 1.0
    params = [q for q in student.parameters() if q.requires_grad]
    through_ref = torch.autograd.grad(
        SRForm().divergence(student(x), student(SRForm().apply(x, sel * delta)).detach()), params)
    for a, b, c in zip(with_ref, base, through_ref, strict=True):
        assert torch.allclose(a - b, c, rtol=1e-4, atol=1e-7) and c.norm() > 1e-3 * b.norm()
    with pytest.raises(ValueError, match="ref_grad needs"):
        _hypergrad(student, x, delta, ref_grad=True, reference=torch.zeros(16, 10))


@pytest.mark.parametrize("n, rounded, floored", [(128, 3, 2), (64, 1, 1), (256, 5, 5), (10, 1, 1)])
def test_outer_rows_rounded_or_floored(n, rounded, floored):
    from abd_ray.defenses.retrospection import retrospection_hypergrad

    student = _cnn("cnn_s", seed=1)
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    delta = torch.full((1, 1, 8, 8), 0.1)
    for rounding, k in (("round", rounded), ("floor", floored)):
        _, stats = retrospection_hypergrad(student, x, delta, portion=0.02, K=1, rounding=rounding,
                                           generator=torch.Generator().manual_seed(0))
        assert stats["sr_perturbed"] == k


class _Bright(nn.Module):
    """Class 0 when the image is bright on average, class 1 otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1), requires_grad=False)  # where predict() finds the device

    def forward(self, x):
        m = x.mean((1, 2, 3))
        return torch.stack([m - 0.5, 0.5 - m] + [m * 0 - 1] * 8, dim=1)


def test_sr_probe_finds_a_trigger_equal_delta_and_leaves_the_run_untouched():
    from abd_ray.engine.build import Evaluation

    g = torch.Generator().manual_seed(0)
    clean = torch.rand(40, 1, 8, 8, generator=g) * 0.3  # dark: class 1
    trigger = torch.zeros(1, 1, 8, 8)
    trigger[..., 5:, 5:] = 0.9
    ev = Evaluation(clean, torch.ones(40, dtype=torch.long), (clean + trigger).clamp(0, 1), torch.ones(40), 0, clean)
    change = (ev.x_poison - clean).mean(0, keepdim=True)
    x = torch.randn(16, 1, 8, 8, generator=g)  # synthetic, outside [0, 1]
    for space in ("pixel_clamp", "normalized"):
        sr, student, _ = _sr_bound({"pert_space": space})
        assert sr.probe(ev, student, _Bright(), 0) == {}  # no SR step yet
        sr.add_student_grads(student, _cnn("cnn_l", seed=2), x, step=0)
        cold = sr.probe(ev, student, _Bright(), 1)
        assert set(cold) == {"sr_flip0", "sr_trigger_target_rate", "sr_student_target_rate", "sr_trigger_cos"}
        assert 0.0 <= cold["sr_flip0"] <= 100.0
        # Half the rows are dark only outside [0, 1] (mean 0.125, clamped 0.75): the clamp alone flips them.
        sr._last_x = torch.cat([torch.tensor([1.5, 1.5, 1.5, -4.0]).repeat(16).view(1, 1, 8, 8).expand(8, 1, 8, 8),
                                torch.full((8, 1, 8, 8), 0.2)])
        assert sr.probe(ev, _Bright(), _Bright(), 1)["sr_flip0"] == (0.0 if space == "normalized" else 50.0)
        sr._last_delta = change if space == "pixel_clamp" else change / sr.form.std
        buffers, rng = [b.clone() for b in student.buffers()], torch.get_rng_state()
        out = sr.probe(ev, student, _Bright(), 1)
        assert out["sr_trigger_cos"] == pytest.approx(1.0, abs=1e-6)
        sr._last_delta = -sr._last_delta
        assert sr.probe(ev, student, _Bright(), 1)["sr_trigger_cos"] == pytest.approx(-1.0, abs=1e-6)
        sr._last_delta = torch.full((1, 1, 8, 8), 1.0) / (1.0 if space == "pixel_clamp" else sr.form.std)
        bright = sr.probe(ev, student, _Bright(), 1)
        assert bright["sr_trigger_target_rate"] == 100.0 and out["sr_trigger_target_rate"] < 100.0
        assert 0.0 <= bright["sr_student_target_rate"] <= 100.0
        assert student.training and torch.equal(torch.get_rng_state(), rng)
        assert all(torch.equal(a, b) for a, b in zip(buffers, student.buffers(), strict=True))
        unattacked = Evaluation(clean, ev.y_test, clean[:0], ev.y_poison[:0], None, clean[:0])
        assert set(sr.probe(unattacked, student, _Bright(), 1)) == {"sr_flip0"}
