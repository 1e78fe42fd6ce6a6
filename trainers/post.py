"""Post-training (phase 3): online consistency / flow-map training, started from mid-trained weights.

- ECT (Geng et al., "Consistency models made easy", locuslab/ect): sigma t ~ log-normal,
  r = t (1 - n(t) / q^(stage + 1)) with n(t) = 1 + k sigmoid(-b t), the target is the model's own
  output at x_r = x + r e under no_grad, with the same noise and the same dropout mask; at r = 0 it
  is the data. Pseudo-Huber distance, weighted by 1 / (t - r) or 1 / t^2 + 1 / sigma_data^2.
- ECD: as ECT, but x_r is one Heun step of the frozen teacher from x_t (sony/cmt's ECDLoss).
- MeanFlow (Geng et al. 2025, Gsunshine/meanflow): z_t = (1 - t) x + t e, v = e - x; the average
  velocity u(z, t, r) regresses onto v - (t - r) du/dt, du/dt the JVP of u along (v, 1, 0),
  stop-gradient, with the adaptive weight 1 / (|delta|^2 + c)^p. The network stays in EDM sigma
  space (docs/design.md, "Flow maps").
"""
import contextlib
import functools
from pathlib import Path

import click
import torch

from cmt.checkpoint import read_safetensors
from cmt.datasets import resolve_data
from cmt.edm import SIGMA_MAX, SIGMA_MIN, broadcast_sigma, sample_lognormal_sigmas
from cmt.teachers import resolve_teacher
from cmt.trainers import loop
from cmt.trainers.diffusion import data_batches, network_for
from cmt.trainers.distances import DISTANCES, make_distance, squared_l2
from cmt.trainers.mid import (average_velocity, build_student, consistency_output, manifest_teacher_spec,
                              network_labels, plain_network, sampling_report, save_student, student_config)

# ECT's defaults (CIFAR-10 ECM, locuslab/ect ct_train.py).
ECT_P_MEAN, ECT_P_STD = -1.1, 2.0
ECT_Q, ECT_K, ECT_B = 2.0, 8.0, 1.0
WEIGHTINGS = ("gap", "snr")
POST_LR = {"edm2": 1e-3, "mlp": 1e-4}
# MeanFlow's defaults (Gsunshine/meanflow configs/default.py).
MF_P_MEAN, MF_P_STD = -0.4, 1.0
MF_EQUAL_SHARE = 0.75          # share of samples with r = t (plain flow matching)
MF_NORM_P, MF_NORM_EPS = 1.0, 0.01
# Samplers start at sigma_max; t beyond it is never used.
MF_T_MAX = SIGMA_MAX / (1 + SIGMA_MAX)


def frozen_weight_norm(plain):
    """EDM2 rewrites its weights in place at each train-mode forward; a second forward (or a JVP)
    in the same step must not, so normalise once up front (a no-op for networks without it)."""
    freeze = getattr(plain, "frozen_weight_norm", None)
    return freeze() if freeze is not None else contextlib.nullcontext()


def same_dropout(device):
    """Run the block, then restore the RNG: the next forward draws the same dropout masks."""
    device = torch.device(device)
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


# ---- ECT / ECD --------------------------------------------------------------------------------

def ect_stage(step, stage_every=None, stage=None):
    """The curriculum stage: fixed (`stage`), or advancing every `stage_every` steps."""
    if stage is not None:
        return int(stage)
    return step // stage_every


def ect_r(t, stage, q=ECT_Q, k=ECT_K, b=ECT_B):
    """ECT's r(t) = t (1 - n(t) / q^(stage + 1)), n(t) = 1 + k sigmoid(-b t), clamped at 0."""
    n = 1 + k * torch.sigmoid(-b * t)
    return (t * (1 - n / q ** (stage + 1))).clamp(min=0)


def ect_weight(t, r, weighting, sigma_data):
    if weighting == "gap":
        return 1 / (t - r)
    if weighting == "snr":
        return 1 / t ** 2 + 1 / sigma_data ** 2
    raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")


@torch.no_grad()
def teacher_heun_step(teacher, x, sigma, target_sigma, labels=None):
    """One EDM Heun step of the teacher's ODE from sigma to target_sigma (Euler where target is 0)."""
    sigma_b, target_b = broadcast_sigma(sigma, x), broadcast_sigma(target_sigma, x)
    slope = (x - teacher(x, sigma, labels)) / sigma_b
    euler = x + (target_b - sigma_b) * slope
    safe_target = torch.where(target_sigma > 0, target_sigma, sigma)
    slope_end = (euler - teacher(euler, safe_target, labels)) / broadcast_sigma(safe_target, x)
    heun = x + (target_b - sigma_b) * (slope + slope_end) / 2
    return torch.where(target_b > 0, heun, euler)


