"""Phase 1: pre-train a diffusion teacher with EDM2's denoising objective (`train_diffusion`).

Loss (Karras et al. 2022, 2024): sigma ~ LogNormal(P_mean, P_std), lambda(sigma) = (sigma^2 +
sigma_data^2) / (sigma sigma_data)^2, and with the learned uncertainty of EDM2
`loss = lambda |D(x + sigma n) - x|^2 / exp(u(sigma)) + u(sigma)`, averaged over the pixels.
"""
import functools

import torch

from cmt.checkpoint import save_network
from cmt.datasets import TOY_NAMES, one_hot_labels
from cmt.edm import SIGMA_DATA, sample_lognormal_sigmas
from cmt.errors import ArgumentError
from cmt.flags import renamed_keywords
from cmt.labels import pick_labels
from cmt.images import MAX_GRID_IMAGES
from cmt.solvers import SOLVERS
from cmt.trainers import identity as identities, loop, precision, recipes, run_files
from cmt.trainers.config import TRAIN_DEFAULTS, TRAIN_HEADING, TRAIN_HELP, check_choice, train_config
from cmt.trainers.reports import sample_and_score
from cmt.networks import family_of
from cmt.options import checked_keywords, document_keywords
from cmt.trainers.data import (DEFAULT_ARCH, PRETRAINING_ARCHITECTURES, STREAM_HELP, check_batch_fits,
                               check_stream_options, data_batches,
                               default_arch, network_for, pictures, training_data)

P_MEAN, P_STD = -0.4, 1.0   # EDM2's training sigma distribution
# num_samples=None: samples for the metric, per kind of data.
EVAL_NUM = {"images": 2000, "points": 4096}
# The trainer options whose defaults differ from TRAIN_DEFAULTS in this phase.
DIFFUSION_DEFAULTS = {"max_steps": 2000, "batch_size": 128, "lr": None}

# How the built-in teachers in cmt/assets/teachers were trained (see the README there), as keyword
# arguments of `train_diffusion`; the demo's --train-teacher runs the same recipe.
_TOY_RECIPE = dict(max_steps=3000, batch_size=512, lr=3e-3, lr_schedule="linear", ema_halflife_images=100_000.0)
TEACHER_RECIPES = {
    "mnist": dict(data="mnist", max_steps=1000, batch_size=128, lr=1e-2, lr_schedule="invsqrt", lr_ref_steps=200),
    **{f"toy:{name}": dict(data=f"toy:{name}", **_TOY_RECIPE) for name in ("checkerboard", "8gaussians", "moons")},
}


