"""MeanFlow (Geng et al. 2025, Gsunshine/meanflow) as a post-training method (`cmt.trainers.methods`).

In linear-interpolation time, z_t = (1 - t) x + t e and v = e - x; the average velocity u(z, t, r)
regresses onto v - (t - r) du/dt, du/dt the JVP of u along (v, 1, 0), stop-gradient, with the
adaptive weight 1 / (|delta|^2 + c)^p. t and r are times here (t = 1 is noise); the network stays
in EDM sigma space (docs/design.md, "Flow maps"). With velocity='teacher', v is the frozen teacher's
ODE velocity at z_t instead of e - x: the same identity, whose fixed point is then the teacher's
flow map (the one mid-training fits), without the conditional velocity's variance.
"""
import functools

import torch

from cmt.edm import SIGMA_MAX, broadcast_sigma, t_to_sigma, z_to_x
from cmt.errors import ArgumentError, InapplicableOption
from cmt.options import Option
from cmt.sampling import sampled_t_max
from cmt.trainers.distances import squared_l2
from cmt.trainers.methods import MethodSetup, PostMethod
from cmt.trainers.students import (average_velocity, frozen_weight_norm, full_precision, network_labels,
                                   plain_network, same_dropout, teacher_velocity)

# MeanFlow's defaults (Gsunshine/meanflow configs/default.py).
MF_P_MEAN, MF_P_STD = -0.4, 1.0
MF_EQUAL_SHARE = 0.75          # share of samples with r = t (plain flow matching)
MF_NORM_P, MF_NORM_EPS = 1.0, 0.01
# MeanFlow's target velocity: the data's conditional e - x (the paper's), or the teacher's ODE velocity.
MF_VELOCITIES = ("data", "teacher")
# Sigma-space samplers start at sigma_max; t beyond it is never used. A student sampled in MeanFlow's
# own time from t = 1 (`cmt.sampling.student_sampler(time="t")`, SiT) trains on every t up to 1, as
# MeanFlow does (Gsunshine/meanflow meanflow.py `sample_tr`: no clamp); the sampler record decides.
MF_T_MAX = SIGMA_MAX / (1 + SIGMA_MAX)


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
                  cfg_t_max=1.0, label_dropout=0.0, teacher=None, t_max=MF_T_MAX):
    """MeanFlow per-sample loss `|u - target|^2 / (|u - target|^2 + eps)^p` (weight without gradient).

    The JVP runs on the unwrapped network without gradient (the target is stop-gradient anyway);
    the gradient path is one plain forward of `net` with the same dropout mask, so DDP sees it.
    Everything runs in float32 whatever autocast is around it (`full_precision`).
    Class-conditional data: `label_dropout` of the rows train unconditionally (null label, target
    from v), and `cfg_omega` (None: off) guides the target's velocity (`guided_velocity`).
    `teacher` (a frozen denoiser; None: the data's e - x): v is its ODE velocity at z_t.
    `t_max`: the largest training time (`MF_T_MAX`, sigma_max's; 1 for students sampled from t = 1).
    u is `cmt.trainers.students.average_velocity`: the network's own where it has one (SiT).
    """
    plain = plain_network(net, ctx)
    if not plain.flow_map:
        raise ValueError("MeanFlow needs a flow-map network (flow_map=True, with a target_sigma input)")
    x = batch["data"].float()
    labels = network_labels(plain, batch.get("label"))
    t, r = sample_t_r(x.shape[0], ctx.generator, x.device, p_mean, p_std, equal_share, t_max)
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


OPTIONS = {
    "p_mean": Option(MF_P_MEAN, "Training times: logit(t) ~ N(p_mean, p_std^2), two draws sorted into t >= r."),
    "p_std": Option(MF_P_STD, "See p_mean.", low=0, low_open=True),
    "equal_share": Option(MF_EQUAL_SHARE, "The share of r = t (plain flow matching).", low=0, high=1),
    "norm_p": Option(MF_NORM_P, "Adaptive weight power: 1 / (|delta|^2 + norm_eps)^norm_p.", low=0),
    "norm_eps": Option(MF_NORM_EPS, "Adaptive weight 1 / (|delta|^2 + norm_eps)^norm_p.", low=0, low_open=True),
    "cfg_omega": Option(None, "Class-conditional data: guidance in training, v_g = omega v + (1 - omega - kappa) "
                              "u_uncond + kappa u_cond [default: off]."),
    "cfg_kappa": Option(0.0, "The kappa of cfg_omega."),
    "cfg_t_min": Option(0.0, "Guide only for t in [cfg_t_min, cfg_t_max].", low=0, high=1),
    "cfg_t_max": Option(1.0, "See cfg_t_min.", low=0, high=1),
    "label_dropout": Option(0.0, "The share of rows trained without label (MeanFlow's official 0.1).", low=0, high=1,
                            high_open=True),
    "velocity": Option("data", "The target's velocity: data = e - x (MeanFlow's), teacher = the teacher's ODE velocity "
                               "at z_t (one teacher forward per row; its flow map is then the fixed point; guide it "
                               "with guidance).", str, choices=MF_VELOCITIES),
}
GUIDANCE_OPTIONS = ("cfg_omega", "cfg_kappa", "cfg_t_min", "cfg_t_max", "label_dropout")


def needs_teacher(options):
    return "MeanFlow's velocity 'teacher'" if options["velocity"] == "teacher" else None


def check(options, student):
    if options["velocity"] == "teacher":
        for name in GUIDANCE_OPTIONS:
            if options[name] != OPTIONS[name].default:
                raise InapplicableOption(name, f"does not apply to velocity 'teacher' (guide the teacher with "
                                               f"guidance instead) (got {options[name]!r}); leave it out", "velocity")
    if (options["cfg_omega"] is not None or options["label_dropout"]) and not student.label_dim:
        raise ArgumentError("cfg_omega" if options["cfg_omega"] is not None else "label_dropout",
                            "MeanFlow's guidance and label dropout need class-conditional data and network")


def build(setup: MethodSetup):
    options = dict(setup.options)
    options.pop("velocity")
    t_max = MF_T_MAX if setup.sampler is None else sampled_t_max(setup.sampler)   # the times it is sampled from
    return functools.partial(meanflow_loss, teacher=setup.teacher, t_max=t_max, **options)


MEANFLOW = PostMethod(
    name="meanflow", summary="MeanFlow: the average velocity u(z, t, r) onto v - (t - r) du/dt (a JVP).",
    options=OPTIONS, student=lambda config: {**config, "flow_map": True}, sampler="flowmap", build=build,
    residual="the JVP target v - (t - r) du/dt", teacher=needs_teacher, check=check, follows_guidance=True,
    record=lambda options: {"stage": None})
