"""`python -m cmt.cli.demo`: the whole pipeline on built-in data (`cmt.demo.run_demo`)."""
from pathlib import Path

import click

from cmt.cli.common import CONTEXT_SETTINGS, WithAliases, translate_errors
from cmt.demo import DATA_CHOICES, DEFAULTS, run_demo

PER_DATA = "[default: per data]"


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path(DEFAULTS["out"]),
              help="Demo folder: shards/, mid/, post/, samples/, report.md.")
@click.option("--data", type=click.Choice(DATA_CHOICES), default=DEFAULTS["data"],
              help="A built-in data set with a built-in teacher.")
@click.option("--train-teacher", is_flag=True, default=DEFAULTS["train_teacher"],
              help="Pre-train the teacher here with the built-in one's recipe instead of reusing it "
                   "(MNIST: ~12 CPU minutes).")
@click.option("--num-trajectories", "--trajectories", "num_trajectories", cls=WithAliases, type=int,
              default=DEFAULTS["num_trajectories"], help=f"Teacher trajectories {PER_DATA}.")
@click.option("--mid-steps", type=int, default=DEFAULTS["mid_steps"], help=f"Mid-training steps {PER_DATA}.")
@click.option("--post-steps", type=int, default=DEFAULTS["post_steps"], help=f"Post-training steps {PER_DATA}.")
@click.option("--batch-size", type=int, default=DEFAULTS["batch_size"],
              help=f"Mid- and post-training batch {PER_DATA}.")
@click.option("--num-samples", "--eval-num", "num_samples", cls=WithAliases, type=int, default=DEFAULTS["num_samples"],
              help=f"Samples per model for the metrics (at least 20) {PER_DATA}.")
@click.option("--seed", type=int, default=DEFAULTS["seed"])
@click.option("--threads", type=int, default=DEFAULTS["threads"],
              help="torch threads [default: torch's, one per core].")
@click.option("--fresh", is_flag=True, default=DEFAULTS["fresh"],
              help="Start over: remove the stages of an earlier run in --out.")
@click.option("--progress/--no-progress", default=DEFAULTS["progress"])
@translate_errors
def main(**options):
    """Run the whole pipeline on built-in data (teacher, trajectories, mid-training, ECT post-training,
    1- and 2-step samples, metrics) and write OUT/report.md."""
    result = run_demo(**options, log=click.echo)
    click.echo(result["report"].read_text())
    click.echo(f"[demo] done in {result['wall_s']:.0f} s ({result['cpu_s']:.0f} CPU s): {result['report']}")


if __name__ == "__main__":
    main()
