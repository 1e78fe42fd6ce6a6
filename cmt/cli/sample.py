"""cmt-sample: draw samples from a teacher (ODE solver) or a student (flow-map jumps); see `cmt.sampling.sample`.

\b
    cmt-sample --ckpt mnist --steps 16 --num-samples 2000 --labels cycle --out grid.png --npz samples.npz
    cmt-sample --ckpt runs/mid/mid.safetensors --sampler flowmap --steps 2 --out mid.png
    cmt-sample --ckpt runs/teacher/snapshots/snapshot-0001000.safetensors --out snapshot.png
    accelerate launch -m cmt.cli.sample --ckpt ... --npz s.npz   # ranks share the batches, rank 0 writes
"""
import inspect
from pathlib import Path

import click

from cmt.cli.common import CONTEXT_SETTINGS, WithAliases, summary, translate_errors
from cmt.edm import SIGMA_GRIDS
from cmt.sampling import SAMPLE_HELP as HELP, SAMPLERS, sample
from cmt.solvers import SOLVERS

DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(sample).parameters.items()}


def _format_seeds(seeds):
    if len(seeds) > 1 and all(b - a == 1 for a, b in zip(seeds[:-1], seeds[1:])):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(str(seed) for seed in seeds)


@click.command(help=__doc__, context_settings=CONTEXT_SETTINGS)
@click.option("--ckpt", required=True, help=HELP["ckpt"])
@click.option("--sampler", type=click.Choice(SAMPLERS), default=DEFAULTS["sampler"], help=HELP["sampler"])
@click.option("--solver", type=click.Choice(sorted(SOLVERS)), default=DEFAULTS["solver"], help=HELP["solver"])
@click.option("--steps", type=click.IntRange(min=1), default=DEFAULTS["steps"], help=HELP["steps"])
@click.option("--grid", type=click.Choice(SIGMA_GRIDS), default=DEFAULTS["grid"], help=HELP["grid"])
@click.option("--sigma-min", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS["sigma_min"],
              help=HELP["sigma_min"])
@click.option("--sigma-max", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS["sigma_max"],
              help=HELP["sigma_max"])
@click.option("--mid-sigma", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS["mid_sigma"],
              help=HELP["mid_sigma"])
@click.option("--num-samples", "--num", "num_samples", cls=WithAliases, type=click.IntRange(min=1),
              default=DEFAULTS["num_samples"], help=HELP["num_samples"])
@click.option("--seed", type=click.IntRange(min=0), default=DEFAULTS["seed"], help=HELP["seed"])
@click.option("--labels", default=DEFAULTS["labels"], help=HELP["labels"])
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help=HELP["out"])
@click.option("--npz", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULTS["npz"], help=HELP["npz"])
@click.option("--vae", default=DEFAULTS["vae"], metavar="DIR_OR_HUB_ID", help=HELP["vae"])
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULTS["batch_size"], help=HELP["batch_size"])
@click.option("--device", default=DEFAULTS["device"], help=HELP["device"])
@click.option("--progress/--no-progress", default=DEFAULTS["progress"], help=HELP["progress"])
@click.option("--metric/--no-metric", default=DEFAULTS["metric"], help=HELP["metric"])
@translate_errors
def main(**options):
    written = sample(**options)
    if written["rank"] != 0:   # rank 0 wrote the files and speaks for all
        return
    lines = [f"cmt-sample: {len(written['seeds'])} samples of {written['identity']['path']} (seeds "
             f"{_format_seeds(written['seeds'])})"]
    lines += [f"  wrote {path}" for path in (written["npz"], written["out"]) if path is not None]
    lines += [f"  {name}: {value:.6g}" for name, value in written["metrics"].items()]
    if written["metric_note"]:
        lines.append(f"  ({written['metric_note']})")
    summary(lines)


if __name__ == "__main__":
    main()
