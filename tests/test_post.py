"""ECT and ECD (`cmt.trainers.ect`), and what post_train does for every method: the init and its student, the
frozen teacher, the precision, resume, bad input, the methods table and reading a checkpoint once."""
import collections
import functools
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import MLP, POST_FAST, TEACHER, command_line, context, mixture, mixture_points, train_on_mixture

import cmt
from cmt import checkpoint as checkpoint_module
from cmt.checkpoint import load_network, save_network
from cmt.cli.sample import main as sample_main
from cmt.cli.train import main
from cmt.datasets import resolve_data
from cmt.edm import broadcast_sigma, flow_map_jump, sample_lognormal_sigmas
from cmt.errors import ArgumentError
from cmt.gmm import gmm_denoiser
from cmt.guidance import autoguidance
from cmt.networks import build_network
from cmt.options import Option
from cmt.sampling import flow_map_sample, recorded_sampler
from cmt.solvers import heun_step
from cmt.teachers import resolve_teacher
from cmt.trainers import post as post_module
from cmt.trainers import precision
from cmt.trainers import recipes
from cmt.trainers.distances import make_distance
from cmt.trainers.ect import ECT, consistency_training_loss, ecd_state, ect_stage, ect_target_sigma
from cmt.trainers.methods import MethodSetup, PostMethod
from cmt.trainers.post import post_train
from cmt.trainers.run_files import read_log
from cmt.trainers.students import build_student, consistency_output, network_labels, plain_network


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
    loss, _ = consistency_training_loss(net, mixture_points(64), context(), distance=make_distance("l2", (2,)), q=1e12,
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
    before, after = train_on_mixture(net, objective)
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
    before, after = train_on_mixture(net, objective)
    assert after < 0.5 * before


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


def test_post_refuses_half_precision_and_runs_float32_by_default(mid_students, tmp_path):
    for half in ("bf16", "fp16"):
        with pytest.raises(ArgumentError) as error:
            post_train(init=mid_students["endpoint"], method="ect", out=tmp_path / half, mixed_precision=half,
                       max_steps=1, **POST_FAST)
        assert error.value.argument == "mixed_precision" and "4096" in error.value.message
        assert not (tmp_path / half).exists()
    post_train(init=mid_students["endpoint"], method="ect", out=tmp_path / "auto", max_steps=1, **POST_FAST)
    assert json.loads((tmp_path / "auto" / "run.json").read_text())["train"]["mixed_precision"] == "no"


def test_post_from_a_mid_checkpoint_keeps_the_fixed_cmt_gap(mid_students, tmp_path):
    post_train(init=mid_students["endpoint"], method="ect", out=tmp_path / "mid", max_steps=2, **POST_FAST)
    assert torch.load(tmp_path / "mid" / "post.pt", weights_only=True)["stage"] == recipes.CMT_POST_STAGE == 11
    assert {record["stage"] for record in read_log(tmp_path / "mid")} == {11.0}
    # Not a mid checkpoint (the teacher's weights): ECT's curriculum from stage 0.
    post_train(init="teacher", teacher=mid_students["teacher"], method="ect", out=tmp_path / "teacher", max_steps=2,
               **POST_FAST)
    assert torch.load(tmp_path / "teacher" / "post.pt", weights_only=True)["stage"] is None
    assert read_log(tmp_path / "teacher")[0]["stage"] < 1   # the curriculum's first stages
    # A recipe's own gap (FFHQ: -q 512 = stage 8), and an explicit stage over the recipe's.
    post_train(init=mid_students["endpoint"], method="ect", recipe="ffhq64", out=tmp_path / "ffhq", max_steps=2, **POST_FAST)
    assert torch.load(tmp_path / "ffhq" / "post.pt", weights_only=True)["stage"] == 8
    post_train(init=mid_students["endpoint"], method="ect", recipe="ffhq64", stage=3, out=tmp_path / "given", max_steps=2,
               **POST_FAST)
    assert torch.load(tmp_path / "given" / "post.pt", weights_only=True)["stage"] == 3


def heun_direct(denoiser, x, t, r):
    """One Heun step t -> r of dx/dsigma = (x - D(x, sigma)) / sigma, Euler where r = 0."""
    slope = (x - denoiser(x, t)) / t[:, None]
    euler = x + (r - t)[:, None] * slope
    safe_r = torch.where(r > 0, r, torch.ones_like(r))
    second = (euler - denoiser(euler, safe_r)) / safe_r[:, None]
    return torch.where((r > 0)[:, None], x + (r - t)[:, None] * (slope + second) / 2, euler)


def test_ecd_with_a_guided_teacher_matches_the_direct_formula(mid_students, tmp_path):
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
    post_train(init=mid_students["endpoint"], method="ecd", guidance=2.05, guide_ckpt=guide_path, out=tmp_path / "ecd",
               max_steps=1, **POST_FAST)
    record = torch.load(tmp_path / "ecd" / "post.pt", weights_only=True)["teacher_guidance"]
    assert record["kind"] == "autoguidance" and record["weight"] == 2.05 and record["guide"]["path"] == str(guide_path)
    with pytest.raises(ArgumentError) as error:   # the mid teacher was unguided: 'manifest' finds no weight
        post_train(init=mid_students["endpoint"], method="ecd", guidance="manifest", guide_ckpt=guide_path,
                   out=tmp_path / "manifest", max_steps=1, **POST_FAST)
    assert error.value.argument == "guidance"
    with pytest.raises(ArgumentError) as error:
        post_train(init=mid_students["endpoint"], method="ect", guidance=2.0, out=tmp_path / "ect", max_steps=1, **POST_FAST)
    assert error.value.argument == "guidance"


def test_ect_student_from_a_flow_map_checkpoint_samples_by_renoising(mid_students, tmp_path):
    post_train(init=mid_students["flowmap"], method="ect", out=tmp_path / "ect", max_steps=1, **POST_FAST)
    student = load_network(tmp_path / "ect" / "post.safetensors")
    assert student.flow_map and recorded_sampler(student)["kind"] == "consistency"
    assert recorded_sampler(load_network(mid_students["flowmap"]))["kind"] == "flowmap"
    noise, fresh = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)), torch.randn(8, 2)
    with torch.no_grad():
        sample = flow_map_sample(student, noise, [80.0, 0.821, 0.0], fresh_noise=lambda jump: fresh, renoise=True)
        first = student(80.0 * noise, 80.0, None, target_sigma=0.0)
        expected = student(first + 0.821 * fresh, 0.821, None, target_sigma=0.0)
        jumped = flow_map_sample(student, noise, [80.0, 0.821, 0.0], fresh_noise=lambda jump: fresh)
    torch.testing.assert_close(sample, expected)
    assert float((sample - jumped).abs().max()) > 0


