"""What mid-training and post-training share: the student built from its teacher (or its init), its
consistency output and average velocity, its 1- and 2-step sampling report, and how it is saved."""
import contextlib
import inspect
import warnings
from pathlib import Path

import torch

from cmt.checkpoint import init_student_from_teacher, save_network
from cmt.datasets import one_hot_labels, resolve_data
from cmt.edm import SIGMA_MAX, SIGMA_MIN, TWO_STEP_SIGMA, broadcast_sigma, sigma_to_t, t_to_sigma, x_to_z, z_to_x
from cmt.errors import ArgumentError, InapplicableOption
from cmt.images import MAX_GRID_IMAGES
from cmt.latents import decode_latents
from cmt.networks import build_network, family_of, network_config
from cmt.outputs import write_torch
from cmt.sampling import MEANFLOW_T_MAX, native_time, sampler_sigmas
from cmt.teachers import resolve_teacher
from cmt.trainers.reports import sample_and_score
from cmt.trainers.run_files import LOG_FILE, STATE_FILE, final_metrics

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
    `z_r = z - (t - r) u` is the same jump as `flow_map_jump` in sigma space. A flow map with its own
    time (`cmt.sampling.native_time`: SiT's `average_velocity(z, t, r, labels)`) gives the same u
    directly, without the round trip through sigma (equal to float32 rounding; defined at t = 1, where
    sigma is infinite). A DDP wrapper has no such method, so under several processes the gradient path
    goes through the wrapper's forward (the round trip), as DDP needs.
    """
    if native_time(net):
        return net.average_velocity(z, t, r, labels).to(z.dtype)
    denoised = net(z_to_x(z, t), t_to_sigma(t), labels, target_sigma=t_to_sigma(r))
    return (z - denoised) / broadcast_sigma(t, z)


def teacher_velocity(denoiser, x, sigma, labels=None):
    """The probability-flow ODE's velocity dz/dt = (z - D(x, sigma)) / t at an EDM state, in float32.
    A flow-map teacher (a trajectory set built from a flow-map student) gives its instantaneous
    velocity u(z, t, t): D at `target_sigma = sigma`."""
    x = x.float()
    target = {"target_sigma": sigma.float()} if getattr(denoiser, "flow_map", False) else {}
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):   # a fixed target: float32, as the build
        denoised = denoiser(x, sigma.float(), labels, **target).float()
    return (x_to_z(x, sigma) - denoised) / broadcast_sigma(sigma_to_t(sigma), x)


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
    """No autocast inside the block: the loss path of post-training runs in float32 (TF32 matmuls only
    where `--tf32` chose them, `trainers/precision.py`). At CMT's fixed gap the residual
    f(x_t, t) - f(x_r, r) is far below bf16's rounding error (~20x smaller, median, on the built-in
    MNIST teacher; fp16 ~3.6x), so half-precision forwards would train on rounding noise. The official
    runs are fp32 (CIFAR-10) and TF32 (ImageNet-512)."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def consistency_output(net, plain, x, sigma, labels):
    """The consistency function f(x, sigma): the jump to sigma = 0 (`target_sigma = 0` for flow maps).

    Sigmas are floored at the student's sigma_min (or SIGMA_MIN), where the boundary form is the
    identity, so stored states at sigma = 0 cost nothing and produce no NaN.
    """
    sigma = sigma.clamp(min=max(getattr(plain, "sigma_min", 0.0), SIGMA_MIN))
    target_sigma = torch.zeros_like(sigma) if plain.flow_map else None
    return net(x, sigma, labels, target_sigma=target_sigma)


def student_family(config, argument):
    """The `NetworkFamily` of a teacher's or init's config; an unknown architecture (a file from
    elsewhere) is an ArgumentError naming `argument` (never a KeyError)."""
    try:
        return family_of(config)
    except ValueError as error:
        raise ArgumentError(argument, str(error)) from None


def consistency_student(config):
    """The consistency-model form of a network config: its family's (`NetworkFamily.consistency_student`:
    the boundary at SIGMA_MIN, or for EDM networks sony/cmt's ECMPrecond); a flow-map config stays one."""
    return family_of(config).consistency_student(config)


def student_config(config, *, flow_map=None, sigma_min=None, dropout=None, dropout_res=None, form=None,
                   argument="teacher"):
    """A student's network config: its teacher's (or init's), with the student's own settings, then
    `form(config)` (e.g. `consistency_student`, a post-training method's `student`). A config that
    cannot be a student (`NetworkFamily.check_student`: EDM's VP / VE / iDDPM teachers) or of an
    unknown family is an ArgumentError naming `argument`, the teacher or init it came from; a
    `dropout_res` (dropout only at feature resolutions up to it) that the network does not take, one
    naming `dropout_res`."""
    family = student_family(config, argument)
    config = dict(config)
    for key, value in (("flow_map", flow_map), ("sigma_min", sigma_min), ("dropout", dropout),
                       ("dropout_res", dropout_res)):
        if value is not None:
            config[key] = value
    if dropout_res is not None:
        try:
            with torch.device("meta"):
                build_network(config)
        except TypeError:
            raise ArgumentError("dropout_res", f"applies to EDM2 U-Nets (dropout in the blocks at resolutions up to "
                                               f"it); this student is a {config.get('architecture')} network") from None
    try:
        if form is not None:
            config = form(config)
        family.check_student(config)
    except ValueError as error:
        raise ArgumentError(argument, error.message if isinstance(error, ArgumentError) else str(error)) from None
    return config


def student_learning_rate(config, phase, argument=None):
    """The default lr of `phase` for a student of this network config's family; an unknown
    architecture is an ArgumentError naming `argument` (default: the teacher for mid, the init for post)."""
    return student_family(config, argument or ("teacher" if phase == "mid" else "init")).learning_rates[phase]


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


