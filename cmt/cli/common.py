"""What every command shares: turning library errors into one-line flag messages."""
from __future__ import annotations

import errno
import functools
import os
from pathlib import Path

import click

from cmt.errors import ArgumentError, CmtError


def flag_for(argument: str, ctx: click.Context | None = None) -> str:
    """The command-line spelling of a library keyword argument (`max_steps` -> `--max-steps`)."""
    ctx = ctx or click.get_current_context(silent=True)
    if ctx is not None:
        for param in ctx.command.params:
            if param.name == argument and param.opts:
                return max(param.opts, key=len)
    return "--" + argument.replace("_", "-")


def debugging() -> bool:
    """`CMT_DEBUG=1` in the environment: let every error through with its traceback."""
    return os.environ.get("CMT_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


# OSErrors that are the machine's or the user's doing, not a bug, when they name a file.
_FILE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                errno.EROFS: "read-only file system", errno.ENOENT: "no such file or directory",
                errno.EEXIST: "cannot create it, something of that name exists", errno.ENOTDIR: "not a directory",
                errno.EISDIR: "is a directory", errno.ENAMETOOLONG: "file name too long"}


def file_error_message(error: OSError) -> str | None:
    """One line for an OSError that names its file (or is a full disk), else None (a bug). Errors
    outside `_FILE_ERRNOS` that name a file (an I/O error of the disk, ...) read as the OS says them."""
    if error.errno is None or (error.filename is None and error.errno not in (errno.ENOSPC, errno.EDQUOT)):
        return None
    what = _FILE_ERRNOS.get(error.errno) or (error.strerror or os.strerror(error.errno)).lower()
    where = f": {error.filename}" if error.filename is not None else ""
    return f"{what}{where}"


def translate_errors(command):
    """Decorator for a click callback: `ArgumentError(argument, message)` becomes
    `click.BadParameter(message, param_hint=--flag)` (exit 2, one line, no traceback); a `CmtError`
    (a bad file, a missing optional package, a stopped run) prints its message and exits with its
    `exit_code`; an OSError naming a file (full disk, permission denied, ...) prints one line and
    exits 1. With `CMT_DEBUG=1` these keep their tracebacks too."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ArgumentError as error:
            if debugging():
                raise
            raise click.BadParameter(error.message, param_hint=flag_for(error.argument)) from None
        except CmtError as error:
            if debugging():
                raise
            fail(str(error), error.exit_code)
        except OSError as error:
            message = file_error_message(error)
            if message is None or debugging():
                raise
            fail(message, 1)
        except Exception as error:
            if not _from_object_storage(error) or debugging():
                raise
            fail(f"object storage: {type(error).__name__}: {error} (s3://: see the README, \"Object storage\")", 1)
    return wrapper


def _from_object_storage(error: Exception) -> bool:
    """An error of the S3 client (no credentials, no endpoint, access denied): the setup, not a bug."""
    return any(cls.__module__.split(".")[0] in ("botocore", "aiobotocore") for cls in type(error).__mro__)


def fail(message: str, exit_code: int = 1):
    """Print `Error: message` to stderr and exit with `exit_code` (click's own format)."""
    exception = click.ClickException(message)
    exception.exit_code = exit_code
    raise exception from None


# ---- one vocabulary: earlier spellings of an option stay accepted, unlisted ----------------------

# Every command's context settings: -h as well as --help, and every default shown in --help.
CONTEXT_SETTINGS = {"show_default": True, "help_option_names": ["-h", "--help"]}


class WithAliases(click.Option):
    """An option whose first name is its name and whose other names are earlier spellings (e.g.
    `--num-samples` and the old `--num`): all are accepted, --help lists the first only."""

    def get_help_record(self, ctx):
        names, self.opts = self.opts, self.opts[:1]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = names


def summary(lines):
    """The closing lines of a command: what it wrote and its key figures (rank 0 only, under
    accelerate launch)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    for line in lines:
        click.echo(line)


def run_summary(command, result):
    """The closing lines of a training command: its files and its last logged figures."""
    metrics = dict(result.get("metrics") or {})
    step = metrics.pop("step", None)
    lines = [f"{command}: done" + (f" at step {step}" if step is not None else "") + f", in {result['out']}"]
    for key in ("model", "checkpoint", "state", "log"):
        if result.get(key) is not None:
            lines.append(f"  wrote {result[key]}")
    figures = [f"{name} {value:.5g}" for name, value in metrics.items()
               if isinstance(value, float) and name not in ("lr", "sec_per_step", "grad_norm")]
    if figures:
        lines.append("  final " + ", ".join(figures))
    snapshots = sorted((Path(result["out"]) / "snapshots").glob("snapshot-*.safetensors"))
    if snapshots:
        lines.append(f"  kept {len(snapshots)} EMA snapshots in {snapshots[0].parent} (last {snapshots[-1].name})")
    return lines


def click_type(option):
    """The click type of a `cmt.options.Option` (its choices or its range)."""
    if option.choices is not None:
        return click.Choice(option.choices)
    if option.type in (int, float) and (option.low is not None or option.high is not None):
        range_type = click.IntRange if option.type is int else click.FloatRange
        return range_type(min=option.low, max=option.high, min_open=option.low_open, max_open=option.high_open)
    return option.type


def table_options(owners_of):
    """Click options for keywords declared in tables (`cmt.options.Option`): `owners_of` maps each
    keyword to `{owner name: Option}` (e.g. the post-training methods that take it). The default is
    None, so a keyword left out is the owner's own default; the help says whose option it is and
    each owner's default."""
    def decorate(command):
        for name, owners in reversed(list(owners_of.items())):
            first = next(iter(owners.values()))
            helps = {option.help for option in owners.values()}
            defaults = "; ".join(f"{owner}: {option.default}" for owner, option in owners.items())
            text = (f"{', '.join(owners)}: {first.help}" if len(helps) == 1 else
                    " ".join(f"{owner}: {option.help}" for owner, option in owners.items()))
            command = click.option("--" + name.replace("_", "-"), name, type=click_type(first), default=None,
                                   help=f"{text} [default: {defaults}]")(command)
        return command
    return decorate
