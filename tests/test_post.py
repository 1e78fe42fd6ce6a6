import collections
import functools
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import FAST, MLP, TEACHER, command_line, context, make_shards

import cmt
from cmt import checkpoint as checkpoint_module
from cmt.checkpoint import load_network, save_network
from cmt.cli.sample import main as sample_main
from cmt.cli.train import main
from cmt.edm import broadcast_sigma, flow_map_jump, sample_lognormal_sigmas
from cmt.errors import ArgumentError
from cmt.gmm import gmm_denoiser, gmm_sample, random_gmm
from cmt.networks import build_network
from cmt.options import Option
from cmt.solvers import heun_step
from cmt.trainers import post as post_module
from cmt.trainers.distances import make_distance
from cmt.trainers.ect import consistency_training_loss, ect_stage, ect_target_sigma
from cmt.trainers.run_files import read_log
from cmt.trainers.meanflow import MF_T_MAX, meanflow_loss, meanflow_target, sample_t_r
from cmt.trainers.methods import PostMethod
from cmt.trainers.mid import mid_train
from cmt.trainers.post import post_train
from cmt.trainers.students import average_velocity, network_labels, plain_network

POST_FAST = dict(FAST, data="toy:moons")


def mixture(seed=0):
    mu, logw, s = random_gmm(4, 2, std=0.1, generator=torch.Generator().manual_seed(seed))
    return mu.float(), logw.float(), s


def points(n, seed=0):
    mu, logw, s = mixture()
    x = gmm_sample(mu, logw, s, n, generator=torch.Generator().manual_seed(seed))
    return {"data": x, "label": torch.full((n,), -1)}


def train(net, objective, steps=150, batch_size=64, lr=3e-3, watch=None):
    """Adam on fresh mixture samples; returns `watch` (default the loss) on held-out data before/after."""
    def evaluate():
        with torch.no_grad():
            result = objective(net.eval(), points(512, seed=99), context(seed=99))
            return float(watch(result) if watch else (result[0] if isinstance(result, tuple) else result).mean())

    before = evaluate()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for step in range(steps):
        result = objective(net, points(batch_size, seed=step + 1), context(step, seed=step + 1))
        loss = result[0] if isinstance(result, tuple) else result
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    return before, evaluate()


def test_ect_r_schedule():
    t = torch.tensor([0.01, 0.5, 2.0, 80.0])
    # q = 2, stage 0: r = t (1 - (1 + 8 sigmoid(-t)) / 2); n(0.5) = 4.02 > 2 -> clamped to 0
    assert ect_target_sigma(t, stage=0).tolist() == pytest.approx([0.0, 0.0, 0.046377, 40.0], abs=1e-5)
    later = ect_target_sigma(t, stage=11)  # q^12 = 4096: CMT's fixed post-training gap
    assert (t - later).tolist() == pytest.approx([0.01 * 4.98 / 4096, 0.5 * 4.0203 / 4096, 2.0 * 1.95362 / 4096,
                                                  80.0 / 4096], rel=1e-3)
    assert bool((ect_target_sigma(t, 3) >= ect_target_sigma(t, 2)).all())
    assert [ect_stage(s, stage_every=100) for s in (0, 99, 100, 250)] == [0, 0, 1, 2]
    assert ect_stage(250, stage_every=100, stage=11) == 11


def test_ect_target_uses_the_same_noise_and_dropout_mask():
    """With q huge, r = t: the target is the same forward, so the loss is 0 only if the dropout
    masks (and noise) of the two forwards match."""
    torch.manual_seed(0)
    net = build_network({**MLP, "sigma_min": 0.002, "dropout": 0.5}).train()
    loss, _ = consistency_training_loss(net, points(64), context(), distance=make_distance("l2", (2,)), q=1e12,
                                        stage=0, weighting="snr")
    assert float(loss.detach().max()) < 1e-10
    # Without the RNG fork the masks differ: the same inputs give other outputs.
    x, sigma = torch.randn(64, 2), torch.full((64,), 1.0)
    with torch.no_grad():
        assert float((net(x, sigma) - net(x, sigma)).abs().max()) > 1e-3


def test_ect_decreases_the_loss():
    torch.manual_seed(0)
    net = build_network({**MLP, "sigma_min": 0.002})
    objective = functools.partial(consistency_training_loss, distance=make_distance("huber", (2,)), stage=0)
    before, after = train(net, objective)
    # Most of this loss is irreducible (at stage 0, r = 0 below t ~ 2: the target is the data).
    assert after < 0.8 * before


