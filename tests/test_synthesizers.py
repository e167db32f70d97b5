"""Every registered synthesizer: batches of the right shape and range, steps without NaN, losses that move the
right way on a toy teacher; the loss functions; hyperparameter validation."""

import math

import numpy as np
import pytest
import torch

from abd_ray import losses
from abd_ray.data import load_dataset
from abd_ray.defenses import Defense
from abd_ray.memo import RowMemo
from abd_ray.models import build_model
from abd_ray.registry import SYNTHESIZERS
from abd_ray.synthesizers import Batch, SynthContext, Synthesizer, synthesizer_class
from abd_ray.synthesizers.parts import BNStats, MemoryBank, frozen

ALL = SYNTHESIZERS.names()
# Tiny budgets so that a whole synthesizer test takes a second or two.
TINY = {"deepinversion": {"iters": 4, "round_every": 3}, "cmi": {"g_steps": 4, "round_every": 3, "n_neg": 32}}
PIXEL_RANGE = {"clean", "deepinversion", "ood"}  # inputs clamped to [0, 1]; generators' outputs are unbounded
B = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """8x8 convolutions: one thread is as fast as two, and does not collapse when the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory):
    """A digits teacher trained for 3 epochs (a second or two): enough to have opinions and BN statistics."""
    from abd_ray.config import TeacherSpec
    from abd_ray.engine.teacher import get_teacher

    spec = TeacherSpec.for_dataset("digits", epochs=3)
    t = get_teacher(spec, tmp_path_factory.mktemp("cache"), progress=False)
    model = t.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def make(name, teacher, params=None, steps=10, seed=0):
    data = load_dataset("digits")
    torch.manual_seed(seed)
    student = build_model("cnn_s", num_classes=10, shape=data.shape, mean=data.mean, std=data.std).train()
    ctx = SynthContext(
        teacher,
        student,
        data,
        torch.device("cpu"),
        steps,
        B,
        Defense(),
        torch.Generator().manual_seed(seed + 1),
        torch.Generator().manual_seed(seed + 2),
    )
    synth = synthesizer_class(name)(ctx, {**TINY.get(name, {}), **(params or {})})
    return synth, ctx


def test_registry_holds_every_synthesizer():
    assert {"clean", "cmi", "dafl", "deepinversion", "dfad", "ood", "zskt"} <= set(ALL)
    for name in ALL:
        cls = synthesizer_class(name)
        assert cls.name == name and cls.paper and cls.__module__.startswith("abd_ray.synthesizers")
        doc = __import__(cls.__module__, fromlist=["x"]).__doc__
        assert doc and any(ch.isdigit() for ch in doc), f"{name}: module docstring must cite its paper and year"
    with pytest.raises(ValueError, match="known synthesizers: clean, cmi"):
        synthesizer_class("nope")


@pytest.mark.parametrize("name", ALL)
def test_batches_shape_range_and_steps_without_nan(name, toy_teacher):
    synth, ctx = make(name, toy_teacher)
    opt = synth.student_optimizer(ctx.student.parameters())
    for step in range(4):
        n = 0
        for batch in synth.batches(step):
            n += 1
            assert batch.x.shape == (B, 1, 8, 8) and batch.t_logits.shape == (B, 10)
            assert not batch.x.requires_grad and not batch.t_logits.requires_grad
            assert torch.isfinite(batch.x).all() and torch.isfinite(batch.t_logits).all()
            if name in PIXEL_RANGE:
                assert batch.x.min() >= 0 and batch.x.max() <= 1
            out = ctx.student(batch.x, return_features=synth.needs_features)
            s_logits, s_feats = out if isinstance(out, tuple) else (out, None)
            per = synth.student_loss(s_logits, s_feats, batch)
            assert per.shape == (B,) and torch.isfinite(per).all()
            opt.zero_grad()
            per.mean().backward()
            opt.step()
        assert n >= 1
    assert all(torch.isfinite(p).all() for p in ctx.student.parameters())
    assert all(math.isfinite(v) for v in synth.losses().values())


@pytest.mark.parametrize("name", ALL)
def test_student_loss_goes_down_on_a_fixed_batch(name, toy_teacher):
    synth, ctx = make(name, toy_teacher, {"lr_s": 5e-3, "opt_s": "adam"})
    batch = next(iter(synth.batches(0)))
    opt = synth.student_optimizer(ctx.student.parameters())

    def loss():
        out = ctx.student(batch.x, return_features=synth.needs_features)
        s_logits, s_feats = out if isinstance(out, tuple) else (out, None)
        return synth.student_loss(s_logits, s_feats, batch).mean()

    ctx.student.eval()  # fixed BN statistics, so the measured loss is a function of the weights only
    before = loss().item()
    ctx.student.train()
    for _ in range(25):
        opt.zero_grad()
        loss().backward()
        opt.step()
    ctx.student.eval()
    assert loss().item() < before


@pytest.mark.parametrize("name", ["zskt", "dfad"])
def test_adversarial_generator_increases_disagreement(name, toy_teacher):
    synth, ctx = make(name, toy_teacher, {"lr_g": 1e-2})
    z = synth.sample_z()
    ctx.student.eval()

    def disagreement():
        with torch.no_grad():
            x = synth.generator(z)
            return synth.disagreement(ctx.student(x), toy_teacher(x)).mean().item()

    before = disagreement()
    for _ in range(10):
        synth.generator_step(z, synth._gen_loss)
    assert disagreement() > before


def test_dafl_generator_loss_goes_down(toy_teacher):
    synth, _ = make("dafl", toy_teacher, {"lr_g": 1e-2})
    z = synth.sample_z()
    first = synth.generator_step(z, synth._gen_loss)[2].item()
    for _ in range(15):
        last = synth.generator_step(z, synth._gen_loss)[2].item()
    assert last < first


@pytest.mark.parametrize("name", ["deepinversion", "cmi"])
def test_inversion_round_lowers_its_loss_and_matches_bn_statistics(name, toy_teacher):
    params = {"iters": 20} if name == "deepinversion" else {"g_steps": 20, "lr_g": 1e-2}
    synth, ctx = make(name, toy_teacher, params)
    with frozen(ctx.student):
        x = synth.synthesize_round(0)
    logged = synth.losses()
    assert logged["loss_gen"] < logged["loss_gen_first"]
    bn = BNStats(toy_teacher)
    noise = torch.rand_like(x)
    with torch.no_grad():
        with bn:
            toy_teacher(x)
        synthesized = bn.loss().item()
        with bn:
            toy_teacher(noise)
        random = bn.loss().item()
    assert synthesized < random


def test_memory_bank_caps_and_round_trips():
    bank = MemoryBank(5)
    bank.add(torch.zeros(3, 1, 2, 2))
    bank.add(torch.ones(4, 1, 2, 2))
    assert len(bank) == 5 and bank.x[0].sum() == 0 and bank.x[-1].sum() == 4
    other = MemoryBank(5)
    other.load_state_dict(bank.state_dict(), torch.device("cpu"))
    assert torch.equal(other.x, bank.x)
    g = torch.Generator().manual_seed(0)
    assert bank.sample(7, g).shape == (7, 1, 2, 2)


def test_bank_keys_name_the_same_sample_after_the_front_is_dropped():
    bank = MemoryBank(5)
    bank.add(torch.arange(3.0).view(3, 1, 1, 1))  # entry k holds the value k: its serial number
    bank.add(torch.arange(3.0, 7.0).view(4, 1, 1, 1))  # serials 0 and 1 dropped
    x, keys = bank.sample_keyed(50, torch.Generator().manual_seed(0))
    assert torch.equal(x.flatten(), keys.float()) and set(keys.tolist()) == {2, 3, 4, 5, 6}
    other = MemoryBank(5)
    other.load_state_dict(bank.state_dict(), torch.device("cpu"))
    assert other.dropped == 2


def test_row_memo_computes_each_key_once():
    memo, seen = RowMemo(), []

    def fn(x):
        seen.append(len(x))
        return x * 2

    x = torch.arange(4.0).view(4, 1)
    assert torch.equal(memo.rows(torch.tensor([0, 1, 2, 3]), x, fn), x * 2)
    out = memo.rows(torch.tensor([3, 70, 3, 1]), torch.tensor([[3.0], [70.0], [3.0], [1.0]]), fn)
    assert torch.equal(out.flatten(), torch.tensor([6.0, 140.0, 6.0, 2.0]))  # key 70 grows the memo past 64 rows
    assert seen == [4, 1] and len(memo) == 5
    memo.clear()
    memo.rows(torch.tensor([1]), torch.tensor([[1.0]]), fn)
    assert seen == [4, 1, 1]


def test_bank_synthesizers_run_rounds_on_schedule(toy_teacher):
    synth, _ = make("cmi", toy_teacher, {"round_every": 2})
    for step in range(5):
        list(synth.batches(step))
    assert len(synth.bank) == 3 * B and len(synth.feat_bank) == 3 * B  # rounds at steps 0, 2, 4


def test_zskt_runs_generator_and_teacher_once_per_pseudo_batch(toy_teacher):
    """The performance contract: n_s student steps share one generator pass and one teacher pass."""
    synth, _ = make("zskt", toy_teacher, {"n_s": 10})
    calls = {"g": 0, "t": 0}
    h1 = synth.generator.register_forward_hook(lambda *a: calls.__setitem__("g", calls["g"] + 1))
    h2 = toy_teacher.register_forward_hook(lambda *a: calls.__setitem__("t", calls["t"] + 1))
    try:
        batches = list(synth.batches(0))
    finally:
        h1.remove()
        h2.remove()
    assert len(batches) == 10 and all(b is batches[0] for b in batches)
    assert calls == {"g": 2, "t": 2}  # one each for the generator step, one each for the student batch


def test_zskt_attention_transfer_only_when_blocks_pair_up(toy_teacher):
    synth, _ = make("zskt", toy_teacher)
    assert synth.beta == 250.0 and synth.needs_features
    data = load_dataset("digits")
    wrn = build_model("wrn16_1", num_classes=10, shape=data.shape, mean=data.mean, std=data.std)
    ctx = SynthContext(
        toy_teacher, wrn, data, torch.device("cpu"), 10, B, Defense(), torch.Generator(), torch.Generator()
    )
    other = synthesizer_class("zskt")(ctx, {})
    assert other.beta == 0.0 and not other.needs_features


def test_digits_defaults_override_paper_defaults():
    zskt = synthesizer_class("zskt")
    assert zskt.resolve_params({}, "cifar10")["n_s"] == 10  # the paper's
    assert zskt.resolve_params({}, "digits")["n_s"] == 5
    assert zskt.resolve_params({"n_s": 3}, "digits")["n_s"] == 3


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("zskt", {"bogus": 1}, r"unknown key\(s\) synth.bogus; allowed: T, at_layer, beta"),
        ("zskt", {"lr_s": 0}, r"synth.lr_s=0 must be > 0"),
        ("zskt", {"beta": -1.0}, r"must be >= 0"),
        ("zskt", {"n_s": 2.5}, r"must be an integer"),
        ("zskt", {"opt_s": "rmsprop"}, r"allowed: adam, sgd"),
        ("zskt", {"T": "hot"}, r"finite number"),
        ("clean", {"fraction": 1.5}, r"fraction=1.5 must be in \(0, 1\]"),
        ("ood", {"image": "/does/not/exist.png"}, r"synth.image='/does/not/exist.png' does not exist"),
        ("deepinversion", {"flip": "yes"}, r"true or false"),
    ],
)
def test_bad_hyperparameters_are_named(name, params, match):
    with pytest.raises(ValueError, match=match):
        synthesizer_class(name).resolve_params(params, "digits")


def test_ood_reads_a_user_image_and_a_folder(tmp_path, toy_teacher):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    for src, n in ((folder / "0.png", 1), (folder, 2)):
        synth, _ = make("ood", toy_teacher, {"image": str(src)})
        assert synth.src.shape[:2] == (n, 1)
        x = next(iter(synth.batches(0))).x
        assert x.shape == (B, 1, 8, 8) and 0 <= x.min() and x.max() <= 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image"):
        synthesizer_class("ood").resolve_params({"image": str(tmp_path / "empty")}, "digits")


def test_clean_uses_the_configured_fraction(toy_teacher):
    synth, ctx = make("clean", toy_teacher)
    assert len(synth.x) == round(0.2 * len(ctx.data.x_train))


# --- losses -----------------------------------------------------------------------------------------------------------


def test_kd_divergence_is_kl_with_temperature():
    t = torch.randn(5, 10)
    s = torch.randn(5, 10)
    assert torch.allclose(losses.kd_divergence(t, t, reduction="none"), torch.zeros(5), atol=1e-6)
    ref = torch.nn.functional.kl_div(torch.log_softmax(s / 4, 1), torch.softmax(t / 4, 1), reduction="batchmean") * 16
    assert torch.allclose(losses.kd_divergence(s, t, T=4.0), ref, atol=1e-5)
    per = losses.kd_divergence(s, t, reduction="none")
    assert (
        per.shape == (5,) and (per > 0).all() and torch.allclose(per.sum(), losses.kd_divergence(s, t, reduction="sum"))
    )
    with pytest.raises(ValueError, match="reduction"):
        losses.kd_divergence(s, t, reduction="max")


def test_small_losses():
    a = torch.randn(4, 10)
    b = torch.randn(4, 10)
    js = losses.js_divergence(a, b, reduction="none")
    assert (js >= 0).all() and (js <= math.log(2) + 1e-6).all()
    assert torch.allclose(losses.l1_logits(a, a), torch.tensor(0.0))
    f = [torch.randn(4, 8, 6, 6), torch.randn(4, 16, 3, 3)]
    assert losses.attention_transfer(f, f).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.attention_transfer(f, [torch.randn_like(x) for x in f]).item() > 0
    assert losses.features_match(f, f) and not losses.features_match(f, f[:1])
    confident = torch.tensor([[10.0, 0, 0], [0, 10.0, 0]])
    assert losses.one_hot_loss(confident) < losses.one_hot_loss(torch.zeros(2, 3))
    balanced = torch.eye(3) * 10
    assert losses.information_entropy_loss(balanced) < losses.information_entropy_loss(balanced[[0, 0, 0]])
    smooth = torch.ones(1, 1, 4, 4)
    assert losses.total_variation(smooth) == 0 and losses.total_variation(torch.rand(1, 1, 4, 4)) > 0
    m, v = losses.batch_channel_stats(torch.randn(64, 3, 5, 5))
    assert losses.bn_statistics_loss([m], [v], [m], [v]) == 0
    emb = torch.randn(8, 16)
    assert losses.info_nce(emb, emb) < losses.info_nce(emb, torch.randn(8, 16))
    agree = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    assert losses.masked_adversarial(-agree, agree) == 0  # nothing agrees: no adversarial pull
    assert losses.masked_adversarial(agree * 0.5, agree) < 0


@pytest.mark.parametrize("name", [n for n in ALL if synthesizer_class(n).fixed_data])
def test_fixed_data_batches_carry_teacher_features_to_the_vaccine(name, toy_teacher):
    """The vaccine's reweighting on fixed or banked data reuses the teacher's block outputs of the batch instead of
    running the shared trunk again; the loss is the same either way."""
    from abd_ray.defenses import build_defense

    synth, ctx = make(name, toy_teacher)
    if hasattr(synth, "aug"):  # augmented, as on 32x32 data (digits are not augmented: see the memo test below)
        synth.aug = {"pad": 1, "flip": True}
    ctx.defense = build_defense("sv", {"fixed_mode": "capped"})
    ctx.defense.bind(toy_teacher, ctx.student, ctx.shape, 10, 10, torch.Generator().manual_seed(0), fixed_data=True)
    batch = next(iter(synth.student_batches(0)))
    assert batch.t_feats is not None and len(batch.t_feats) >= ctx.defense.suspect.start
    per = torch.rand(len(batch.x))
    with_feats = ctx.defense.student_loss(per, batch)
    without = ctx.defense.student_loss(per, Batch(batch.x, batch.t_logits))
    assert torch.allclose(with_feats, without, atol=1e-6)
    ctx.defense = Defense()  # a defense that does not want the teacher's features: none computed
    assert synth.fixed_batch(batch.x).t_feats is None


@pytest.mark.parametrize("name", ["clean", "deepinversion", "cmi"])
@pytest.mark.parametrize("defense", ["sv", "abd"])
def test_unaugmented_stored_samples_reuse_teacher_and_suspect_outputs(name, defense, toy_teacher):
    """On digits, clean and the banks feed stored samples unchanged: the batch names them, and the teacher's and the
    suspect's logits are computed once per sample, equal to computing them on every draw."""
    from abd_ray.defenses import build_defense

    synth, ctx = make(name, toy_teacher)
    ctx.defense = build_defense(defense, {"fixed_mode": "capped"})
    ctx.defense.bind(toy_teacher, ctx.student, ctx.shape, 10, 10, torch.Generator().manual_seed(0), fixed_data=True)
    sv = getattr(ctx.defense, "sv", ctx.defense)
    assert sv.active

    def loss_and_suspect_rows(per, batch):
        """The defense's student loss on ``batch``, and how many rows the suspect computed for it."""
        rows = []
        hook = sv.suspect.register_forward_hook(lambda m, inp, out: rows.append(len(inp[0])))
        try:
            return ctx.defense.student_loss(per, batch), sum(rows)
        finally:
            hook.remove()

    seen = set()
    for step in range(4):
        batch = next(iter(synth.student_batches(step)))
        assert batch.keys is not None and batch.t_feats is None
        with torch.no_grad():
            assert torch.allclose(batch.t_logits, toy_teacher(batch.x), atol=1e-5)
        per = torch.rand(len(batch.x))
        misses = [k for k in batch.keys.tolist() if k not in seen]  # a key drawn twice unseen is computed twice
        loss, rows = loss_and_suspect_rows(per, batch)
        assert rows == len(misses)
        assert torch.allclose(loss, sv.student_loss(per, Batch(batch.x, batch.t_logits)), atol=1e-6)
        seen |= set(batch.keys.tolist())
        assert len(synth.teacher_memo) == len(seen)
    rows = []
    hook = toy_teacher.register_forward_hook(lambda m, inp, out: rows.append(len(inp[0])))
    try:
        again = synth.fixed_batch(batch.x, batch.keys)  # every sample seen: neither model runs
        assert loss_and_suspect_rows(per, again)[1] == 0
    finally:
        hook.remove()
    assert rows == [] and torch.equal(again.t_logits, batch.t_logits)
    other = build_defense(defense, {"fixed_mode": "capped"})
    other.bind(toy_teacher, ctx.student, ctx.shape, 10, 10, torch.Generator().manual_seed(5), fixed_data=True)
    ctx.defense.load_state_dict(other.state_dict())  # other permutations: the old suspect's rows are gone
    assert loss_and_suspect_rows(per, again)[1] == len(again.x)


