"""The one error type for a user's mistake.

Library functions raise `ArgumentError` (a `ValueError`) naming the keyword argument that is wrong;
the click commands in `cmt.cli` turn it into a message naming the matching flag. Anything else that
escapes is a bug and keeps its traceback.
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