def test_ecd_uses_a_teacher_heun_step_and_decreases_the_loss():
    mu, logw, s = mixture()
    teacher = gmm_denoiser(mu, logw, s)
    x = torch.randn(8, 2)
    sigma, target = torch.full((8,), 2.0), torch.tensor([1.0] * 4 + [0.0] * 4)
    step = heun_step(teacher, x, sigma, target)   # what ECD takes as x_r
    slope = (x - teacher(x, sigma)) / 2.0
    euler = x - slope * (2.0 - target[:, None])
    slope_end = (euler[:4] - teacher(euler[:4], target[:4])) / 1.0
    torch.testing.assert_close(step[:4], x[:4] - (slope[:4] + slope_end) / 2)
    torch.testing.assert_close(step[4:], euler[4:])  # to sigma = 0: the Euler step (no division by 0)
    torch.manual_seed(0)
    net = build_network({**MLP, "sigma_min": 0.002})
    objective = functools.partial(consistency_training_loss, distance=make_distance("huber", (2,)), teacher=teacher,
                                  stage=2, weighting="snr")
    before, after = train(net, objective)
    assert after < 0.5 * before


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

    batch = points(128, seed=4)
    losses = {}
    for name, velocity_teacher in (("data", None), ("teacher", teacher)):
        loss, _ = meanflow_loss(net, batch, context(seed=5), equal_share=0.0, norm_p=0.0, teacher=velocity_teacher)
        losses[name] = float(loss.mean())
    assert losses["data"] > 0.1   # the mixture's e - x varies by O(1) around its mean given z_t
    assert losses["teacher"] < 1e-4 * losses["data"]


def test_meanflow_needs_a_flow_map_network():
    with pytest.raises(ValueError, match="flow-map network"):
        meanflow_loss(build_network(MLP), points(4), context())


def test_meanflow_learns_the_exact_velocity():
    """Its loss is mostly irreducible (the conditional velocity e - x is random), so watch the
    reducible part: u(z, t, t) against the mixture's exact velocity (z - D*(x, sigma)) / t."""
    mu, logw, s = mixture()
    exact_denoiser = gmm_denoiser(mu, logw, s)
    held_out = points(512, seed=99)["data"]
    t = torch.linspace(0.05, 0.95, 512)
    noise = torch.randn(512, 2, generator=torch.Generator().manual_seed(5))
    z = (1 - t[:, None]) * held_out + t[:, None] * noise
    exact = (z - exact_denoiser(z / (1 - t[:, None]), t / (1 - t))) / t[:, None]

    def velocity_error(result):
        return (average_velocity(net, z, t, t) - exact).square().sum(1).mean()

    torch.manual_seed(0)
    net = build_network({**MLP, "flow_map": True})
    before, after = train(net, meanflow_loss, steps=200, watch=velocity_error)
    assert after < 0.5 * before


# ---- post_train and cmt-train post ------------------------------------------------------------

def run(command, *args):
    result = CliRunner().invoke(main, [command, *map(str, args)])
    return result.exit_code, result.output


def run_sample(*args):
    result = CliRunner().invoke(sample_main, list(map(str, args)))
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    """A teacher checkpoint, its trajectories, and a mid-trained student of each target."""
    root = tmp_path_factory.mktemp("post")
    teacher_path, shards = make_shards(root, "teacher", TEACHER, num_trajectories=16, shard_size=1000)
    paths = {"teacher": teacher_path}
    for target in ("endpoint", "flowmap"):
        paths[target] = mid_train(data=shards, out=root / target, target=target, max_steps=2, workers=0,
                                  **FAST)["checkpoint"]
    return paths


def test_post_ect_from_mid_finds_the_recorded_teacher_for_ecd(students, tmp_path):
    result = post_train(init=students["endpoint"], method="ect", out=tmp_path / "ect", max_steps=3, stage=11,
                        **POST_FAST)
    assert result["checkpoint"] == tmp_path / "ect" / "post.pt" and result["metrics"]["step"] == 3
    checkpoint = torch.load(tmp_path / "ect" / "post.pt", weights_only=True)
    assert checkpoint["method"] == "ect" and checkpoint["config"]["sigma_min"] == 0.002
    assert checkpoint["teacher"] == str(students["teacher"])  # recorded by mid.pt
    post_train(init=students["endpoint"], method="ecd", out=tmp_path / "ecd", max_steps=2, weighting="snr",
               **POST_FAST)


