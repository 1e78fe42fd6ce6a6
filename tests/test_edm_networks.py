"""EDM (v1) networks (cmt.networks.edm, edm_unets) against the official NVlabs/edm and sony/cmt code:
outputs of tiny networks under every preconditioning (tests/fixtures/edm_tiny_io.safetensors), the
state-dict names and shapes of the official presets (edm_keys.json), and our additions (flow-map and
consistency students)."""
import json

import pytest
import torch

from cmt.checkpoint import init_student_from_teacher
from cmt.edm import edm_scalings
from cmt.errors import ArgumentError
from cmt.networks import build_network
from cmt.networks.edm import config_from_official

from conftest import FIXTURES
from edm_fixtures import TINY, fixture_io, official_kwargs, tiny_network

IO = fixture_io()
CASES = {case["key"]: case for case in TINY["cases"]}


def relative_error(ours, official):
    """max |ours - official| / max |official|, per sample, the worst sample."""
    per_sample = (ours - official).abs().flatten(1).max(1).values / official.abs().flatten(1).max(1).values
    return per_sample.max().item()


@pytest.mark.parametrize("key", list(CASES))
def test_outputs_match_the_official_networks(key):
    case = CASES[key]
    net = tiny_network(case["network"], case["precond"], case["label_dim"])
    if case.get("mode") == "train":   # dropout 0: ECMPrecond's training form, deterministic
        net.train()
    labels = IO["labels"] if case["label_dim"] and case.get("labels", "onehot") is not None else None
    extra = dict(augment_labels=IO["augment_labels"]) if case.get("augment") else {}
    with torch.no_grad():
        ours = net(IO["x"], IO["sigma"], labels, **extra)
    assert ours.dtype == torch.float32
    assert relative_error(ours, IO["D/" + key]) <= 1e-5


@pytest.mark.parametrize("preset", json.loads((FIXTURES / "edm_keys.json").read_text()))
def test_official_presets_have_the_official_names_and_shapes(preset):
    official = json.loads((FIXTURES / "edm_keys.json").read_text())[preset]
    with torch.device("meta"):
        net = build_network(config_from_official(official["class_name"], (), official["init_kwargs"]))
    assert {key: list(value.shape) for key, value in net.state_dict().items()} == official["keys"]
    assert net.data_shape == (3, official["init_kwargs"]["img_resolution"], official["init_kwargs"]["img_resolution"])
    assert net.label_dim == official["init_kwargs"]["label_dim"] and net.flow_map_keys == set()


@pytest.mark.parametrize("network", ["ddpmpp", "adm"])
@pytest.mark.parametrize("precond", ["EDMPrecond", "ECMPrecond"])
def test_flow_map_student_starts_as_its_teacher(network, precond):
    teacher = tiny_network(network, precond, 3)
    student = build_network(dict(teacher.config, flow_map=True))
    assert student.flow_map_keys == {"model.map_target.weight", "model.map_target.bias"}
    init_student_from_teacher(student, teacher.state_dict())
    student.eval()
    x, sigma, labels = IO["x"], IO["sigma"], IO["labels"]
    with torch.no_grad():
        expected = teacher(x, sigma, labels)
        for target in (torch.zeros(4), sigma / 2, torch.full((4,), 0.002)):
            assert torch.equal(student(x, sigma, labels, target_sigma=target), expected)
    with pytest.raises(ValueError, match="target_sigma"):
        student(x, sigma, labels)

    # Once trained, the target input matters, and its label is smooth at target_sigma = 0.
    with torch.no_grad():
        student.model.map_target.weight.normal_()
    target = torch.zeros(4, requires_grad=True)
    out = student(x, sigma, labels, target_sigma=target)
    (gradient,) = torch.autograd.grad(out.square().sum(), target)
    assert torch.isfinite(gradient).all() and gradient.abs().max() > 0
    assert not torch.equal(out.detach(), student(x, sigma, labels, target_sigma=sigma / 2).detach())