def diffusion_loss(net, batch, ctx, *, label_dim, sigma_data=SIGMA_DATA, p_mean=P_MEAN, p_std=P_STD,
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


def sample_and_measure(ema, step, out, *, data, solver, steps, num_samples, grid_num=None, progress=False):
    """The embedded metric of `data` over `num_samples` samples of the teacher's ODE, and a picture
    (`cmt.trainers.reports.sample_and_score`): a grid of `grid_num` samples (default: 6 rows of 10
    classes, else 64), or the scored samples themselves for points."""
    label_dim = ema.label_dim
    grid_num = grid_num or (60 if label_dim == 10 else MAX_GRID_IMAGES)
    return sample_and_score(ema, out, step, sampling=dict(solver=solver, steps=steps), num_samples=num_samples,
                            data=data, title=f"teacher at step {step}, {solver} {steps} steps",
                            draw=lambda samples: pictures(data, samples),
                            grid=(range(grid_num), pick_labels("cycle", grid_num, label_dim)),
                            nrow=10 if label_dim == 10 else None, progress=progress)


# What each keyword of `train_diffusion` means: its docstring and `cmt-train diffusion --help`
# (`cmt.options.document_keywords`); the shared trainer options are `TRAIN_HELP`'s.
DIFFUSION_HELP = {
    "data": f"mnist, toy:NAME ({', '.join(TOY_NAMES)}), a path to an image folder / .npz / EDM dataset .zip, or a "
            "cmt-encode latent set.",
    "out": TRAIN_HELP["out"],
    "resolution": "Resize images to this size [default: mnist 16, else as they are].",
    **STREAM_HELP,
    "arch": "edm2: EDM2's U-Net (the default for images); mlp: a residual MLP (the default for 2-D data).",
    "channels": f"edm2: model_channels (default {DEFAULT_ARCH['edm2']['channels']}); mlp: width (default "
                f"{DEFAULT_ARCH['mlp']['channels']}).",
    "channel_mult": "edm2: per-level multipliers [default: "
                    f"{','.join(map(str, DEFAULT_ARCH['edm2']['channel_mult']))}].",
    "num_blocks": f"edm2: blocks per level (default {DEFAULT_ARCH['edm2']['num_blocks']}); mlp: residual blocks "
                  f"(default {DEFAULT_ARCH['mlp']['num_blocks']}).",
    "attn_res": "edm2: resolutions with self-attention [default: "
                f"{','.join(map(str, DEFAULT_ARCH['edm2']['attn_res']))}]; "
                "'' (in Python ()) for none.",
    "dropout": "Dropout probability of the network.",
    "cond": "Class-conditional when the data has labels.",
    "label_dropout": "Drop labels with this probability (unconditional training share, for guidance).",
    "p_mean": "Training sigmas: log(sigma) ~ N(p_mean, p_std^2) (EDM2's).",
    "p_std": "Training sigmas: the spread of log(sigma) (EDM2's).",
    "uncertainty": "EDM2's learned loss weighting: loss / exp(logvar(sigma)) + logvar(sigma).",
    "sample_solver": "Solver of the sample grids and the metric.",
    "sample_steps": "Solver steps of the sample grids and the metric.",
    "num_samples": f"Samples for the embedded metric at each --sample-every and the end (default: {EVAL_NUM['images']} "
                   f"for images, {EVAL_NUM['points']} for 2-D; 0: no metric; also spelled eval_num).",
    "recipe": recipes.recipe_help("diffusion"),
    "resolved_options": "(Filled in by the recipe layer) what run.json and the model record.",
}


@document_keywords(DIFFUSION_HELP, (TRAIN_HEADING, TRAIN_HELP, {**TRAIN_DEFAULTS, **DIFFUSION_DEFAULTS}))
@renamed_keywords(eval_num="num_samples")
@checked_keywords
@recipes.with_recipe("diffusion")
def train_diffusion(*, data, out, resolution=None, xflip=None, workers="auto", arch=None, channels=None,
                    channel_mult=None, num_blocks=None,
                    attn_res=None, dropout=0.0, cond=True, label_dropout=0.0, p_mean=P_MEAN, p_std=P_STD,
                    uncertainty=True, sample_solver="dpm++3m", sample_steps=16, num_samples=None, recipe=None,
                    resolved_options=None, **train_options):
    """Pre-train a diffusion teacher (EDM2 objective); writes `out/teacher.safetensors` (EMA weights).
    lr=None takes the architecture's pre-training rate (`cmt.networks.learning_rates("diffusion")`).

    Returns `{"out", "model", "log", "state": Path, "metrics": the last logged scalars}`.
    """
    check_stream_options(xflip, workers)
    data = training_data(data, resolution)
    arch = default_arch(data) if arch is None else arch
    check_choice("arch", arch, PRETRAINING_ARCHITECTURES)
    check_choice("sample_solver", sample_solver, SOLVERS)
    for name, value in (("dropout", dropout), ("label_dropout", label_dropout)):
        if not 0 <= value <= 1:
            raise ArgumentError(name, f"must be in [0, 1], got {value}")
    config = train_config(out, DIFFUSION_DEFAULTS, train_options, default_lr=family_of(arch).learning_rates["diffusion"])
    check_batch_fits(data, config.batch_size)
    trainer = loop.Trainer(config, find_unused_parameters=not uncertainty)
    trainer.set_tf32(precision.fixed_choice(config.tf32, "EDM2's training loop runs without it "
                                                         "(training/training_loop.py)"))
    net = network_for(data, arch, channels, channel_mult, num_blocks, attn_res, dropout, cond)
    objective = functools.partial(diffusion_loss, label_dim=net.label_dim, sigma_data=net.sigma_data,
                                  p_mean=p_mean, p_std=p_std, uncertainty=uncertainty,
                                  label_dropout=label_dropout)
    batches = data_batches(data, trainer.micro_batch_size, trainer.seed_for(0), workers=workers, xflip=xflip)
    if num_samples is None:
        num_samples = EVAL_NUM["points" if len(data.data_shape) == 1 else "images"]
    sample_fn = functools.partial(sample_and_measure, data=data, solver=sample_solver, steps=sample_steps,
                                  num_samples=num_samples, progress=config.progress)
    extra = {"phase": "diffusion", "data": data.name, "max_steps": config.max_steps,
             "batch_size": config.batch_size, "p_mean": p_mean, "p_std": p_std,
             "label_dropout": label_dropout if net.label_dim else None,   # what classifier-free guidance needs
             **({"encoder": data.encoder} if data.encoder else {})}      # a latent set's VAE: decodes samples
    model = config.out / "teacher.safetensors"

    def save_final(ema, _net, out):
        save_network(model, ema, extra_config=extra)

    trainer.fit(net, objective, batches, sample_fn=sample_fn, save_final=save_final,
                run_info={"phase": "diffusion", "data": data.name, "network": net.config,
                          **(resolved_options or {"recipe": recipe})},
                run_options={key: value for key, value in run_files.phase_options(train_diffusion, locals()).items()
                             if key != "workers"},   # the DataLoader workers change no batch
                inputs=identities.input_identities(data))
    return {"out": config.out, "model": model, "log": config.out / run_files.LOG_FILE,
            "state": config.out / run_files.STATE_FILE, "metrics": run_files.final_metrics(config.out)}
