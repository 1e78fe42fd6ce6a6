"""Phase 1: pre-train a diffusion teacher with EDM2's denoising objective (`cmt-train diffusion`).

Loss (Karras et al. 2022, 2024): sigma ~ LogNormal(P_mean, P_std), lambda(sigma) = (sigma^2 +
sigma_data^2) / (sigma sigma_data)^2, and with the learned uncertainty of EDM2
`loss = lambda |D(x + sigma n) - x|^2 / exp(u(sigma)) + u(sigma)`, averaged over the pixels.
"""
import functools
from pathlib import Path

import click
import torch

from cmt.checkpoint import save_network
from cmt.datasets import one_hot_labels, resolve_data
from cmt.edm import sample_lognormal_sigmas
from cmt.metrics import embedded_metric
from cmt.networks import build_network
from cmt.solvers import SOLVERS
from cmt.sampling import generate, pick_labels, save_samples
from cmt.trainers import loop

P_MEAN, P_STD = -0.4, 1.0   # EDM2's training sigma distribution
DEFAULT_ARCH = {  # sized for a few minutes on a CPU
    "edm2": dict(channels=32, channel_mult=(1, 2, 2), num_blocks=1, attn_res=(4,)),
    "mlp": dict(channels=256, num_blocks=4),
}
DEFAULT_LR = {"edm2": 1e-2, "mlp": 3e-3}   # EDM2's magnitude-preserving net takes a larger lr

# How the built-in teachers in cmt/assets/teachers were trained (see the README there); the demo's
# --train-teacher runs the same recipe.
_TOY_RECIPE = ["--max-steps", "3000", "--batch-size", "512", "--lr", "3e-3", "--lr-schedule", "linear",
               "--ema-halflife", "100000"]
TEACHER_RECIPES = {
    "mnist": ["--data", "mnist", "--max-steps", "1000", "--batch-size", "128", "--lr", "1e-2",
              "--lr-schedule", "invsqrt", "--lr-ref-steps", "200"],
    **{f"toy:{name}": ["--data", f"toy:{name}", *_TOY_RECIPE] for name in ("checkerboard", "8gaussians", "moons")},
}


def diffusion_loss(net, batch, ctx, *, label_dim, sigma_data=0.5, p_mean=P_MEAN, p_std=P_STD,
                   uncertainty=True, label_dropout=0.0):
    """Per-sample EDM2 denoising loss of clean `batch["data"]` with integer `batch["label"]`
    (`label_dim`: the network's; 0 = unconditional)."""
    data = batch["data"]
    labels = one_hot_labels(batch["label"], label_dim)
    if labels is not None and label_dropout > 0:
        keep = torch.rand(len(data), generator=ctx.generator, device=ctx.device) >= label_dropout
        labels = labels * keep[:, None].to(labels.dtype)
    sigma = sample_lognormal_sigmas(len(data), p_mean, p_std, generator=ctx.generator, device=ctx.device)
    noise = torch.randn(data.shape, generator=ctx.generator, device=ctx.device)
    shape = (-1,) + (1,) * (data.ndim - 1)
    weight = ((sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2).reshape(shape)
    denoised, logvar = net(data + sigma.reshape(shape) * noise, sigma, labels, return_logvar=True)
    weighted = weight * (denoised.float() - data) ** 2
    per_sample = weighted.flatten(1).mean(dim=1)
    if not uncertainty:
        return per_sample
    logvar = logvar.float().reshape(-1)
    return per_sample / logvar.exp() + logvar, {"weighted_mse": per_sample.mean().detach()}


def network_for(data, arch, channels, channel_mult, num_blocks, attn_res, dropout, cond):
    """The teacher network for `data`, with the `DEFAULT_ARCH` of `arch` where an option is None."""
    defaults = DEFAULT_ARCH[arch]
    label_dim = data.label_dim if cond else 0
    channels = channels or defaults["channels"]
    num_blocks = num_blocks or defaults["num_blocks"]
    if arch == "mlp":
        return build_network(dict(architecture="mlp", data_shape=list(data.data_shape), label_dim=label_dim,
                                  width=channels, num_blocks=num_blocks, dropout=dropout))
    if len(data.data_shape) != 3 or data.data_shape[1] != data.data_shape[2]:
        raise click.BadParameter(f"edm2 needs square images [C, H, W]; {data.name} has shape "
                                 f"{list(data.data_shape)} (use --arch mlp)", param_hint="--arch")
    channel_mult = channel_mult or defaults["channel_mult"]
    attn_res = defaults["attn_res"] if attn_res is None else attn_res
    if data.data_shape[1] % 2 ** (len(channel_mult) - 1):
        raise click.BadParameter(f"{len(channel_mult)} levels halve the resolution {data.data_shape[1]} "
                                 "to a non-integer size", param_hint="--channel-mult")
    return build_network(dict(architecture="edm2", img_resolution=data.data_shape[1],
                              img_channels=data.data_shape[0], label_dim=label_dim, model_channels=channels,
                              channel_mult=list(channel_mult), num_blocks=num_blocks,
                              attn_resolutions=list(attn_res), dropout=dropout))


def data_batches(data, batch_size, seed):
    """Fresh random draws (toy: new points; images: rows with replacement), resumable."""
    def draw(n, generator):
        x, labels = data.sample(n, generator)
        return {"data": x, "label": labels}
    return loop.RandomBatches(draw, batch_size, seed)


def sample_and_measure(ema, step, out, *, data, solver, steps, eval_num, grid_num=100):
    """A grid (or scatter) of `grid_num` samples and the embedded metric over `eval_num` samples."""
    label_dim = ema.label_dim
    grid_labels = pick_labels("cycle", grid_num, label_dim)
    grid = generate(ema, list(range(grid_num)), grid_labels, solver=solver, steps=steps)
    is_points = grid.ndim == 2
    logs = {}
    if eval_num:
        seeds = list(range(10**6, 10**6 + eval_num))
        samples = generate(ema, seeds, pick_labels("random", eval_num, label_dim, seed=step), solver=solver,
                           steps=steps)
        logs = {key: value for key, value in embedded_metric(data, samples).items()}
        if is_points:
            grid = samples
    reference = data.reference() if is_points else None
    save_samples(grid, Path(out) / "samples" / f"step-{step:06d}.png", reference=reference,
                 nrow=10 if label_dim == 10 else None)
    return logs


def _int_tuple(text):
    return tuple(int(part) for part in text.split(",") if part.strip())


class IntList(click.ParamType):
    name = "N,N,..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            return _int_tuple(value)
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)


