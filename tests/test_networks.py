"""EDM2 U-Net + Precond against the reference fixtures; flow-map students; jvp; the MLP."""
import json

import pytest
import torch
from safetensors.torch import load_file

from cmt.checkpoint import init_student_from_teacher
from cmt.networks import build_network, network_config
from cmt.networks.edm2 import MPConv, Precond, normalize
from cmt.networks.mlp import MLPDenoiser
from conftest import FIXTURES


def tiny_edm2(**kwargs):
    return Precond(**{**json.loads((FIXTURES / "edm2_tiny.json").read_text()), **kwargs})


@pytest.fixture(scope="module")
def reference():
    return load_file(FIXTURES / "edm2_tiny_weights.safetensors"), load_file(FIXTURES / "edm2_tiny_io.safetensors")


def randomize_gains(net, seed=0):
    """Zero-initialised gains hide the embeddings; give them values so every input matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if param.ndim == 0:
                param.copy_(0.3 + 0.5 * torch.rand([], generator=generator))


@pytest.mark.parametrize("preset", ["edm2-img64-s", "edm2-img512-xs"])
def test_state_dict_keys_match_official_presets(preset):
    reference = json.loads((FIXTURES / "edm2_keys.json").read_text())[preset]
    with torch.device("meta"):
        net = Precond(**reference["init_kwargs"])
    shapes = {key: list(value.shape) for key, value in net.state_dict().items()}
    assert shapes == reference["state_dict"]


def test_outputs_match_reference_eval_and_train(reference):
    weights, io = reference
    net = tiny_edm2()
    net.load_state_dict(weights)
    net.eval()
    with torch.no_grad():
        denoised, logvar = net(io["x"], io["sigma"], io["class_labels"], return_logvar=True)
    torch.testing.assert_close(denoised, io["D_eval"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logvar.flatten(), io["logvar_eval"], atol=1e-5, rtol=1e-5)

    # Train mode: forced weight normalisation first rewrites the stored weights, then runs.
    net.train()
    with torch.no_grad():
        denoised = net(io["x"], io["sigma"], io["class_labels"])
    torch.testing.assert_close(denoised, io["D_train"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net.unet.out_gain.detach(), io["out_gain_after_train_forward"])
    stored = net.unet.emb_noise.weight.detach()
    torch.testing.assert_close(stored, normalize(weights["unet.emb_noise.weight"]))


def test_forced_weight_norm_can_be_frozen(reference):
    weights, io = reference
    net = tiny_edm2()
    net.load_state_dict(weights)
    net.train()
    with net.frozen_weight_norm():
        assert not any(m.force_normalize for m in net.modules() if isinstance(m, MPConv))
        # normalize_weights ran up front, so this forward writes nothing.
        before = {k: v.clone() for k, v in net.state_dict().items()}
        with torch.no_grad():
            net(io["x"], io["sigma"], io["class_labels"])
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(m.force_normalize for m in net.modules() if isinstance(m, MPConv))
    torch.testing.assert_close(before["unet.out_conv.weight"], normalize(weights["unet.out_conv.weight"]))


def test_fp16_is_a_no_op_on_cpu(reference):
    weights, io = reference
    net16 = tiny_edm2(use_fp16=True).eval()
    net16.load_state_dict(weights)
    with torch.no_grad():
        torch.testing.assert_close(net16(io["x"], io["sigma"], io["class_labels"]), io["D_eval"], atol=1e-5, rtol=1e-5)


def test_scalar_sigma_and_missing_labels():
    torch.manual_seed(0)
    net = tiny_edm2().eval()
    randomize_gains(net)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        scalar = net(x, 0.7)
        batched = net(x, torch.full([3], 0.7))
        with_labels = net(x, 0.7, torch.eye(10)[:3])
    torch.testing.assert_close(scalar, batched)
    assert not torch.allclose(scalar, with_labels, atol=1e-4)


def test_consistency_boundary_is_identity():
    torch.manual_seed(0)
    net = tiny_edm2(sigma_min=0.002).eval()
    randomize_gains(net)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x, 0.002), x)
        assert not torch.allclose(net(x, 1.0), x, atol=1e-3)


def flow_map_agrees_with_teacher(teacher, student_config, x, sigma, labels):
    student = build_network(student_config)
    init_student_from_teacher(student, teacher.state_dict())
    teacher.eval(), student.eval()
    with torch.no_grad():
        expected = teacher(x, sigma, labels)
        for target in (0.0, 0.01, torch.full([x.shape[0]], 0.3)):
            torch.testing.assert_close(student(x, sigma, labels, target_sigma=target), expected)
    return student


def test_edm2_flow_map_student_starts_as_teacher():
    torch.manual_seed(0)
    teacher = tiny_edm2()
    randomize_gains(teacher)
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([2.0, 0.1]), torch.eye(10)[:2]
    student = flow_map_agrees_with_teacher(teacher, dict(network_config(teacher), flow_map=True), x, sigma, labels)
    assert student.flow_map_keys == {"unet.emb_fourier_target.freqs", "unet.emb_fourier_target.phases",
                                     "unet.emb_target.weight", "unet.emb_target_gain"}
    with torch.no_grad():  # once the gain moves, target_sigma matters
        student.unet.emb_target_gain.fill_(1.0)
        assert not torch.allclose(student(x, sigma, labels, target_sigma=0.0),
                                  student(x, sigma, labels, target_sigma=0.5), atol=1e-4)
    with pytest.raises(ValueError, match="target_sigma"):
        student(x, sigma, labels)


def test_mlp_flow_map_student_starts_as_teacher():
    torch.manual_seed(0)
    teacher = MLPDenoiser(label_dim=3, width=32, num_blocks=2, emb_width=16, fourier_freqs=8)
    x, sigma, labels = torch.randn(5, 2), torch.rand(5) * 3 + 0.01, torch.eye(3)[[0, 1, 2, 0, 1]]
    student = flow_map_agrees_with_teacher(teacher, dict(teacher.config, flow_map=True), x, sigma, labels)
    assert student.flow_map_keys == {"emb_fourier_target.freqs", "emb_target.weight", "emb_target.bias"}


def jvp_matches_finite_difference(net, primals, tangents, step=1e-3):
    def denoise(x, sigma, target):
        return net(x, sigma, target_sigma=target)

    _, jvp = torch.func.jvp(denoise, primals, tangents)
    with torch.no_grad():
        plus = denoise(*[p + step * t for p, t in zip(primals, tangents)])
        minus = denoise(*[p - step * t for p, t in zip(primals, tangents)])
    difference = (plus - minus) / (2 * step)
    assert difference.norm() > 1.0
    assert (jvp - difference).norm() / difference.norm() < 2e-3


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_jvp_through_edm2_precond(mode):
    torch.manual_seed(0)
    net = Precond(img_resolution=8, img_channels=2, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                  attn_resolutions=[4], flow_map=True)
    randomize_gains(net)
    net.train(mode == "train")
    x = torch.randn(2, 2, 8, 8)
    primals = (x, torch.tensor([1.5, 0.3]), torch.tensor([0.5, 0.05]))
    tangents = (torch.randn_like(x), torch.tensor([1.0, 0.5]), torch.tensor([0.3, 0.1]))
    with net.frozen_weight_norm():
        jvp_matches_finite_difference(net, primals, tangents)


def test_jvp_through_mlp():
    torch.manual_seed(0)
    net = MLPDenoiser(width=64, num_blocks=2, flow_map=True)
    with torch.no_grad():
        net.emb_target.weight.normal_(0, 0.3)
    x = torch.randn(16, 2)
    primals = (x, torch.rand(16) + 0.2, torch.rand(16) * 0.2 + 0.05)
    tangents = (torch.randn_like(x), torch.ones(16), torch.ones(16))
    with net.frozen_weight_norm():
        jvp_matches_finite_difference(net, primals, tangents)


def test_build_network_round_trip_and_errors():
    torch.manual_seed(0)
    mlp = build_network({"architecture": "mlp", "data_shape": [2], "width": 32, "num_blocks": 1})
    assert mlp.data_shape == (2,) and mlp.label_dim == 0 and mlp.sigma_data == 0.5 and mlp.flow_map is False
    again = build_network(network_config(mlp))
    assert network_config(again) == network_config(mlp)
    net = tiny_edm2()
    assert net.data_shape == (3, 16, 16) and net.label_dim == 10 and net.config["architecture"] == "edm2"
    assert json.loads(json.dumps(net.config)) == net.config
    with pytest.raises(ValueError, match="unknown network architecture 'resnet'.*edm2, mlp"):
        build_network({"architecture": "resnet"})


def test_mlp_denoises_images_shaped_data_and_logvar():
    net = MLPDenoiser(data_shape=(1, 4, 4), width=32, num_blocks=1)
    x = torch.randn(3, 1, 4, 4)
    denoised, logvar = net(x, torch.tensor([0.5, 1.0, 2.0]), return_logvar=True)
    assert denoised.shape == x.shape and logvar.shape == (3, 1, 1, 1)


def test_guided_denoisers():
    from cmt.guidance import apply_guidance, autoguidance, classifier_free_guidance

    torch.manual_seed(0)
    net = MLPDenoiser(label_dim=3, width=32, num_blocks=1)
    guide = MLPDenoiser(label_dim=3, width=16, num_blocks=1)
    x, sigma, labels = torch.randn(4, 2), torch.full([4], 0.8), torch.eye(3)[[0, 1, 2, 0]]
    with torch.no_grad():
        main, weak, uncond = net(x, sigma, labels), guide(x, sigma, labels), net(x, sigma, None)
        auto = autoguidance(net, guide, 2.5, guide_identity={"kind": "checkpoint", "path": "g.pt", "sha256": "ab"})
        torch.testing.assert_close(auto(x, sigma, labels), weak + 2.5 * (main - weak))
        cfg = classifier_free_guidance(net, 1.5)
        torch.testing.assert_close(cfg(x, sigma, labels), uncond + 1.5 * (main - uncond))
        unguided, record = apply_guidance(net, 1.0)   # weight 1 is no guidance, recorded as such (None)
        torch.testing.assert_close(unguided(x, sigma, labels), main)
    assert auto.describe() == {"kind": "autoguidance", "weight": 2.5,
                               "guide": {"kind": "checkpoint", "path": "g.pt", "sha256": "ab"}}
    assert cfg.describe()["kind"] == "classifier_free" and unguided is net and record is None
    assert auto.data_shape == (2,) and auto.label_dim == 3
    with pytest.raises(ValueError, match="class-conditional"):
        classifier_free_guidance(MLPDenoiser(width=8, num_blocks=1), 2.0)
    with pytest.raises(ValueError, match="data shape"):
        autoguidance(net, MLPDenoiser(data_shape=(3,), width=8, num_blocks=1), 2.0)
