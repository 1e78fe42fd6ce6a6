"""MeanFlow (`cmt.trainers.meanflow`): its time sampling, JVP target, guidance and weighting, against exact
flow maps of Gaussian mixtures, and post-training with it."""
import json
import math

import pytest
import torch
from conftest import (FAST, MLP, POST_FAST, TEACHER, command_line, context, invoke_command, mixture, mixture_points,
                      train_on_mixture)

from cmt.builders.build import build_trajectories
from cmt.checkpoint import load_network, save_network
from cmt.cli.train import main
from cmt.edm import SIGMA_MAX, SIGMA_MIN, sigma_grid
from cmt.errors import ArgumentError
from cmt.gmm import gmm_denoiser, gmm_sample, random_gmm
from cmt.networks import build_network
from cmt.trainers import recipes
from cmt.trainers.meanflow import (MF_T_MAX, guided_velocity, label_dropout_mask, meanflow_loss, meanflow_target,
                                   sample_t_r)
from cmt.trainers.mid import mid_train
from cmt.trainers.post import post_train
from cmt.trainers.students import average_velocity


def test_meanflow_time_sampling():
    t, r = sample_t_r(1000, torch.Generator().manual_seed(0), "cpu")
    assert bool((r <= t).all()) and float(t.max()) <= MF_T_MAX and float(t.min()) > 0
    assert int((r == t).sum()) >= 750 and int((r < t).sum()) > 200


def test_meanflow_jvp_target_matches_finite_differences():
    torch.manual_seed(0)
    net = build_network({**MLP, "flow_map": True})
    for parameter in net.parameters():
        torch.nn.init.normal_(parameter, std=0.3)  # the target embedding too: u must depend on r
    generator = torch.Generator().manual_seed(1)
    x, e = torch.randn(16, 2, generator=generator), torch.randn(16, 2, generator=generator)
    t, r = sample_t_r(16, generator, "cpu", equal_share=0.25)
    z, v = (1 - t[:, None]) * x + t[:, None] * e, e - x
    target = meanflow_target(net, z, t, r, v)
    h = 1e-3
    with torch.no_grad():
        du_dt = (average_velocity(net, z + h * v, t + h, r) - average_velocity(net, z - h * v, t - h, r)) / (2 * h)
    expected = v - (t - r)[:, None] * du_dt
    assert float((target - expected).abs().max()) < 2e-3 * float(expected.abs().max())
    assert float((target - v).abs().max()) > 0.1  # the JVP term is not negligible here


def test_meanflow_jvp_through_edm2_matches_finite_differences():
    torch.manual_seed(0)
    net = build_network(dict(architecture="edm2", img_resolution=8, img_channels=1, model_channels=16,
                             channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], flow_map=True)).eval()
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if "gain" in name or "emb_target" in name:  # zero at init: make every path count
                parameter.normal_(0, 0.5)
    generator = torch.Generator().manual_seed(1)
    x, e = torch.randn(4, 1, 8, 8, generator=generator).clamp(-1, 1), torch.randn(4, 1, 8, 8, generator=generator)
    t = torch.tensor([0.3, 0.5, 0.7, 0.9])
    r = 0.4 * t
    z, v = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * e, e - x
    target = meanflow_target(net, z, t, r, v)
    h = 1e-2
    with torch.no_grad():
        du_dt = (average_velocity(net, z + h * v, t + h, r) - average_velocity(net, z - h * v, t - h, r)) / (2 * h)
    expected = v - (t - r).view(-1, 1, 1, 1) * du_dt
    assert float((target - expected).abs().max()) < 1e-2 * float((expected - v).abs().max())


def exact_flow_map(mu, logw, s, steps=64):
    """The mixture's exact flow map as a flow-map denoiser: Heun in log sigma from sigma to target_sigma,
    returned in the DDIM form `D = (x_r - (r / sigma) x) / (1 - r / sigma)` (differentiable, for the JVP)."""
    exact_denoiser = gmm_denoiser(mu, logw, s)

    def net(x, sigma, labels=None, target_sigma=None):
        start, end = sigma.log()[:, None], target_sigma.log()[:, None]
        state = x
        for i in range(steps):
            here, there = start + (end - start) * i / steps, start + (end - start) * (i + 1) / steps
            slope = state - exact_denoiser(state, here.exp()[:, 0])  # dx / dlog(sigma)
            euler = state + (there - here) * slope
            state = state + (there - here) * (slope + euler - exact_denoiser(euler, there.exp()[:, 0])) / 2
        ratio = (target_sigma / sigma)[:, None]
        return (state - ratio * x) / (1 - ratio)
    return net


