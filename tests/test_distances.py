import math

import pytest
import torch

from cmt.lpips import FEATURES
from cmt.trainers.distances import default_huber_c, make_distance, pseudo_huber, squared_l2



def test_l2_is_the_summed_squared_error():
    x, y = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    expected = ((x - y) ** 2).reshape(3, -1).sum(1)
    torch.testing.assert_close(make_distance("l2", (1, 4, 4))(x, y), expected)
    half = squared_l2(x.half(), y.half())
    assert half.dtype == torch.float32


def test_pseudo_huber_limits_and_default_constant():
    assert default_huber_c((3, 32, 32)) == pytest.approx(0.03, rel=3e-3)  # iCT's CIFAR-10 value
    assert default_huber_c((2,)) == pytest.approx(0.00054 * math.sqrt(2))
    x = torch.zeros(2, 2)
    y = torch.tensor([[1e-4, 0.0], [30.0, 40.0]])
    c = 0.01
    d = pseudo_huber(x, y, c)
    assert d[0] == pytest.approx(1e-8 / (2 * c), rel=1e-3)          # quadratic near 0
    assert d[1] == pytest.approx(50.0 - c, rel=1e-6)                  # the L2 norm far away
    torch.testing.assert_close(make_distance("huber", (2,), huber_c=c)(x, y), d)
    torch.testing.assert_close(make_distance("huber", (2,), huber_c=0.0)(x, y), y.norm(dim=1))


def test_bad_distance_requests_fail_clearly():
    with pytest.raises(ValueError, match="unknown distance 'l1'"):
        make_distance("l1", (2,))
    with pytest.raises(ValueError, match="pixel images"):
        make_distance("lpips", (2,))
    with pytest.raises(ValueError, match="pixel images"):
        make_distance("lpips", (4, 32, 32))  # latents
    with pytest.raises(ValueError, match=">= 0"):
        make_distance("huber", (2,), huber_c=-1.0)




def test_lpips_without_trunk_weights_is_one_clear_error(offline_hub):
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        make_distance("lpips", (1, 16, 16))


def test_lpips_distance_with_trunk_weights_gives_gradients(offline_hub):
    # Stand-in trunk weights with torchvision's names, in the hub cache where LPIPS looks.
    generator = torch.Generator().manual_seed(0)
    state = {}
    for index, layer in enumerate(FEATURES["vgg"]()):
        if isinstance(layer, torch.nn.Conv2d):
            state[f"features.{index}.weight"] = 0.05 * torch.randn(layer.weight.shape, generator=generator)
            state[f"features.{index}.bias"] = 0.01 * torch.randn(layer.bias.shape, generator=generator)
    (offline_hub / "checkpoints").mkdir()
    torch.save(state, offline_hub / "checkpoints" / "vgg16-397923af.pth")
    distance = make_distance("lpips", (1, 16, 16))
    x = torch.rand(2, 1, 16, 16, requires_grad=True)
    y = torch.rand(2, 1, 16, 16)
    d = distance(x, y)
    assert d.shape == (2,) and bool((d > 0).all())
    assert float(distance(y, y).abs().max()) < 1e-6
    d.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
