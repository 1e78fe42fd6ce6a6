"""The error types for a user's mistake and for a run that stops on purpose.

Library functions raise `ArgumentError` (a `ValueError`) naming the keyword argument that is wrong;
the click commands in `cmt.cli` turn it into a message naming the matching flag. The others below
carry a complete one-line message (naming the file, or the step); the commands print it and exit
with `exit_code`. An `OSError` naming a file (no space left, permission denied, ...) is reported the
same way. Anything else that escapes is a bug and keeps its traceback.
"""
from __future__ import annotations


class ArgumentError(ValueError):
    """A bad value for the keyword argument `argument` of a library function (or a file it names).

    `str(error)` reads "argument: message"; `error.message` is the message alone.
    """

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument}: {message}")
        self.argument = argument
        self.message = message


class InapplicableOption(ArgumentError):
    """An option set to a value other than its default where it does not apply, `because` of the
    value of another keyword (huber_c under loss lpips). A recipe's value of it is left out when the
    caller chose `because` (`cmt.trainers.recipes.with_recipe`); one the caller gave is refused."""

    def __init__(self, argument: str, message: str, because: str):
        super().__init__(argument, message)
        self.because = because


class CmtError(Exception):
    """A failure that is not a bug: `str(error)` is the whole message; a command exits `exit_code`."""
    exit_code = 1


class FileFormatError(CmtError, ValueError):
    """A file that is empty, truncated, foreign, refused (a pickle that could run code) or has
    missing or mistyped fields; the message names the file (and the field)."""


class ShardError(FileFormatError):
    """A trajectory or latent shard that is missing, truncated or corrupt (or of an unknown format);
    the message names it."""


class MissingDependency(CmtError, ImportError):
    """An optional package a feature needs; the message says how to install it."""


class TrainingStopped(CmtError, RuntimeError):
    """Training stopped before max_steps on purpose: diverged (exit 1), or a signal (SIGINT: exit
    130, SIGTERM: exit 143) after saving a resumable training-state.pt."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class PeerFailed(CmtError, RuntimeError):
    """Another process of a multi-process run failed (its own message says why): this one stops
    quietly (the commands print nothing for it)."""


class EvaluationFailed(CmtError, RuntimeError):
    """Training finished and its model is saved, but sampling or scoring it failed."""


class NonFiniteSamples(CmtError, ValueError):
    """A network produced NaN or inf samples (diverged or broken weights); nothing was plotted or scored."""


def local_path_only(argument: str, value) -> None:
    """ArgumentError naming `argument` if `value` is a URL (`s3://...`): this output is a local path
    (pathlib would quietly turn `s3://b/x` into the local folder `s3:/b/x`)."""
    text = str(value)
    scheme = text.split(":", 1)[0]
    if ":" in text and len(scheme) > 1 and scheme.replace("+", "").replace("-", "").replace(".", "").isalnum() \
            and text[len(scheme) + 1:].startswith("/"):
        raise ArgumentError(argument, f"{text} is a URL; this output is written to a local path (copy it to "
                                      "object storage afterwards)")
