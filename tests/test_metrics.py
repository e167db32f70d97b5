import math

import torch
from torch import nn

from abd_ray import metrics as M


def test_metrics_match_hand_computation():
    y = torch.tensor([0, 1, 2, 3, 4])
    pred = torch.tensor([0, 1, 0, 3, 0])
    assert M.clean_acc(pred, y) == 60.0
    # poisoned set: true labels 1..4, target 0; predictions 0, 0, 3, 4 -> asr 2/4, robust 2/4
    yp = torch.tensor([1, 2, 3, 4])
    pp = torch.tensor([0, 0, 3, 4])
    assert M.asr(pp, 0) == 50.0
    assert M.robust_acc(pp, yp) == 50.0


def test_der_hand_values():
    # asr 90 -> 10 and acc 95 -> 93: ((0.8) - (0.02) + 1) / 2 = 0.89
    assert math.isclose(M.der(95, 90, 93, 10), 0.89)
    # a defense that raises asr and raises acc: both clipped at 0 -> 0.5
    assert M.der(90, 10, 95, 20) == 0.5
    assert M.der(100, 100, 0, 0) == 0.5 and M.der(50, 100, 50, 0) == 1.0 and M.der(100, 0, 0, 0) == 0.0


class _Fixed(nn.Module):
    """Predicts the first pixel's value as the class."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        c = x.flatten(1)[:, 0].long()
        return nn.functional.one_hot(c, 5).float() + 0 * self.w


def test_evaluate_batched_equals_unbatched():
    x = torch.tensor([0.0, 1, 2, 3, 4, 0, 0]).view(-1, 1, 1, 1)
    y = torch.tensor([0, 1, 2, 0, 4, 0, 1])
    xp = torch.zeros(4, 1, 1, 1)
    yp = torch.tensor([1, 2, 3, 4])
    a = M.evaluate(_Fixed(), x, y, xp, yp, target=0, batch_size=2)
    b = M.evaluate(_Fixed(), x, y, xp, yp, target=0, batch_size=100)
    assert a == b
    assert math.isclose(a["clean_acc"], 100 * 5 / 7) and a["asr"] == 100.0 and a["robust_acc"] == 0.0