# ---- post_train and cmt-train post ------------------------------------------------------------


def run(command, *args):
    result = CliRunner().invoke(main, [command, *map(str, args)])
    return result.exit_code, result.output


def run_sample(*args):
    result = CliRunner().invoke(sample_main, list(map(str, args)))
    return result.exit_code, result.output


def test_post_ect_from_mid_finds_the_recorded_teacher_for_ecd(mid_students, tmp_path):
    result = post_train(init=mid_students["endpoint"], method="ect", out=tmp_path / "ect", max_steps=3, stage=11,
                        **POST_FAST)
    assert result["checkpoint"] == tmp_path / "ect" / "post.pt" and result["metrics"]["step"] == 3
    checkpoint = torch.load(tmp_path / "ect" / "post.pt", weights_only=True)
    assert checkpoint["method"] == "ect" and checkpoint["config"]["sigma_min"] == 0.002
    assert checkpoint["teacher"] == str(mid_students["teacher"])  # recorded by mid.pt
    post_train(init=mid_students["endpoint"], method="ecd", out=tmp_path / "ecd", max_steps=2, weighting="snr",
               **POST_FAST)


def test_post_meanflow_from_flowmap_mid_and_ecd_from_random(mid_students, tmp_path):
    post_train(init=mid_students["flowmap"], method="meanflow", out=tmp_path / "mf", max_steps=2, **POST_FAST)
    post_train(init="random", teacher=mid_students["teacher"], method="ecd", out=tmp_path / "ecd", max_steps=2,
               **POST_FAST)
    student, teacher = load_network(tmp_path / "ecd" / "post.pt"), load_network(mid_students["teacher"])
    assert student.config["width"] == teacher.config["width"]
    assert float((student.inp.weight - teacher.inp.weight).detach().abs().max()) > 1e-3


