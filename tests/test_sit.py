"""SiT / MeanFlow-port transformers against the reference fixtures (tests/fixtures/README.md, "SiT"):
state-dict names, outputs, SiT's own ODE sampler and guidance; jvp; students; checkpoints."""
import json

import pytest
import torch
from safetensors.torch import load_file

from cmt.checkpoint import init_student_from_teacher, load_network, save_network
from cmt.errors import ArgumentError
from cmt.guidance import classifier_free_guidance
from cmt.networks import build_network
from cmt.networks.sit import SIT_CFG_CHANNELS, SIT_PRESETS, SiT, sit_config
from cmt.solvers import sample_trajectory
from conftest import FIXTURES

TINY = dict(label_dim=10, hidden_size=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def fixture():
    return json.loads((FIXTURES / "sit_tiny.json").read_text()), load_file(FIXTURES / "sit_tiny_io.safetensors")


def randomize(net, seed):
    """The fixture's weights (README): every key but pos_embed in sorted order from one generator,
    N(0, 1 / fan_in) for matrices and N(0, 0.1^2) for vectors; returns the sum of their |values|."""
    generator = torch.Generator().manual_seed(seed)
    state = net.state_dict()
    total = 0.0
    with torch.no_grad():
        for key in sorted(state):
            if key == "pos_embed":
                continue
            shape = state[key].shape
            std = shape[1:].numel() ** -0.5 if len(shape) >= 2 else 0.1
            state[key].copy_(torch.randn(shape, generator=generator, dtype=torch.float32) * std)
            total += float(state[key].double().abs().sum())
    return total


def tiny_case(fixture, name):
    meta, _ = fixture
    case = meta["cases"][name]
    port = case["kind"] == "port"
    net = SiT(data_shape=(4, case["input_size"], case["input_size"]), patch_size=case["patch_size"], **TINY,
              learn_sigma=case.get("learn_sigma", False), flow_map=port,
              time_convention="meanflow" if port else "sit").eval()
    assert randomize(net, case["seed"]) == pytest.approx(case["weights_abs_sum"], rel=1e-9)
    return net


def one_hot(index, num_classes=10):
    """One-hot rows; the null class (index num_classes) is a row of zeros."""
    return torch.nn.functional.one_hot(index, num_classes + 1)[:, :num_classes].float()


def relative_error(ours, reference):
    """Per sample: max |ours - reference| / max |reference|."""
    return ((ours - reference).flatten(1).abs().max(1).values / reference.flatten(1).abs().max(1).values)


@pytest.mark.parametrize("name, preset, options", [
    ("SiT-XL/2", "sit-xl/2", dict(learn_sigma=True)),
    ("MeanFlow SiT-B/4", "sit-b/4", dict(flow_map=True, time_convention="meanflow")),
    ("MeanFlow SiT-XL/2", "sit-xl/2", dict(flow_map=True, time_convention="meanflow")),
])
def test_state_dict_names_and_shapes_equal_the_reference(name, preset, options):
    reference = json.loads((FIXTURES / "sit_keys.json").read_text())[name]["keys"]
    with torch.device("meta"):
        net = build_network(sit_config(preset, data_shape=(4, 32, 32), label_dim=1000, **options))
    assert {key: list(value.shape) for key, value in net.state_dict().items()} == reference


@pytest.mark.parametrize("name", ["sit_p2_ls", "sit_p4", "sit_p8_ls", "port_p2"])
def test_outputs_equal_the_reference_networks(fixture, name):
    io = fixture[1]
    net = tiny_case(fixture, name)
    assert torch.equal(net.pos_embed, io[f"{name}.pos_embed"])
    z, t, labels, reference = io[f"{name}.x"], io[f"{name}.t"], one_hot(io[f"{name}.y"]), io[f"{name}.out"]
    index = net.class_index(labels, len(z), z.device)
    assert index.tolist() == io[f"{name}.y"].tolist()   # zero rows take the null class 10
    port = name.startswith("port")
    r = io[f"{name}.r"] if port else None
    with torch.no_grad():
        native = net.transformer(z, t, index, t - r if port else None)
        # The denoiser in sigma space, at the same point: SiT's time s is our 1 - t (t = 1 - s).
        ours_t = t if port else 1 - t
        sigma = ours_t / (1 - ours_t)
        target = r / (1 - r) if port else None
        denoised = net(z / (1 - ours_t)[:, None, None, None], sigma, labels, target_sigma=target)
    assert relative_error(native, reference).max() <= 1e-5
    # D = z - t u with u = the port's output, or u = -(SiT's velocity data - noise).
    velocity = reference if port else -reference
    expected = z - ours_t[:, None, None, None] * velocity
    assert relative_error(denoised, expected).max() <= 1e-5


def sit_grid_sigmas(grid):
    """SiT's ODE times s (0 = noise, 1 = data) as our sigmas, s > 0 only: sigma = (1 - s) / s."""
    s = grid.double()
    return (1 - s) / s


@pytest.mark.parametrize("key", ["euler", "euler_cfg4"])
def test_euler_through_the_denoiser_equals_sits_sampler(fixture, key):
    """SiT's transport ODE sampler (Euler over s = linspace(0, 1, 9)) against cmt.solvers' Euler over
    our denoiser. SiT starts at s = 0, pure noise, i.e. sigma = inf, which our solvers cannot start
    from: the first step is taken in t by `average_velocity` (t = 1 is fine there), the rest by
    cmt.solvers from sigma(s_1)."""
    io = fixture[1]
    net = tiny_case(fixture, "sit_p2_ls")
    reference, grid, noise, labels = io[f"ode.{key}"], io["ode.grid"], io["ode.noise"], one_hot(io["ode.y"])
    guided = key.endswith("cfg4")
    denoiser = classifier_free_guidance(net, 4.0, channels=SIT_CFG_CHANNELS) if guided else net
    with torch.no_grad():
        velocity = net.average_velocity(noise, 1.0, None, labels)
        if guided:   # SiT's forward_with_cfg: channels 0-2 guided, channel 3 conditional
            unconditional = net.average_velocity(noise, 1.0, None, None)
            velocity = torch.cat([unconditional.lerp(velocity, 4.0)[:, :3], velocity[:, 3:]], dim=1)
    first = noise - float(grid[1]) * velocity              # t: 1 -> 1 - s_1
    assert relative_error(first, reference[1]).max() <= 1e-5
    sigmas = sit_grid_sigmas(grid[1:])
    start = reference[1] / float(grid[1])                  # x = z / (1 - t) = z / s
    trajectory = sample_trajectory(denoiser, start / sigmas[0], sigmas, solver="euler", labels=labels)
    states = trajectory.states * grid[1:].reshape(-1, 1, 1, 1, 1)   # back to SiT's x_s = z
    assert sigmas[-1] == 0 and trajectory.nfe == len(grid) - 2
    for state, expected in zip(states, reference[1:]):
        assert relative_error(state, expected).max() <= 1e-5


def test_sits_heun_is_heun_in_t_over_the_velocity(fixture):
    """SiT's ODE "Heun" (torchdiffeq heun2 in s) evaluates the network at s = 1 on its last step,
    where a denoiser carries no information (D(x, 0) = x), and averages slopes in t, not sigma: no
    sigma-space solver over D reproduces it. Heun in t over `average_velocity` does, exactly."""
    io = fixture[1]
    net = tiny_case(fixture, "sit_p2_ls")
    reference, grid, labels = io["ode.heun2"], io["ode.grid"], one_hot(io["ode.y"])
    z, times = io["ode.noise"], 1 - grid
    with torch.no_grad():
        for index in range(len(grid) - 1):
            step = times[index + 1] - times[index]
            slope = net.average_velocity(z, times[index], None, labels)
            slope_next = net.average_velocity(z + step * slope, times[index + 1], None, labels)
            z = z + step * 0.5 * (slope + slope_next)
            assert relative_error(z, reference[index + 1]).max() <= 1e-5


def tiny_sit(seed=0, **options):
    config = dict(data_shape=(4, 8, 8), patch_size=2, **TINY)
    net = SiT(**{**config, **options})
    randomize(net, seed)
    return net.eval()


def test_jvp_through_attention_matches_central_differences():
    """MeanFlow's du/dt: torch.func.jvp of u(z, t, r) along (v, 1, 0). In float64 against a central
    difference; in float32 on the default SDPA path (the fused CPU kernel has no forward-mode AD:
    attention falls back to the math backend under jvp) against the float64 jvp."""
    net = tiny_sit(seed=5, flow_map=True, learn_sigma=True).double()
    generator = torch.Generator().manual_seed(6)
    z = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    v = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    t, r = torch.tensor([0.7, 0.4], dtype=torch.float64), torch.tensor([0.2, 0.1], dtype=torch.float64)
    labels = one_hot(torch.tensor([3, 10])).double()

    def u(z, t, r):
        return net.average_velocity(z, t, r, labels)

    tangents = (v, torch.ones_like(t), torch.zeros_like(r))
    value, du_dt = torch.func.jvp(u, (z, t, r), tangents)
    eps = 1e-5
    central = (u(z + eps * v, t + eps, r) - u(z - eps * v, t - eps, r)) / (2 * eps)
    assert torch.allclose(value, u(z, t, r))
    assert relative_error(du_dt, central).max() < 1e-7
    net.float()
    _, du_dt32 = torch.func.jvp(lambda z, t, r: net.average_velocity(z, t, r, labels.float()),
                                (z.float(), t.float(), r.float()), tuple(x.float() for x in tangents))
    assert relative_error(du_dt32, du_dt.float()).max() < 1e-4


def test_student_built_from_a_teacher_starts_as_the_teacher():
    teacher = tiny_sit(seed=7, learn_sigma=True)
    student = build_network({**teacher.config, "flow_map": True}).eval()
    init_student_from_teacher(student, teacher.state_dict())
    assert student.flow_map_keys == {"r_embedder.mlp.0.weight", "r_embedder.mlp.0.bias", "r_embedder.mlp.2.weight",
                                     "r_embedder.mlp.2.bias"}
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(3, 4, 8, 8, generator=generator) * 5
    sigma = torch.tensor([5.0, 1.0, 0.1])
    labels = one_hot(torch.tensor([1, 10, 4]))
    with torch.no_grad():
        expected = teacher(x, sigma, labels)
        for target in (0.0, 0.05, 0.9, sigma):
            assert torch.equal(student(x, sigma, labels, target_sigma=target), expected)
        z, t = x / 6, torch.tensor([0.9, 0.5, 0.2])
        for r in (t, torch.zeros(3), t / 2):
            assert torch.equal(student.average_velocity(z, t, r, labels), teacher.average_velocity(z, t, None, labels))
    with pytest.raises(ValueError, match="needs target_sigma"):
        student(x, sigma, labels)
    with pytest.raises(ValueError, match="r=None"):
        teacher.average_velocity(z, t, t, labels)


def test_consistency_student_is_the_identity_at_sigma_min():
    teacher = tiny_sit(seed=9)
    student = build_network({**teacher.config, "sigma_min": 0.002}).eval()
    init_student_from_teacher(student, teacher.state_dict())
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        assert torch.allclose(student(x, 0.002), x, atol=1e-6)
        sigma = torch.tensor([3.0, 0.5])
        denoised = teacher(x, sigma)   # the student is the teacher's DDIM jump to sigma_min
        jump = denoised + (0.002 / sigma[:, None, None, None]) * (x - denoised)
        torch.testing.assert_close(student(x, sigma), jump, rtol=1e-6, atol=1e-6)


def test_labels_none_and_zero_rows_are_the_null_class():
    net = tiny_sit(seed=11)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        null = net(x, 1.0, None)
        assert torch.equal(net(x, 1.0, torch.zeros(2, 10)), null)
        assert torch.equal(net(x, 1.0, torch.zeros(1, 10)), null)
        conditional = net(x, 1.0, one_hot(torch.tensor([2, 2])))
        assert not torch.allclose(conditional, null)
        logvar = net(x, 1.0, None, return_logvar=True)[1]
    assert logvar.shape == (2, 1, 1, 1) and not logvar.any()
    with pytest.raises(ValueError, match="no null class"):
        tiny_sit(null_class=False)(x, 1.0, None)


def test_save_and_load_round_trip(tmp_path):
    net = tiny_sit(seed=13, flow_map=True, time_convention="meanflow", sigma_min=0.002)
    path = save_network(tmp_path / "sit.safetensors", net)
    loaded = load_network(path)
    assert loaded.config == net.config and loaded.config["architecture"] == "sit"
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        assert torch.equal(loaded(x, 2.0, None, target_sigma=0.5), net(x, 2.0, None, target_sigma=0.5))


def test_sizes_and_bad_shapes():
    assert len(SIT_PRESETS) == 12 and SIT_PRESETS["sit-b/4"] == dict(depth=12, hidden_size=768, num_heads=12,
                                                                       patch_size=4)
    with pytest.raises(ArgumentError, match="data_shape: sit-xl/8 needs square latents"):
        sit_config("sit-xl/8", data_shape=(4, 36, 36))
    with pytest.raises(ArgumentError, match="size: unknown SiT size 'sit-m/2'"):
        sit_config("sit-m/2")
    with pytest.raises(ValueError, match="divisible by the patch size"):
        SiT(data_shape=(4, 10, 10), patch_size=4, **TINY)
