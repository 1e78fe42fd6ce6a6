"""cmt-build: run a teacher's ODE solver once and store its trajectories as zarr or WebDataset shards.

    cmt-build --teacher mnist --nfe 16 --num-trajectories 10000 --out shards/
    cmt-build --recipe cifar10 --num-trajectories 50000 --out shards/    # EDM's CIFAR-10 teacher, as sony/cmt
    accelerate launch -m cmt.cli.build --teacher teacher.safetensors --out shards/   # ranks split the shards

The options are the keywords of `cmt.builders.build.build_trajectories`, with its defaults.
"""
import click

from cmt.builders.build import DEFAULTS, NonFiniteTrajectories, build_trajectories
from cmt.builders.plan import DEFAULT_SOLVER, STORAGE_DTYPES
from cmt.cli.common import CONTEXT_SETTINGS, translate_errors
from cmt.edm import SIGMA_GRIDS
from cmt.formats import COMPRESSIONS, DEFAULT_COMPRESSION, FORMATS
from cmt.labels import LABELS_HELP
from cmt.solvers import FLOW_MAP, SOLVERS
from cmt.teachers import RECIPE_TEACHERS


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--teacher", default=DEFAULTS["teacher"],
              help="A checkpoint of ours (path), a built-in name (mnist, toy:NAME), 'edm2' or 'edm' with "
                   "--teacher-ckpt, an EDM2 or EDM preset, an official .pkl, a SiT size with --teacher-ckpt, or a "
                   "flow-map student (a CMT flow-map or MeanFlow checkpoint, a MeanFlow-port .pt) sampled by its "
                   "own --nfe jumps [default: the --recipe's].")
@click.option("--recipe", type=click.Choice(list(RECIPE_TEACHERS)), default=DEFAULTS["recipe"],
              help="A recipe of docs/recipes.md: its official teacher when --teacher is not given (cifar10: "
                   "edm-cifar10-32x32-uncond-vp, ffhq64: edm-ffhq-64x64-uncond-vp, afhq64: "
                   "edm-afhqv2-64x64-uncond-vp); the defaults below are its solver settings.")
@click.option("--teacher-ckpt", default=DEFAULTS["teacher_ckpt"],
              help="For --teacher edm2 / edm: an official .pkl, its .safetensors export or a preset.")
@click.option("--guidance", type=float, default=DEFAULTS["guidance"],
              help="Guidance weight: autoguidance with --guide-ckpt, else classifier-free (conditional teachers); "
                   "1 is no guidance.")
@click.option("--guide-ckpt", default=DEFAULTS["guide_ckpt"],
              help="The guiding network for autoguidance (path, preset or built-in name).")
@click.option("--out", required=True, help="Output directory or fsspec URL (file://, memory://, s3:// ...).")
@click.option("--solver", type=click.Choice([*SOLVERS, FLOW_MAP]), default=DEFAULTS["solver"],
              help=f"ODE solver of a diffusion teacher; {FLOW_MAP}: a flow-map teacher's own jumps along the grid "
                   f"[default: {DEFAULT_SOLVER}, or {FLOW_MAP} for a flow-map teacher].")
@click.option("--nfe", type=int, default=DEFAULTS["nfe"], help="Denoiser calls per trajectory.")
@click.option("--grid", type=click.Choice(list(SIGMA_GRIDS)), default=DEFAULTS["grid"],
              help="Sigma grid: logsnr (geometric, the official CMT grid) or karras (EDM, ends at 0).")
@click.option("--sigma-max", type=float, default=DEFAULTS["sigma_max"])
@click.option("--sigma-min", type=float, default=DEFAULTS["sigma_min"])
@click.option("--rho", type=float, default=DEFAULTS["rho"], help="Karras grid exponent.")
@click.option("--num-trajectories", type=int, default=DEFAULTS["num_trajectories"],
              help="Trajectories in the set; a larger number into an existing set adds the new ones.")
@click.option("--batch-size", type=int, default=DEFAULTS["batch_size"],
              help="Trajectories per teacher batch (part of the configuration).")
@click.option("--seed", type=int, default=DEFAULTS["seed"], help="Trajectory i depends on (seed, i) only.")
@click.option("--labels", default=DEFAULTS["labels"],
              help=LABELS_HELP)
@click.option("--format", type=click.Choice(list(FORMATS)), default=DEFAULTS["format"],
              help="Shard format: zarr (v3 groups) or wds (WebDataset .tar.gz).")
@click.option("--compression", type=click.Choice(list(COMPRESSIONS)), default=DEFAULTS["compression"],
              help=f"Blosc codec of zarr shards (lz4, byte shuffle: the fastest to read; zstd, bit shuffle: ~15% "
                   f"smaller on noise-like states, ~2x slower to read) [default: the one --out was built with, else "
                   f"{DEFAULT_COMPRESSION}].")
@click.option("--shard-size", type=int, default=DEFAULTS["shard_size"], help="Trajectories per shard.")
@click.option("--dtype", type=click.Choice(list(STORAGE_DTYPES)), default=DEFAULTS["dtype"], help="Stored states.")
@click.option("--states", default=DEFAULTS["states"],
              help="Solver states to keep: all, or grid indices like 0,4,8,12,16 (noise and endpoint are always kept).")
@click.option("--eval-teacher", is_flag=True, default=DEFAULTS["eval_teacher"],
              help="Score the endpoints with the embedded-data metric (stored in the manifest).")
@click.option("--eval-data", default=DEFAULTS["eval_data"],
              help="Data set for --eval-teacher (default: the built-in teacher's name).")
@click.option("--progress/--no-progress", default=DEFAULTS["progress"])
@translate_errors
def main(**options):
    """Build a dataset of teacher ODE trajectories (resumable: re-run the same command after a crash)."""
    try:
        build_trajectories(**options, log=click.echo)
    except NonFiniteTrajectories as error:
        raise click.ClickException(str(error)) from None


if __name__ == "__main__":
    main()
