"""cmt-convert: an official EDM or EDM2 network pickle -> our .safetensors (`cmt.teachers.convert_checkpoint`)."""
from pathlib import Path

import click

from cmt.cli.common import CONTEXT_SETTINGS, translate_errors
from cmt.teachers import CONVERT_HELP as HELP, convert_checkpoint


@click.command(context_settings=CONTEXT_SETTINGS,
               help=f"Convert SOURCE to OUT.\n\nSOURCE: {HELP['source']}\n\nOUT: {HELP['out']}")
@click.argument("source")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True, help=HELP["overwrite"])
@translate_errors
def main(source, out, overwrite):
    written = convert_checkpoint(source=source, out=out, overwrite=overwrite)
    click.echo(f"wrote {written['out']} ({written['official_class']}, {written['parameters'] / 1e6:.1f}M parameters, "
               f"encoder {written['encoder']['kind']})")


if __name__ == "__main__":
    main()