def test_post_meanflow_from_teacher_starts_as_the_teacher(students, tmp_path):
    post_train(init="teacher", teacher=students["teacher"], method="meanflow", out=tmp_path / "mf", max_steps=1,
               lr=1e-12, **POST_FAST)
    student = load_network(tmp_path / "mf" / "post.pt", key="net")
    teacher = load_network(students["teacher"])
    assert student.flow_map and not teacher.flow_map
    z, t = torch.randn(8, 2), torch.linspace(0.1, 0.9, 8)
    with torch.no_grad():
        instantaneous = (z - teacher(z / (1 - t[:, None]), t / (1 - t))) / t[:, None]
        for r in (torch.zeros(8), t / 2, t):  # a new target_sigma input, zero-initialised: u ignores r
            torch.testing.assert_close(average_velocity(student, z, t, r), instantaneous, atol=1e-5, rtol=1e-5)


def test_post_meanflow_from_flowmap_mid_and_ecd_from_random(students, tmp_path):
    post_train(init=students["flowmap"], method="meanflow", out=tmp_path / "mf", max_steps=2, **POST_FAST)
    post_train(init="random", teacher=students["teacher"], method="ecd", out=tmp_path / "ecd", max_steps=2,
               **POST_FAST)
    student, teacher = load_network(tmp_path / "ecd" / "post.pt"), load_network(students["teacher"])
    assert student.config["width"] == teacher.config["width"]
    assert float((student.inp.weight - teacher.inp.weight).detach().abs().max()) > 1e-3


def test_post_meanflow_teacher_velocity_trains_from_the_recorded_teacher(students, tmp_path):
    """`cmt-train post --velocity teacher`: the teacher mid.pt records gives the target's velocity,
    and the run records it; the loss is then the reducible part only (no e - x variance)."""
    code, output = run("post", "--init", students["flowmap"], "--method", "meanflow", "--velocity", "teacher",
                       "--out", tmp_path / "teacher-v", "--max-steps", "2", *command_line(POST_FAST))
    assert code == 0, output
    post_train(init=students["flowmap"], method="meanflow", out=tmp_path / "data-v", max_steps=2, **POST_FAST)
    checkpoint = torch.load(tmp_path / "teacher-v" / "post.pt", weights_only=True)
    assert checkpoint["teacher"] == str(students["teacher"])
    first = {name: json.loads((tmp_path / name / "log.jsonl").read_text().splitlines()[0])["velocity_error"]
             for name in ("teacher-v", "data-v")}
    assert first["teacher-v"] < 0.5 * first["data-v"]


def test_post_resume_repeats_an_uninterrupted_run(students, tmp_path):
    common = dict(init=students["endpoint"], method="ect", ckpt_every=2, lr=1e-3, **POST_FAST)
    post_train(**common, out=tmp_path / "whole", max_steps=4)
    post_train(**common, out=tmp_path / "split", max_steps=2)
    post_train(**common, out=tmp_path / "split", max_steps=4, resume=True)
    whole = torch.load(tmp_path / "whole" / "post.pt", weights_only=True)["ema"]
    split = torch.load(tmp_path / "split" / "post.pt", weights_only=True)["ema"]
    for key, value in whole.items():
        torch.testing.assert_close(split[key], value, atol=0, rtol=0)


def test_post_bad_input_fails_before_training(students, tmp_path):
    wide = save_network(tmp_path / "wide.safetensors", build_network({**TEACHER, "data_shape": [3]}))
    fast = command_line(POST_FAST)
    code, output = run("post", "--init", wide, "--method", "ect", "--out", tmp_path / "run", *fast)
    assert code == 2 and "--data" in output and "shape (2,)" in output and "shape (3,)" in output
    code, output = run("post", "--init", "random", "--method", "ecd", "--out", tmp_path / "run", *fast)
    assert code == 2 and "--teacher" in output
    code, output = run("post", "--init", tmp_path / "missing.pt", "--method", "ect", "--out", tmp_path / "run", *fast)
    assert code == 2 and "--init" in output and "missing.pt" in output
    for options, argument in ((dict(init="teacher", method="ect"), "teacher"), (dict(init=wide, method="ect"), "data"),
                              (dict(init=students["endpoint"], method="ctm"), "method")):
        with pytest.raises(ArgumentError) as error:
            post_train(out=tmp_path / "run", **{**POST_FAST, **options})
        assert error.value.argument == argument
    for options, argument in ((dict(method="ect", velocity="teacher"), "velocity"),
                              (dict(method="meanflow", velocity="teacher", label_dropout=0.1), "label_dropout"),
                              (dict(method="meanflow", guidance=2.0), "guidance"),
                              (dict(method="meanflow", velocity="fresh"), "velocity")):
        with pytest.raises(ArgumentError) as error:
            post_train(init=students["flowmap"], out=tmp_path / "run", **{**POST_FAST, **options})
        assert error.value.argument == argument
    assert not (tmp_path / "run").exists()