def test_meanflow_target_of_the_exact_flow_map_is_its_average_velocity():
    """MeanFlow's identity u = v - (t - r) du/dt holds for the exact flow map with the exact velocity
    v* = (z - D*) / t: this checks the time conversion, the JVP tangent and the target's sign together."""
    mu, logw, s = random_gmm(3, 2, std=0.3, generator=torch.Generator().manual_seed(0))
    net = exact_flow_map(mu, logw, s)
    generator = torch.Generator().manual_seed(1)
    x, e = gmm_sample(mu, logw, s, 8, generator), torch.randn(8, 2, generator=generator, dtype=torch.float64)
    t = torch.linspace(0.2, 0.9, 8, dtype=torch.float64)
    r = t * torch.linspace(0.1, 0.8, 8, dtype=torch.float64)
    z = (1 - t[:, None]) * x + t[:, None] * e
    exact_velocity = (z - gmm_denoiser(mu, logw, s)(z / (1 - t[:, None]), t / (1 - t))) / t[:, None]
    average = average_velocity(net, z, t, r)
    target = meanflow_target(net, z, t, r, exact_velocity)
    assert float((target - average).norm(dim=1).max()) < 1e-2 * float(average.norm(dim=1).mean())
    assert float((exact_velocity - average).norm(dim=1).mean()) > 0.1 * float(average.norm(dim=1).mean())


class ExactFlowMapNetwork(torch.nn.Module):
    """`exact_flow_map` with the attributes MeanFlow's loss reads from a flow-map network."""
    flow_map, label_dim = True, 0

    def __init__(self, mu, logw, s):
        super().__init__()
        self.map = exact_flow_map(mu, logw, s)

    def forward(self, x, sigma, labels=None, target_sigma=None):
        return self.map(x, sigma, labels, target_sigma)


def test_meanflow_teacher_velocity_makes_the_teachers_flow_map_its_fixed_point():
    """The cause of the toy's MeanFlow drift (docs/claim.md, "the toy's 1-step drift"): at the exact
    flow map, MeanFlow's loss with the data's velocity e - x is the conditional velocity's variance,
    so every batch still pushes an exact network away (Adam makes it a random walk of lr-sized
    steps); with the teacher's velocity the exact map has zero loss, and zero gradient."""
    mu, logw, s = mixture(seed=3)
    net = ExactFlowMapNetwork(mu, logw, s)
    exact_denoiser = gmm_denoiser(mu, logw, s)

    def teacher(x, sigma, labels=None):
        return exact_denoiser(x, sigma)

    batch = mixture_points(128, seed=4)
    losses = {}
    for name, velocity_teacher in (("data", None), ("teacher", teacher)):
        loss, _ = meanflow_loss(net, batch, context(seed=5), equal_share=0.0, norm_p=0.0, teacher=velocity_teacher)
        losses[name] = float(loss.mean())
    assert losses["data"] > 0.1   # the mixture's e - x varies by O(1) around its mean given z_t
    assert losses["teacher"] < 1e-4 * losses["data"]


def test_meanflow_needs_a_flow_map_network():
    with pytest.raises(ValueError, match="flow-map network"):
        meanflow_loss(build_network(MLP), mixture_points(4), context())


def test_meanflow_learns_the_exact_velocity():
    """Its loss is mostly irreducible (the conditional velocity e - x is random), so watch the
    reducible part: u(z, t, t) against the mixture's exact velocity (z - D*(x, sigma)) / t."""
    mu, logw, s = mixture()
    exact_denoiser = gmm_denoiser(mu, logw, s)
    held_out = mixture_points(512, seed=99)["data"]
    t = torch.linspace(0.05, 0.95, 512)
    noise = torch.randn(512, 2, generator=torch.Generator().manual_seed(5))
    z = (1 - t[:, None]) * held_out + t[:, None] * noise
    exact = (z - exact_denoiser(z / (1 - t[:, None]), t / (1 - t))) / t[:, None]

    def velocity_error(result):
        return (average_velocity(net, z, t, t) - exact).square().sum(1).mean()

    torch.manual_seed(0)
    net = build_network({**MLP, "flow_map": True})
    before, after = train_on_mixture(net, meanflow_loss, steps=200, watch=velocity_error)
    assert after < 0.5 * before


