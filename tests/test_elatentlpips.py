"""E-LatentLPIPS (cmt.elatentlpips): the authors' package's numbers and names, the augmentation at
fixed percentiles, the distance of --loss elatentlpips, and its missing weights offline."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cmt.download import DownloadError
from cmt.elatentlpips import ELatentLPIPS, augment_pair, elatentlpips_distance, geometric_filter, latent_input
from cmt.trainers.distances import make_distance
from conftest import FIXTURES

FIXTURE = FIXTURES / "elatentlpips_formula.safetensors"


def formula_state(keys, shapes):
    """The weights the fixture's package run loaded (tests/fixtures/README.md): a sine of the flat
    index, shifted by the key's position, scaled per kind of tensor."""
    state = {}
    for k, name in enumerate(keys):
        shape = shapes[name]
        if name.endswith("num_batches_tracked"):
            state[name] = torch.zeros((), dtype=torch.long)
            continue
        v = torch.sin(0.37 * torch.arange(torch.Size(shape).numel(), dtype=torch.float64) + k)
        if len(shape) == 4:
            v = v * (6.0 / torch.Size(shape[1:]).numel()) ** 0.5
        elif name.endswith("running_var") or (name.endswith(".weight") and len(shape) == 1):
            v = 1.0 + 0.2 * v.abs()
        else:
            v = 0.1 * v
        if name.startswith("lin"):
            v = v.abs()
        state[name] = v.float().reshape(shape)
    return state


@pytest.fixture(scope="module")
def reference():
    with safe_open(FIXTURE, "pt") as handle:
        keys = json.loads(handle.metadata()["keys"])
    return load_file(FIXTURE), keys


@pytest.fixture(scope="module")
def model(reference):
    _, keys = reference
    shapes = {name: tuple(value.shape) for name, value in ELatentLPIPS("sd15", weights="random").state_dict().items()}
    assert set(keys) == set(shapes) - {"filter"}     # the package's names, every one of them
    state = formula_state(keys, shapes)
    # As the package saves it: its heads twice (lin{k} and lins.{k}).
    state.update({f"lins.{k}.model.1.weight": state[f"lin{k}.model.1.weight"] for k in range(5)})
    return ELatentLPIPS("sd15", weights=state, augment=None)


def test_matches_the_elatentlpips_package(reference, model):
    data, _ = reference
    with torch.no_grad():
        torch.testing.assert_close(model(data["x0"], data["x1"]), data["dist"], atol=1e-5, rtol=1e-5)
        model.l1 = False
        try:
            torch.testing.assert_close(model(data["x0"], data["x1"]), data["dist_no_l1"], atol=1e-5, rtol=1e-5)
            assert model(data["x0"], data["x0"]).abs().max() < 1e-6
        finally:
            model.l1 = True


@pytest.mark.parametrize("letter", ["b", "g", "o", "n"])
@pytest.mark.parametrize("percentile", [0.3, 0.8])
def test_augmentation_matches_the_package_at_fixed_percentiles(reference, letter, percentile):
    data, _ = reference
    from cmt.elatentlpips import augment_ops
    torch.manual_seed(2)   # the noise's draws (the fixture's seed; the others are fixed by the percentile)
    a, b = augment_pair(data["x0"], data["x1"], augment_ops(letter), geometric_filter(), percentile=percentile)
    tag = f"aug_{letter}_{int(percentile * 10)}"
    torch.testing.assert_close(a, data[f"{tag}_0"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(b, data[f"{tag}_1"], atol=2e-5, rtol=1e-5)


def test_random_augmentations_keep_shapes_gradients_and_zero_for_equal_inputs():
    model = ELatentLPIPS("sd15", weights="random", augment="bgcno")
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    y = torch.randn(2, 4, 16, 16)
    generator = torch.Generator().manual_seed(0)
    distance = model(x, y, generator=generator)
    assert distance.shape == (2,) and torch.isfinite(distance).all() and (distance > 0).all()
    distance.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in model.parameters())
    # One transform per sample applied to both inputs: equal inputs stay equal (noise aside).
    same = ELatentLPIPS("sd15", weights="random", augment="bgco")(y, y, generator=generator)
    assert same.abs().max() < 1e-6


def test_latent_input_undoes_the_sets_scaling():
    from cmt.latents import scaling_record
    raw = torch.randn(2, 4, 8, 8)
    edm2 = scaling_record("edm2")
    scale, bias = torch.tensor(edm2["scale"]).view(1, -1, 1, 1), torch.tensor(edm2["bias"]).view(1, -1, 1, 1)
    torch.testing.assert_close(latent_input(edm2)(raw * scale + bias), raw * 0.18215, atol=1e-5, rtol=1e-5)
    sd = raw * 0.18215
    torch.testing.assert_close(latent_input(scaling_record("sd"))(sd), sd)


def test_distance_refuses_pixels_and_names_the_missing_file_offline(offline_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("CMT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="latents"):
        make_distance("elatentlpips", (3, 32, 32))
    with pytest.raises(DownloadError) as error:
        make_distance("elatentlpips", (4, 8, 8))
    message = str(error.value)
    assert "sd15_latest_vgg16_tuned.pth" in message and str(tmp_path / "cache" / "elatentlpips") in message
    assert "\n" not in message
    # A copy put where the message says is used from then on.
    target = tmp_path / "cache" / "elatentlpips" / "sd15_latest_vgg16_tuned.pth"
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v for k, v in ELatentLPIPS("sd15", weights="random").state_dict().items() if k != "filter"}, target)
    distance = make_distance("elatentlpips", (4, 8, 8), elatentlpips_augment="b")
    assert distance(torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)).shape == (3,)
    with pytest.raises(ValueError, match="do not fit"):
        ELatentLPIPS("sd15", weights={"net.slice1.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown letter"):
        elatentlpips_distance("sd15", augment="bgz", weights="random")
