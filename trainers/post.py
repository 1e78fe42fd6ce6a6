"""Post-training (phase 3): online consistency / flow-map training, started from mid-trained weights.

- ECT (Geng et al., "Consistency models made easy", locuslab/ect): sigma t ~ log-normal,
  r = t (1 - n(t) / q^(stage + 1)) with n(t) = 1 + k sigmoid(-b t), the target is the model's own
  output at x_r = x + r e under no_grad, with the same noise and the same dropout mask; at r = 0 it
  is the data. Pseudo-Huber distance, weighted by 1 / (t - r) or 1 / t^2 + 1 / sigma_data^2.
- ECD: as ECT, but x_r is one Heun step of the frozen teacher from x_t (sony/cmt's ECDLoss).
- MeanFlow (Geng et al. 2025, Gsunshine/meanflow): z_t = (1 - t) x + t e, v = e - x; the average
  velocity u(z, t, r) regresses onto v - (t - r) du/dt, du/dt the JVP of u along (v, 1, 0),
  stop-gradient, with the adaptive weight 1 / (|delta|^2 + c)^p. The network stays in EDM sigma
  space (docs/design.md, "Flow maps"). With velocity='teacher', v is the frozen teacher's ODE
  velocity at z_t instead of e - x: the same identity, whose fixed point is then the teacher's flow
  map (the one mid-training fits), without the conditional velocity's variance.
"""
import contextlib
import functools
from pathlib import Path

import torch

from cmt.checkpoint import read_safetensors, read_torch_file
from cmt.edm import SIGMA_MAX, SIGMA_MIN, TWO_STEP_SIGMA, broadcast_sigma, sample_lognormal_sigmas, t_to_sigma, z_to_x
from cmt.errors import ArgumentError, FileFormatError
from cmt.solvers import heun_step
from cmt.teachers import BUILTIN_TEACHERS, resolve_teacher
from cmt.trainers import loop, recipes
from cmt.trainers.data import (ARCHITECTURES, check_data_fits, data_batches, default_arch, network_for,
                               training_data)
from cmt.trainers.distances import DISTANCES, make_distance, squared_l2
from cmt.trainers.mid import teacher_velocity
from cmt.trainers.students import (average_velocity, build_student, check_report_options, consistency_output,
                                   network_labels, plain_network, recorded_teacher_spec, refuse_inapplicable,
                                   resolve_teacher_or_fail, sampling_report, save_student, student_config,
                                   student_result)

# ECT's defaults (CIFAR-10 ECM, locuslab/ect ct_train.py).
ECT_P_MEAN, ECT_P_STD = -1.1, 2.0
ECT_Q, ECT_K, ECT_B = 2.0, 8.0, 1.0
WEIGHTINGS = ("gap", "snr")
# lr=None: per architecture, a tenth of the diffusion phase's.
POST_LR = {"edm2": 1e-3, "mlp": 1e-4}
# The trainer options whose defaults differ from loop.TRAIN_DEFAULTS in this phase.
POST_DEFAULTS = {"max_steps": 2000, "batch_size": 128, "lr": None}
# MeanFlow's defaults (Gsunshine/meanflow configs/default.py).
MF_P_MEAN, MF_P_STD = -0.4, 1.0
MF_EQUAL_SHARE = 0.75          # share of samples with r = t (plain flow matching)
MF_NORM_P, MF_NORM_EPS = 1.0, 0.01
# MeanFlow's target velocity: the data's conditional e - x (the paper's), or the teacher's ODE velocity.
MF_VELOCITIES = ("data", "teacher")
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


