"""cmt-encode: encode an image set once through a VAE into a latent set (zarr shards of posterior moments).

    cmt-encode --source imagenet-512.zip --out latents/ --vae stabilityai/sd-vae-ft-mse --scaling edm2
    cmt-encode --source train/ --resolution 256 --resize adm --scaling sd --flips --out latents/   # MeanFlow's
    accelerate launch -m cmt.cli.encode --source ... --out latents/                   # ranks split the shards

The options are the keywords of `cmt.builders.encode.encode_dataset`, with its defaults. The set is
then `--data latents/` for cmt-train diffusion / post and cmt-eval, and `cmt-inspect latents/`.
"""
import click

from cmt.builders.encode import DEFAULTS, STORAGE_DTYPES, encode_dataset
from cmt.cli.common import CONTEXT_SETTINGS, translate_errors
from cmt.datasets.images import RESIZES
from cmt.formats import COMPRESSIONS
from cmt.latents import SCALINGS


def _workers(value):
    return value if value == "auto" else int(value)


@click.command(context_settings=CONTEXT_SETTINGS)
@click.option("--source", required=True, help="The images: a folder, an EDM dataset .zip or an .npz.")
@click.option("--out", required=True, help="Output directory (resumable: re-run the same command after a crash).")
@click.option("--vae", default=DEFAULTS["vae"], metavar="DIR_OR_HUB_ID",
              help="The diffusers AutoencoderKL: a local directory or a hub id.")
@click.option("--scaling", type=click.Choice(list(SCALINGS)), default=DEFAULTS["scaling"],
              help="edm2: EDM2's per-channel statistics, the VAE on [0, 1] pixels; sd: x 0.18215, the VAE on "
                   "[-1, 1] pixels (MeanFlow's).")
@click.option("--resolution", type=click.IntRange(min=8), default=DEFAULTS["resolution"],
              help="Bring every image to this size first [default: as they are].")
@click.option("--resize", type=click.Choice(list(RESIZES)), default=DEFAULTS["resize"],
              help="How --resolution is reached: center-crop (EDM's dataset tool) or adm (ADM's, ImageNet).")
@click.option("--flips/--no-flips", default=DEFAULTS["flips"],
              help="Also encode every image mirrored left-right (training draws one of the two at random).")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULTS["batch_size"], help="Images per VAE call.")
@click.option("--shard-size", type=click.IntRange(min=1), default=DEFAULTS["shard_size"], help="Images per shard.")
@click.option("--dtype", type=click.Choice(list(STORAGE_DTYPES)), default=DEFAULTS["dtype"],
              help="Stored moments.")
@click.option("--compression", type=click.Choice(list(COMPRESSIONS)), default=DEFAULTS["compression"],
              help="Blosc codec of the shards (the moments are noise-like: lz4 saves ~5%).")
@click.option("--workers", default=DEFAULTS["workers"], type=_workers,
              help="Image decoding processes: auto (every core but one) or a number.")
@click.option("--device", default=DEFAULTS["device"], help="The VAE's device [default: cuda if available].")
@click.option("--progress/--no-progress", default=DEFAULTS["progress"])
@translate_errors
def main(**options):
    """Encode an image set through a VAE into a latent set (what cmt-train and cmt-eval take as --data)."""
    encode_dataset(**options, log=click.echo)


if __name__ == "__main__":
    main()
