"""ECT and ECD: consistency training with a shrinking (or, after CMT, fixed) gap, as post-training
methods (`cmt.trainers.methods`).

- ECT (Geng et al., "Consistency models made easy", locuslab/ect): the noise level sigma ~
  log-normal, the target noise level target_sigma = sigma (1 - n(sigma) / q^(stage + 1)) with
  n(sigma) = 1 + k sigmoid(-b sigma); the target is the model's own output at
  x_target = x + target_sigma e under no_grad, with the same noise and the same dropout mask; at
  target_sigma = 0 it is the data. Pseudo-Huber distance, weighted by 1 / (sigma - target_sigma)
  or 1 / sigma^2 + 1 / sigma_data^2.
- ECD: as ECT, but x_target is one Heun step of the frozen teacher from x_sigma (sony/cmt's ECDLoss).
Both are EDM sigmas throughout (the code of the official losses calls them t and r).
"""
import dataclasses
import functools

import torch

from cmt.edm import broadcast_sigma, sample_lognormal_sigmas
from cmt.errors import ArgumentError, InapplicableOption
from cmt.options import Option
from cmt.solvers import heun_step
from cmt.trainers import recipes
from cmt.trainers.distances import DISTANCES, make_distance
from cmt.trainers.methods import MethodSetup, PostMethod
from cmt.trainers.students import (consistency_output, consistency_student, frozen_weight_norm, full_precision,
                                   network_labels, plain_network, same_dropout)

# ECT's defaults (CIFAR-10 ECM, locuslab/ect ct_train.py).
ECT_P_MEAN, ECT_P_STD = -1.1, 2.0
ECT_Q, ECT_K, ECT_B = 2.0, 8.0, 1.0
WEIGHTINGS = ("gap", "snr")


def ect_stage(step, stage_every=None, stage=None):
    """The curriculum stage: fixed (`stage`), or advancing every `stage_every` steps."""
    if stage is not None:
        return int(stage)
    return step // stage_every


def ect_target_sigma(sigma, stage, q=ECT_Q, k=ECT_K, b=ECT_B):
    """ECT's target noise level sigma (1 - n(sigma) / q^(stage + 1)), n = 1 + k sigmoid(-b sigma),
    clamped at 0 (ECT's r(t))."""
    n = 1 + k * torch.sigmoid(-b * sigma)
    return (sigma * (1 - n / q ** (stage + 1))).clamp(min=0)


def ect_weight(sigma, target_sigma, weighting, sigma_data):
    if weighting == "gap":
        return 1 / (sigma - target_sigma)
    if weighting == "snr":
        return 1 / sigma ** 2 + 1 / sigma_data ** 2
    raise ValueError(f"unknown weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")


def ecd_state(teacher, x, sigma, target_sigma, labels=None):
    """ECD's x_target: one Heun step sigma -> target_sigma of the frozen (maybe guided) teacher's
    ODE, Euler where target_sigma = 0 (sony/cmt imagenet512/training/loss.py:ECDGuidLoss.heun_solver)."""
    with torch.no_grad():
        return heun_step(teacher, x, sigma, target_sigma, labels).float()


def consistency_training_loss(net, batch, ctx, *, distance, teacher=None, stage=None, stage_every=None,
                              q=ECT_Q, k=ECT_K, b=ECT_B, p_mean=ECT_P_MEAN, p_std=ECT_P_STD, weighting="gap"):
    """ECT (teacher None) or ECD (a frozen teacher makes x_target): per-sample weighted distance, in
    float32 whatever autocast is around it (`full_precision`)."""
    plain = plain_network(net, ctx)
    x = batch["data"].float()
    labels = network_labels(plain, batch.get("label"))
    current = ect_stage(ctx.step, stage_every, stage)
    sigma = sample_lognormal_sigmas(x.shape[0], p_mean, p_std, generator=ctx.generator, device=x.device)
    target_sigma = ect_target_sigma(sigma, current, q, k, b)
    noise = torch.randn(x.shape, generator=ctx.generator, device=x.device, dtype=x.dtype)
    x_sigma = x + broadcast_sigma(sigma, x) * noise
    with full_precision(x.device):
        if teacher is None:
            x_target = x + broadcast_sigma(target_sigma, x) * noise
        else:
            x_target = ecd_state(teacher, x_sigma, sigma, target_sigma, labels)
        with frozen_weight_norm(plain):
            with same_dropout(x.device):
                prediction = consistency_output(net, plain, x_sigma, sigma, labels).float()
            with torch.no_grad():
                target = consistency_output(net, plain, x_target, target_sigma, labels).float().nan_to_num()
        target = torch.where(broadcast_sigma(target_sigma, x) > 0, target, x)
        loss = distance(prediction, target) * ect_weight(sigma, target_sigma, weighting, plain.sigma_data)
    return loss, {"stage": torch.tensor(float(current)), "mean_gap": (sigma - target_sigma).mean()}


