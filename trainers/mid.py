"""CMT mid-training (phase 2b): regress a student from teacher-trajectory states onto fixed targets.

The targets were computed once by `cmt-build` (the teacher's ODE solve, stored in shards), so a
training step is one student forward and backward, with no teacher in the loop.

- `--target endpoint` (CMT-CM): `d(f(x_i, sigma_i), x_end)` with the consistency parametrisation
  (`sigma_min = 0.002`, so f(x, sigma_min) = x).
- `--target flowmap` (CMT-MF): for two states i, j of one trajectory (sigma_i > sigma_j), the
  student's average velocity from t_i to t_j regresses onto the secant `(z_i - z_j) / (t_i - t_j)`,
  in linear-interpolation time `t = sigma / (1 + sigma)`, `z = x / (1 + sigma)` (docs/design.md,
  "Flow maps"); summed squared error, as the official code.
"""
import functools
from pathlib import Path

import click
import torch

from cmt.manifest import TrajectoryDataset
from cmt.checkpoint import init_student_from_teacher, save_network
from cmt.datasets import one_hot_labels, resolve_data
from cmt.datasets.shards import ShardReader
from cmt.edm import SIGMA_MAX, SIGMA_MIN, broadcast_sigma, sigma_to_t, t_to_sigma, x_to_z, z_to_x
from cmt.metrics import embedded_metric
from cmt.networks import build_network, network_config
from cmt.sampling import generate, pick_labels, save_samples
from cmt.teachers import resolve_teacher
from cmt.trainers import loop
from cmt.trainers.distances import DISTANCES, make_distance, squared_l2
from cmt.trainers.loop import save_atomic


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


def secant_velocity(x_i, sigma_i, x_j, sigma_j):
    """`(z_i - z_j) / (t_i - t_j)`: the average velocity between two states of one trajectory."""
    z_i, z_j = x_to_z(x_i, sigma_i), x_to_z(x_j, sigma_j)
    gap = sigma_to_t(sigma_i) - sigma_to_t(sigma_j)
    return (z_i - z_j) / broadcast_sigma(gap, z_i)


def consistency_output(net, plain, x, sigma, labels):
    """The consistency function f(x, sigma): the jump to sigma = 0 (`target_sigma = 0` for flow maps).

    Sigmas are floored at the student's sigma_min (or 0.002), where the boundary form is the
    identity, so stored states at sigma = 0 cost nothing and produce no NaN.
    """
    sigma = sigma.clamp(min=max(getattr(plain, "sigma_min", 0.0), SIGMA_MIN))
    target_sigma = torch.zeros_like(sigma) if plain.flow_map else None
    return net(x, sigma, labels, target_sigma=target_sigma)


def endpoint_loss(net, batch, ctx, *, distance):
    """CMT-CM: `d(f(x_i, sigma_i), x_end)` per sample."""
    plain = plain_network(net, ctx)
    labels = network_labels(plain, batch.get("label"))
    prediction = consistency_output(net, plain, batch["state"], batch["sigma"], labels)
    return distance(prediction, batch["endpoint"].to(prediction.dtype))


def flowmap_loss(net, batch, ctx, *, distance=squared_l2, clean_sigma=SIGMA_MIN):
    """CMT-MF: `d(u(z_i, t_i, t_j), (z_i - z_j) / (t_i - t_j))` per sample (a batch of state pairs).

    Later states at `sigma <= clean_sigma` (the solver's endpoint at sigma_min) count as clean data,
    t = 0, as the endpoint target does: the student learns the jump that 1-step sampling asks for.
    """
    plain = plain_network(net, ctx)
    labels = network_labels(plain, batch.get("label"))
    x_i, sigma_i = batch["state"], batch["sigma"]
    x_j, sigma_j = batch["target_state"], batch["target_sigma"]
    if not bool((sigma_i > sigma_j).all()):
        raise ValueError("flow-map mid-training pairs need sigma > target_sigma (the first state noisier)")
    sigma_j = torch.where(sigma_j <= clean_sigma, torch.zeros_like(sigma_j), sigma_j)
    target = secant_velocity(x_i, sigma_i, x_j, sigma_j)
    velocity = average_velocity(net, x_to_z(x_i, sigma_i), sigma_to_t(sigma_i), sigma_to_t(sigma_j), labels)
    return distance(velocity, target.to(velocity.dtype))


