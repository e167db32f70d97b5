"""Every registered classifier runs forward and backward at 8x8x1 and 32x32x3 without NaN; every generator too."""

import pytest
import torch

from abd_ray.models import build_model, classifier_names, conv_layers, generator_names
from abd_ray.registry import MODELS


def test_every_model_is_a_classifier_or_a_generator():
    assert classifier_names() and generator_names()
    assert sorted(classifier_names() + generator_names()) == MODELS.names()


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)], ids=["8x8x1", "32x32x3"])
@pytest.mark.parametrize("name", classifier_names())
def test_classifier_forward_backward(name, shape):
    torch.manual_seed(0)
    m = build_model(name, num_classes=7, shape=shape, mean=(0.5,) * shape[0], std=(0.25,) * shape[0])
    x = torch.rand(3, *shape)
    logits, feats = m(x, return_features=True)
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()
    assert len(feats) >= 3 and feats[-1].dim() == 2 and all(f.shape[0] == 3 for f in feats)
    (logits.logsumexp(1).mean() + sum(f.pow(2).mean() for f in feats[:-1])).backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert len(conv_layers(m)) >= 3
    assert torch.equal(m(x), logits)  # return_features does not change the logits


def test_classifier_normalises_its_input():
    m = build_model("cnn_s", num_classes=3, shape=(1, 8, 8), mean=(0.5,), std=(2.0,)).eval()
    x = torch.rand(2, 1, 8, 8)
    m2 = build_model("cnn_s", num_classes=3, shape=(1, 8, 8), mean=(0.0,), std=(1.0,)).eval()
    m2.load_state_dict({k: v for k, v in m.state_dict().items() if k not in ("mean", "std")}, strict=False)
    assert torch.allclose(m(x), m2((x - 0.5) / 2.0), atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32)])
@pytest.mark.parametrize("name", generator_names())
def test_generator_shapes_and_gradients(name, shape):
    g = build_model(name, shape=shape, mean=(0.5,), std=(0.25,))
    x = g(torch.randn(4, 100))
    assert x.shape == (4, *shape) and torch.isfinite(x).all()
    x.mean().backward()
    assert all(p.grad is not None for p in g.parameters())