# ---- the methods table: a new method is its own module and one registry line -------------------

def flow_map_distillation_loss(net, batch, ctx, *, teacher, p_mean, p_std):
    """A plain flow-map distillation, written here as a newcomer would: the student's jump from sigma
    to a random smaller target regresses onto one Heun step of the frozen teacher."""
    plain = plain_network(net, ctx)
    x = batch["data"].float()
    labels = network_labels(plain, batch.get("label"))
    sigma = sample_lognormal_sigmas(x.shape[0], p_mean, p_std, generator=ctx.generator, device=x.device)
    target_sigma = sigma * torch.rand(x.shape[0], generator=ctx.generator, device=x.device)
    x_sigma = x + broadcast_sigma(sigma, x) * torch.randn(x.shape, generator=ctx.generator, dtype=x.dtype)
    with torch.no_grad():
        target = heun_step(teacher, x_sigma, sigma, target_sigma, labels).float()
    jump = flow_map_jump(x_sigma, sigma, target_sigma, net(x_sigma, sigma, labels, target_sigma=target_sigma))
    return ((jump - target) ** 2).mean(dim=1)


FLOW_MAP_DISTILLATION = PostMethod(
    name="fmd", summary="Flow-map distillation: the student's jump onto one Heun step of the teacher.",
    options={"p_mean": Option(-1.1, "log(sigma) ~ N(p_mean, p_std^2)."), "p_std": Option(2.0, "See p_mean.", low=0)},
    student=lambda config: {**config, "flow_map": True}, sampler="flowmap",
    build=lambda setup: functools.partial(flow_map_distillation_loss, teacher=setup.teacher, **setup.options),
    residual="the jump's distance to a Heun step", teacher=lambda options: "method fmd")


def test_a_method_registered_from_outside_runs_end_to_end(students, tmp_path, monkeypatch):
    monkeypatch.setitem(post_module.METHODS, "fmd", FLOW_MAP_DISTILLATION)
    result = post_train(init="random", teacher=students["teacher"], method="fmd", out=tmp_path / "fmd", max_steps=60,
                        p_std=1.0, lr=1e-2, **{**POST_FAST, "log_every": 30, "batch_size": 64})
    losses = [record["loss"] for record in read_log(tmp_path / "fmd")]
    assert len(losses) == 2 and losses[-1] < 0.75 * losses[0]
    student = load_network(result["model"])
    assert student.flow_map and student.record["method"] == "fmd" and student.record["sampler"]["kind"] == "flowmap"
    sampled = cmt.sample(ckpt=result["model"], out=tmp_path / "fmd.png", num_samples=8, progress=False)
    assert sampled["sampler"] == "flowmap" and sampled["steps"] == 2   # the model says how it is sampled
    with pytest.raises(ArgumentError) as error:   # another method's option
        post_train(init=students["teacher"], method="fmd", out=tmp_path / "x", stage=3, **POST_FAST)
    assert error.value.argument == "stage" and "only to ect, ecd" in error.value.message
    with pytest.raises(ArgumentError) as error:   # its own option, checked from its table
        post_train(init=students["teacher"], method="fmd", out=tmp_path / "x", p_std=-1.0, **POST_FAST)
    assert error.value.argument == "p_std"
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_is_read_once_per_command(students, tmp_path, monkeypatch):
    """post_train from a mid checkpoint and cmt-sample of the student parse each file once, however
    many places need its weights or its record."""
    reads = collections.Counter()
    for name in ("read_safetensors", "read_torch_file"):
        original = getattr(checkpoint_module, name)
        monkeypatch.setattr(checkpoint_module, name,
                            lambda path, *args, _original=original, **kwargs: reads.update([str(path)]) or
                            _original(path, *args, **kwargs))
    post_train(init=students["endpoint"], method="ecd", out=tmp_path / "ecd", max_steps=1, **POST_FAST)
    assert reads[str(students["endpoint"])] == 1 and reads[str(students["teacher"])] == 1, reads
    reads.clear()
    code, output = run_sample("--ckpt", tmp_path / "ecd" / "post.pt", "--out", tmp_path / "s.png", "--num-samples", 4,
                              "--no-progress")
    assert code == 0, output
    assert reads == collections.Counter({str(tmp_path / "ecd" / "post.pt"): 1}), reads
