"""The per-step schedules of the training loop: the learning rate (constant, linear decay, EDM2's
inverse square root, warm-up) and the fixed-decay EMA (a per-step beta, or EDM's half-life in images
with its ramp-up) and its update."""
import math

import torch

from cmt.trainers.config import LR_SCHEDULES, TrainConfig, check_choice


def learning_rate(config: TrainConfig, step: int) -> float:
    lr = config.lr
    if config.lr_schedule == "linear":
        lr *= max(1.0 - step / max(config.max_steps, 1), 0.0)
    elif config.lr_schedule == "invsqrt":
        lr /= math.sqrt(max(step / max(config.lr_ref_steps, 1), 1.0))
    elif config.lr_schedule != "constant":
        check_choice("lr_schedule", config.lr_schedule, LR_SCHEDULES)
    if config.warmup_steps > 0:
        lr *= min((step + 1) / config.warmup_steps, 1.0)
    return lr


def ema_beta(config: TrainConfig, step: int) -> float:
    """EMA decay per optimizer step: fixed, or from a half-life in images (EDM's ramp-up)."""
    if config.ema_beta is not None:
        return config.ema_beta
    if config.ema_halflife_images is None:
        return 0.0
    halflife = config.ema_halflife_images
    if config.ema_rampup_ratio is not None:
        halflife = min(halflife, (step + 1) * config.batch_size * config.ema_rampup_ratio)
    return 0.5 ** (config.batch_size / max(halflife, 1e-8))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    ema_params, net_params = list(ema.parameters()), [p.detach() for p in net.parameters()]
    if all(a.dtype == b.dtype and a.device == b.device for a, b in zip(ema_params, net_params)):
        # One foreach call instead of a Python loop of kernels: the same lerp per tensor.
        torch._foreach_lerp_(ema_params, net_params, 1.0 - beta)
    else:
        for p_ema, p_net in zip(ema_params, net_params):
            p_ema.lerp_(p_net.to(p_ema.dtype), 1.0 - beta)
    ema_buffers, net_buffers = list(ema.buffers()), list(net.buffers())
    if ema_buffers:
        torch._foreach_copy_(ema_buffers, net_buffers)