def test_post_meanflow_from_teacher_starts_as_the_teacher(mid_students, tmp_path):
    post_train(init="teacher", teacher=mid_students["teacher"], method="meanflow", out=tmp_path / "mf", max_steps=1,
               lr=1e-12, **POST_FAST)
    student = load_network(tmp_path / "mf" / "post.pt", key="net")
    teacher = load_network(mid_students["teacher"])
    assert student.flow_map and not teacher.flow_map
    z, t = torch.randn(8, 2), torch.linspace(0.1, 0.9, 8)
    with torch.no_grad():
        instantaneous = (z - teacher(z / (1 - t[:, None]), t / (1 - t))) / t[:, None]
        for r in (torch.zeros(8), t / 2, t):  # a new target_sigma input, zero-initialised: u ignores r
            torch.testing.assert_close(average_velocity(student, z, t, r), instantaneous, atol=1e-5, rtol=1e-5)


def test_post_meanflow_teacher_velocity_trains_from_the_recorded_teacher(mid_students, tmp_path):
    """`cmt-train post --velocity teacher`: the teacher mid.pt records gives the target's velocity,
    and the run records it; the loss is then the reducible part only (no e - x variance)."""
    code, output = invoke_command(main, "post", "--init", mid_students["flowmap"], "--method", "meanflow", "--velocity",
                                  "teacher", "--out", tmp_path / "teacher-v", "--max-steps", "2", *command_line(POST_FAST))
    assert code == 0, output
    post_train(init=mid_students["flowmap"], method="meanflow", out=tmp_path / "data-v", max_steps=2, **POST_FAST)
    checkpoint = torch.load(tmp_path / "teacher-v" / "post.pt", weights_only=True)
    assert checkpoint["teacher"] == str(mid_students["teacher"])
    first = {name: json.loads((tmp_path / name / "log.jsonl").read_text().splitlines()[0])["velocity_error"]
             for name in ("teacher-v", "data-v")}
    assert first["teacher-v"] < 0.5 * first["data-v"]


