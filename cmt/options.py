"""Options declared once: a keyword's default, its type and range, and its help text.

A library function whose options live in a table (a post-training method's, `cmt.trainers.methods`)
declares each as an `Option`; the library checks a value with `Option.check` (an `ArgumentError`
naming the keyword, before anything is written), and the command builds its click option from the
same record (`cmt.cli.common.click_option`), so the prose and the limits are written once.
"""
import dataclasses
import math
from typing import Any

from cmt.errors import ArgumentError


@dataclasses.dataclass(frozen=True)
class Option:
    """One keyword: `default`, `help` (one or two sentences, as `--help` shows them), `type` (float,
    int, str or bool), `choices` (for str), bounds `low` / `high` (open when `low_open` /
    `high_open`); `None` is a valid value when the default is None."""
    default: Any
    help: str
    type: type = float
    choices: tuple = None
    low: float = None
    high: float = None
    low_open: bool = False
    high_open: bool = False

    def check(self, name, value):
        """`value` as this option's type (an int given for a float is converted), or an
        ArgumentError naming `name` that says what is expected."""
        if value is None and self.default is None:
            return None
        if self.choices is not None:
            if value not in self.choices:
                raise ArgumentError(name, f"{value!r} is not one of {', '.join(map(str, self.choices))}")
            return value
        if self.type is bool:
            if not isinstance(value, bool):
                raise ArgumentError(name, f"must be True or False, got {value!r}")
            return value
        if self.type is str:
            if not isinstance(value, str):
                raise ArgumentError(name, f"must be a string, got {value!r}")
            return value
        wanted = "an integer" if self.type is int else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (self.type is int and not float(value).is_integer()) or math.isnan(value):
            raise ArgumentError(name, f"must be {wanted}{self.range_text()}, got {value!r}")
        value = self.type(value)
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            raise ArgumentError(name, f"must be {wanted}{self.range_text()}, got {value!r}")
        return value

    def range_text(self):
        """" in [0, 1)", " > 1", "" ..."""
        if self.low is not None and self.high is not None:
            return f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f" {'<' if self.high_open else '<='} {self.high:g}"
        return ""


def differences(old, new, prefix="", missing="(not set)"):
    """`[(dotted name, old value, new value)]` of every key whose value differs between two option
    dicts (nested dicts compared key by key); a key that one side lacks has the value `missing`
    there. Where a run's options are compared with the saved ones (resume, a build folder)."""
    found = []
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name, missing), new.get(name, missing)
        if isinstance(before, dict) and isinstance(after, dict):
            found += differences(before, after, f"{prefix}{name}.", missing)
        elif before != after:
            found.append((f"{prefix}{name}", before, after))
    return found
