"""Per-sample memo of a frozen function, for samples a run feeds again unchanged.

Fixed-data synthesizers on unaugmented inputs (``clean``, and the banks of ``deepinversion`` and ``cmi`` on the 8x8
digits, where no crop or flip is applied) draw the same stored samples over and over. The teacher is frozen, and so
is the vaccine's suspect model once built: their outputs on such a sample never change, so computing them once per
sample is exact, and saves the teacher's forward (every defense) and the suspect's forward (SV) on every later draw.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class RowMemo:
    """Rows of ``fn(x)`` for samples known by an integer key, each computed once.

    A key is a sample's serial number in a pool that never changes a sample once it holds it (an index into
    ``clean``'s fixed subset; a memory bank's count of samples added before it). ``clear()`` forgets every row:
    call it when ``fn`` changes (the vaccine draws new permutations).
    """

    def __init__(self) -> None:
        self.vals: torch.Tensor | None = None
        self.have: torch.Tensor | None = None

    def clear(self) -> None:
        self.vals = self.have = None

    def __len__(self) -> int:
        """How many keys have a row."""
        return 0 if self.have is None else int(self.have.sum())

    def rows(self, keys: torch.Tensor, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``fn(x)`` for a batch ``x`` whose row ``i`` is the sample of key ``keys[i]``; ``fn`` runs only on the
        rows whose key has not been seen (a key drawn twice in one batch is computed twice, then kept once).

        Args:
            keys: int64 (N,), on ``x``'s device.
            x: the samples (N, ...).
            fn: a function of a batch, returning one row per sample, detached (no gradient is kept).
        """
        self._reserve(int(keys.max()) + 1, keys.device)
        assert self.have is not None
        miss = (~self.have[keys]).nonzero().squeeze(1)
        if len(miss):
            out = fn(x[miss]).detach()
            if self.vals is None:
                self.vals = out.new_zeros((len(self.have), *out.shape[1:]))
            self.vals[keys[miss]] = out
            self.have[keys[miss]] = True
        assert self.vals is not None
        return self.vals[keys]

    def _reserve(self, n: int, device: torch.device) -> None:
        """Room for keys ``0 .. n - 1`` (capacity doubles, so a growing bank costs amortised constant time)."""
        if self.have is not None and len(self.have) >= n:
            return
        cap = max(n, 2 * (0 if self.have is None else len(self.have)), 64)
        have = torch.zeros(cap, dtype=torch.bool, device=device)
        if self.have is not None:
            have[: len(self.have)] = self.have
        self.have = have
        if self.vals is not None:
            vals = self.vals.new_zeros((cap, *self.vals.shape[1:]))
            vals[: len(self.vals)] = self.vals
            self.vals = vals
