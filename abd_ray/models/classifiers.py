"""Classifiers: Wide-ResNets (Zagoruyko & Komodakis 2016), CIFAR ResNets (He et al. 2016), VGG with batch norm
(Simonyan & Zisserman 2015), and small CNNs sized for 8x8 digits.

Every classifier works at any input channel count and at 8x8 or 32x32, and returns its block outputs (plus the
pooled embedding as the last entry) when called with ``return_features=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from abd_ray.models.base import Classifier
from abd_ray.registry import MODELS


def _pool(h: torch.Tensor) -> torch.Tensor:
    return F.adaptive_avg_pool2d(h, 1).flatten(1)


# --- Wide-ResNet ---------------------------------------------------------------------------------------------------


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(F.relu(self.bn2(y)))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(Classifier):
    """WRN-depth-widen for small images; three stages, pre-activation blocks.

    Attributes:
        features_pre_bn: when true, ``return_features=True`` gives the last stage's output before the final
            BN-ReLU (the original ZSKT code's third attention map) instead of after it; the logits do not change.
    """

    features_pre_bn = False

    def __init__(self, depth: int, widen: int, num_classes: int, shape: Sequence[int], mean, std) -> None:
        super().__init__(shape[0], num_classes, mean, std)
        assert (depth - 4) % 6 == 0, "WRN depth must be 6n+4"
        n = (depth - 4) // 6
        w = [16, 16 * widen, 32 * widen, 64 * widen]
        stem = nn.Conv2d(shape[0], w[0], 3, 1, 1, bias=False)
        groups = []
        for g, stride in enumerate((1, 2, 2)):
            blocks = [_WideBlock(w[g] if i == 0 else w[g + 1], w[g + 1], stride if i == 0 else 1) for i in range(n)]
            groups.append(nn.Sequential(*blocks))
        groups[0] = nn.Sequential(stem, *groups[0])
        self._stages = nn.ModuleList(groups)
        self.bn = nn.BatchNorm2d(w[3])
        self.fc = nn.Linear(w[3], num_classes)
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def stages(self) -> nn.ModuleList:
        return self._stages

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        if not (return_features and self.features_pre_bn):
            return super().forward(x, return_features)
        h = (x - self.mean) / self.std
        feats = []
        for stage in self._stages:
            h = stage(h)
            feats.append(h)
        emb = self.pool_head(F.relu(self.bn(h)))
        return self.fc(emb), feats + [emb]

    def run_stage(self, i: int, h: torch.Tensor) -> torch.Tensor:
        # The last stage's output is taken after the final BN-ReLU, as attention transfer expects.
        h = self._stages[i](h)
        return F.relu(self.bn(h)) if i == len(self._stages) - 1 else h

    def pool_head(self, h: torch.Tensor) -> torch.Tensor:
        return _pool(h)


for _d, _k in ((16, 1), (16, 2), (40, 1), (40, 2)):
    MODELS.register(f"wrn{_d}_{_k}", kind="classifier")(
        lambda num_classes, shape, mean, std, _d=_d, _k=_k: WideResNet(_d, _k, num_classes, shape, mean, std)
    )


# --- CIFAR ResNet --------------------------------------------------------------------------------------------------


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNet(Classifier):
    """ResNet with a 3x3 stem and no max-pool (the CIFAR variant)."""

    def __init__(self, layers: Sequence[int], num_classes: int, shape: Sequence[int], mean, std) -> None:
        super().__init__(shape[0], num_classes, mean, std)
        stem = nn.Sequential(nn.Conv2d(shape[0], 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        stages, cin = [], 64
        for i, (n, cout) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(_BasicBlock(cin, cout, (1 if i == 0 else 2) if j == 0 else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        stages[0] = nn.Sequential(stem, *stages[0])
        self._stages = nn.ModuleList(stages)
        self.fc = nn.Linear(512, num_classes)

    def stages(self) -> nn.ModuleList:
        return self._stages

    def pool_head(self, h: torch.Tensor) -> torch.Tensor:
        return _pool(h)


MODELS.register("resnet18", kind="classifier")(
    lambda num_classes, shape, mean, std: ResNet((2, 2, 2, 2), num_classes, shape, mean, std)
)
MODELS.register("resnet34", kind="classifier")(
    lambda num_classes, shape, mean, std: ResNet((3, 4, 6, 3), num_classes, shape, mean, std)
)


# --- VGG -------------------------------------------------------------------------------------------------------------

_VGG = {
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
}


class VGG(Classifier):
    """VGG with batch norm; a stage's max-pool is skipped once the feature map is 1x1 (8x8 inputs)."""

    def __init__(self, cfg: list[list[int]], num_classes: int, shape: Sequence[int], mean, std) -> None:
        super().__init__(shape[0], num_classes, mean, std)
        stages, cin, size = [], shape[0], min(shape[1], shape[2])
        for stage_cfg in cfg:
            layers: list[nn.Module] = []
            for cout in stage_cfg:
                layers += [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
            if size > 1:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            stages.append(nn.Sequential(*layers))
        self._stages = nn.ModuleList(stages)
        self.fc = nn.Linear(512, num_classes)

    def stages(self) -> nn.ModuleList:
        return self._stages

    def pool_head(self, h: torch.Tensor) -> torch.Tensor:
        return _pool(h)


for _name, _cfg in _VGG.items():
    MODELS.register(_name, kind="classifier")(
        lambda num_classes, shape, mean, std, _cfg=_cfg: VGG(_cfg, num_classes, shape, mean, std)
    )


# --- small CNNs for 8x8 digits ------------------------------------------------------------------------------------


class SmallCNN(Classifier):
    """Three 3x3 conv-BN-ReLU stages (the second pools by 2): sized for 8x8 inputs, fine at 32x32 too."""

    def __init__(self, widths: Sequence[int], num_classes: int, shape: Sequence[int], mean, std) -> None:
        super().__init__(shape[0], num_classes, mean, std)
        stages, cin = [], shape[0]
        for i, cout in enumerate(widths):
            layers = [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            if i == 1:
                layers.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*layers))
            cin = cout
        self._stages = nn.ModuleList(stages)
        self.fc = nn.Linear(cin, num_classes)

    def stages(self) -> nn.ModuleList:
        return self._stages

    def pool_head(self, h: torch.Tensor) -> torch.Tensor:
        return _pool(h)


# cnn_l is the digits teacher, cnn_s the digits student: same shape of network, a quarter of the width, so
# attention transfer applies between them as between WRN-16-2 and WRN-16-1.
MODELS.register("cnn_l", kind="classifier")(
    lambda num_classes, shape, mean, std: SmallCNN((32, 64, 128), num_classes, shape, mean, std)
)
MODELS.register("cnn_s", kind="classifier")(
    lambda num_classes, shape, mean, std: SmallCNN((16, 32, 64), num_classes, shape, mean, std)
)
