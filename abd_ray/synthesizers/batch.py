"""The batch a synthesizer hands to the KD loop and to the defense's hooks."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    """Inputs with the teacher's view of them.

    A student step's batch is detached; the batch a generator's loss is built on (``generator_term``) keeps the
    graph, so the defense's term can steer the generator.

    Attributes:
        x: inputs in pixel space (N, C, H, W).
        t_logits: teacher logits on ``x`` (float32).
        t_feats: the teacher's block outputs on ``x``, where the synthesizer had them or the defense asked for them.
        keys: each row's sample key, where the rows are stored samples fed unchanged (:class:`abd_ray.memo.RowMemo`).
        term_optional: set on a synthesis loss whose own method has no defense term (DeepInversion); a defense
            adds its term there only when configured to (the vaccine's ``bank_mode`` term / both).
    """

    x: torch.Tensor
    t_logits: torch.Tensor
    t_feats: list[torch.Tensor] | None = None
    keys: torch.Tensor | None = None
    term_optional: bool = False
