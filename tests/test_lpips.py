import importlib.util
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cmt.lpips import FEATURES, LPIPS, cached_lpips, lpips_distance
from conftest import FIXTURES


def formula(shape, i):
    numel = torch.Size(shape).numel()
    return (0.05 * torch.sin(0.37 * torch.arange(numel, dtype=torch.float64) + i)).float().reshape(shape)


def formula_trunk(net):
    """torchvision-style state dict: conv k of `features` gets formula(shape, 2k), formula(shape, 2k + 1)."""
    convs = [(index, layer) for index, layer in enumerate(FEATURES[net]()) if isinstance(layer, torch.nn.Conv2d)]
    state = {"classifier.1.weight": torch.zeros(2, 2)}  # a full torchvision file also holds the classifier
    for k, (index, conv) in enumerate(convs):
        state[f"features.{index}.weight"] = formula(conv.weight.shape, 2 * k)
        state[f"features.{index}.bias"] = formula(conv.bias.shape, 2 * k + 1)
    return state


@pytest.fixture(scope="module")
def reference():
    return load_file(FIXTURES / "lpips_formula.safetensors")


# The lpips package itself, run on this machine with these trunks, gives our numbers bit for bit; the
# fixture's VGG values carry ~6e-5 of float32 noise from the machine that made them (VGG with formula
# weights is ill-conditioned: float32-rounding its weights moves the distance by ~1e-5), AlexNet's ~3e-7.
@pytest.mark.parametrize("net, atol", [("vgg", 1e-4), ("alex", 1e-5)])
def test_matches_lpips_package(reference, net, atol):
    assert len([key for key in formula_trunk(net) if key.endswith(".bias")]) == reference[f"{net}_conv_count"].item()
    model = LPIPS(net, trunk_weights=formula_trunk(net))
    with torch.no_grad():
        distance = model(reference["x0"], reference["x1"])
        self_distance = model(reference["x0"], reference["x0"])
    torch.testing.assert_close(distance, reference[f"{net}_dist"], atol=atol, rtol=0)
    torch.testing.assert_close(self_distance, reference[f"{net}_dist_self"], atol=1e-7, rtol=0)


def test_trunk_from_hub_cache_and_file(reference, offline_hub, tmp_path_factory):
    (offline_hub / "checkpoints").mkdir()
    torch.save(formula_trunk("alex"), offline_hub / "checkpoints" / "alexnet-owt-7be5be79.pth")
    from_hub = LPIPS("alex")
    path = tmp_path_factory.mktemp("weights") / "alex.pth"
    torch.save(formula_trunk("alex"), path)
    from_path = LPIPS("alex", trunk_weights=path)
    with torch.no_grad():
        for model in (from_hub, from_path):
            torch.testing.assert_close(model(reference["x0"], reference["x1"]), reference["alex_dist"], atol=1e-5, rtol=0)


def test_missing_trunk_offline_names_file_and_directory(offline_hub):
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth") as error:
        LPIPS("vgg")
    assert str(offline_hub / "checkpoints") in str(error.value)
    assert str(offline_hub / "cmt-cache" / "lpips" / "vgg16-397923af.pth") in str(error.value)


def test_trunk_from_the_cmt_cache(reference, offline_hub):
    (offline_hub / "cmt-cache" / "lpips").mkdir(parents=True)
    torch.save(formula_trunk("alex"), offline_hub / "cmt-cache" / "lpips" / "alexnet-owt-7be5be79.pth")
    with torch.no_grad():
        distance = LPIPS("alex")(reference["x0"], reference["x1"])
    torch.testing.assert_close(distance, reference["alex_dist"], atol=1e-5, rtol=0)


def test_missing_lpips_package(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "lpips" else find_spec(name, *args))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps lpips"):
        LPIPS("alex", trunk_weights=formula_trunk("alex"))


def test_bad_arguments():
    with pytest.raises(ValueError, match="squeeze"):
        LPIPS("squeeze", trunk_weights={})
    trunk = formula_trunk("alex")
    del trunk["features.3.bias"]
    with pytest.raises(ValueError, match="the given state dict"):
        LPIPS("alex", trunk_weights=trunk)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        LPIPS("alex", trunk_weights="nowhere.pth")
    model = LPIPS("alex", trunk_weights=formula_trunk("alex"))
    with pytest.raises(ValueError, match="resize=224"):
        model(torch.zeros(2, 3, 28, 28), torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="1 or 3"):
        model(torch.zeros(2, 2, 32, 32), torch.zeros(2, 2, 32, 32))


def test_frozen_but_differentiable_in_inputs(reference):
    model = LPIPS("vgg", trunk_weights=formula_trunk("vgg"))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x0 = reference["x0"].clone().requires_grad_(True)
    distance = model(x0, reference["x1"])
    distance.sum().backward()
    assert distance.shape == (4,)
    assert torch.isfinite(x0.grad).all() and x0.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    # A small step against the gradient brings the images closer.
    with torch.no_grad():
        closer = model(x0 - 1e-2 * x0.grad / x0.grad.norm(), reference["x1"])
    assert (closer < distance.detach()).all()


def test_gray_images_and_resize(reference):
    model = LPIPS("alex", trunk_weights=formula_trunk("alex"), resize=48)
    gray0, gray1 = reference["x0"][:, :1, :28, :28], reference["x1"][:, :1, :28, :28]
    with torch.no_grad():
        distance = model(gray0, gray1)
        by_hand = LPIPS("alex", trunk_weights=formula_trunk("alex"))(
            *(F.interpolate(g.repeat(1, 3, 1, 1), size=(48, 48), mode="bilinear", align_corners=False) for g in (gray0, gray1))
        )
    torch.testing.assert_close(distance, by_hand, atol=1e-6, rtol=0)
    assert (distance > 0).all()


def test_lpips_distance_caches_one_module_per_device(reference, offline_hub):
    (offline_hub / "checkpoints").mkdir()
    torch.save(formula_trunk("alex"), offline_hub / "checkpoints" / "alexnet-owt-7be5be79.pth")
    distance = lpips_distance("alex", resize=None)
    with torch.no_grad():
        first = distance(reference["x0"], reference["x1"])
        second = lpips_distance("alex", resize=None)(reference["x0"], reference["x1"])
    torch.testing.assert_close(first, reference["alex_dist"], atol=1e-5, rtol=0)
    torch.testing.assert_close(second, first)
    assert cached_lpips.cache_info().currsize == 1
    assert cached_lpips("alex", torch.device("cpu"), None) is cached_lpips("alex", torch.device("cpu"), None)


def test_lpips_package_is_read_not_imported():
    code = (
        "import sys, torch; from cmt.lpips import LPIPS, FEATURES; "
        "LPIPS('alex', trunk_weights={f'features.{i}.{name}': torch.zeros_like(value) "
        "for i, layer in enumerate(FEATURES['alex']()) for name, value in layer.state_dict().items()}); "
        "assert 'lpips' not in sys.modules and 'torchvision' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
