"""Issue 9: named recipes, the precision of post-training, the fixed gap after mid-training, ECD with a
guided teacher, MeanFlow's classifier-free guidance, the 16 mid-training states, and the 2-step
sampler of an ECT student started from a flow-map checkpoint."""
import json
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import FAST, MLP, TEACHER, context, make_shards

from cmt.checkpoint import load_network, save_network
from cmt.cli.train import main
from cmt.datasets.shards import ShardReader
from cmt.edm import SIGMA_MAX, SIGMA_MIN, broadcast_sigma, sample_lognormal_sigmas, sigma_grid
from cmt.errors import ArgumentError
from cmt.gmm import gmm_denoiser, gmm_sample, random_gmm
from cmt.guidance import autoguidance
from cmt.networks import build_network
from cmt.sampling import flow_map_sample, recorded_sampler
from cmt.trainers import recipes
from cmt.trainers.distances import make_distance
from cmt.trainers.run_files import read_log
from cmt.trainers.mid import mid_train
from cmt.trainers.ect import consistency_training_loss, ecd_state, ect_target_sigma
from cmt.trainers.meanflow import guided_velocity, label_dropout_mask, meanflow_loss, meanflow_target, sample_t_r
from cmt.trainers.post import post_train
from cmt.trainers.students import average_velocity, consistency_output

POST_FAST = dict(FAST, data="toy:moons")


def mixture_points(n, seed=0):
    mu, logw, s = random_gmm(4, 2, std=0.1, generator=torch.Generator().manual_seed(0))
    x = gmm_sample(mu.float(), logw.float(), s, n, generator=torch.Generator().manual_seed(seed))
    return {"data": x, "label": torch.full((n,), -1)}


@pytest.fixture(scope="module")
def mids(tmp_path_factory):
    """A teacher, its trajectories and a mid-trained student of each target."""
    root = tmp_path_factory.mktemp("recipes")
    teacher, shards = make_shards(root, "teacher", TEACHER, num_trajectories=16, shard_size=1000)
    paths = {"teacher": teacher, "shards": shards}
    for target in ("endpoint", "flowmap"):
        paths[target] = mid_train(data=shards, out=root / target, target=target, max_steps=2, workers=0,
                                  **FAST)["checkpoint"]
    return paths


# ---- precision ---------------------------------------------------------------------------------