@contextlib.contextmanager
def recipe_teacher_errors(resolved_options):
    """An ArgumentError about the teacher inside the block names the recipe when the recipe filled the
    teacher in (`cmt.trainers.recipes.official_teacher`): the caller named none."""
    values = ((resolved_options or {}).get("recipe") or {}).get("values") or {}
    try:
        yield
    except ArgumentError as error:
        if error.argument != "teacher" or "teacher" not in values:
            raise
        raise ArgumentError("recipe", f"its teacher {values['teacher']}: {error.message}") from None


# ---- checks before training --------------------------------------------------------------------

def refuse_inapplicable(function, values, names, reason, because):
    """InapplicableOption for the first of `names` whose value in `values` is not `function`'s default:
    an option that does not apply (`reason`, e.g. "to loss l2") was set, so it would be ignored;
    `because`: the keyword whose value makes it so (a recipe's value is then left out)."""
    defaults = {name: parameter.default for name, parameter in inspect.signature(function).parameters.items()}
    for name in names:
        if values[name] != defaults[name]:
            raise InapplicableOption(name, f"does not apply {reason} (got {values[name]!r}); leave it out", because)


# The students' sample-and-score report: the keywords of the phases that train a student (mid,
# post), described once for their docstrings and commands.
REPORT_HELP = {
    "num_samples": "Samples for the metric and pictures.",
    "mid_sigma": "Intermediate sigma of 2-step sampling (the CMT setting).",
}


def check_report_options(net, *, eval_data, mid_sigma, sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN):
    """What `sampling_report` will need, checked before training: `eval_data` names a data set of the
    student's shape, `mid_sigma` lies in (sigma_min, sigma_max). Returns the resolved data set or None."""
    sampler_sigmas("flowmap", 2, sigma_min=sigma_min, sigma_max=sigma_max, mid_sigma=mid_sigma)
    if eval_data is None:
        return None
    try:
        data = resolve_data(eval_data)
    except ValueError as error:
        raise ArgumentError("eval_data", str(error)) from None
    if tuple(data.data_shape) != tuple(net.data_shape):
        raise ArgumentError("eval_data", f"{data.name} holds data of shape {tuple(data.data_shape)}; the student "
                                         f"makes samples of shape {tuple(net.data_shape)}: name matching data "
                                         "(or leave it out)")
    return data


# ---- reports and results ----------------------------------------------------------------------

def sampling_report(net, out, step, *, sampler, eval_data=None, num_samples=1000, mid_sigma=TWO_STEP_SIGMA,
                    sigma_max=SIGMA_MAX, progress=False, time="sigma", t_max=MEANFLOW_T_MAX, encoder=None):
    """1- and 2-step samples of a student (`cmt.trainers.reports.sample_and_score`): the built-in
    metric of `eval_data` (toy:NAME, mnist) as scalars `{metric}_{steps}step` and a picture each in
    `out/samples/` (as `samples_{steps}step`): points and pixels as they are, latents decoded through
    the VAE their `encoder` record names (a latent set's, a latent teacher's; `cmt.latents.decode_latents`;
    no record: no picture). sampler: the student's kind (`cmt.sampling.STUDENT_SAMPLERS`; "consistency"
    re-noises between jumps to 0 even for a flow-map network, as ECT / ECD students are sampled);
    time, t_max: its record's (`cmt.sampling.generate`)."""
    data = resolve_data(eval_data) if eval_data is not None else None
    scalars = {}
    for steps in (1, 2):
        scalars.update(sample_and_score(
            net, out, step, sampling=dict(sampler="flowmap", steps=steps, mid_sigma=mid_sigma, sigma_max=sigma_max,
                                          renoise=sampler == "consistency", time=time, t_max=t_max),
            num_samples=num_samples, data=data, suffix=f"_{steps}step",
            title=f"student at step {step}, {steps} step{'s' * (steps > 1)}",
            draw=picture_of(net, encoder), progress=progress))
    return scalars


def picture_of(net, encoder):
    """What a student's sample grid shows of its samples (None: nothing): points and pixels as they
    are; latents decoded through the recorded VAE (the first `MAX_GRID_IMAGES`). A VAE that cannot be
    loaded (offline, not in the Hugging Face cache) costs the picture, with one warning, not the run."""
    if len(net.data_shape) == 1 or net.data_shape[0] in (1, 3):
        return lambda images: images
    if not encoder or encoder.get("kind") != "stability_vae":
        return None

    def decode(latents):
        try:
            return decode_latents(latents[:MAX_GRID_IMAGES], encoder, device=latents.device)
        except (FileNotFoundError, ImportError, OSError) as error:
            if encoder.get("vae_name") not in _WARNED_VAES:
                _WARNED_VAES.add(encoder.get("vae_name"))
                warnings.warn(f"no pictures of the latent samples: {error}", stacklevel=2)
            return None
    return decode


_WARNED_VAES = set()


def save_student(out, name, ema, net, info):
    """`out/{name}.pt` (`torch.load(weights_only=True)`: config, net, ema, and `info`) and
    `out/{name}.safetensors` (the EMA weights, for `cmt-sample` and `load_network`)."""
    out = Path(out)
    checkpoint = {"config": network_config(ema), "net": net.state_dict(), "ema": ema.state_dict(), **info}
    write_torch(out / f"{name}.pt", checkpoint)
    save_network(out / f"{name}.safetensors", ema, extra_config=info)


def student_result(out, name):
    """What a student phase returns: the files it wrote and its final logged scalars."""
    out = Path(out)
    return {"out": out, "checkpoint": out / f"{name}.pt", "model": out / f"{name}.safetensors",
            "log": out / LOG_FILE, "state": out / STATE_FILE, "metrics": final_metrics(out)}
