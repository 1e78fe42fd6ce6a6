"""`python -m cmt.cli.demo`: the whole pipeline on built-in data (`cmt.demo.run_demo`)."""
from pathlib import Path

import click

from cmt.cli.common import CONTEXT_SETTINGS, WithAliases, translate_errors
from cmt.demo import DATA_CHOICES, DEFAULTS, DEMO_HELP as HELP, run_demo


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path(DEFAULTS["out"]),
              help=HELP["out"])
@click.option("--data", type=click.Choice(DATA_CHOICES), default=DEFAULTS["data"], help=HELP["data"])
@click.option("--train-teacher", is_flag=True, default=DEFAULTS["train_teacher"], help=HELP["train_teacher"])
@click.option("--num-trajectories", "--trajectories", "num_trajectories", cls=WithAliases, type=int,
              default=DEFAULTS["num_trajectories"], help=HELP["num_trajectories"])
@click.option("--mid-steps", type=int, default=DEFAULTS["mid_steps"], help=HELP["mid_steps"])
@click.option("--post-steps", type=int, default=DEFAULTS["post_steps"], help=HELP["post_steps"])
@click.option("--batch-size", type=int, default=DEFAULTS["batch_size"], help=HELP["batch_size"])
@click.option("--num-samples", "--eval-num", "num_samples", cls=WithAliases, type=int, default=DEFAULTS["num_samples"],
              help=HELP["num_samples"])
@click.option("--seed", type=int, default=DEFAULTS["seed"], help=HELP["seed"])
@click.option("--threads", type=int, default=DEFAULTS["threads"], help=HELP["threads"])
@click.option("--fresh", is_flag=True, default=DEFAULTS["fresh"], help=HELP["fresh"])
@click.option("--progress/--no-progress", default=DEFAULTS["progress"], help=HELP["progress"])
@translate_errors
def main(**options):
    """Run the whole pipeline on built-in data (teacher, trajectories, mid-training, ECT post-training,
    1- and 2-step samples, metrics) and write OUT/report.md."""
    result = run_demo(**options, log=click.echo)
    click.echo(result["report"].read_text())
    click.echo(f"[demo] done in {result['wall_s']:.0f} s ({result['cpu_s']:.0f} CPU s): {result['report']}")


if __name__ == "__main__":
    main()
