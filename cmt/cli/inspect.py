"""cmt-inspect: summarise, verify, preview and measure a trajectory dataset made by cmt-build.

    cmt-inspect shards/                      # teacher, solver, grid, count, shapes, bytes, compression
    cmt-inspect shards/ --verify             # every checksum, decode and NaN/inf scan; exit 1 on a fault
    cmt-inspect shards/ --stats              # per state: mean / std against what its sigma predicts
    cmt-inspect shards/ --preview traj.png   # rows are trajectories, columns states (scatter for 2-D)
    cmt-inspect shards/ --preview traj.png --vae stabilityai/sd-vae-ft-mse   # latent sets: decoded
    cmt-inspect shards/ --json               # the same as one JSON document

The options are the keywords of `cmt.builders.inspect.inspect_trajectories`, with its defaults.
"""
import inspect
import json
import sys

import click

from cmt.builders.inspect import INSPECT_HELP as HELP, inspect_trajectories
from cmt.cli.common import CONTEXT_SETTINGS, translate_errors
from cmt.errors import ArgumentError
from cmt.formats import ShardError
from cmt.manifest import DATASET_NAME

DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(inspect_trajectories).parameters.items()}


def print_latent_report(report):
    info, encoder = report["summary"], report["summary"]["encoder"]
    click.echo(f"{info['path']}  ({info['format']} shards, {info['dataset']} version {info['dataset_version']})")
    click.echo(f"  source    {info['source']['path']} ({info['source']['count']} images "
               f"{info['source']['data_shape']})")
    click.echo(f"  vae       {encoder['vae_name']} (sha256 {str(encoder['vae_sha256'])[:12]}), {encoder['scaling']} "
               f"scaling, pixels in {encoder['pixel_range']}")
    click.echo(f"  count     {info['count']} items in {info['shards']} shards; {info['label_dim']} classes; "
               f"flips {'stored' if info['flips'] else 'none'}")
    for name, shape in info["arrays"].items():
        click.echo(f"  {name:<9} {shape} {info['dtype']}")
    click.echo(f"  on disk   {info['bytes_on_disk']:,} bytes, {info['bytes_per_item']:.1f} bytes per item; "
               f"compression {info['compression']} ({info['compression_ratio']:.2f}x)")


def print_report(report):
    if report["summary"].get("dataset") == "cmt-latents":
        print_latent_report(report)
        _print_tail(report, "all checksums match")
        return
    info = report["summary"]
    teacher = info["teacher"]
    click.echo(f"{info['path']}  ({info['format']} shards, {DATASET_NAME} version {info['dataset_version']})")
    click.echo(f"  teacher   {teacher.get('name') or teacher.get('path')} ({teacher.get('kind')}, "
               f"{teacher.get('architecture')}, sha256 {str(teacher.get('sha256'))[:12]})")
    click.echo(f"  solver    {info['solver']}, nfe {info['nfe']}, {info['grid']} grid from sigma {info['sigma_max']:g} "
               f"to {info['sigma_min']:g} ({len(info['sigmas'])} sigmas)")
    click.echo(f"  kept      {len(info['kept_states'])} states {info['kept_states']}")
    click.echo("  sigmas    " + ", ".join(f"{sigma:.4g}" for sigma in info["kept_sigmas"]))
    labels = "none" if info["labels"] is None else info["labels"]
    click.echo(f"  count     {info['count']} trajectories in {info['shards']} shards; seed {info['seed']}; "
               f"labels {labels} ({info['label_dim']} classes)")
    for name, shape in info["shapes"].items():
        click.echo(f"  {name:<9} {shape} {info['dtypes'][name]}")
    click.echo(f"  on disk   {info['bytes_on_disk']:,} bytes, {info['bytes_per_stored_state']:.1f} bytes per stored "
               f"state; compression {info['compression_ratio']:.2f}x, {info['size_vs_float16']:.3f} of raw float16")
    if info["teacher_eval"]:
        metrics = ", ".join(f"{key} {value:.5g}" for key, value in info["teacher_eval"]["metrics"].items())
        click.echo(f"  teacher   baseline on {info['teacher_eval']['data']}: {metrics}")
    if "stats" in report:
        click.echo("  state  sigma      mean   (pred)     std   (pred)  std/pred")
        for row in report["stats"]:
            click.echo(f"  {row['state']:>5} {row['sigma']:>9.4g} {row['mean']:>8.4f} {row['predicted_mean']:>8.4f} "
                       f"{row['std']:>8.4f} {row['predicted_std']:>8.4f} {row['std_ratio']:>8.3f}")
    _print_tail(report, "all checksums match, no NaN/inf")


def _print_tail(report, ok):
    if "preview" in report:
        click.echo(f"  preview   {report['preview']}")
    if "verify" in report:
        checked = report["verify"]
        for fault in checked["faults"]:
            click.echo(f"  FAULT     {fault}", err=True)
        click.echo(f"  verify    {checked['shards']} shards: " + (ok if checked["ok"]
                                                                 else f"{len(checked['faults'])} faults"))


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("path")
@click.option("--verify", is_flag=True, default=DEFAULTS["verify"], help=HELP["verify"])
@click.option("--stats", is_flag=True, default=DEFAULTS["stats"], help=HELP["stats"])
@click.option("--preview", type=click.Path(dir_okay=False), default=DEFAULTS["preview"], help=HELP["preview"])
@click.option("--preview-count", type=int, default=DEFAULTS["preview_count"], show_default=True,
              help=HELP["preview_count"])
@click.option("--vae", default=DEFAULTS["vae"], metavar="DIR_OR_HUB_ID", help=HELP["vae"])
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
@translate_errors
def main(path, verify, stats, preview, preview_count, vae, as_json):
    """Summarise the trajectory dataset (or cmt-encode latent set) at PATH (a directory or fsspec URL)."""
    try:
        report = inspect_trajectories(path, verify=verify, stats=stats, preview=preview, preview_count=preview_count,
                                      vae=vae)
    except ArgumentError as error:
        if error.argument != "path":
            raise
        raise click.ClickException(error.message) from None  # no dataset there: a failure (exit 1), not a usage error
    except ShardError as error:
        raise click.ClickException(f"{error} (run cmt-inspect --verify for every fault)") from None
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        print_report(report)
    if verify and not report["verify"]["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