@click.command("diffusion", context_settings={"show_default": True})
@click.option("--data", "data_spec", required=True,
              help="mnist, toy:NAME (checkerboard, 8gaussians, moons, swissroll, rings), or a path to an "
                   "image folder / .npz / EDM dataset .zip.")
@click.option("--resolution", type=click.IntRange(min=4), default=None,
              help="Resize images to this size (mnist: 16 by default).")
@click.option("--arch", type=click.Choice(["edm2", "mlp"]), default=None,
              help="edm2 U-Net (default for images) or mlp (default for 2-D data).")
@click.option("--channels", type=click.IntRange(min=1), default=None,
              help="edm2: model_channels (default 32); mlp: width (default 256).")
@click.option("--channel-mult", type=IntList(), default=None, help="edm2: per-level multipliers [1,2,2].")
@click.option("--num-blocks", type=click.IntRange(min=1), default=None,
              help="edm2: blocks per level (default 1); mlp: residual blocks (default 4).")
@click.option("--attn-res", type=IntList(), default=None,
              help="edm2: resolutions with self-attention [4]; '' for none.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0)
@click.option("--cond/--uncond", default=True,
              help="Class-conditional when the data has labels.")
@click.option("--label-dropout", type=click.FloatRange(0, 1), default=0.0,
              help="Drop labels with this probability (unconditional training share, for guidance).")
@click.option("--p-mean", type=float, default=P_MEAN, help="Training sigmas: log(sigma) ~ N(p_mean, p_std^2).")
@click.option("--p-std", type=click.FloatRange(min=0, min_open=True), default=P_STD)
@click.option("--uncertainty/--no-uncertainty", default=True,
              help="EDM2's learned loss weighting: loss / exp(logvar(sigma)) + logvar(sigma).")
@click.option("--sample-solver", type=click.Choice(sorted(SOLVERS)), default="dpm++3m",
              help="Solver of the sample grids and the metric.")
@click.option("--sample-steps", type=click.IntRange(min=1), default=16)
@click.option("--eval-num", type=click.IntRange(min=0), default=None,
              help="Samples for the embedded metric at each --sample-every and the end "
                   "(default: 2000 for images, 4096 for 2-D; 0: no metric).")
@loop.trainer_options(lr=None, max_steps=2000, batch_size=128, ema_halflife_images=500_000.0)
def command(data_spec, resolution, arch, channels, channel_mult, num_blocks, attn_res, dropout, cond,
            label_dropout, p_mean, p_std, uncertainty, sample_solver, sample_steps, eval_num, **options):
    """Pre-train a diffusion teacher (EDM2 objective); writes OUT/teacher.safetensors (EMA weights)."""
    try:
        data = resolve_data(data_spec, resolution)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--data") from None
    is_points = len(data.data_shape) == 1
    arch = arch or ("mlp" if is_points else "edm2")
    if options["lr"] is None:
        options["lr"] = DEFAULT_LR[arch]
    config = loop.config_from_options(options)
    trainer = loop.Trainer(config, find_unused_parameters=not uncertainty)
    net = network_for(data, arch, channels, channel_mult, num_blocks, attn_res, dropout, cond)
    objective = functools.partial(diffusion_loss, label_dim=net.label_dim, sigma_data=net.sigma_data,
                                  p_mean=p_mean, p_std=p_std, uncertainty=uncertainty,
                                  label_dropout=label_dropout)
    batches = data_batches(data, trainer.micro_batch_size, trainer.seed_for(0))
    eval_num = (4096 if is_points else 2000) if eval_num is None else eval_num
    sample_fn = functools.partial(sample_and_measure, data=data, solver=sample_solver, steps=sample_steps,
                                  eval_num=eval_num)
    extra = {"phase": "diffusion", "data": data.name, "max_steps": config.max_steps,
             "batch_size": config.batch_size, "p_mean": p_mean, "p_std": p_std}

    def save_final(ema, _net, out):
        save_network(out / "teacher.safetensors", ema, extra_config=extra)

    trainer.fit(net, objective, batches, sample_fn=sample_fn, save_final=save_final,
                run_info={"phase": "diffusion", "data": data.name, "network": net.config})