def full_precision(device):
    """No autocast inside the block: the loss path of post-training runs in float32 (TF32 matmuls on
    CUDA). At CMT's fixed gap the residual f(x_t, t) - f(x_r, r) is far below bf16's rounding error
    (~20x smaller, median, on the built-in MNIST teacher; fp16 ~3.6x), so half-precision forwards
    would train on rounding noise. The official runs are fp32 (CIFAR-10) and TF32 (ImageNet-512)."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


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


def consistency_training_loss(net, batch, ctx, *, distance, teacher=None, stage=None, stage_every=None,
                              q=ECT_Q, k=ECT_K, b=ECT_B, p_mean=ECT_P_MEAN, p_std=ECT_P_STD, weighting="gap"):
    """ECT (teacher None) or ECD (a frozen teacher makes x_r): per-sample weighted distance, in float32
    whatever autocast is around it (`full_precision`)."""
    plain = plain_network(net, ctx)
    x = batch["data"].float()
    labels = network_labels(plain, batch.get("label"))
    current = ect_stage(ctx.step, stage_every, stage)
    t = sample_lognormal_sigmas(x.shape[0], p_mean, p_std, generator=ctx.generator, device=x.device)
    r = ect_r(t, current, q, k, b)
    noise = torch.randn(x.shape, generator=ctx.generator, device=x.device, dtype=x.dtype)
    x_t = x + broadcast_sigma(t, x) * noise
    with full_precision(x.device):
        if teacher is None:
            x_r = x + broadcast_sigma(r, x) * noise
        else:
            x_r = ecd_state(teacher, x_t, t, r, labels)
        with frozen_weight_norm(plain):
            with same_dropout(x.device):
                prediction = consistency_output(net, plain, x_t, t, labels).float()
            with torch.no_grad():
                target = consistency_output(net, plain, x_r, r, labels).float().nan_to_num()
        target = torch.where(broadcast_sigma(r, x) > 0, target, x)
        loss = distance(prediction, target) * ect_weight(t, r, weighting, plain.sigma_data)
    return loss, {"stage": torch.tensor(float(current)), "mean_gap": (t - r).mean()}


def ecd_state(teacher, x_t, t, r, labels=None):
    """ECD's x_r: one Heun step t -> r of the frozen (maybe guided) teacher's ODE, Euler where r = 0
    (sony/cmt imagenet512/training/loss.py:ECDGuidLoss.heun_solver)."""
    with torch.no_grad():
        return heun_step(teacher, x_t, t, r, labels).float()


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


def label_dropout_mask(n, share, generator, device):
    """MeanFlow's label dropout: True for the first `count` rows, `count` ~ Binomial(n, share)
    (Gsunshine/meanflow meanflow.py:cond_drop drops a leading block of the batch)."""
    count = int((torch.rand(n, generator=generator, device=device) < share).sum())
    return torch.arange(n, device=device) < count


def guided_velocity(plain, z, t, velocity, labels, dropped, *, omega, kappa=0.0, t_min=0.0, t_max=1.0):
    """MeanFlow's classifier-free guided velocity in training (meanflow.py:guidance_fn):
    `v_g = omega v + (1 - omega - kappa) u_uncond + kappa u_cond`, where u_cond / u_uncond are the
    network's own instantaneous velocities u(z, t, t) with / without labels (no gradient); outside
    t in [t_min, t_max] omega = 1 and kappa = 0, and rows whose label is dropped keep v."""
    inside = ((t >= t_min) & (t <= t_max) & ~dropped).to(velocity.dtype)
    w_omega = broadcast_sigma(1 + inside * (omega - 1), z)
    w_kappa = broadcast_sigma(inside * kappa, z)
    with torch.no_grad():
        uncond = average_velocity(plain, z, t, t, torch.zeros_like(labels))
        cond = average_velocity(plain, z, t, t, labels) if kappa else uncond
    return w_omega * velocity + (1 - w_omega - w_kappa) * uncond + w_kappa * cond


def meanflow_loss(net, batch, ctx, *, p_mean=MF_P_MEAN, p_std=MF_P_STD, equal_share=MF_EQUAL_SHARE,
                  norm_p=MF_NORM_P, norm_eps=MF_NORM_EPS, cfg_omega=None, cfg_kappa=0.0, cfg_t_min=0.0,
                  cfg_t_max=1.0, label_dropout=0.0, teacher=None):
    """MeanFlow per-sample loss `|u - target|^2 / (|u - target|^2 + eps)^p` (weight without gradient).

    The JVP runs on the unwrapped network without gradient (the target is stop-gradient anyway);
    the gradient path is one plain forward of `net` with the same dropout mask, so DDP sees it.
    Everything runs in float32 whatever autocast is around it (`full_precision`).
    Class-conditional data: `label_dropout` of the rows train unconditionally (null label, target
    from v), and `cfg_omega` (None: off) guides the target's velocity (`guided_velocity`).
    `teacher` (a frozen denoiser; None: the data's e - x): v is its ODE velocity at z_t.
    """
    plain = plain_network(net, ctx)
    if not plain.flow_map:
        raise ValueError("MeanFlow needs a flow-map network (flow_map=True, with a target_sigma input)")
    x = batch["data"].float()
    labels = network_labels(plain, batch.get("label"))
    t, r = sample_t_r(x.shape[0], ctx.generator, x.device, p_mean, p_std, equal_share)
    noise = torch.randn(x.shape, generator=ctx.generator, device=x.device, dtype=x.dtype)
    t_b = broadcast_sigma(t, x)
    z = (1 - t_b) * x + t_b * noise
    if teacher is None:
        velocity = noise - x
    else:
        velocity = teacher_velocity(teacher, z_to_x(z, t), t_to_sigma(t), labels)
    with full_precision(x.device), frozen_weight_norm(plain):
        if labels is not None and (label_dropout > 0 or cfg_omega is not None):
            dropped = label_dropout_mask(x.shape[0], label_dropout, ctx.generator, x.device)
            if cfg_omega is not None:
                with same_dropout(x.device):
                    velocity = guided_velocity(plain, z, t, velocity, labels, dropped, omega=cfg_omega,
                                               kappa=cfg_kappa, t_min=cfg_t_min, t_max=cfg_t_max)
            labels = labels * (~dropped)[:, None].to(labels.dtype)
        with same_dropout(x.device):
            target = meanflow_target(plain, z, t, r, velocity, labels)
        u = average_velocity(net, z, t, r, labels).float()
    error = squared_l2(u, target.float())
    loss = error / (error.detach() + norm_eps) ** norm_p
    return loss, {"velocity_error": error.detach().mean()}


OBJECTIVES = {"ect": consistency_training_loss, "ecd": consistency_training_loss, "meanflow": meanflow_loss}


# ---- post_train -------------------------------------------------------------------------------

def checkpoint_record(path):
    """What a mid.pt / post.pt (or its .safetensors export) records besides weights (phase, teacher,
    guidance, ...); {} for anything else."""
    path = Path(path)
    if not path.is_file():
        return {}
    if path.suffix == ".pt":
        checkpoint = read_torch_file(path, mmap=True)
        if not isinstance(checkpoint, dict):
            raise FileFormatError(f"{path}: expected a checkpoint dict with 'config' and 'net'/'ema'")
        return {key: value for key, value in checkpoint.items() if key not in ("net", "ema")}
    if path.suffix == ".safetensors":
        return dict(read_safetensors(path)[2])
    return {}


def recorded_teacher(path):
    """The teacher identity a mid.pt / post.pt (or its .safetensors export) records, if any."""
    return checkpoint_record(path).get("teacher")


def builtin_teacher_recipe(given):
    """The implicit recipe of a post-training run: the built-in teacher's (mnist, toy) when the
    teacher (given, or recorded in `init`) is built in."""
    teacher = given.get("teacher")
    if teacher is None:
        init = str(given.get("init"))
        if init in BUILTIN_TEACHERS:
            teacher = init
        else:
            try:
                recorded = recorded_teacher(init)
            except (OSError, RuntimeError, ValueError):
                return None   # post_train names the fault itself
            teacher = recorded_teacher_spec(recorded) if recorded else None
    return recipes.builtin_recipe(str(teacher)) if teacher is not None else None


def post_precision(mixed_precision, method):
    """Post-training's precision: float32 (TF32 matmuls allowed on CUDA) for 'auto'; a half
    precision asked for explicitly is refused, since the loss path would not use it."""
    if mixed_precision == "auto":
        return "no"
    if mixed_precision in ("bf16", "fp16"):
        gap = "f(x_t, t) - f(x_r, r) at CMT's fixed gap r = t (1 - n(t) / 4096)" if method != "meanflow" else \
            "the JVP target v - (t - r) du/dt"
        raise ArgumentError("mixed_precision", f"{method} post-training runs its loss path in float32: the residual "
                                               f"{gap} is far below {mixed_precision}'s rounding error; use 'no' "
                                               "or 'auto' (float32, TF32 matmuls on CUDA)")
    return mixed_precision


def teacher_guidance_of(guidance, guide_ckpt, init_record):
    """The frozen teacher's guidance `(weight, guide)` (ECD's, MeanFlow's velocity 'teacher'): as
    given, or with guidance='manifest' the one the mid checkpoint records from its dataset manifest
    (the official mid teacher is unguided, so only when asked)."""
    if guidance != "manifest":
        try:
            return (None if guidance is None else float(guidance)), guide_ckpt
        except ValueError:
            raise ArgumentError("guidance", f"a weight (EDM2 uses about 1.4 to 2.5) or 'manifest', got {guidance!r}") \
                from None
    record = init_record.get("guidance")
    if "guidance" not in init_record:
        raise ArgumentError("guidance", "'manifest' takes the guidance recorded in a mid checkpoint's dataset "
                                        "manifest; --init records none")
    if record is None:
        return None, guide_ckpt
    guide = (record.get("guide") or {}).get("path")
    return float(record["weight"]), guide_ckpt if guide_ckpt is not None else guide


def frozen_teacher(teacher, guidance, guide_ckpt, init_record, student, needed_by):
    """`(denoiser, guidance record)`: the teacher ECD solves with, or MeanFlow's velocity 'teacher'
    takes its velocity from, guided as asked (`teacher_guidance_of`), frozen, checked against the
    student."""
    if teacher is None:
        raise ArgumentError("teacher", f"{needed_by} needs a diffusion teacher: name one")
    weight, guide = teacher_guidance_of(guidance, guide_ckpt, init_record)
    try:
        net, identity = resolve_teacher(teacher, guidance=weight, guide_ckpt=guide)
    except ArgumentError:
        raise
    except (ValueError, OSError) as error:
        raise ArgumentError("teacher", str(error)) from None
    if tuple(net.data_shape) != tuple(student.data_shape) or net.label_dim != student.label_dim:
        raise ArgumentError("teacher", f"{teacher} does not take the student's data (shape "
                                       f"{tuple(student.data_shape)}, {student.label_dim} classes)")
    return net.eval().requires_grad_(False), identity.get("guidance")


def load_init(init, teacher, data, arch):
    """`(config, state_dict or None, identity, teacher)` of the network post-training starts from;
    `teacher` is the given teacher spec, else the one recorded in `init`, else `init` itself when it
    is a plain diffusion model.

    init: a checkpoint (mid.pt, ...) or built-in name; "teacher" (the teacher's weights); "random"
    (the teacher's architecture, or the diffusion phase's default network of `arch` for `data`).
    """
    if init == "random":
        if teacher is not None:
            net, identity = resolve_teacher_or_fail(teacher, "teacher")
            return net.config, None, {"kind": "random", "like": identity}, teacher
        return network_for(data, arch).config, None, {"kind": "random"}, None
    if init == "teacher":
        if teacher is None:
            raise ArgumentError("teacher", "init 'teacher' starts from the teacher: name one (a built-in name or "
                                           "a checkpoint)")
        init = teacher
    net, identity = resolve_teacher_or_fail(init, "init")
    if teacher is None:
        recorded = recorded_teacher(init) if Path(init).is_file() else None
        if recorded:
            teacher = recorded_teacher_spec(recorded)
        elif not (net.sigma_min or net.flow_map):
            teacher = init
    return net.config, net.state_dict(), identity, teacher


@recipes.with_recipe("post", default_recipe=builtin_teacher_recipe)
def post_train(*, init, method=None, data, out, teacher=None, arch=None, stage=None, stage_every=None, q=ECT_Q,
               k=ECT_K, b=ECT_B, p_mean=None, p_std=None, weighting="gap", loss="huber", huber_c=None,
               guidance=None, guide_ckpt=None, equal_share=MF_EQUAL_SHARE, norm_p=MF_NORM_P, norm_eps=MF_NORM_EPS,
               cfg_omega=None, cfg_kappa=0.0, cfg_t_min=0.0, cfg_t_max=1.0, label_dropout=0.0, velocity="data",
               dropout=None,
               resolution=None, eval_data=None, num_samples=1000, mid_sigma=TWO_STEP_SIGMA, recipe=None,
               resolved_options=None, **train_options):
    """Post-train a student with ECT, ECD or MeanFlow -> `out/post.pt` (1- and 2-step sampling).

    recipe: a named set of every setting (`cmt.trainers.recipes.RECIPES`: cifar10, ffhq64, afhq64,
    imagenet512, imagenet64-ect, imagenet256-meanflow, mnist, toy); arguments given explicitly
    override it. None: the built-in teacher's recipe (mnist, toy) when the teacher is built in.
    Precision: the loss path runs in float32 (TF32 matmuls on CUDA); mixed_precision 'auto' means
    that, and bf16 / fp16 are refused (see `full_precision`).

    init: mid.pt (or another checkpoint of ours, or a built-in teacher name), 'teacher' (the
    teacher's weights) or 'random'. method: ect, ecd or meanflow. data: mnist, toy:NAME, or an image
    folder / .npz / EDM .zip; resolution resizes images (None: the network's).
    teacher: diffusion teacher (name or checkpoint): ECD's solver, and what 'teacher' / 'random'
    inits copy (None: the teacher recorded in init). arch: with init 'random' and no teacher, the
    diffusion phase's default network of this kind (edm2 or mlp).
    ECT/ECD: stage, a fixed curriculum stage (CMT post-training: 11, i.e. q^12 = 4096 with q = 2),
    else the stage advances every stage_every steps (max_steps / 8 when None). With neither, an init
    that is a mid-trained checkpoint keeps CMT's fixed gap `recipes.CMT_POST_STAGE` (11, the official
    CIFAR-10 -q 4096, unless a recipe sets its own); any other init starts ECT's curriculum at 0. q, the gap decay per
    stage; k, b: n(t) = 1 + k sigmoid(-b t); weighting: gap = 1 / (t - r) (ECT on CIFAR-10), snr =
    1 / t^2 + 1 / sigma_data^2 (ECT on EDM2); loss: the distance; huber_c: the pseudo-Huber
    constant (None: 0.00054 sqrt(dim); 0: the L2 norm, ECT's CIFAR-10 setting).
    p_mean, p_std: the time distribution (None: ECT log-normal -1.1, 2.0; MeanFlow logit-normal -0.4, 1.0).
    ECD (and MeanFlow with velocity 'teacher'): guidance, guide_ckpt: guide the teacher
    (`cmt.guidance.apply_guidance`: autoguidance by guide_ckpt, else classifier-free);
    guidance='manifest' takes the guidance the mid checkpoint's dataset manifest records.
    MeanFlow: equal_share, the share of r = t; the adaptive weight 1 / (|delta|^2 + norm_eps)^norm_p;
    class-conditional data: cfg_omega (None: no guidance), cfg_kappa, cfg_t_min, cfg_t_max, MeanFlow's
    guided target velocity (`guided_velocity`), label_dropout, the share of rows trained without label;
    velocity: the target's velocity, 'data' (MeanFlow's e - x) or 'teacher' (the teacher's ODE
    velocity at z_t, one teacher forward per row: the teacher's flow map as the fixed point, and a
    target without the data's conditional variance; docs/claim.md, "the toy's 1-step drift").
    dropout: the student's (None: the init's). eval_data: data set whose built-in metric scores
    samples (None: data, if built in); num_samples: samples for the metric and pictures; mid_sigma:
    the intermediate sigma of 2-step sampling.
    train_options: the shared trainer options, `TrainConfig`'s fields (max_steps, batch_size, lr, ...,
    resume, tensorboard, progress), defaults `POST_DEFAULTS` over `loop.TRAIN_DEFAULTS`; lr=None
    takes `POST_LR` of the student's architecture.

    Returns `{"out", "checkpoint" (post.pt), "model" (post.safetensors), "log", "state": Path,
    "metrics": the last logged scalars}`.
    """
    init, teacher = str(init), None if teacher is None else str(teacher)   # names or paths, as recorded
    loop.check_choice("method", method, OBJECTIVES)
    if not 0 <= label_dropout < 1:
        raise ArgumentError("label_dropout", f"must be in [0, 1), got {label_dropout}")
    loop.check_choice("velocity", velocity, MF_VELOCITIES)
    teacher_velocity_target = method == "meanflow" and velocity == "teacher"
    if method != "ecd" and not teacher_velocity_target and (guidance is not None or guide_ckpt is not None):
        raise ArgumentError("guidance", "guides the teacher of ECD or of MeanFlow's velocity 'teacher'; MeanFlow "
                                        "guides its own target with cfg_omega")
    init_record = checkpoint_record(init) if init not in ("random", "teacher") else {}
    if method != "meanflow" and stage is None and stage_every is None and init_record.get("phase") == "mid":
        stage = recipes.CMT_POST_STAGE   # never restart ECT's curriculum on mid-trained weights
    loop.check_choice("weighting", weighting, WEIGHTINGS)
    loop.check_choice("loss", loss, DISTANCES)
    if arch is not None:
        loop.check_choice("arch", arch, ARCHITECTURES)
    data_spec = data
    data = training_data(data_spec, resolution)
    arch = arch or default_arch(data)
    init_config, init_state, identity, teacher = load_init(init, teacher, data, arch)
    if resolution is None and init_config.get("architecture") == "edm2" and data.kind == "images":
        data = training_data(data_spec, init_config["img_resolution"])
    train_options["mixed_precision"] = post_precision(train_options.get("mixed_precision", "auto"), method)
    config = loop.train_config(out, POST_DEFAULTS, train_options, default_lr=POST_LR[init_config["architecture"]])
    meanflow = method == "meanflow"
    network = student_config(init_config, flow_map=True if meanflow else None, sigma_min=None if meanflow else SIGMA_MIN,
                             dropout=dropout)
    if network.get("use_fp16"):
        network["use_fp16"] = False   # EDM2's fp16 U-Net (official pickles): the student trains in float32
    student = build_student(network, init_state, source=f"init {init}", seed=config.seed)
    check_data_fits(data, student)
    if meanflow:
        refuse_inapplicable(post_train, locals(), ("stage", "stage_every", "q", "k", "b", "weighting", "loss",
                                                   "huber_c"), "to method meanflow")
        if teacher_velocity_target:
            refuse_inapplicable(post_train, locals(), ("cfg_omega", "cfg_kappa", "cfg_t_min", "cfg_t_max",
                                                       "label_dropout"),
                                "to velocity 'teacher' (guide the teacher with guidance instead)")
    else:
        refuse_inapplicable(post_train, locals(), ("equal_share", "norm_p", "norm_eps", "cfg_omega", "cfg_kappa",
                                                   "cfg_t_min", "cfg_t_max", "label_dropout", "velocity"),
                            f"to method {method} (only to meanflow)")
        if method != "ecd":
            refuse_inapplicable(post_train, locals(), ("guidance", "guide_ckpt"), f"to method {method} (only to ecd)")
        if loss != "huber":
            refuse_inapplicable(post_train, locals(), ("huber_c",), f"to loss {loss} (only to huber)")
    teacher_net = guidance_record = None
    if meanflow:
        if (cfg_omega is not None or label_dropout) and not student.label_dim:
            raise ArgumentError("cfg_omega" if cfg_omega is not None else "label_dropout",
                                "MeanFlow's guidance and label dropout need class-conditional data and network")
        if teacher_velocity_target:
            teacher_net, guidance_record = frozen_teacher(teacher, guidance, guide_ckpt, init_record, student,
                                                          "MeanFlow's velocity 'teacher'")
        objective = functools.partial(meanflow_loss, p_mean=MF_P_MEAN if p_mean is None else p_mean,
                                      p_std=MF_P_STD if p_std is None else p_std, equal_share=equal_share,
                                      norm_p=norm_p, norm_eps=norm_eps, cfg_omega=cfg_omega, cfg_kappa=cfg_kappa,
                                      cfg_t_min=cfg_t_min, cfg_t_max=cfg_t_max, label_dropout=label_dropout,
                                      teacher=teacher_net)
    else:
        try:
            distance = make_distance(loss, student.data_shape, huber_c=huber_c)
        except (ValueError, FileNotFoundError, ModuleNotFoundError) as error:
            raise ArgumentError("loss", str(error)) from None
        if method == "ecd":
            teacher_net, guidance_record = frozen_teacher(teacher, guidance, guide_ckpt, init_record, student,
                                                          "method ecd")
        objective = functools.partial(
            consistency_training_loss, distance=distance, teacher=teacher_net, stage=stage,
            stage_every=stage_every or max(1, -(-config.max_steps // 8)), q=q, k=k, b=b,
            p_mean=ECT_P_MEAN if p_mean is None else p_mean, p_std=ECT_P_STD if p_std is None else p_std,
            weighting=weighting)
    if eval_data is None and (data.kind == "toy" or data.name == "mnist"):
        eval_data = data.name
    check_report_options(student, eval_data=eval_data, mid_sigma=mid_sigma)
    info = {"phase": "post", "method": method, "init": str(init), "init_identity": identity, "teacher": teacher,
            "data": data.name, "stage": None if meanflow else stage,
            "teacher_guidance": guidance_record, **(resolved_options or {"recipe": recipe}),
            **({"encoder": data.encoder} if data.encoder else {})}   # a latent set's VAE: decodes samples
    trainer = loop.Trainer(config)
    if trainer.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True   # float32 loss path, TF32 matmuls (ImageNet-512's setting)
        torch.backends.cudnn.allow_tf32 = True
    if teacher_net is not None:
        teacher_net.to(trainer.device)  # the frozen teacher (ECD's, MeanFlow's velocity); fit() moves the student

    def sample_fn(ema, step, out):
        return sampling_report(ema, out, step, eval_data=eval_data, num_samples=num_samples, mid_sigma=mid_sigma,
                               consistency=not meanflow, progress=config.progress)

    trainer.fit(student, objective, data_batches(data, trainer.micro_batch_size, trainer.seed_for(0)),
                sample_fn=sample_fn, save_final=lambda ema, net, out: save_student(out, "post", ema, net, info),
                run_info={**info, "student": student.config},
                run_options={"recipe": recipe, **(resolved_options or loop.phase_options(post_train, locals())),
                             # the curriculum a longer max_steps would change (stage_every None: max_steps / 8)
                             "resolved_stage_every": None if meanflow else objective.keywords["stage_every"]})
    return student_result(config.out, "post")