OBJECTIVES = {"endpoint": endpoint_loss, "flowmap": flowmap_loss}
# Fine-tuning rates: the official CMT mid-training runs at twice its post-training rate.
MID_LR = {"edm2": 2e-3, "mlp": 2e-4}


# ---- students, sampling, reports (shared with post-training) ----------------------------------

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


def sampling_report(net, out, step, *, eval_data=None, num_samples=1000, mid_sigma=0.821, sigma_max=SIGMA_MAX):
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


# ---- cmt-train mid ----------------------------------------------------------------------------

def manifest_teacher_spec(identity):
    """How to name the teacher recorded in a dataset manifest (or a checkpoint) to `resolve_teacher`."""
    if isinstance(identity, str):
        return identity
    if identity.get("kind") == "builtin" and identity.get("name"):
        return identity["name"]
    return identity.get("path") or identity.get("preset")


def load_mid_teacher(manifest, teacher, need_weights):
    """`(config, state_dict or None, identity)` of the teacher that shapes (and starts) the student."""
    recorded = manifest.get("teacher") or {}
    spec = teacher or manifest_teacher_spec(recorded)
    if spec is None:
        if need_weights or "config" not in recorded:
            raise click.UsageError("the dataset manifest names no teacher file; pass --teacher")
        return recorded["config"], None, recorded
    if not need_weights and teacher is None and "config" in recorded:
        return recorded["config"], None, recorded
    try:
        net, identity = resolve_teacher(spec)
    except (ValueError, FileNotFoundError, OSError) as error:
        hint = "" if teacher else " (the teacher recorded in the dataset manifest; pass --teacher to use another copy)"
        raise click.BadParameter(f"{error}{hint}", param_hint="--teacher") from None
    if teacher is None and recorded.get("sha256") and identity.get("sha256") != recorded["sha256"]:
        raise click.BadParameter(f"{spec} is not the teacher the dataset was built with (sha256 differs); "
                                 "pass --teacher explicitly to use it anyway", param_hint="--teacher")
    return net.config, net.state_dict(), identity


def check_agreement(manifest, net, data):
    """The trajectories must fit the student: one clear error before training if they do not."""
    shape, label_dim = tuple(manifest.get("data_shape", ())), int(manifest.get("label_dim", 0))
    if shape != tuple(net.data_shape) or label_dim != net.label_dim:
        raise click.BadParameter(
            f"{data} holds states of shape {shape} with {label_dim} classes, but the student "
            f"({net.config['architecture']}) takes shape {tuple(net.data_shape)} with {net.label_dim} classes; "
            "build the dataset with this teacher or pass the matching --teacher", param_hint="--data")


def parse_states_per_trajectory(ctx, param, value):
    if value == "all":
        return value
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise click.BadParameter(f"'all' or a positive integer, got {value!r}")
    return count


@click.command("mid", context_settings={"show_default": True})
@click.option("--data", required=True, help="A cmt-build trajectory dataset (folder or fsspec URL).")
@click.option("--target", type=click.Choice(list(OBJECTIVES)), default="endpoint",
              help="endpoint: CMT-CM, jump to the trajectory's endpoint; flowmap: CMT-MF, average velocity "
                   "to a later state of the trajectory.")
@click.option("--loss", "loss_name", type=click.Choice(DISTANCES), default="l2",
              help="Distance (endpoint target). The official CMT runs use lpips on pixel data; flowmap "
                   "takes l2 (the official code) or huber.")
@click.option("--huber-c", type=click.FloatRange(min=0), default=None,
              help="Pseudo-Huber constant [default: 0.00054 sqrt(dim)].")
@click.option("--lpips-resize", type=click.IntRange(min=16), default=None,
              help="Upsample images to this side before LPIPS [default: their own size].")