def test_post_resume_repeats_an_uninterrupted_run(mid_students, tmp_path):
    common = dict(init=mid_students["endpoint"], method="ect", ckpt_every=2, lr=1e-3, **POST_FAST)
    post_train(**common, out=tmp_path / "whole", max_steps=4)
    post_train(**common, out=tmp_path / "split", max_steps=2)
    post_train(**common, out=tmp_path / "split", max_steps=4, resume=True)
    whole = torch.load(tmp_path / "whole" / "post.pt", weights_only=True)["ema"]
    split = torch.load(tmp_path / "split" / "post.pt", weights_only=True)["ema"]
    for key, value in whole.items():
        torch.testing.assert_close(split[key], value, atol=0, rtol=0)


def test_post_bad_input_fails_before_training(mid_students, tmp_path):
    wide = save_network(tmp_path / "wide.safetensors", build_network({**TEACHER, "data_shape": [3]}))
    fast = command_line(POST_FAST)
    code, output = run("post", "--init", wide, "--method", "ect", "--out", tmp_path / "run", *fast)
    assert code == 2 and "--data" in output and "shape (2,)" in output and "shape (3,)" in output
    code, output = run("post", "--init", "random", "--method", "ecd", "--out", tmp_path / "run", *fast)
    assert code == 2 and "--teacher" in output
    code, output = run("post", "--init", tmp_path / "missing.pt", "--method", "ect", "--out", tmp_path / "run", *fast)
    assert code == 2 and "--init" in output and "missing.pt" in output
    for options, argument in ((dict(init="teacher", method="ect"), "teacher"), (dict(init=wide, method="ect"), "data"),
                              (dict(init=mid_students["endpoint"], method="ctm"), "method")):
        with pytest.raises(ArgumentError) as error:
            post_train(out=tmp_path / "run", **{**POST_FAST, **options})
        assert error.value.argument == argument
    for options, argument in ((dict(method="ect", velocity="teacher"), "velocity"),
                              (dict(method="meanflow", velocity="teacher", label_dropout=0.1), "label_dropout"),
                              (dict(method="meanflow", guidance=2.0), "guidance"),
                              (dict(method="meanflow", velocity="fresh"), "velocity")):
        with pytest.raises(ArgumentError) as error:
            post_train(init=mid_students["flowmap"], out=tmp_path / "run", **{**POST_FAST, **options})
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


def test_a_method_registered_from_outside_runs_end_to_end(mid_students, tmp_path, monkeypatch):
    monkeypatch.setitem(post_module.METHODS, "fmd", FLOW_MAP_DISTILLATION)
    result = post_train(init="random", teacher=mid_students["teacher"], method="fmd", out=tmp_path / "fmd", max_steps=60,
                        p_std=1.0, lr=1e-2, **{**POST_FAST, "log_every": 30, "batch_size": 64})
    losses = [record["loss"] for record in read_log(tmp_path / "fmd")]
    assert len(losses) == 2 and losses[-1] < 0.75 * losses[0]
    student = load_network(result["model"])
    assert student.flow_map and student.record["method"] == "fmd" and student.record["sampler"]["kind"] == "flowmap"
    sampled = cmt.sample(ckpt=result["model"], out=tmp_path / "fmd.png", num_samples=8, progress=False)
    assert sampled["sampler"] == "flowmap" and sampled["steps"] == 2   # the model says how it is sampled
    with pytest.raises(ArgumentError) as error:   # another method's option
        post_train(init=mid_students["teacher"], method="fmd", out=tmp_path / "x", stage=3, **POST_FAST)
    assert error.value.argument == "stage" and "only to ect, ecd" in error.value.message
    with pytest.raises(ArgumentError) as error:   # its own option, checked from its table
        post_train(init=mid_students["teacher"], method="fmd", out=tmp_path / "x", p_std=-1.0, **POST_FAST)
    assert error.value.argument == "p_std"
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_is_read_once_per_command(mid_students, tmp_path, monkeypatch):
    """post_train from a mid checkpoint and cmt-sample of the student parse each file once, however
    many places need its weights or its record."""
    reads = collections.Counter()
    for name in ("read_safetensors", "read_torch_file"):
        original = getattr(checkpoint_module, name)
        monkeypatch.setattr(checkpoint_module, name,
                            lambda path, *args, _original=original, **kwargs: reads.update([str(path)]) or
                            _original(path, *args, **kwargs))
    post_train(init=mid_students["endpoint"], method="ecd", out=tmp_path / "ecd", max_steps=1, **POST_FAST)
    assert reads[str(mid_students["endpoint"])] == 1 and reads[str(mid_students["teacher"])] == 1, reads
    reads.clear()
    code, output = run_sample("--ckpt", tmp_path / "ecd" / "post.pt", "--out", tmp_path / "s.png", "--num-samples", 4,
                              "--no-progress")
    assert code == 0, output
    assert reads == collections.Counter({str(tmp_path / "ecd" / "post.pt"): 1}), reads