def test_post_loss_path_is_float32_under_bf16_autocast():
    """At CMT's fixed gap the residual f(x_t, t) - f(x_r, r) is below bf16's rounding: computed under
    CPU autocast the residual would be mostly noise; the objective keeps its whole loss path in float32."""
    torch.manual_seed(0)
    net = build_network({**MLP, "sigma_min": 0.002})
    distance = make_distance("huber", (2,), huber_c=0.0)
    batch = mixture_points(256)
    kwargs = dict(distance=distance, stage=11, weighting="gap")
    reference, _ = consistency_training_loss(net, batch, context(seed=3), **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        guarded, _ = consistency_training_loss(net, batch, context(seed=3), **kwargs)
    assert guarded.dtype == torch.float32
    torch.testing.assert_close(guarded, reference, rtol=1e-5, atol=1e-6)
    # What the guard prevents: the same two forwards under bf16 autocast lose the residual.
    generator = torch.Generator().manual_seed(3)
    x = batch["data"]
    t = sample_lognormal_sigmas(len(x), -1.1, 2.0, generator=generator)
    r = ect_target_sigma(t, 11)
    noise = torch.randn(x.shape, generator=generator)
    x_t, x_r = x + broadcast_sigma(t, x) * noise, x + broadcast_sigma(r, x) * noise
    with torch.no_grad():
        exact = consistency_output(net, net, x_t, t, None) - consistency_output(net, net, x_r, r, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = (consistency_output(net, net, x_t, t, None) - consistency_output(net, net, x_r, r, None)).float()
    relative = ((rounded - exact).norm(dim=1) / exact.norm(dim=1).clamp(min=1e-12)).median()
    assert float(relative) > 0.05   # bf16 rounding: a large share of the residual (float32: ~1e-6)


def test_meanflow_loss_is_float32_under_bf16_autocast():
    torch.manual_seed(0)
    net = build_network({**MLP, "flow_map": True})
    batch = mixture_points(64)
    reference, _ = meanflow_loss(net, batch, context(seed=4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        guarded, _ = meanflow_loss(net, batch, context(seed=4))
    torch.testing.assert_close(guarded, reference, rtol=1e-5, atol=1e-6)


def test_post_refuses_half_precision_and_runs_float32_by_default(mids, tmp_path):
    for precision in ("bf16", "fp16"):
        with pytest.raises(ArgumentError) as error:
            post_train(init=mids["endpoint"], method="ect", out=tmp_path / precision, mixed_precision=precision,
                       max_steps=1, **POST_FAST)
        assert error.value.argument == "mixed_precision" and "4096" in error.value.message
        assert not (tmp_path / precision).exists()
    post_train(init=mids["endpoint"], method="ect", out=tmp_path / "auto", max_steps=1, **POST_FAST)
    assert json.loads((tmp_path / "auto" / "run.json").read_text())["train"]["mixed_precision"] == "no"


# ---- the fixed gap after mid-training ----------------------------------------------------------

def test_post_from_a_mid_checkpoint_keeps_the_fixed_cmt_gap(mids, tmp_path):
    post_train(init=mids["endpoint"], method="ect", out=tmp_path / "mid", max_steps=2, **POST_FAST)
    assert torch.load(tmp_path / "mid" / "post.pt", weights_only=True)["stage"] == recipes.CMT_POST_STAGE == 11
    assert {record["stage"] for record in read_log(tmp_path / "mid")} == {11.0}
    # Not a mid checkpoint (the teacher's weights): ECT's curriculum from stage 0.
    post_train(init="teacher", teacher=mids["teacher"], method="ect", out=tmp_path / "teacher", max_steps=2,
               **POST_FAST)
    assert torch.load(tmp_path / "teacher" / "post.pt", weights_only=True)["stage"] is None
    assert read_log(tmp_path / "teacher")[0]["stage"] < 1   # the curriculum's first stages
    # A recipe's own gap (FFHQ: -q 512 = stage 8), and an explicit stage over the recipe's.
    post_train(init=mids["endpoint"], method="ect", recipe="ffhq64", out=tmp_path / "ffhq", max_steps=2, **POST_FAST)
    assert torch.load(tmp_path / "ffhq" / "post.pt", weights_only=True)["stage"] == 8
    post_train(init=mids["endpoint"], method="ect", recipe="ffhq64", stage=3, out=tmp_path / "given", max_steps=2,
               **POST_FAST)
    assert torch.load(tmp_path / "given" / "post.pt", weights_only=True)["stage"] == 3


# ---- recipes -----------------------------------------------------------------------------------

def test_every_recipe_resolves_for_its_phases():
    for name, recipe in recipes.RECIPES.items():
        assert recipe["source"]
        if recipe["mid"] is not None:
            values, from_recipe = recipes.resolve_options(mid_train, "mid", {}, name)
            assert values["target"] == "endpoint" and from_recipe["mid_sigma"] > 0
        for method in recipe["post"]:
            values, _ = recipes.resolve_options(post_train, "post", {}, name, method)
            assert values["method"] == method and values["max_steps"] > 0 and values["lr"] > 0
    assert recipes.recipe_values("post", "cifar10", "ect")["stage"] == 11
    assert recipes.recipe_values("post", "afhq64", "ect")["stage"] == 9
    assert recipes.recipe_values("post", "imagenet512", "ecd")["guidance"] == 2.05
    assert recipes.recipe_values("mid", "cifar10")["mid_sigma"] == 0.77569
    with pytest.raises(ArgumentError, match="no mid-training settings"):
        recipes.recipe_values("mid", "imagenet256-meanflow")
    with pytest.raises(ArgumentError, match="method meanflow"):
        recipes.recipe_values("post", "cifar10", "meanflow")
    assert len(recipes.DIFFUSION_RECIPES) == 10
    edm2_s = recipes.recipe_values("diffusion", "edm2-img64-s")
    assert edm2_s["lr"] == 0.01 and edm2_s["channels"] == 192 and edm2_s["lr_ref_steps"] == 35000


def test_a_recipe_is_recorded_and_explicit_arguments_override_it(mids, tmp_path):
    result = mid_train(data=mids["shards"], recipe="imagenet512", out=tmp_path / "mid", max_steps=2, workers=0,
                       lr=3e-4, **FAST)
    run = json.loads((tmp_path / "mid" / "run.json").read_text())
    assert run["train"]["optimizer"] == "adam" and run["train"]["betas"] == [0.9, 0.999]
    assert run["train"]["ema_beta"] == 0.999 and run["train"]["lr"] == 3e-4 and run["train"]["max_steps"] == 2
    checkpoint = torch.load(result["checkpoint"], weights_only=True)
    assert checkpoint["recipe"]["name"] == "imagenet512" and "lr" not in checkpoint["recipe"]["values"]
    assert checkpoint["recipe"]["values"]["huber_c"] == 0.06 and checkpoint["options"]["mid_sigma"] == 1.526
    assert checkpoint["options"]["loss"] == "huber"


def test_the_command_line_recipe_and_its_overrides(mids, tmp_path):
    out = tmp_path / "post"
    result = CliRunner().invoke(main, ["post", "--init", str(mids["endpoint"]), "--method", "ect", "--data",
                                       "toy:moons", "--recipe", "cifar10", "--lr", "3e-4", "--max-steps", "2",
                                       "--optimizer", "adam",   # the flag's default value, given: it wins
                                       "--batch-size", "16", "--num-samples", "64", "--no-progress",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "recipe cifar10" in result.output and "ema_beta=0.9999" in result.output
    run = json.loads((out / "run.json").read_text())
    assert run["train"]["optimizer"] == "adam" and run["train"]["lr"] == 3e-4 and run["train"]["ema_beta"] == 0.9999
    assert run["train"]["betas"] == [0.9, 0.999] and run["train"]["lr_schedule"] == "linear"
    checkpoint = torch.load(out / "post.pt", weights_only=True)
    assert checkpoint["options"]["huber_c"] == 0.0 and checkpoint["options"]["mid_sigma"] == 0.821
    assert checkpoint["stage"] == 11 and checkpoint["config"]["dropout"] == 0.2
    help_text = CliRunner().invoke(main, ["mid", "--help"]).output
    assert "--recipe" in help_text and "cifar10" in help_text and "imagenet512" in help_text


def test_builtin_teachers_default_to_their_recipe():
    assert recipes.builtin_recipe("mnist") == "mnist" and recipes.builtin_recipe("toy:moons") == "toy"
    assert recipes.builtin_recipe("runs/teacher.safetensors") is None
    from cmt.trainers.post import builtin_teacher_recipe
    assert builtin_teacher_recipe({"init": "mnist"}) == "mnist"
    assert builtin_teacher_recipe({"init": "random", "teacher": "toy:checkerboard"}) == "toy"


# ---- ECD with a guided teacher -----------------------------------------------------------------

def heun_direct(denoiser, x, t, r):
    """One Heun step t -> r of dx/dsigma = (x - D(x, sigma)) / sigma, Euler where r = 0."""
    slope = (x - denoiser(x, t)) / t[:, None]
    euler = x + (r - t)[:, None] * slope
    safe_r = torch.where(r > 0, r, torch.ones_like(r))
    second = (euler - denoiser(euler, safe_r)) / safe_r[:, None]
    return torch.where((r > 0)[:, None], x + (r - t)[:, None] * (slope + second) / 2, euler)


def test_ecd_with_a_guided_teacher_matches_the_direct_formula(mids, tmp_path):
    torch.manual_seed(0)
    main_net, guide_net = build_network(TEACHER).eval(), build_network({**TEACHER, "width": 16}).eval()
    guided = autoguidance(main_net, guide_net, 2.5)
    x = torch.randn(32, 2)
    t = torch.linspace(0.05, 5.0, 32)
    r = torch.cat([torch.zeros(4), t[4:] * 0.9])
    with torch.no_grad():
        def direct(y, sigma):
            weak = guide_net(y, sigma)
            return weak + 2.5 * (main_net(y, sigma) - weak)
        expected = heun_direct(direct, x, t, r)
        unguided = heun_direct(lambda y, sigma: main_net(y, sigma), x, t, r)
    torch.testing.assert_close(ecd_state(guided, x, t, r), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ecd_state(main_net, x, t, r), unguided, rtol=1e-5, atol=1e-5)
    assert float((expected - unguided).abs().max()) > 1e-3
    # The loss of ECD with the guided teacher is the distance to the student at that x_r.
    student = build_network({**MLP, "sigma_min": 0.002})
    distance = make_distance("l2", (2,))
    batch = mixture_points(32)
    loss, _ = consistency_training_loss(student, batch, context(seed=5), distance=distance, teacher=guided, stage=2,
                                        weighting="snr")
    generator = torch.Generator().manual_seed(5)
    data = batch["data"]
    t = sample_lognormal_sigmas(32, -1.1, 2.0, generator=generator)
    r = ect_target_sigma(t, 2)
    noise = torch.randn(data.shape, generator=generator)
    x_t = data + t[:, None] * noise
    with torch.no_grad():
        x_r = heun_direct(direct, x_t, t, r)
        target = torch.where((r > 0)[:, None], consistency_output(student, student, x_r, r, None), data)
        manual = (consistency_output(student, student, x_t, t, None) - target).square().sum(1) * (1 / t ** 2 + 4)
    torch.testing.assert_close(loss.detach(), manual, rtol=1e-4, atol=1e-6)
    # post_train: the guide checkpoint and weight reach the teacher and are recorded.
    guide_path = save_network(tmp_path / "guide.safetensors", build_network({**TEACHER, "width": 16}))
    post_train(init=mids["endpoint"], method="ecd", guidance=2.05, guide_ckpt=guide_path, out=tmp_path / "ecd",
               max_steps=1, **POST_FAST)
    record = torch.load(tmp_path / "ecd" / "post.pt", weights_only=True)["teacher_guidance"]
    assert record["kind"] == "autoguidance" and record["weight"] == 2.05 and record["guide"]["path"] == str(guide_path)
    with pytest.raises(ArgumentError) as error:   # the mid teacher was unguided: 'manifest' finds no weight
        post_train(init=mids["endpoint"], method="ecd", guidance="manifest", guide_ckpt=guide_path,
                   out=tmp_path / "manifest", max_steps=1, **POST_FAST)
    assert error.value.argument == "guidance"
    with pytest.raises(ArgumentError) as error:
        post_train(init=mids["endpoint"], method="ect", guidance=2.0, out=tmp_path / "ect", max_steps=1, **POST_FAST)
    assert error.value.argument == "guidance"


# ---- MeanFlow's classifier-free guidance -------------------------------------------------------

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


def test_meanflow_cfg_needs_class_conditional_data(mids, tmp_path):
    with pytest.raises(ArgumentError) as error:
        post_train(init=mids["flowmap"], method="meanflow", cfg_omega=1.0, out=tmp_path / "mf", max_steps=1,
                   **POST_FAST)
    assert error.value.argument == "cfg_omega"


# ---- mid-training states; the 2-step sampler of an ECT student from a flow map ----------------

def test_endpoint_mid_training_never_feeds_the_endpoint_state(mids):
    common = dict(batch_size=1000, seed=0, endless=False)
    every = next(iter(ShardReader(mids["shards"], **common)))
    kept = next(iter(ShardReader(mids["shards"], exclude_endpoint=True, **common)))
    last = float(every["sigma"].min())
    assert bool((every["sigma"] == last).any()) and not bool((kept["sigma"] == last).any())
    assert len(kept["sigma"]) * 5 == len(every["sigma"]) * 4   # nfe 4: 4 of the 5 stored states


def test_ect_student_from_a_flow_map_checkpoint_samples_by_renoising(mids, tmp_path):
    post_train(init=mids["flowmap"], method="ect", out=tmp_path / "ect", max_steps=1, **POST_FAST)
    student = load_network(tmp_path / "ect" / "post.safetensors")
    assert student.flow_map and recorded_sampler(student)["kind"] == "consistency"
    assert recorded_sampler(load_network(mids["flowmap"]))["kind"] == "flowmap"
    noise, fresh = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)), torch.randn(8, 2)
    with torch.no_grad():
        sample = flow_map_sample(student, noise, [80.0, 0.821, 0.0], fresh_noise=lambda jump: fresh, renoise=True)
        first = student(80.0 * noise, 80.0, None, target_sigma=0.0)
        expected = student(first + 0.821 * fresh, 0.821, None, target_sigma=0.0)
        jumped = flow_map_sample(student, noise, [80.0, 0.821, 0.0], fresh_noise=lambda jump: fresh)
    torch.testing.assert_close(sample, expected)
    assert float((sample - jumped).abs().max()) > 0


# ---- classifier-free guidance needs a teacher trained with label dropout ----------------------

def test_classifier_free_guidance_is_refused_without_label_dropout(tmp_path):
    from cmt.teachers import resolve_teacher
    with pytest.raises(ArgumentError, match="unconditional guide") as error:
        resolve_teacher("mnist", guidance=2.0)   # the built-in teacher: no label dropout
    assert error.value.argument == "guidance"
    conditional = {**TEACHER, "label_dim": 3}
    for label_dropout, allowed in ((0.0, False), (0.1, True), (None, True)):
        path = save_network(tmp_path / f"net-{label_dropout}.safetensors", build_network(conditional),
                            extra_config={} if label_dropout is None else {"label_dropout": label_dropout})
        if allowed:
            assert resolve_teacher(str(path), guidance=2.0)[1]["guidance"]["kind"] == "classifier_free"
        else:
            with pytest.raises(ArgumentError, match="unconditional guide"):
                resolve_teacher(str(path), guidance=2.0)
    # An unconditional guide network gives classifier-free guidance to any conditional teacher.
    uncond = save_network(tmp_path / "uncond.safetensors", build_network(TEACHER))
    guided, identity = resolve_teacher(str(tmp_path / "net-0.0.safetensors"), guidance=2.0, guide_ckpt=str(uncond))
    assert identity["guidance"]["kind"] == "classifier_free" and identity["guidance"]["guide"]["path"] == str(uncond)
    x, sigma, labels = torch.randn(4, 2), torch.full((4,), 0.7), torch.eye(3)[[0, 1, 2, 0]]
    with torch.no_grad():
        teacher, weak = load_network(tmp_path / "net-0.0.safetensors"), load_network(uncond)
        torch.testing.assert_close(guided(x, sigma, labels), weak(x, sigma) + 2.0 * (teacher(x, sigma, labels)
                                                                                   - weak(x, sigma)))
