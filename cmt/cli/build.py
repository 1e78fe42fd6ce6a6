"""cmt-build: run a teacher's ODE solver once and store its trajectories as zarr or WebDataset shards.

    cmt-build --teacher mnist --nfe 16 --num-trajectories 10000 --out shards/
    cmt-build --recipe cifar10 --num-trajectories 50000 --out shards/    # EDM's CIFAR-10 teacher, as sony/cmt
    accelerate launch -m cmt.cli.build --teacher teacher.safetensors --out shards/   # ranks split the shards

The options are the keywords of `cmt.builders.build.build_trajectories`, with its defaults.
"""
import click

from cmt.builders.build import BUILD_HELP as HELP, DEFAULTS, NonFiniteTrajectories, build_trajectories
from cmt.builders.plan import STORAGE_DTYPES
from cmt.cli.common import CONTEXT_SETTINGS, translate_errors
from cmt.edm import SIGMA_GRIDS
from cmt.formats import COMPRESSIONS, FORMATS
from cmt.solvers import FLOW_MAP, SOLVERS
from cmt.teachers import RECIPE_TEACHERS


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--teacher", default=DEFAULTS["teacher"], help=HELP["teacher"])
@click.option("--recipe", type=click.Choice(list(RECIPE_TEACHERS)), default=DEFAULTS["recipe"], help=HELP["recipe"])
@click.option("--teacher-ckpt", default=DEFAULTS["teacher_ckpt"], help=HELP["teacher_ckpt"])
@click.option("--guidance", type=float, default=DEFAULTS["guidance"], help=HELP["guidance"])
@click.option("--guide-ckpt", default=DEFAULTS["guide_ckpt"], help=HELP["guide_ckpt"])
@click.option("--out", required=True, help=HELP["out"])
@click.option("--solver", type=click.Choice([*SOLVERS, FLOW_MAP]), default=DEFAULTS["solver"], help=HELP["solver"])
@click.option("--nfe", type=int, default=DEFAULTS["nfe"], help=HELP["nfe"])
@click.option("--grid", type=click.Choice(list(SIGMA_GRIDS)), default=DEFAULTS["grid"], help=HELP["grid"])
@click.option("--sigma-max", type=float, default=DEFAULTS["sigma_max"], help=HELP["sigma_max"])
@click.option("--sigma-min", type=float, default=DEFAULTS["sigma_min"], help=HELP["sigma_min"])
@click.option("--rho", type=float, default=DEFAULTS["rho"], help=HELP["rho"])
@click.option("--num-trajectories", type=int, default=DEFAULTS["num_trajectories"], help=HELP["num_trajectories"])
@click.option("--batch-size", type=int, default=DEFAULTS["batch_size"], help=HELP["batch_size"])
@click.option("--seed", type=int, default=DEFAULTS["seed"], help=HELP["seed"])
@click.option("--labels", default=DEFAULTS["labels"], help=HELP["labels"])
@click.option("--format", type=click.Choice(list(FORMATS)), default=DEFAULTS["format"], help=HELP["format"])
@click.option("--compression", type=click.Choice(list(COMPRESSIONS)), default=DEFAULTS["compression"],
              help=HELP["compression"])
@click.option("--shard-size", type=int, default=DEFAULTS["shard_size"], help=HELP["shard_size"])
@click.option("--dtype", type=click.Choice(list(STORAGE_DTYPES)), default=DEFAULTS["dtype"], help=HELP["dtype"])
@click.option("--states", default=DEFAULTS["states"], help=HELP["states"])
@click.option("--eval-teacher", is_flag=True, default=DEFAULTS["eval_teacher"], help=HELP["eval_teacher"])
@click.option("--eval-data", default=DEFAULTS["eval_data"], help=HELP["eval_data"])
@click.option("--progress/--no-progress", default=DEFAULTS["progress"], help=HELP["progress"])
@translate_errors
def main(**options):
    """Build a dataset of teacher ODE trajectories (resumable: re-run the same command after a crash)."""
    try:
        build_trajectories(**options, log=click.echo)
    except NonFiniteTrajectories as error:
        raise click.ClickException(str(error)) from None


if __name__ == "__main__":
    main()