def test_meanflow_loss_is_float32_under_bf16_autocast():
    torch.manual_seed(0)
    net = build_network({**MLP, "flow_map": True})
    batch = mixture_points(64)
    reference, _ = meanflow_loss(net, batch, context(seed=4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        guarded, _ = meanflow_loss(net, batch, context(seed=4))
    torch.testing.assert_close(guarded, reference, rtol=1e-5, atol=1e-6)


def conditional_mixture(seed=0):
    mu, logw, s = random_gmm(3, 2, std=0.3, generator=torch.Generator().manual_seed(seed))
    return mu, logw, s


def exact_conditional_denoiser(mu, logw, s):
    """D*(x, sigma | class): a one-hot label picks its component, a zero label the whole mixture."""
    mixture = gmm_denoiser(mu, logw, s)
    components = [gmm_denoiser(mu[k:k + 1], torch.zeros(1, dtype=mu.dtype), s) for k in range(len(mu))]

    def denoiser(x, sigma, labels):
        out = mixture(x, sigma)
        if labels is None:
            return out
        for k, component in enumerate(components):
            out = torch.where(labels[:, k:k + 1] > 0, component(x, sigma), out)
        return out
    return denoiser


class ExactConditionalFlowMap(torch.nn.Module):
    """The mixture's exact class-conditional flow map (Heun in log sigma), a flow-map 'network'."""
    flow_map, label_dim, sigma_data, data_shape = True, 3, 0.5, (2,)

    def __init__(self, mu, logw, s, steps=48):
        super().__init__()
        self.denoiser, self.steps = exact_conditional_denoiser(mu, logw, s), steps

    def forward(self, x, sigma, labels=None, target_sigma=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0])
        target_sigma = torch.as_tensor(target_sigma, dtype=x.dtype).expand(x.shape[0])
        instantaneous = self.denoiser(x, sigma, labels)
        start, end = sigma.log()[:, None], target_sigma.clamp(min=1e-8).log()[:, None]
        state = x
        for i in range(self.steps):
            here, there = start + (end - start) * i / self.steps, start + (end - start) * (i + 1) / self.steps
            slope = state - self.denoiser(state, here.exp()[:, 0], labels)
            euler = state + (there - here) * slope
            state = state + (there - here) * (slope + euler - self.denoiser(euler, there.exp()[:, 0], labels)) / 2
        ratio = (target_sigma / sigma)[:, None]
        same = ratio >= 1 - 1e-6
        return torch.where(same, instantaneous, (state - ratio * x) / torch.where(same, torch.ones_like(ratio),
                                                                                   1 - ratio))


def test_meanflow_cfg_velocity_and_target_on_an_exact_mixture_flow_map():
    mu, logw, s = conditional_mixture()
    net = ExactConditionalFlowMap(mu, logw, s)
    denoiser = exact_conditional_denoiser(mu, logw, s)
    n = 12
    generator = torch.Generator().manual_seed(1)
    classes = torch.arange(n) % 3
    x = gmm_sample(mu, logw, s, n, generator)
    e = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    t = torch.linspace(0.1, 0.9, n, dtype=torch.float64)
    r = t * 0.5
    z = (1 - t[:, None]) * x + t[:, None] * e
    v = e - x
    labels = torch.nn.functional.one_hot(classes, 3).to(torch.float64)
    dropped = torch.arange(n) < 2
    omega, kappa, t_min, t_max = 1.5, 0.3, 0.2, 0.8
    guided = guided_velocity(net, z, t, v, labels, dropped, omega=omega, kappa=kappa, t_min=t_min, t_max=t_max)

    def exact_velocity(label_rows):
        return (z - denoiser(z / (1 - t[:, None]), t / (1 - t), label_rows)) / t[:, None]
    cond, uncond = exact_velocity(labels), exact_velocity(torch.zeros_like(labels))
    inside = ((t >= t_min) & (t <= t_max) & ~dropped)[:, None]
    expected = torch.where(inside, omega * v + (1 - omega - kappa) * uncond + kappa * cond, v)
    torch.testing.assert_close(guided, expected, rtol=1e-6, atol=1e-8)
    assert bool(inside.any()) and bool((~inside).any())
    # The target of the guided velocity: v_g - (t - r) du/dt, du/dt along (v_g, 1, 0), by central differences.
    dropped_labels = labels * (~dropped)[:, None]
    target = meanflow_target(net, z, t, r, guided, dropped_labels)
    h = 1e-4
    with torch.no_grad():
        du_dt = (average_velocity(net, z + h * guided, t + h, r, dropped_labels)
                 - average_velocity(net, z - h * guided, t - h, r, dropped_labels)) / (2 * h)
    torch.testing.assert_close(target, guided - (t - r)[:, None] * du_dt, rtol=1e-4, atol=1e-5)


def test_meanflow_loss_with_cfg_and_label_dropout_uses_the_guided_target():
    mu, logw, s = conditional_mixture()
    net = ExactConditionalFlowMap(mu.float(), logw.float(), s, steps=16)
    n = 16
    x = gmm_sample(mu.float(), logw.float(), s, n, torch.Generator().manual_seed(2))
    batch = {"data": x, "label": torch.arange(n) % 3}
    settings = dict(cfg_omega=1.0, cfg_kappa=0.5, cfg_t_min=0.0, cfg_t_max=1.0, label_dropout=0.1)
    loss, _ = meanflow_loss(net, batch, context(seed=7), **settings)
    generator = torch.Generator().manual_seed(7)
    t, r = sample_t_r(n, generator, "cpu")
    noise = torch.randn(x.shape, generator=generator)
    dropped = label_dropout_mask(n, 0.1, generator, "cpu")
    z = (1 - t[:, None]) * x + t[:, None] * noise
    labels = torch.nn.functional.one_hot(batch["label"], 3).float()
    v_g = guided_velocity(net, z, t, noise - x, labels, dropped, omega=1.0, kappa=0.5)
    kept = labels * (~dropped)[:, None]
    error = (average_velocity(net, z, t, r, kept) - meanflow_target(net, z, t, r, v_g, kept)).square().sum(1)
    torch.testing.assert_close(loss, error / (error + 0.01), rtol=1e-4, atol=1e-6)
    unguided, _ = meanflow_loss(net, batch, context(seed=7))
    assert float((unguided - loss).abs().max()) > 1e-4


def test_meanflow_adaptive_weight_pulls_an_exact_flow_map_away_and_plain_l2_does_not():
    """Why the built-in recipes post-train MeanFlow with norm_p = 0 (bench_claim, issue 10): at the
    exact flow map the residual u - target has conditional mean zero given (z, t, r) (the target is
    unbiased), so the plain L2 loss has zero expected gradient there; MeanFlow's adaptive weight
    1 / (|delta|^2 + eps) (p = 1) weighs the posterior's draws unequally, so its expected gradient at
    the exact answer is not zero: started from good (CMT) weights it trains them away."""
    mu, logw, s = conditional_mixture()
    net = ExactConditionalFlowMap(mu, logw, s, steps=32)
    n, t, r = 4000, 0.6, 0.2
    generator = torch.Generator().manual_seed(0)
    # One point z between two components, and x drawn from the posterior p(x | z_t = z).
    sigma = t / (1 - t)
    y = (mu[0] + mu[1]) / 2
    variance = s ** 2 + sigma ** 2
    posterior = (logw - (y - mu).square().sum(1) / (2 * variance)).softmax(0)
    component = torch.multinomial(posterior, n, replacement=True, generator=generator)
    x = (mu[component] + (s ** 2 / variance) * (y - mu[component])
         + (s ** 2 * sigma ** 2 / variance) ** 0.5 * torch.randn(n, 2, generator=generator, dtype=torch.float64))
    z = ((1 - t) * y).expand(n, 2).clone()
    velocity = (z - (1 - t) * x) / t - x            # e - x with e = (z - (1 - t) x) / t
    t_rows, r_rows = torch.full((n,), t, dtype=torch.float64), torch.full((n,), r, dtype=torch.float64)
    delta = average_velocity(net, z, t_rows, r_rows).detach() - meanflow_target(net, z, t_rows, r_rows, velocity)
    z_scores = {}
    for norm_p in (0.0, 1.0):
        gradient = delta / (delta.square().sum(1, keepdim=True) + 0.01) ** norm_p   # d loss / d u, per draw / 2
        z_scores[norm_p] = (gradient.mean(0) / (gradient.std(0) / n ** 0.5)).abs()
    assert float(z_scores[0.0].max()) < 3, z_scores
    assert float(z_scores[1.0].max()) > 8, z_scores
    for name in ("mnist", "toy"):
        assert recipes.recipe_values("post", name, "meanflow")["norm_p"] == 0.0


class GridBlindFlowMap(ExactConditionalFlowMap):
    """The exact flow map, off by `eps * sin(pi k(sigma)) * offset` in its output, where k is the
    position on the 16-step log-sigma grid the trajectories are stored on: exact at every stored
    state, so no mid-training target can see the error, but with a wrong time derivative."""

    def __init__(self, mu, logw, s, eps, steps=32):
        super().__init__(mu, logw, s, steps)
        self.eps, self.offset = eps, torch.tensor([1.0, -0.5], dtype=torch.float64)
        self.log_step = (math.log(SIGMA_MAX) - math.log(SIGMA_MIN)) / 16

    def grid_position(self, sigma):
        return (math.log(SIGMA_MAX) - torch.as_tensor(sigma, dtype=torch.float64).log()) / self.log_step

    def forward(self, x, sigma, labels=None, target_sigma=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).expand(x.shape[0])
        wave = torch.sin(math.pi * self.grid_position(sigma))[:, None]
        return super().forward(x, sigma, labels, target_sigma) + self.eps * wave * self.offset


def test_meanflow_target_is_further_from_the_flow_map_than_weights_exact_at_the_stored_states():
    """Why MeanFlow post-training can make CMT flow-map weights worse (the toy's drift, issue 10;
    docs/claim.md, "Why MeanFlow from CMT degrades on the toy"): mid-training fits the flow map at the
    stored states only, while MeanFlow's target v - (t - r) du/dt uses the network's own time
    derivative, which no mid-training target constrains. A network exact at every stored state but
    with a small error in between has a MeanFlow target (t - r) du/dt-errors away: several times
    further from the exact flow map than the network itself, so MeanFlow trains it away from it."""
    mu, logw, s = conditional_mixture()
    exact, blind = ExactConditionalFlowMap(mu, logw, s, steps=32), GridBlindFlowMap(mu, logw, s, eps=0.01)
    grid = sigma_grid("logsnr", 16).tolist()
    generator = torch.Generator().manual_seed(3)
    x, noise = gmm_sample(mu, logw, s, 8, generator), torch.randn(8, 2, generator=generator, dtype=torch.float64)
    for sigma, target_sigma in [(grid[i], grid[j]) for i in range(16) for j in (i + 1, 16)]:
        states = x + sigma * noise
        torch.testing.assert_close(blind(states, sigma, None, target_sigma), exact(states, sigma, None, target_sigma))
    n = 256
    generator = torch.Generator().manual_seed(4)
    data = gmm_sample(mu, logw, s, n, generator)
    t = 0.2 + 0.6 * torch.rand(n, generator=generator, dtype=torch.float64)   # between the stored times
    r = t / 4
    z = (1 - t[:, None]) * data + t[:, None] * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    velocity = average_velocity(exact, z, t, t).detach()   # the exact instantaneous velocity: no data noise
    truth = average_velocity(exact, z, t, r).detach()

    def distance(u):
        return float((u - truth).square().sum(1).sqrt().mean())

    value_error = distance(average_velocity(blind, z, t, r).detach())
    target_error = distance(meanflow_target(blind, z, t, r, velocity))
    assert 0 < value_error < 0.05 and target_error > 3 * value_error, (value_error, target_error)
    # the exact map is (up to its 32-step solve) a fixed point: its target is where it is
    assert distance(meanflow_target(exact, z, t, r, velocity)) < min(0.25 * value_error, 0.05 * target_error)


def test_meanflow_cfg_needs_class_conditional_data(mid_students, tmp_path):
    with pytest.raises(ArgumentError) as error:
        post_train(init=mid_students["flowmap"], method="meanflow", cfg_omega=1.0, out=tmp_path / "mf", max_steps=1,
                   **POST_FAST)
    assert error.value.argument == "cfg_omega"


def test_the_teacher_velocity_follows_the_guidance_mid_training_fitted(tmp_path):
    """MeanFlow's velocity 'teacher' aims at the flow map mid-training fitted: by default the guided
    teacher the dataset manifest records; guidance 'none' (or a weight) says otherwise."""
    torch.manual_seed(0)
    nets = [build_network(TEACHER) for _ in range(2)]
    paths = [save_network(tmp_path / f"net{k}.safetensors", net) for k, net in enumerate(nets)]
    build_trajectories(teacher=str(paths[0]), guidance=2.0, guide_ckpt=str(paths[1]), out=tmp_path / "shards",
                       num_trajectories=8, batch_size=8, nfe=3, progress=False, log=lambda m: None)
    mid = mid_train(data=tmp_path / "shards", out=tmp_path / "mid", target="flowmap", max_steps=1, workers=0,
                    eval_data="toy:moons", **FAST)["checkpoint"]
    common = dict(init=mid, method="meanflow", velocity="teacher", max_steps=1, **POST_FAST)
    followed = post_train(out=tmp_path / "followed", **common)
    record = torch.load(followed["checkpoint"], weights_only=True)["teacher_guidance"]
    assert record["kind"] == "autoguidance" and record["weight"] == 2.0 and record["guide"]["path"] == str(paths[1])
    unguided = post_train(out=tmp_path / "unguided", guidance="none", **common)
    assert torch.load(unguided["checkpoint"], weights_only=True)["teacher_guidance"] is None
    ecd = post_train(init=mid, method="ecd", max_steps=1, out=tmp_path / "ecd", **POST_FAST)   # ECD: as given
    assert torch.load(ecd["checkpoint"], weights_only=True)["teacher_guidance"] is None
