"""What mid-training and post-training share: the student built from its teacher (or its init), its
consistency output and average velocity, its 1- and 2-step sampling report, and how it is saved."""
from pathlib import Path

import torch

from cmt.checkpoint import init_student_from_teacher, save_network
from cmt.datasets import one_hot_labels, resolve_data
from cmt.edm import SIGMA_MAX, SIGMA_MIN, TWO_STEP_SIGMA, broadcast_sigma, t_to_sigma, z_to_x
from cmt.errors import ArgumentError
from cmt.metrics import embedded_metric
from cmt.networks import build_network, network_config
from cmt.sampling import generate, pick_labels, save_samples
from cmt.teachers import resolve_teacher
from cmt.trainers.loop import LOG_FILE, STATE_FILE, final_metrics, save_atomic

STUDENT_INITS = ("teacher", "random")


# ---- the student's network --------------------------------------------------------------------

def plain_network(net, ctx):
    """The network without its DDP wrapper (for its attributes; call `net` for the gradient path)."""
    accelerator = getattr(ctx, "accelerator", None)
    return accelerator.unwrap_model(net) if accelerator is not None else net


def network_labels(plain, labels):
    """Integer class ids `[B]` (-1 = none) -> what the network takes (one-hot or None)."""
    return one_hot_labels(labels, plain.label_dim) if labels is not None else None


def average_velocity(net, z, t, r, labels=None):
    """`u(z, t, r) = (z - D(z / (1 - t), t / (1 - t), target_sigma = r / (1 - r))) / t`.

    The average velocity from time t to r < t of a flow-map network that lives in EDM sigma space:
    `z_r = z - (t - r) u` is the same jump as `flow_map_jump` in sigma space.
    """
    denoised = net(z_to_x(z, t), t_to_sigma(t), labels, target_sigma=t_to_sigma(r))
    return (z - denoised) / broadcast_sigma(t, z)


def consistency_output(net, plain, x, sigma, labels):
    """The consistency function f(x, sigma): the jump to sigma = 0 (`target_sigma = 0` for flow maps).

    Sigmas are floored at the student's sigma_min (or SIGMA_MIN), where the boundary form is the
    identity, so stored states at sigma = 0 cost nothing and produce no NaN.
    """
    sigma = sigma.clamp(min=max(getattr(plain, "sigma_min", 0.0), SIGMA_MIN))
    target_sigma = torch.zeros_like(sigma) if plain.flow_map else None
    return net(x, sigma, labels, target_sigma=target_sigma)


def student_config(config, *, flow_map=None, sigma_min=None, dropout=None):
    """A student's network config: its teacher's (or init's), with the student's own settings."""
    config = dict(config)
    for key, value in (("flow_map", flow_map), ("sigma_min", sigma_min), ("dropout", dropout)):
        if value is not None:
            config[key] = value
    return config


def build_student(config, init_state=None, source="teacher", seed=0):
    """Build a student (its random initial values drawn from `seed`, so a run can be repeated); a
    flow-map student loaded from a non-flow-map state keeps its zero-initialised `target_sigma`
    embedding, so it starts as that network."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_network(config)
    if init_state is not None:
        init_student_from_teacher(net, init_state, source=source)
    return net


# ---- its teacher ------------------------------------------------------------------------------

def recorded_teacher_spec(identity):
    """How to name a teacher recorded in a dataset manifest or a checkpoint to `resolve_teacher`."""
    if isinstance(identity, str):
        return identity
    if identity.get("kind") == "builtin" and identity.get("name"):
        return identity["name"]
    return identity.get("path") or identity.get("preset")


def resolve_teacher_or_fail(spec, argument, hint=""):
    """`resolve_teacher(spec)`, a missing or unreadable file an ArgumentError of `argument`."""
    try:
        return resolve_teacher(spec)
    except (ValueError, OSError) as error:
        message = error.message if isinstance(error, ArgumentError) else str(error)
        raise ArgumentError(argument, f"{message}{hint}") from None


# ---- reports and results ----------------------------------------------------------------------

def sampling_report(net, out, step, *, eval_data=None, num_samples=1000, mid_sigma=TWO_STEP_SIGMA,
                    sigma_max=SIGMA_MAX):
    """1- and 2-step samples of a student: a picture each in `out/samples/`, and the built-in
    metric of `eval_data` (toy:NAME, mnist) as scalars `{metric}_{steps}step`."""
    seeds = list(range(10**6, 10**6 + num_samples))
    labels = pick_labels("random", num_samples, net.label_dim, seed=step)
    data = resolve_data(eval_data) if eval_data is not None else None
    reference = data.reference() if data is not None and len(net.data_shape) == 1 else None
    scalars = {}
    for steps in (1, 2):
        samples = generate(net, seeds, labels, sampler="flowmap", steps=steps, mid_sigma=mid_sigma,
                           sigma_max=sigma_max)
        if len(net.data_shape) == 1 or net.data_shape[0] in (1, 3):  # points or pixels, not latents
            shown = samples if len(net.data_shape) == 1 else samples[:100]
            save_samples(shown, Path(out) / "samples" / f"step-{step:07d}-{steps}step.png", reference=reference)
        if data is not None:
            scalars.update({f"{name}_{steps}step": float(value) for name, value in embedded_metric(data, samples).items()})
    return scalars


def save_student(out, name, ema, net, info):
    """`out/{name}.pt` (`torch.load(weights_only=True)`: config, net, ema, and `info`) and
    `out/{name}.safetensors` (the EMA weights, for `cmt-sample` and `load_network`)."""
    out = Path(out)
    checkpoint = {"config": network_config(ema), "net": net.state_dict(), "ema": ema.state_dict(), **info}
    save_atomic(checkpoint, out / f"{name}.pt")
    save_network(out / f"{name}.safetensors", ema, extra_config=info)


def student_result(out, name):
    """What a student phase returns: the files it wrote and its final logged scalars."""
    out = Path(out)
    return {"out": out, "checkpoint": out / f"{name}.pt", "model": out / f"{name}.safetensors",
            "log": out / LOG_FILE, "state": out / STATE_FILE, "metrics": final_metrics(out)}
