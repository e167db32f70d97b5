"""Loss functions of data-free distillation (ALGORITHMS.md section 3), as pure functions of tensors.

Every function that has a natural per-sample form takes ``reduction`` (``"mean"``, ``"sum"`` or ``"none"``); with
``"none"`` it returns one value per sample, which is what the defenses' ``student_loss`` hook reweights.

Sources: the KD divergence (Hinton et al. 2015); attention transfer (Zagoruyko & Komodakis 2017, as used by
ZSKT, Micaelli & Storkey 2019); the L1 logit distance (DFAD, Fang et al. 2019); one-hot, activation and
information-entropy losses (DAFL, Chen et al. 2019); BatchNorm-statistics, total-variation and the
Jensen-Shannon competition term (DeepInversion / ADI, Yin et al. 2020); the masked adversarial term and the
contrastive loss (CMI, Fang et al. 2021; InfoNCE, van den Oord et al. 2018).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_REDUCTIONS = ("mean", "sum", "none")


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    raise ValueError(f"reduction={reduction!r}; allowed: {', '.join(_REDUCTIONS)}")


def kl_rows(
    log_p: torch.Tensor,
    log_q: torch.Tensor | None = None,
    *,
    q_logits: torch.Tensor | None = None,
    over_classes: str = "sum",
) -> torch.Tensor:
    """Per-sample ``KL(p || q)`` from log-probabilities (N, K), the one KL of the package.

    Args:
        log_p: ``log p`` (N, K).
        log_q: ``log q`` (N, K); or give ``q_logits`` instead, whose log-softmax is then taken after ``exp(log_p)``
            (the op order Self-Retrospection's graphs are built in, kept so that its gradients stay bit-identical).
        over_classes: ``sum`` (the divergence) or ``mean`` (the mean of its per-class terms, the vaccine's ``d``).
    """
    p = log_p.exp()
    if log_q is None:
        assert q_logits is not None, "give log_q or q_logits"
        log_q = F.log_softmax(q_logits, dim=1)
    terms = p * (log_p - log_q)
    return terms.sum(1) if over_classes == "sum" else terms.mean(1)


KD_FORMS = ("batchmean", "mean")


def kd_divergence(
    s_logits: torch.Tensor, t_logits: torch.Tensor, T: float = 1.0, reduction: str = "mean", form: str = "batchmean"
) -> torch.Tensor:
    """``KL(softmax(t / T) || softmax(s / T))`` per sample, in one of two scales.

    - ``batchmean``: summed over classes, times ``T**2``. The ``T**2`` factor (Hinton et al. 2015) keeps gradient
      magnitudes comparable across temperatures; at ``T = 1`` (ZSKT) it is 1.
    - ``mean``: the mean of the per-class terms, no ``T**2``: averaged over the batch too, it is torch's
      ``kl_div(reduction="mean")`` over N x K, the scale of the original ZSKT code (1/K of ``batchmean`` at T = 1).

    Args:
        s_logits: student logits (N, K).
        t_logits: teacher logits (N, K); gradients flow into them too if they require grad (ZSKT's generator).
        T: temperature.
        reduction: ``mean`` over samples, ``sum``, or ``none`` for (N,).
        form: ``batchmean`` or ``mean`` (above).
    """
    log_p_s = F.log_softmax(s_logits.float() / T, dim=1)
    log_p_t = F.log_softmax(t_logits.float() / T, dim=1)
    if form == "mean":
        return _reduce(kl_rows(log_p_t, log_p_s, over_classes="mean"), reduction)
    if form != "batchmean":
        raise ValueError(f"form={form!r}; allowed: {', '.join(KD_FORMS)}")
    per = kl_rows(log_p_t, log_p_s) * (T * T)
    return _reduce(per, reduction)


def l1_logits(s_logits: torch.Tensor, t_logits: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean absolute difference of the logits per sample (DFAD's discrepancy)."""
    return _reduce((s_logits.float() - t_logits.float()).abs().mean(1), reduction)


def js_divergence(a_logits: torch.Tensor, b_logits: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Jensen-Shannon divergence between two softmax distributions, per sample in [0, log 2]."""
    p = F.softmax(a_logits.float(), dim=1)
    q = F.softmax(b_logits.float(), dim=1)
    m = (0.5 * (p + q)).clamp_min(1e-12)
    kl_pm = (p * (p.clamp_min(1e-12).log() - m.log())).sum(1)
    kl_qm = (q * (q.clamp_min(1e-12).log() - m.log())).sum(1)
    return _reduce(0.5 * (kl_pm + kl_qm), reduction)


def attention_map(feat: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Spatial attention of a block output: channel mean of ``|f|**p``, flattened and L2-normalised (N, H*W)."""
    a = feat.float().abs().pow(p).mean(1).flatten(1)
    return F.normalize(a, dim=1)


def attention_transfer(
    s_feats: Sequence[torch.Tensor], t_feats: Sequence[torch.Tensor], p: int = 2, reduction: str = "mean"
) -> torch.Tensor:
    """Attention-transfer loss: mean squared difference of attention maps, summed over the block pairs.

    Args:
        s_feats: the student's block outputs (4-D tensors only; a pooled embedding must be left out).
        t_feats: the teacher's block outputs, same count and spatial sizes.
        p: exponent of the attention map (2 in Zagoruyko & Komodakis and ZSKT).
        reduction: over samples.
    """
    if len(s_feats) != len(t_feats):
        raise ValueError(
            f"attention transfer needs as many student as teacher blocks ({len(s_feats)} vs {len(t_feats)})"
        )
    per = None
    for s, t in zip(s_feats, t_feats, strict=True):
        d = (attention_map(s, p) - attention_map(t, p)).pow(2).mean(1)
        per = d if per is None else per + d
    assert per is not None, "attention transfer over zero blocks"
    return _reduce(per, reduction)


def features_match(s_feats: Sequence[torch.Tensor], t_feats: Sequence[torch.Tensor]) -> bool:
    """Whether two lists of block outputs pair up for attention transfer (same count, same spatial sizes)."""
    if len(s_feats) != len(t_feats):
        return False
    return all(
        s.dim() == 4 and t.dim() == 4 and s.shape[2:] == t.shape[2:] for s, t in zip(s_feats, t_feats, strict=True)
    )


def bn_statistics_loss(
    means: Sequence[torch.Tensor],
    variances: Sequence[torch.Tensor],
    running_means: Sequence[torch.Tensor],
    running_vars: Sequence[torch.Tensor],
) -> torch.Tensor:
    """DeepInversion's feature-distribution prior: ``sum_l ||mu_l - rm_l||_2 + ||var_l - rv_l||_2``.

    Args:
        means: batch means of each BatchNorm layer's input (per channel).
        variances: batch (biased) variances of each layer's input.
        running_means: each layer's running mean.
        running_vars: each layer's running variance.
    """
    total = None
    for m, v, rm, rv in zip(means, variances, running_means, running_vars, strict=True):
        term = torch.linalg.vector_norm(m.float() - rm.float()) + torch.linalg.vector_norm(v.float() - rv.float())
        total = term if total is None else total + term
    if total is None:
        raise ValueError("the model has no BatchNorm layer; the BN-statistics loss needs one (set synth.bn=0)")
    return total


def batch_channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of a (N, C, ...) activation, as BatchNorm computes them."""
    dims = [0, *range(2, x.dim())]
    x = x.float()
    return x.mean(dims), x.var(dims, unbiased=False)


def one_hot_loss(t_logits: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """DAFL's one-hot loss: cross-entropy of the teacher's logits against its own argmax (confident outputs)."""
    return _reduce(F.cross_entropy(t_logits.float(), t_logits.argmax(1), reduction="none"), reduction)


def activation_loss(features: torch.Tensor) -> torch.Tensor:
    """DAFL's activation loss: minus the mean absolute activation of a feature tensor (rewards high activations)."""
    return -features.float().abs().mean()


def information_entropy_loss(t_logits: torch.Tensor) -> torch.Tensor:
    """DAFL's information-entropy loss: the NEGATIVE entropy of the batch-mean class distribution.

    Minimising it maximises that entropy, i.e. balances the classes the generator produces.
    """
    p = F.softmax(t_logits.float(), dim=1).mean(0)
    return (p * p.clamp_min(1e-12).log()).sum()


def total_variation(x: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Total variation prior of images (N, C, H, W): mean ``|dx|**p + |dy|**p`` over pixels (p = 1 or 2)."""
    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    if p == 1:
        return dx.abs().mean() + dy.abs().mean()
    if p == 2:
        return dx.pow(2).mean() + dy.pow(2).mean()
    raise ValueError(f"total variation p={p!r}; allowed: 1, 2")


def masked_adversarial(s_logits: torch.Tensor, t_logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """CMI's adversarial term: ``-KL(t || s)`` on the samples where student and teacher still agree.

    Samples the student already gets wrong are left alone, so the generator does not chase unlearnable outliers.
    """
    agree = (s_logits.argmax(1) == t_logits.argmax(1)).float()
    return -(kd_divergence(s_logits, t_logits, T, reduction="none") * agree).mean()


def info_nce(
    anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None, temperature: float = 0.1
) -> torch.Tensor:
    """InfoNCE: each anchor must pick its own positive among all positives (and the extra negatives).

    Args:
        anchors: (N, D) embeddings; L2-normalised inside.
        positives: (N, D) embeddings of a second view of the same samples.
        negatives: (M, D) embeddings of other samples (e.g. a memory bank), or None.
        temperature: softmax temperature (CMI: 0.1).
    """
    a = F.normalize(anchors.float(), dim=1)
    keys = F.normalize(positives.float(), dim=1)
    if negatives is not None and len(negatives):
        keys = torch.cat([keys, F.normalize(negatives.float(), dim=1)])
    logits = a @ keys.t() / temperature
    labels = torch.arange(len(a), device=a.device)
    return F.cross_entropy(logits, labels)