def consistency_training_loss(net, batch, ctx, *, distance, teacher=None, stage=None, stage_every=None,
                              q=ECT_Q, k=ECT_K, b=ECT_B, p_mean=ECT_P_MEAN, p_std=ECT_P_STD, weighting="gap"):
    """ECT (teacher None) or ECD (a frozen teacher makes x_r): per-sample weighted distance."""
    plain = plain_network(net, ctx)
    x = batch["data"]
    labels = network_labels(plain, batch.get("label"))
    current = ect_stage(ctx.step, stage_every, stage)
    t = sample_lognormal_sigmas(x.shape[0], p_mean, p_std, generator=ctx.generator, device=x.device)
    r = ect_r(t, current, q, k, b)
    noise = torch.randn(x.shape, generator=ctx.generator, device=x.device, dtype=x.dtype)
    x_t = x + broadcast_sigma(t, x) * noise
    if teacher is None:
        x_r = x + broadcast_sigma(r, x) * noise
    else:
        x_r = teacher_heun_step(teacher, x_t, t, r, labels)
    with frozen_weight_norm(plain):
        with same_dropout(x.device):
            prediction = consistency_output(net, plain, x_t, t, labels)
        with torch.no_grad():
            target = consistency_output(net, plain, x_r, r, labels).nan_to_num()
    target = torch.where(broadcast_sigma(r, x) > 0, target, x)
    loss = distance(prediction, target.to(prediction.dtype)) * ect_weight(t, r, weighting, plain.sigma_data)
    return loss, {"stage": torch.tensor(float(current)), "mean_gap": (t - r).mean()}


# ---- MeanFlow ---------------------------------------------------------------------------------

def sample_t_r(n, generator, device, p_mean=MF_P_MEAN, p_std=MF_P_STD, equal_share=MF_EQUAL_SHARE, t_max=MF_T_MAX):
    """MeanFlow's (t, r): two logit-normal draws sorted (t >= r); the first `equal_share` of the
    batch gets r = t. t is clamped to `t_max` (sigma_max)."""
    draws = torch.sigmoid(torch.randn(2, n, generator=generator, device=device) * p_std + p_mean)
    t, r = draws.max(dim=0).values, draws.min(dim=0).values
    t = t.clamp(max=t_max)
    r = torch.minimum(r, t)
    equal = torch.arange(n, device=device) < int(n * equal_share)
    return t, torch.where(equal, t, r)


def meanflow_target(plain, z, t, r, velocity, labels=None):
    """`v - (t - r) du/dt` with du/dt = JVP of u(z, t, r) along (v, 1, 0); no gradient."""
    def u(z, t, r):
        return average_velocity(plain, z, t, r, labels)

    with torch.no_grad():
        _, du_dt = torch.func.jvp(u, (z, t, r), (velocity, torch.ones_like(t), torch.zeros_like(r)))
    return velocity - broadcast_sigma(t - r, z) * du_dt


def meanflow_loss(net, batch, ctx, *, p_mean=MF_P_MEAN, p_std=MF_P_STD, equal_share=MF_EQUAL_SHARE,
                  norm_p=MF_NORM_P, norm_eps=MF_NORM_EPS):
    """MeanFlow per-sample loss `|u - target|^2 / (|u - target|^2 + eps)^p` (weight without gradient).

    The JVP runs on the unwrapped network without gradient (the target is stop-gradient anyway);
    the gradient path is one plain forward of `net` with the same dropout mask, so DDP sees it.
    """
    plain = plain_network(net, ctx)
    if not plain.flow_map:
        raise ValueError("MeanFlow needs a flow-map network (flow_map=True, with a target_sigma input)")
    x = batch["data"]
    labels = network_labels(plain, batch.get("label"))
    t, r = sample_t_r(x.shape[0], ctx.generator, x.device, p_mean, p_std, equal_share)
    noise = torch.randn(x.shape, generator=ctx.generator, device=x.device, dtype=x.dtype)
    t_b = broadcast_sigma(t, x)
    z = (1 - t_b) * x + t_b * noise
    velocity = noise - x
    with frozen_weight_norm(plain):
        with same_dropout(x.device):
            target = meanflow_target(plain, z, t, r, velocity, labels)
        u = average_velocity(net, z, t, r, labels)
    error = squared_l2(u, target.to(u.dtype))
    loss = error / (error.detach() + norm_eps) ** norm_p
    return loss, {"velocity_error": error.detach().mean()}


OBJECTIVES = {"ect": consistency_training_loss, "ecd": consistency_training_loss, "meanflow": meanflow_loss}


# ---- cmt-train post ---------------------------------------------------------------------------

