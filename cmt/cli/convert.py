"""cmt-convert: an official EDM or EDM2 network pickle -> our .safetensors (`cmt.teachers.convert_checkpoint`)."""
from pathlib import Path

import click

from cmt.cli.common import CONTEXT_SETTINGS, translate_errors
from cmt.teachers import convert_checkpoint


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("source")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@translate_errors
def main(source, out, overwrite):
    """Convert an official EDM or EDM2 network pickle (SOURCE: path, URL or preset name) to OUT.safetensors.

    The pickle is read with a restricted unpickler: no code from the file runs; EDM or EDM2 is told
    from the pickled class of its network. Presets and URLs are downloaded into $CMT_CACHE/edm2 or
    $CMT_CACHE/edm (default ~/.cache/cmt/...).
    """
    written = convert_checkpoint(source=source, out=out, overwrite=overwrite)
    click.echo(f"wrote {written['out']} ({written['official_class']}, {written['parameters'] / 1e6:.1f}M parameters, "
               f"encoder {written['encoder']['kind']})")


if __name__ == "__main__":
    main()
