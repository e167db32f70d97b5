"""The Shuffling Vaccine's suspect model: an ensemble of channel-shuffled copies of the teacher (Hong et al.,
"Revisiting Data-Free Knowledge Distillation with Poisoned Teachers", ICML 2023; ALGORITHMS.md section 4.1).

Permuting the input channels of the teacher's last few convolutions destroys its ordinary features, yet a
trigger-bearing input often keeps its prediction: where the ensemble still agrees with the teacher, the input is
suspect.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from abd_ray.models import conv_layers

# The paper shuffles the last 5 of a WRN-16-2's 16 convolutions, about the last third; "auto" keeps that share of
# the depth (the digits CNNs: the last 1 of 3; the measurements are in docs/defaults.md).
PAPER_N_SHUF_LAYER = 5
PAPER_N_CONV = 16


LAYER_COUNTS = ("all_convs", "named_conv")


def named_conv_indices(model: nn.Module) -> list[int]:
    """The convolutions the original code counts: those whose state-dict key contains "conv" in ITS models.

    Its residual networks name the stem ``conv1`` and each block's convolutions ``conv1`` / ``conv2``; a WRN's
    projection shortcut is ``convShortcut`` (counted) and a ResNet's ``shortcut.0`` (skipped). Its VGG names
    layers by index, so nothing counts. Ours carry the same block names (``conv1``, ``conv2``, a WRN block's
    ``shortcut`` conv, a ResNet block's ``shortcut`` Sequential), which this maps back; a network with no
    ``conv1`` / ``conv2`` (VGG, the digits CNNs) gets none.

    Returns:
        Indices into :func:`~abd_ray.models.conv_layers` (input side = 0).
    """
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    leaves = [name.rsplit(".", 1)[-1] for name in names]
    if not any(leaf in ("conv1", "conv2") for leaf in leaves):
        return []
    # The stem (the first convolution) is conv1 in the original's residual networks.
    return [i for i, leaf in enumerate(leaves) if i == 0 or leaf in ("conv1", "conv2", "shortcut")]


def resolve_shuffled_layers(
    model: nn.Module, n_shuf_layer: int | str | None, layer_count: str = "all_convs"
) -> list[int]:
    """Indices (input side = 0) of the convolutions to shuffle.

    Args:
        model: the teacher.
        n_shuf_layer: ``k > 0``: the last ``k`` convolutions; ``k < 0``: the first ``|k|``; ``"auto"`` / None:
            the paper's fraction of the depth, ``round(n_convs * 5 / 16)`` clipped to [1, n_convs - 1].
        layer_count: which convolutions count: ``all_convs`` (every ``nn.Conv2d``, in registration order) or
            ``named_conv`` (the original code's key-name rule, :func:`named_conv_indices`).

    Raises:
        ValueError: when ``|k|`` is 0 or exceeds the counted convolutions (the message gives the count), or when
            ``named_conv`` counts none.
    """
    if layer_count == "named_conv":
        counted = named_conv_indices(model)
        if not counted:
            raise ValueError(
                f"defense.layer_count='named_conv' counts no convolution of this {type(model).__name__} teacher "
                "(its layers have no conv1/conv2 names, as the original's VGG), so the vaccine would shuffle nothing "
                "and be inert; use defense.layer_count=all_convs"
            )
    elif layer_count == "all_convs":
        counted = list(range(len(conv_layers(model))))
    else:
        raise ValueError(f"defense.layer_count={layer_count!r} is not allowed; allowed: {', '.join(LAYER_COUNTS)}")
    n = len(counted)
    if n == 0:
        raise ValueError("the Shuffling Vaccine needs a teacher with convolutions; this one has none")
    if n_shuf_layer is None or n_shuf_layer == "auto":
        k = max(1, min(round(n * PAPER_N_SHUF_LAYER / PAPER_N_CONV), n - 1))
        return counted[n - k :]
    k = int(n_shuf_layer)
    if k == 0 or abs(k) > n:
        raise ValueError(
            f"defense.n_shuf_layer={n_shuf_layer!r} does not fit a teacher with {n} convolutions; "
            f"use 1..{n} (the last k), -{n}..-1 (the first |k|) or 'auto'"
        )
    return counted[n - k :] if k > 0 else counted[:-k]


def draw_permutations(
    model: nn.Module, layers: list[int], n_copies: int, generator: torch.Generator
) -> list[dict[int, torch.Tensor]]:
    """One random permutation of the input-channel axis per chosen layer per copy (CPU int64 tensors)."""
    convs = conv_layers(model)
    return [
        {i: torch.randperm(convs[i].weight.shape[1], generator=generator) for i in layers} for _ in range(n_copies)
    ]


def shuffled_copy(model: nn.Module, perms: dict[int, torch.Tensor]) -> nn.Module:
    """A deep copy of ``model`` whose chosen convolutions have their weight's input-channel axis permuted.

    The input-channel axis is dimension 1 of a convolution weight; in a grouped convolution the same permutation
    applies within every group. The copy is frozen and in eval mode; ``model`` is not touched.
    """
    clone = copy.deepcopy(model)
    convs = conv_layers(clone)
    with torch.no_grad():
        for i, perm in perms.items():
            w = convs[i].weight
            w.copy_(w[:, perm.to(w.device)])
    clone.eval()
    clone.requires_grad_(False)
    return clone


def first_shuffled_stage(model: nn.Module, layers: list[int]) -> int:
    """The index of the first stage of ``model`` that holds a shuffled convolution; 0 when the model has no
    stages (the whole network then runs per copy)."""
    stages = getattr(model, "stages", None)
    if not callable(stages) or not hasattr(model, "forward_from") or not layers:
        return 0
    chosen = {id(c) for i, c in enumerate(conv_layers(model)) if i in layers}
    for j, stage in enumerate(stages()):
        if any(id(m) in chosen for m in stage.modules()):
            return j
    return 0


class ShuffledEnsemble(nn.Module):
    """The suspect model: the mean of the logits of channel-shuffled copies of a teacher.

    The copies are identical to the teacher up to the first stage that holds a shuffled convolution, so that
    trunk runs once, on the teacher (or is taken from the teacher's features, when the caller has them), and only
    the rest of the network runs per copy: with the paper's last third of a WRN shuffled, three copies cost about
    one teacher forward instead of three.

    Args:
        teacher: the teacher (left untouched; frozen and in eval mode, like the copies).
        perms: one ``{layer index: permutation}`` dict per copy.
    """

    def __init__(self, teacher: nn.Module, perms: list[dict[int, torch.Tensor]]) -> None:
        super().__init__()
        self.perms = [{i: p.clone() for i, p in d.items()} for d in perms]
        self.copies = nn.ModuleList(shuffled_copy(teacher, d) for d in perms)
        self.start = first_shuffled_stage(teacher, sorted({i for d in perms for i in d}))
        self.__dict__["_teacher"] = teacher  # not a submodule: the teacher is neither copied, moved nor saved here

    def train(self, mode: bool = True) -> ShuffledEnsemble:
        # The copies stand for the frozen teacher: their BatchNorms always use the running statistics.
        return super().train(False)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The shared stages' output (the input of stage ``start``) for inputs ``x``."""
        t = self._teacher
        h = (x - t.mean) / t.std
        for i in range(self.start):
            h = t.run_stage(i, h)
        return h

    def forward(self, x: torch.Tensor, t_feats: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Mean logits of the copies on ``x``; ``t_feats``, the teacher's stage outputs on ``x`` (as returned with
        ``return_features=True``), saves the shared trunk's forward."""
        if self.start == 0:
            return torch.stack([m(x) for m in self.copies]).mean(0)
        h = t_feats[self.start - 1] if t_feats is not None else self.trunk(x)
        if not torch.is_autocast_enabled(h.device.type):  # features kept from an autocast forward
            h = h.to(self.copies[0].fc.weight.dtype)
        return torch.stack([m.forward_from(h, self.start) for m in self.copies]).mean(0)