def recorded_teacher(path):
    """The teacher identity a mid.pt / post.pt (or its .safetensors export) records, if any."""
    path = Path(path)
    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True).get("teacher")
    if path.suffix == ".safetensors":
        return read_safetensors(path)[2].get("teacher")
    return None


def resolve_or_fail(spec, flag):
    try:
        return resolve_teacher(spec)
    except (ValueError, FileNotFoundError, OSError) as error:
        raise click.BadParameter(str(error), param_hint=flag) from None


def load_init(init, teacher, data, arch):
    """`(config, state_dict or None, identity, teacher)` of the network post-training starts from;
    `teacher` is the --teacher spec, else the one recorded in --init, else --init itself when it
    is a plain diffusion model.

    init: a checkpoint (mid.pt, ...) or built-in name; "teacher" (the --teacher weights); "random"
    (the --teacher architecture, or the diffusion command's default network for `data`).
    """
    if init == "random":
        if teacher is not None:
            net, identity = resolve_or_fail(teacher, "--teacher")
            return net.config, None, {"kind": "random", "like": identity}, teacher
        return network_for(data, arch, None, None, None, None, 0.0, True).config, None, {"kind": "random"}, None
    if init == "teacher":
        if teacher is None:
            raise click.UsageError("--init teacher needs --teacher (a built-in name or a checkpoint)")
        init = teacher
    net, identity = resolve_or_fail(init, "--init")
    if teacher is None:
        recorded = recorded_teacher(init) if Path(init).is_file() else None
        if recorded:
            teacher = manifest_teacher_spec(recorded)
        elif not (net.sigma_min or net.flow_map):
            teacher = init
    return net.config, net.state_dict(), identity, teacher


def check_data_fits(data, net):
    if tuple(data.data_shape) != tuple(net.data_shape) or (net.label_dim and data.label_dim != net.label_dim):
        raise click.BadParameter(
            f"{data.name} holds data of shape {tuple(data.data_shape)} with {data.label_dim} classes; the network "
            f"takes shape {tuple(net.data_shape)} with {net.label_dim} classes", param_hint="--data")


@click.command("post", context_settings={"show_default": True})
@click.option("--init", required=True,
              help="mid.pt (or another checkpoint of ours, or a built-in teacher name), 'teacher' (the --teacher "
                   "weights) or 'random'.")
@click.option("--method", type=click.Choice(list(OBJECTIVES)), required=True)
@click.option("--data", "data_spec", required=True, help="mnist, toy:NAME, or an image folder / .npz / EDM .zip.")
@click.option("--teacher", default=None,
              help="Diffusion teacher (name or checkpoint): ECD's solver, and what 'teacher' / 'random' inits "
                   "copy [default: the teacher recorded in --init].")
@click.option("--arch", type=click.Choice(["edm2", "mlp"]), default=None,
              help="--init random without --teacher: the diffusion command's default network of this kind.")
@click.option("--stage", type=click.IntRange(min=0), default=None,
              help="ECT/ECD: a fixed curriculum stage (CMT post-training: 11, i.e. q^12 = 4096 with q = 2).")
@click.option("--stage-every", type=click.IntRange(min=1), default=None,
              help="ECT/ECD: advance the stage every this many steps [default: max-steps / 8].")
@click.option("--q", type=click.FloatRange(min=1, min_open=True), default=ECT_Q, help="ECT: gap decay per stage.")
@click.option("--k", type=float, default=ECT_K, help="ECT: n(t) = 1 + k sigmoid(-b t).")
@click.option("--b", type=float, default=ECT_B, help="ECT: n(t) = 1 + k sigmoid(-b t).")
@click.option("--p-mean", type=float, default=None,
              help="Time distribution mean [ECT: log-normal -1.1; MeanFlow: logit-normal -0.4].")
@click.option("--p-std", type=click.FloatRange(min=0, min_open=True), default=None, help="[ECT: 2.0; MeanFlow: 1.0]")
@click.option("--weighting", type=click.Choice(WEIGHTINGS), default="gap",
              help="ECT/ECD: gap = 1 / (t - r) (ECT on CIFAR-10), snr = 1 / t^2 + 1 / sigma_data^2 (ECT on EDM2).")
@click.option("--loss", "loss_name", type=click.Choice(DISTANCES), default="huber", help="ECT/ECD distance.")
@click.option("--huber-c", type=click.FloatRange(min=0), default=None,
              help="Pseudo-Huber constant [default: 0.00054 sqrt(dim); 0 = the L2 norm, ECT's CIFAR-10 setting].")
