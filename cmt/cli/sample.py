"""cmt-sample: draw samples from a teacher (ODE solver) or a student (flow-map jumps); see `cmt.sampling.sample`."""
import inspect
from pathlib import Path

import click

from cmt.cli.common import translate_errors
from cmt.edm import SIGMA_GRIDS, TWO_STEP_SIGMA
from cmt.sampling import SAMPLERS, sample
from cmt.solvers import SOLVERS

DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(sample).parameters.items()}


def _format_seeds(seeds):
    if len(seeds) > 1 and all(b - a == 1 for a, b in zip(seeds[:-1], seeds[1:])):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(str(seed) for seed in seeds)


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.option("--ckpt", required=True,
              help="A checkpoint (.safetensors, training .pt, EDM2 .pkl), a built-in teacher "
                   "(mnist, toy:checkerboard, toy:8gaussians, toy:moons) or an EDM2 preset.")
@click.option("--sampler", type=click.Choice(SAMPLERS), default=DEFAULTS["sampler"],
              help="ode: solve the teacher's ODE; flowmap: 1-/2-step jumps of a student.")
@click.option("--solver", type=click.Choice(sorted(SOLVERS)), default=DEFAULTS["solver"], help="ODE solver.")
@click.option("--steps", type=click.IntRange(min=1), default=DEFAULTS["steps"], help="Solver steps (flowmap: 1 or 2).")
@click.option("--grid", type=click.Choice(SIGMA_GRIDS), default=DEFAULTS["grid"],
              help="Sigma grid of the ODE solver (logsnr: the CMT trajectories' grid).")
@click.option("--sigma-min", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS["sigma_min"])
@click.option("--sigma-max", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS["sigma_max"])
@click.option("--mid-sigma", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS["mid_sigma"],
              help=f"Flowmap 2-step: the intermediate sigma (the training reports use {TWO_STEP_SIGMA}).")
@click.option("--num", type=click.IntRange(min=1), default=DEFAULTS["num"], help="Number of samples.")
@click.option("--seed", type=click.IntRange(min=0), default=DEFAULTS["seed"], help="Sample i uses seed + i.")
@click.option("--labels", default=DEFAULTS["labels"],
              help="Class labels of a conditional network: random, cycle, or a class id K.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="PNG: image grid, or scatter plot for 2-D data.")
@click.option("--npz", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULTS["npz"],
              help="Also save samples, labels and seeds here.")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULTS["batch_size"],
              help="Samples per network batch.")
@click.option("--device", default=DEFAULTS["device"], help="torch device (default: cuda if available, else cpu).")
@translate_errors
def main(**options):
    """Sample a teacher or a student checkpoint to a PNG (and optionally an .npz)."""
    written = sample(**options)
    click.echo(f"{len(written['seeds'])} samples of {written['identity']['path']} -> {written['out']}"
               + (f", {written['npz']}" if written["npz"] else ""))
    click.echo(f"seeds {_format_seeds(written['seeds'])}")


if __name__ == "__main__":
    main()