@click.option("--teacher", default=None,
              help="Teacher name or checkpoint giving the student's architecture and initial weights "
                   "[default: the one recorded in the dataset manifest].")
@click.option("--student-init", type=click.Choice(["teacher", "random"]), default="teacher")
@click.option("--states-per-trajectory", default="all", callback=parse_states_per_trajectory,
              help="States (flowmap: state pairs) drawn per trajectory and epoch: all, or K.")
@click.option("--dropout", type=click.FloatRange(0, 1), default=None, help="Student dropout [default: the teacher's].")
@click.option("--workers", type=click.IntRange(min=0), default=2, help="Shard reader processes per rank.")
@click.option("--eval-data", default=None,
              help="Data set whose built-in metric scores 1- and 2-step samples (toy:NAME, mnist) "
                   "[default: the teacher's built-in name, if any].")
@click.option("--num-samples", type=click.IntRange(min=1), default=1000, help="Samples for the metric and pictures.")
@click.option("--mid-sigma", type=click.FloatRange(min=0, min_open=True), default=0.821,
              help="Intermediate sigma of 2-step sampling.")
@loop.trainer_options(lr=None, max_steps=2000, batch_size=128, ema_halflife_images=500_000.0)
def command(data, target, loss_name, huber_c, lpips_resize, teacher, student_init, states_per_trajectory, dropout,
            workers, eval_data, num_samples, mid_sigma, **kwargs):
    """CMT mid-training: regress a student onto the stored teacher trajectories -> OUT/mid.pt.

    --lr defaults to a fifth of `cmt-train diffusion`'s: 2e-3 (edm2), 2e-4 (mlp).
    """
    try:
        dataset = TrajectoryDataset(data)
    except (ValueError, FileNotFoundError, OSError) as error:
        raise click.BadParameter(str(error), param_hint="--data") from None
    manifest = dataset.manifest
    teacher_config, teacher_state, identity = load_mid_teacher(manifest, teacher, student_init == "teacher")
    flow_map = target == "flowmap"
    student = build_student(
        student_config(teacher_config, flow_map=flow_map, sigma_min=0.0 if flow_map else SIGMA_MIN, dropout=dropout),
        teacher_state, source=f"teacher {identity.get('path', identity.get('name'))}", seed=kwargs["seed"])
    check_agreement(manifest, student, data)
    if flow_map and loss_name == "lpips":
        raise click.BadParameter("flowmap regresses velocities: use l2 or huber", param_hint="--loss")
    try:
        distance = make_distance(loss_name, student.data_shape, huber_c=huber_c, lpips_resize=lpips_resize)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as error:
        raise click.BadParameter(str(error), param_hint="--loss") from None
    if eval_data is None and identity.get("kind") == "builtin":
        eval_data = identity.get("name")
    if kwargs["lr"] is None:
        kwargs["lr"] = MID_LR[student.config["architecture"]]
    config = loop.config_from_options(kwargs)
    trainer = loop.Trainer(config)
    batches = ShardReader(dataset, trainer.micro_batch_size, seed=trainer.seed_for(0), pairs=flow_map,
                          states_per_trajectory=states_per_trajectory, rank=trainer.rank,
                          world_size=trainer.num_processes, num_workers=workers)
    info = {"phase": "mid", "target": target, "loss": loss_name, "data": str(data), "teacher": identity}

    def sample_fn(ema, step, out):
        return sampling_report(ema, out, step, eval_data=eval_data, num_samples=num_samples, mid_sigma=mid_sigma,
                               sigma_max=float(manifest.get("sigma_max", SIGMA_MAX)))

    settings = {"clean_sigma": float(manifest.get("sigma_min", SIGMA_MIN))} if flow_map else {}
    trainer.fit(student, functools.partial(OBJECTIVES[target], distance=distance, **settings), batches,
                sample_fn=sample_fn,
                save_final=lambda ema, net, out: save_student(out, "mid", ema, net, info),
                run_info={**info, "student": student.config, "student_init": student_init,
                          "states_per_trajectory": states_per_trajectory})