@click.option("--equal-share", type=click.FloatRange(0, 1), default=MF_EQUAL_SHARE, help="MeanFlow: share of r = t.")
@click.option("--norm-p", type=click.FloatRange(min=0), default=MF_NORM_P, help="MeanFlow: adaptive weight power.")
@click.option("--norm-eps", type=click.FloatRange(min=0, min_open=True), default=MF_NORM_EPS,
              help="MeanFlow: adaptive weight 1 / (|delta|^2 + eps)^p.")
@click.option("--dropout", type=click.FloatRange(0, 1), default=None, help="Student dropout [default: the init's].")
@click.option("--resolution", type=click.IntRange(min=4), default=None, help="Resize images [default: the network's].")
@click.option("--eval-data", default=None, help="Data set whose built-in metric scores samples [default: --data if built in].")
@click.option("--num-samples", type=click.IntRange(min=1), default=1000, help="Samples for the metric and pictures.")
@click.option("--mid-sigma", type=click.FloatRange(min=0, min_open=True), default=0.821,
              help="Intermediate sigma of 2-step sampling.")
@loop.trainer_options(lr=None, max_steps=2000, batch_size=128, ema_halflife_images=500_000.0)
def command(init, method, data_spec, teacher, arch, stage, stage_every, q, k, b, p_mean, p_std, weighting, loss_name,
            huber_c, equal_share, norm_p, norm_eps, dropout, resolution, eval_data, num_samples, mid_sigma, **kwargs):
    """Post-train a student with ECT, ECD or MeanFlow -> OUT/post.pt (1- and 2-step sampling).

    --lr defaults to a tenth of the diffusion command's: 1e-3 (edm2), 1e-4 (mlp).
    """
    try:
        data = resolve_data(data_spec, resolution)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--data") from None
    arch = arch or ("mlp" if len(data.data_shape) == 1 else "edm2")
    init_config, init_state, identity, teacher = load_init(init, teacher, data, arch)
    if resolution is None and init_config.get("architecture") == "edm2" and data.kind == "images":
        data = resolve_data(data_spec, init_config["img_resolution"])
    meanflow = method == "meanflow"
    student = build_student(
        student_config(init_config, flow_map=True if meanflow else None, sigma_min=None if meanflow else SIGMA_MIN,
                       dropout=dropout), init_state, source=f"--init {init}", seed=kwargs["seed"])
    check_data_fits(data, student)
    if kwargs["lr"] is None:
        kwargs["lr"] = POST_LR[student.config["architecture"]]
    config = loop.config_from_options(kwargs)
    teacher_net = None
    if meanflow:
        objective = functools.partial(meanflow_loss, p_mean=MF_P_MEAN if p_mean is None else p_mean,
                                      p_std=MF_P_STD if p_std is None else p_std, equal_share=equal_share,
                                      norm_p=norm_p, norm_eps=norm_eps)
    else:
        try:
            distance = make_distance(loss_name, student.data_shape, huber_c=huber_c)
        except (ValueError, FileNotFoundError, ModuleNotFoundError) as error:
            raise click.BadParameter(str(error), param_hint="--loss") from None
        if method == "ecd":
            if teacher is None:
                raise click.UsageError("--method ecd needs a diffusion teacher: pass --teacher")
            teacher_net, _ = resolve_or_fail(teacher, "--teacher")
            if tuple(teacher_net.data_shape) != tuple(student.data_shape) or teacher_net.label_dim != student.label_dim:
                raise click.BadParameter(f"{teacher} does not take the student's data (shape "
                                         f"{tuple(student.data_shape)}, {student.label_dim} classes)", param_hint="--teacher")
            teacher_net.eval().requires_grad_(False)
        objective = functools.partial(
            consistency_training_loss, distance=distance, teacher=teacher_net, stage=stage,
            stage_every=stage_every or max(1, -(-config.max_steps // 8)), q=q, k=k, b=b,
            p_mean=ECT_P_MEAN if p_mean is None else p_mean, p_std=ECT_P_STD if p_std is None else p_std,
            weighting=weighting)
    if eval_data is None and (data.kind == "toy" or data.name == "mnist"):
        eval_data = data.name
    info = {"phase": "post", "method": method, "init": str(init), "init_identity": identity, "teacher": teacher,
            "data": data.name}
    trainer = loop.Trainer(config)
    if teacher_net is not None:
        teacher_net.to(trainer.device)  # the frozen ECD teacher; fit() moves the student

    def sample_fn(ema, step, out):
        return sampling_report(ema, out, step, eval_data=eval_data, num_samples=num_samples, mid_sigma=mid_sigma)

    trainer.fit(student, objective, data_batches(data, trainer.micro_batch_size, trainer.seed_for(0)),
                sample_fn=sample_fn, save_final=lambda ema, net, out: save_student(out, "post", ema, net, info),
                run_info={**info, "student": student.config})
