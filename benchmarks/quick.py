"""The `--quick` option the benchmark scripts share: small sizes as defaults, unless given."""
import click


def quick_option(sizes):
    """A `--quick` flag that makes `sizes` (option name: value) the defaults of the other options."""
    def callback(ctx, param, value):
        if value:
            ctx.default_map = {**sizes, **(ctx.default_map or {})}
    return click.option("--quick", is_flag=True, is_eager=True, expose_value=False, callback=callback,
                        help="Small sizes (" + ", ".join(f"{key}={value}" for key, value in sizes.items())
                             + ") unless given.")
