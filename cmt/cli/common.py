"""What every command shares: turning library errors into one-line flag messages."""
from __future__ import annotations

import functools

import click

from cmt.errors import ArgumentError


def flag_for(argument: str, ctx: click.Context | None = None) -> str:
    """The command-line spelling of a library keyword argument (`max_steps` -> `--max-steps`)."""
    ctx = ctx or click.get_current_context(silent=True)
    if ctx is not None:
        for param in ctx.command.params:
            if param.name == argument and param.opts:
                return max(param.opts, key=len)
    return "--" + argument.replace("_", "-")


def translate_errors(command):
    """Decorator for a click callback: `ArgumentError(argument, message)` becomes
    `click.BadParameter(message, param_hint=--flag)` (exit 2, one line, no traceback)."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ArgumentError as error:
            raise click.BadParameter(error.message, param_hint=flag_for(error.argument)) from None
    return wrapper