OPTIONS = {
    "stage": Option(None, "A fixed curriculum stage (CMT post-training: 11, i.e. q^12 = 4096 with q = 2) [default: "
                          "11 (or the recipe's) when --init is a mid checkpoint, else the curriculum].", int, low=0),
    "stage_every": Option(None, "Advance the stage every this many steps [default: max-steps / 8].", int, low=1),
    "q": Option(ECT_Q, "The gap's decay per stage.", low=1, low_open=True),
    "k": Option(ECT_K, "n(sigma) = 1 + k sigmoid(-b sigma)."),
    "b": Option(ECT_B, "n(sigma) = 1 + k sigmoid(-b sigma)."),
    "p_mean": Option(ECT_P_MEAN, "Training noise levels: log(sigma) ~ N(p_mean, p_std^2)."),
    "p_std": Option(ECT_P_STD, "See p_mean.", low=0, low_open=True),
    "weighting": Option("gap", "gap = 1 / (sigma - target_sigma) (ECT on CIFAR-10), snr = 1 / sigma^2 + "
                               "1 / sigma_data^2 (ECT on EDM2).", str, choices=WEIGHTINGS),
    "loss": Option("huber", "The distance.", str, choices=DISTANCES),
    "huber_c": Option(None, "Pseudo-Huber constant [default: 0.00054 sqrt(dim); 0 = the L2 norm, ECT's CIFAR-10 "
                            "setting].", low=0),
}


def keep_the_fixed_gap(options, init_record, max_steps):
    """Never restart ECT's curriculum on mid-trained weights: a mid checkpoint keeps CMT's fixed gap
    (`recipes.CMT_POST_STAGE`) unless a stage or a curriculum is asked for; the curriculum's default
    pace is max_steps / 8 (under a fixed stage there is no pace, so a longer max_steps extends the run
    on resume, as in mid-training)."""
    options = dict(options)
    if options["stage"] is None and options["stage_every"] is None and init_record.get("phase") == "mid":
        options["stage"] = recipes.CMT_POST_STAGE
    if options["stage_every"] is None and options["stage"] is None:
        options["stage_every"] = max(1, -(-max_steps // 8))
    return options


def check_distance(options, student):
    if options["loss"] != "huber" and options["huber_c"] is not None:
        raise InapplicableOption("huber_c", f"does not apply to loss {options['loss']} (only to huber) (got "
                                            f"{options['huber_c']!r}); leave it out", "loss")


def build(setup: MethodSetup):
    options = dict(setup.options)
    try:
        distance = make_distance(options.pop("loss"), setup.student.data_shape, huber_c=options.pop("huber_c"))
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as error:
        raise ArgumentError("loss", str(error)) from None
    return functools.partial(consistency_training_loss, distance=distance, teacher=setup.teacher, **options)


def finest_stage(options, max_steps):
    """The last curriculum stage the run reaches (the fixed stage, else the one at max_steps)."""
    return options["stage"] if options["stage"] is not None else (max_steps - 1) // options["stage_every"]


def gap_probe(setup: MethodSetup, batch, generator):
    """The inputs and the residual f(x_t, t) - f(x_r, r) of the loss at the run's finest gap (as the
    objective draws them; the data's x_r, ECT's), for the TF32 guard."""
    options, student = setup.options, setup.student
    x = batch["data"].float()
    labels = network_labels(student, batch.get("label"))
    stage = finest_stage(options, setup.max_steps)
    sigma = sample_lognormal_sigmas(x.shape[0], options["p_mean"], options["p_std"], generator=generator,
                                    device=x.device)
    target_sigma = ect_target_sigma(sigma, stage, options["q"], options["k"], options["b"])
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_sigma = x + broadcast_sigma(sigma, x) * noise
    with torch.no_grad():
        residual = (consistency_output(student, student, x_sigma, sigma, labels)
                    - consistency_output(student, student, x + broadcast_sigma(target_sigma, x) * noise, target_sigma,
                                         labels)).float()
    keep = target_sigma > 0   # a gap to the data itself has no small residual
    return x_sigma[keep], sigma[keep], None if labels is None else labels[keep], residual[keep], \
        f"f(x_t, t) - f(x_r, r) at stage {stage}"


RESIDUAL = "f(x_t, t) - f(x_r, r) at CMT's fixed gap r = t (1 - n(t) / 4096)"
# The student: its family's consistency form (`students.consistency_student`: the boundary at SIGMA_MIN,
# EDM networks as sony/cmt's ECMPrecond); a flow-map init stays a flow map, sampled by jumps to 0 and re-noising.
ECT = PostMethod(name="ect", summary="Easy consistency training: the gap's target is the student's own output.",
                 options=OPTIONS, student=consistency_student, sampler="consistency", build=build, residual=RESIDUAL,
                 prepare=keep_the_fixed_gap, check=check_distance, record=lambda options: {"stage": options["stage"]},
                 probe=gap_probe)
ECD = dataclasses.replace(ECT, name="ecd", teacher=lambda options: "method ecd",
                          summary="Consistency distillation: the gap's target is one Heun step of the frozen teacher.")
