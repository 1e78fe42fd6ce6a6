"""cmt-build: run a teacher's ODE solver once and store its trajectories as zarr or WebDataset shards.

    cmt-build --teacher mnist --nfe 16 --num-trajectories 10000 --out shards/
    accelerate launch -m cmt.builders.cli --teacher teacher.safetensors --out shards/   # ranks split the shards
"""
import click
from cmt.builders.build import STORAGE_DTYPES, NonFiniteTrajectories, Teacher, build, build_config, distributed_state
from cmt.formats import FORMATS
from cmt.datasets import TOY_NAMES
from cmt.edm import SIGMA_GRIDS
from cmt.guidance import autoguidance, classifier_free_guidance, no_guidance
from cmt.solvers import SOLVERS
from cmt.teachers import resolve_teacher


def load_teacher(spec, teacher_ckpt, guidance, guide_ckpt, device):
    """The teacher as the builder needs it; bad names or paths become one error on the flag at fault.

    --guidance W with --guide-ckpt: autoguidance by that network (EDM2's guided presets); --guidance W
    alone: classifier-free guidance against the teacher without labels; W = 1: no guidance.
    """
    try:
        net, identity = resolve_teacher(spec, ckpt=teacher_ckpt, device=device)
    except (ValueError, FileNotFoundError, OSError) as error:
        raise click.BadParameter(str(error), param_hint="--teacher") from None
    net.requires_grad_(False)
    if guide_ckpt is not None and guidance is None:
        raise click.UsageError("--guide-ckpt needs --guidance WEIGHT (EDM2 uses about 1.4 to 2.5)")
    denoiser, description = net, None
    if guidance is not None:
        try:
            if guide_ckpt is not None:
                guide, guide_identity = resolve_teacher(guide_ckpt, device=device)
                guide.requires_grad_(False)
                denoiser = autoguidance(net, guide, guidance, guide_identity)
            elif guidance == 1:
                denoiser = no_guidance(net)
            else:
                denoiser = classifier_free_guidance(net, guidance)
        except (ValueError, FileNotFoundError, OSError) as error:
            raise click.BadParameter(str(error), param_hint="--guide-ckpt / --guidance") from None
        description = denoiser.describe()
    return Teacher(denoiser, net.data_shape, net.label_dim, identity, dtype=next(net.parameters()).dtype,
                   device=device, guidance=description)


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--teacher", required=True,
              help="A checkpoint of ours (path), a built-in name (mnist, toy:NAME), or 'edm2' with --teacher-ckpt.")
@click.option("--teacher-ckpt", default=None,
              help="For --teacher edm2: an official .pkl, its .safetensors export or a preset.")
@click.option("--guidance", type=float, default=None,
              help="Guidance weight: autoguidance with --guide-ckpt, else classifier-free (conditional teachers).")
@click.option("--guide-ckpt", default=None, help="The guiding network for autoguidance (path, preset or built-in name).")
@click.option("--out", required=True, help="Output directory or fsspec URL (file://, memory://, s3:// ...).")
@click.option("--solver", type=click.Choice(list(SOLVERS)), default="dpm++3m")
@click.option("--nfe", type=int, default=16, help="Denoiser calls per trajectory.")
@click.option("--grid", type=click.Choice(list(SIGMA_GRIDS)), default="logsnr",
              help="Sigma grid: logsnr (geometric, the official CMT grid) or karras (EDM, ends at 0).")
@click.option("--sigma-max", type=float, default=80.0)
@click.option("--sigma-min", type=float, default=0.002)
@click.option("--rho", type=float, default=7.0, help="Karras grid exponent.")
@click.option("--num-trajectories", type=int, default=1000)
@click.option("--batch-size", type=int, default=256, help="Trajectories per teacher batch (part of the configuration).")
@click.option("--seed", type=int, default=0, help="Trajectory i depends on (seed, i) only.")
@click.option("--labels", default=None,
              help="random (per trajectory), a class id, or none; default random for conditional teachers.")
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), default="zarr")
@click.option("--shard-size", type=int, default=1000, help="Trajectories per shard.")
@click.option("--dtype", type=click.Choice(list(STORAGE_DTYPES)), default="float16", help="Stored states.")
@click.option("--states", default="all",
              help="Solver states to keep: all, or grid indices like 0,4,8,12,16 (noise and endpoint are always kept).")
@click.option("--eval-teacher", is_flag=True,
              help="Score the endpoints with the embedded-data metric (stored in the manifest).")
@click.option("--eval-data", default=None, help="Data set for --eval-teacher (default: the built-in teacher's name).")
@click.option("--progress/--no-progress", default=True)
def main(teacher, teacher_ckpt, guidance, guide_ckpt, out, solver, nfe, grid, sigma_max, sigma_min, rho,
         num_trajectories, batch_size, seed, labels, fmt, shard_size, dtype, states, eval_teacher, eval_data, progress):
    """Build a dataset of teacher ODE trajectories (resumable: re-run the same command after a crash)."""
    state = distributed_state()
    model = load_teacher(teacher, teacher_ckpt, guidance, guide_ckpt, state.device)
    if labels is None:
        labels = "random" if model.label_dim else "none"
    if eval_teacher:
        eval_data = eval_data or model.identity.get("name")
        with_metric = ["mnist", *(f"toy:{name}" for name in TOY_NAMES)]
        if eval_data not in with_metric:
            raise click.UsageError(f"--eval-teacher: the embedded-data metric exists for {', '.join(with_metric)}; "
                                   f"give one of them with --eval-data (got {eval_data!r})")
    try:
        config = build_config(model, solver=solver, nfe=nfe, grid=grid, sigma_min=sigma_min, sigma_max=sigma_max,
                              rho=rho, num_trajectories=num_trajectories, batch_size=batch_size, seed=seed,
                              labels=labels, fmt=fmt, shard_size=shard_size, dtype=dtype, states=states)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    try:
        build(out, model, config, eval_data=eval_data if eval_teacher else None, progress=progress,
              log=click.echo)
    except (ValueError, NonFiniteTrajectories) as error:
        raise click.ClickException(str(error)) from None


if __name__ == "__main__":
    main()