def test_consistency_boundary_forms():
    x, labels = IO["x"], IO["labels"]
    student = tiny_network("ddpmpp", "EDMPrecond", 3, sigma_min=0.002)
    with torch.no_grad():
        torch.testing.assert_close(student(x, 0.002, labels), x, rtol=0, atol=0)
        student.train()   # our boundary form holds in both modes
        torch.testing.assert_close(student(x, 0.002, labels), x, rtol=0, atol=0)

    # sony/cmt's ECMPrecond: the boundary (its default sigma_min 0.003) in eval mode only.
    ecm = tiny_network("ddpmpp", "ECMPrecond", 3)
    plain = tiny_network("ddpmpp", "EDMPrecond", 3)
    assert ecm.sigma_min == 0.003 and ecm.config["sigma_min"] == 0.003
    sigma = torch.full((4,), 0.003)
    with torch.no_grad():
        torch.testing.assert_close(ecm(x, sigma, labels), x, rtol=0, atol=0)
        ecm.train()
        trained_form = ecm(x, sigma, labels)
        assert torch.equal(trained_form, plain(x, sigma, labels)) and not torch.equal(trained_form, x)
    c_skip, c_out, c_in, c_noise = ecm.eval().scalings(IO["sigma"])
    for ours, reference in zip((c_skip, c_out, c_in, c_noise), edm_scalings(IO["sigma"], 0.5, 0.003)):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)


@pytest.mark.parametrize("precond", ["VPPrecond", "VEPrecond", "iDDPMPrecond"])
def test_teacher_only_preconditionings_refuse_students(precond):
    config = config_from_official(precond, (), official_kwargs("ddpmpp", 0))
    for key, value in (("sigma_min", 0.002), ("flow_map", True)):
        with pytest.raises(ArgumentError, match="EDMPrecond or ECMPrecond") as refused:
            build_network(dict(config, **{key: value}))
        assert refused.value.argument == key and precond in refused.value.message


def test_config_is_plain_and_rebuilds_the_network():
    net = tiny_network("ncsnpp", "VPPrecond", 3)
    config = json.loads(json.dumps(net.config))
    assert config["architecture"] == "edm" and config["precond"] == "VPPrecond" and config["model_type"] == "SongUNet"
    assert config["beta_d"] == 19.9 and config["M"] == 1000 and config["resample_filter"] == [1, 3, 3, 1]
    rebuilt = build_network(config)
    rebuilt.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(IO["x"], IO["sigma"], IO["labels"]), net(IO["x"], IO["sigma"], IO["labels"]))
    assert (net.data_shape, net.label_dim, net.sigma_data) == ((3, 8, 8), 3, 0.5)
    assert net.sigma_min == 0.0 and net.flow_map is False
    D, logvar = net(IO["x"], IO["sigma"], IO["labels"], return_logvar=True)   # EDM has no uncertainty head
    assert logvar.shape == (4, 1, 1, 1) and not logvar.any()
    with pytest.raises(ArgumentError) as refused:
        build_network(dict(config, precond="Precond"))
    assert refused.value.argument == "precond"


def test_official_sampler_range_kwargs_are_dropped_and_ecm_gets_its_boundary():
    edm = config_from_official("EDMPrecond", (32, 3), dict(sigma_min=0, sigma_max=float("inf"), model_type="SongUNet"))
    assert edm["img_resolution"] == 32 and edm["img_channels"] == 3
    assert "sigma_max" not in edm and "sigma_min" not in edm
    ve = config_from_official("VEPrecond", (), dict(img_resolution=8, img_channels=3, sigma_min=0.02, sigma_max=100))
    with torch.device("meta"):
        assert "sigma_min" not in ve and build_network(ve).sigma_min == 0.0
    ecm = config_from_official("ECMPrecond", (), dict(img_resolution=8, img_channels=3, model_type="SongUNet"))
    assert ecm["sigma_min"] == 0.003 and "model_type" in ecm
    assert config_from_official("iDDPMPrecond", (), {})["model_type"] == "DhariwalUNet"


def test_use_fp16_is_recorded_and_ignored_on_cpu():
    half = tiny_network("adm", "EDMPrecond", 3, use_fp16=True)
    full = tiny_network("adm", "EDMPrecond", 3)
    assert half.config["use_fp16"] is True
    with torch.no_grad():
        assert torch.equal(half(IO["x"], IO["sigma"], IO["labels"]), full(IO["x"], IO["sigma"], IO["labels"]))