def test_kl_rows_is_the_kl_divergence_in_each_form():
    p, q = torch.randn(6, 5), torch.randn(6, 5)
    log_p, log_q = torch.log_softmax(p, 1), torch.log_softmax(q, 1)
    ref = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(1)
    assert torch.allclose(losses.kl_rows(log_p, log_q), ref, atol=1e-6)
    assert torch.equal(losses.kl_rows(log_p, q_logits=q), losses.kl_rows(log_p, log_q))
    assert torch.allclose(losses.kl_rows(log_p, log_q, over_classes="mean"), ref / 5, atol=1e-6)


class _Probe(Defense):
    """Stands for the vaccine: a generator term, and a student loss that acts on fixed data only (as SV's does);
    each records when a backward pass goes through it."""

    def bind(self, teacher, student, shape, num_classes, total_steps, generator, *, fixed_data):
        self.fixed_data, self.reached = fixed_data, set()

    def _probe(self, t, where):
        t.register_hook(lambda g: self.reached.add(where))
        return t

    def generator_term(self, batch):
        return self._probe(batch.x.float().sum() * 0.0, "generator")

    def student_loss(self, per_sample, batch):
        return self._probe(per_sample.mean() * 1.0, "student") if self.fixed_data else per_sample.mean()


@pytest.mark.parametrize("name", ALL)
def test_the_defense_term_reaches_every_synthesizers_generator_or_student_loss(name, toy_teacher):
    synth, ctx = make(name, toy_teacher)
    ctx.defense = _Probe()
    ctx.defense.bind(toy_teacher, ctx.student, ctx.shape, 10, 10, torch.Generator(), fixed_data=type(synth).fixed_data)
    for batch in synth.student_batches(0):
        out = ctx.student(batch.x, return_features=synth.needs_features)
        s_logits, s_feats = out if isinstance(out, tuple) else (out, None)
        synth.batch_loss(s_logits, s_feats, batch)[0].backward()
    assert ctx.defense.reached & {"generator", "student"}, f"{name}: the defense never reached a loss"


def test_a_generator_fed_synthesizer_that_skips_the_defense_term_fails_at_once(toy_teacher):
    class Forgetful(Synthesizer):
        def batches(self, step):
            yield Batch(torch.zeros(2, 1, 8, 8), torch.zeros(2, 10))

    _, ctx = make("zskt", toy_teacher)
    with pytest.raises(RuntimeError, match="add_defense_term"):
        next(Forgetful(ctx).student_batches(0))
