"""cmt-ema: post-hoc EMA, the EMA of any length rebuilt from a run's power-function EMA snapshots
(EDM2's reconstruct_phema.py); see `cmt.posthoc_ema.reconstruct_ema`.

\b
    cmt-ema --snapshots runs/teacher/snapshots --std 0.13 --out runs/teacher/ema
    cmt-ema --snapshots runs/teacher/snapshots --std 0.03,0.05,0.08,0.1,0.15,0.2 --out ema/ --eval toy:checkerboard

Each std gives ema-NNNNNNN-STD.safetensors in --out, loadable wherever a checkpoint is. --eval DATA
(mnist or toy:NAME) samples and scores every reconstruction (students: --eval-steps flow-map steps,
default 2; diffusion networks: the ODE sampler, default 16 steps), prints the table, and writes
ema-eval.json and ema-eval.png (the metric against the EMA std).
"""
import inspect
from pathlib import Path

import click

from cmt.cli.common import CONTEXT_SETTINGS, summary, translate_errors
from cmt.errors import ArgumentError
from cmt.posthoc_ema import EMA_HELP as HELP, reconstruct_ema

DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(reconstruct_ema).parameters.items()}


def parse_stds(text):
    """`0.05,0.1` -> [0.05, 0.1]; ArgumentError naming --std otherwise."""
    try:
        return [float(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ArgumentError("std", f"expected comma-separated numbers such as 0.05,0.1, got {text!r}") from None


@click.command(help=__doc__, context_settings=CONTEXT_SETTINGS)
@click.option("--snapshots", required=True, type=click.Path(exists=True, path_type=Path), help=HELP["snapshots"])
@click.option("--std", required=True, help=HELP["std"])
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help=HELP["out"])
@click.option("--step", type=click.IntRange(min=1), default=DEFAULTS["step"], help=HELP["step"])
@click.option("--eval-data", "--eval", "eval_data", default=DEFAULTS["eval_data"], help=HELP["eval_data"])
@click.option("--eval-steps", type=click.IntRange(min=1), default=DEFAULTS["eval_steps"], help=HELP["eval_steps"])
@click.option("--mid-sigma", type=click.FloatRange(min=0, min_open=True), default=DEFAULTS["mid_sigma"],
              help=HELP["mid_sigma"])
@click.option("--num-samples", type=click.IntRange(min=2), default=DEFAULTS["num_samples"], help=HELP["num_samples"])
@click.option("--seed", type=click.IntRange(min=0), default=DEFAULTS["seed"], help=HELP["seed"])
@click.option("--device", default=DEFAULTS["device"], help=HELP["device"])
@click.option("--progress/--no-progress", default=DEFAULTS["progress"], help=HELP["progress"])
@translate_errors
def main(std, **options):
    result = reconstruct_ema(std=parse_stds(std), **options)
    lines = [f"cmt-ema: {len(result['models'])} reconstruction(s) at step {result['step']} from "
             f"{len(result['snapshots'])} snapshots, in {result['out']}"]
    lines += [f"  wrote {path.name} (profile fit error {error:.2g})"
              for path, error in zip(result["models"], result["fit_error"])]
    sweep = result["eval"]
    if sweep is not None:
        metric = sweep["metric"]
        lines.append(f"  {sweep['data']}, {sweep['sampler']} {sweep['steps']} steps, {sweep['num_samples']} samples:")
        lines.append(f"  {'std':>7s}  {metric}")
        lines += [f"  {row['std']:7.3f}  {row[metric]:.6g}{'  <- best' if row is sweep['best'] else ''}"
                  for row in sweep["rows"]]
        lines.append(f"  wrote {sweep['table']} and {sweep['plot']}")
        lines.append(f"  best: std {sweep['best']['std']:.3f}, {metric} {sweep['best'][metric]:.6g} "
                     f"({Path(sweep['best']['model']).name})")
    summary(lines)


if __name__ == "__main__":
    main()
