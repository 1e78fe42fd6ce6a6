"""cmt-eval: score generated samples against a data set (`cmt.evaluation.evaluate`).

\b
    cmt-eval --samples samples.npz --data toy:checkerboard
    cmt-eval --samples samples.npz --data mnist --json
    cmt-eval --samples samples.npz --data images.zip --fid --detector inception-2015-12-05.pt [--ref refs.npz]
    cmt-eval --samples samples.npz --data images.zip --fd-dinov2 [--ref refs.npz]
    cmt-eval --data images.zip --ref-stats refs.npz --fd-dinov2 [--fid --detector inception-2015-12-05.pt]
    cmt-eval --samples latents.npz --data latents/ --fid --detector inception-2015-12-05.pt   # a cmt-encode set

Toy data: energy distance and sliced Wasserstein against the fixed reference sample. mnist:
FD-MNIST (features of a small MNIST classifier, not Inception FID). --fid: Inception FID, and
--fd-dinov2: EDM2's FD-DINOv2 (DINOv2 ViT-L/14 features), against the --ref statistics, or against
statistics of the --data images when --ref is not given (read a batch at a time). --ref-stats OUT
writes those statistics of the --data images (both metrics in one pass) instead of scoring samples.
A latent set as --data: latent samples, decoded through its VAE (or --vae) first.
Under accelerate launch the ranks share the feature extraction and rank 0 prints.
"""
import inspect
import json

import click

from cmt.cli.common import CONTEXT_SETTINGS, summary, translate_errors
from cmt.evaluation import EVALUATE_HELP as HELP, evaluate

DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(evaluate).parameters.items()}


@click.command(help=__doc__, context_settings=CONTEXT_SETTINGS)
@click.option("--samples", default=DEFAULTS["samples"], type=click.Path(exists=True, dir_okay=False),
              help=HELP["samples"])
@click.option("--data", required=True, help=HELP["data"])
@click.option("--fid", is_flag=True, default=DEFAULTS["fid"], help=HELP["fid"])
@click.option("--detector", default=DEFAULTS["detector"], help=HELP["detector"])
@click.option("--ref", default=DEFAULTS["ref"], help=HELP["ref"])
@click.option("--fd-dinov2", is_flag=True, default=DEFAULTS["fd_dinov2"], help=HELP["fd_dinov2"])
@click.option("--dinov2", default=DEFAULTS["dinov2"], help=HELP["dinov2"])
@click.option("--ref-stats", type=click.Path(dir_okay=False), default=DEFAULTS["ref_stats"], help=HELP["ref_stats"])
@click.option("--vae", default=DEFAULTS["vae"], metavar="DIR_OR_HUB_ID", help=HELP["vae"])
@click.option("--device", default=DEFAULTS["device"], help=HELP["device"])
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@translate_errors
def main(as_json, **options):
    result = evaluate(**options)
    if result["rank"] != 0:   # rank 0 speaks for all
        return
    if "ref_stats" in result:
        if as_json:
            click.echo(json.dumps({"ref_stats": str(result["ref_stats"]), "data": result["data"],
                                   "count": result["count"], "metrics": result["metrics"]}))
        else:
            summary([f"cmt-eval: reference statistics ({', '.join(result['metrics'])}) of {result['count']} images "
                     f"of {result['data']}", f"  wrote {result['ref_stats']}"])
        return
    if result.get("conversion"):
        click.echo(f"cmt-eval: {result['conversion']}", err=True)
    if result.get("metric_note"):
        click.echo(f"cmt-eval: {result['metric_note']}", err=True)
    if as_json:
        click.echo(json.dumps({"samples": str(result["samples"]), "data": result["data"], "count": result["count"],
                               **result["metrics"]}))
    else:
        summary([f"cmt-eval: {result['count']} samples from {result['samples']} vs {result['data']}",
                 *(f"  {name}: {value:.6g}" for name, value in result["metrics"].items())])


if __name__ == "__main__":
    main()
