"""cmt-encode: encode an image set once through a VAE into a latent set (zarr shards of posterior moments).

    cmt-encode --source imagenet-512.zip --out latents/ --vae stabilityai/sd-vae-ft-mse --scaling edm2
    cmt-encode --source train/ --resolution 256 --resize adm --scaling sd --flips --out latents/   # MeanFlow's
    accelerate launch -m cmt.cli.encode --source ... --out latents/                   # ranks split the shards

The options are the keywords of `cmt.builders.encode.encode_dataset`, with its defaults. The set is
then `--data latents/` for cmt-train diffusion / post and cmt-eval, and `cmt-inspect latents/`.
"""
import click

from cmt.builders.encode import DEFAULTS, ENCODE_HELP as HELP, STORAGE_DTYPES, encode_dataset
from cmt.cli.common import CONTEXT_SETTINGS, translate_errors
from cmt.datasets.images import RESIZES
from cmt.formats import COMPRESSIONS
from cmt.latents import SCALINGS


def _workers(value):
    return value if value == "auto" else int(value)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--source", required=True, help=HELP["source"])
@click.option("--out", required=True, help=HELP["out"])
@click.option("--vae", default=DEFAULTS["vae"], metavar="DIR_OR_HUB_ID", help=HELP["vae"])
@click.option("--scaling", type=click.Choice(list(SCALINGS)), default=DEFAULTS["scaling"], help=HELP["scaling"])
@click.option("--resolution", type=click.IntRange(min=8), default=DEFAULTS["resolution"], help=HELP["resolution"])
@click.option("--resize", type=click.Choice(list(RESIZES)), default=DEFAULTS["resize"], help=HELP["resize"])
@click.option("--flips/--no-flips", default=DEFAULTS["flips"], help=HELP["flips"])
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULTS["batch_size"], help=HELP["batch_size"])
@click.option("--shard-size", type=click.IntRange(min=1), default=DEFAULTS["shard_size"], help=HELP["shard_size"])
@click.option("--dtype", type=click.Choice(list(STORAGE_DTYPES)), default=DEFAULTS["dtype"], help=HELP["dtype"])
@click.option("--compression", type=click.Choice(list(COMPRESSIONS)), default=DEFAULTS["compression"],
              help=HELP["compression"])
@click.option("--workers", default=DEFAULTS["workers"], type=_workers, help=HELP["workers"])
@click.option("--device", default=DEFAULTS["device"], help=HELP["device"])
@click.option("--progress/--no-progress", default=DEFAULTS["progress"], help=HELP["progress"])
@translate_errors
def main(**options):
    """Encode an image set through a VAE into a latent set (what cmt-train and cmt-eval take as --data)."""
    encode_dataset(**options, log=click.echo)


if __name__ == "__main__":
    main()