# ---- the TF32 guard ----------------------------------------------------------------------------

def test_tf32_emulation_rounds_every_product_to_ten_mantissa_bits():
    a, b = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)), torch.randn(32, 16)
    with precision.ReducedProducts(10):
        emulated = a @ b
    torch.testing.assert_close(emulated, precision.round_mantissa(a, 10) @ precision.round_mantissa(b, 10))
    relative = float((emulated - a @ b).norm() / (a @ b).norm())
    assert 1e-5 < relative < 2e-3   # TF32's 2^-11 unit roundoff, float32's is 2^-24
    assert torch.equal(precision.round_mantissa(torch.tensor([1 + 2 ** -12, 3.0]), 10), torch.tensor([1.0, 3.0]))


def test_the_tf32_guard_keeps_it_at_stage_9_and_turns_it_off_at_stage_11():
    """On the built-in MNIST teacher as ECT's student, TF32's rounding (emulated on the CPU) is below
    the stage-9 residual f(x_t, t) - f(x_r, r) and above the stage-11 one, CMT's fixed gap."""
    net, _ = resolve_teacher("mnist")
    student = build_student(ECT.student(net.config), net.state_dict()).eval()
    images, labels = resolve_data("mnist").sample(128, torch.Generator().manual_seed(0))
    choices = {}
    for stage in (9, 11):
        options = {**ECT.defaults(), "stage": stage, "stage_every": 100}
        setup = MethodSetup(options=options, student=student, teacher=None, max_steps=100)

        def measure():
            probe = ECT.probe(setup, {"data": images, "label": labels}, torch.Generator().manual_seed(1))
            return precision.rounding_ratio(student, *probe[:-1], precision.MANTISSA_BITS["tf32"]), probe[-1]
        choices[stage] = precision.measured_choice("auto", measure)
    assert choices[9].enabled and 0.3 < choices[9].ratio < precision.TF32_LIMIT
    assert not choices[11].enabled and choices[11].ratio > 2 * precision.TF32_LIMIT
    assert "stage 11" in choices[11].reason and "--tf32 on" in choices[11].reason
    assert precision.measured_choice("on", measure).enabled and not precision.measured_choice("off", measure).enabled


def test_a_cpu_run_records_its_tf32_choice(mid_students, tmp_path):
    post_train(init=mid_students["endpoint"], method="ect", out=tmp_path / "ect", max_steps=1, **POST_FAST)
    choice = json.loads((tmp_path / "ect" / "run.json").read_text())["tf32"]
    assert choice["setting"] == "auto" and choice["enabled"] is False and "CPU" in choice["reason"]
    with pytest.raises(ArgumentError) as error:
        post_train(init=mid_students["endpoint"], method="ect", out=tmp_path / "bad", tf32="maybe", **POST_FAST)
    assert error.value.argument == "tf32"
