"""Options declared once: a keyword's default, its type and range, and its help text.

A library function whose options live in a table (a post-training method's, `cmt.trainers.methods`)
declares each as an `Option`; the library checks a value with `Option.check` (an `ArgumentError`
naming the keyword, before anything is written), and the command builds its click option from the
same record (`cmt.cli.common.click_option`), so the prose and the limits are written once.

The keywords every entry point shares (`max_steps`, `lr`, `seed`, `out`, `nfe`, ...) mean the same
everywhere, so their types and ranges are declared once too (`KEYWORDS`); `checked_keywords`
checks a call's keywords against that table before the function runs, so a call that is refused
writes nothing (`build_trajectories(num_trajectories=16.5)` used to record 16.5 first).
"""
import dataclasses
import functools
import inspect
import math
import numbers
import os
import textwrap
from typing import Any

from cmt.errors import ArgumentError


@dataclasses.dataclass(frozen=True)
class Option:
    """One keyword: `default`, `help` (one or two sentences, as `--help` shows them), `type` (float,
    int, str or bool), `choices` (for str), bounds `low` / `high` (open when `low_open` /
    `high_open`); `None` is a valid value when the default is None. type `os.PathLike`: a path, a
    `str` or an `os.PathLike` (kept as given). Numbers must be finite (numpy scalars are numbers).
    `words`: strings a number option also takes (guidance's "none" and "manifest")."""
    default: Any
    help: str
    type: type = float
    choices: tuple = None
    low: float = None
    high: float = None
    low_open: bool = False
    high_open: bool = False
    words: tuple = ()

    def check(self, name, value):
        """`value` as this option's type (an int given for a float is converted), or an
        ArgumentError naming `name` that says what is expected."""
        if value is None and self.default is None:
            return None
        if isinstance(value, str) and value in self.words:
            return value
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
        if self.type is os.PathLike:
            if not isinstance(value, (str, os.PathLike)):
                raise ArgumentError(name, f"must be a path (a str or pathlib.Path), got {value!r}")
            return value
        wanted = ("an integer" if self.type is int else "a number") + self.range_text() + \
            (f" or one of {', '.join(map(repr, self.words))}" if self.words else "")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or \
                (self.type is int and not float(value).is_integer()):
            raise ArgumentError(name, f"must be {wanted}, got {value!r}")
        value = self.type(value)
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        above = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if below or above:
            raise ArgumentError(name, f"must be {wanted}, got {value!r}")
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


# ---- the keywords the entry points share ------------------------------------------------------

def _keyword(kind, low=None, high=None, low_open=False, high_open=False):
    return Option(None, "", kind, low=low, high=high, low_open=low_open, high_open=high_open)


_COUNTS = ("max_steps", "batch_size", "lr_ref_steps", "grad_accum", "log_every", "ckpt_every", "nfe",
           "num_trajectories", "shard_size", "steps", "sample_steps", "eval_steps", "preview_count", "channels",
           "num_blocks", "resolution", "max_trajectories", "stage_every")
_NON_NEGATIVE_INTEGERS = ("seed", "warmup_steps", "sample_every", "snapshot_every", "max_nonfinite_steps",
                          "num_samples", "step", "stage")
_POSITIVE_NUMBERS = ("lr", "sigma_min", "sigma_max", "rho", "mid_sigma", "p_std", "grad_clip")
_NON_NEGATIVE_NUMBERS = ("cache_gb", "weight_decay", "ema_halflife_images", "ema_rampup_ratio")
_SHARES = ("dropout", "label_dropout", "velocity_share")
_PATHS = ("out", "npz", "ckpt", "teacher_ckpt", "guide_ckpt", "detector", "ref", "ref_stats")
_SWITCHES = ("resume", "tensorboard", "progress", "cond", "uncertainty", "flips", "fid", "fd_dinov2", "stats",
             "eval_teacher", "metric")

# keyword -> its type and range wherever it appears (a function may narrow the range further).
KEYWORDS = {
    **{name: _keyword(int, low=1) for name in _COUNTS},
    **{name: _keyword(int, low=0) for name in _NON_NEGATIVE_INTEGERS},
    **{name: _keyword(float, low=0, low_open=True) for name in _POSITIVE_NUMBERS},
    **{name: _keyword(float, low=0) for name in _NON_NEGATIVE_NUMBERS},
    **{name: _keyword(float, low=0, high=1) for name in _SHARES},
    "ema_beta": _keyword(float, low=0, high=1, high_open=True),
    "p_mean": _keyword(float),
    # a weight, or post_train's words for the frozen teacher's: unguided, or as the mid checkpoint records
    "guidance": dataclasses.replace(_keyword(float, low=0), words=("none", "manifest")),
    **{name: _keyword(os.PathLike) for name in _PATHS},
    **{name: _keyword(bool) for name in _SWITCHES},
}


def check_keywords(values):
    """`values` (keyword -> value) with each keyword of `KEYWORDS` checked and converted (`Option.check`:
    2.0 for an integer is 2); None passes (it means "the default" throughout); an ArgumentError
    names the first keyword that is wrong."""
    return {name: value if value is None or name not in KEYWORDS else KEYWORDS[name].check(name, value)
            for name, value in values.items()}


def checked_keywords(function):
    """Decorator for an entry point: its keyword arguments go through `check_keywords` before it runs."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        return function(*args, **check_keywords(kwargs))
    return wrapper


# ---- keyword prose written once ------------------------------------------------------------------

KEYWORDS_HEADING = "Keywords (the command's flags are these names with - for _; the same text is their --help):"


def document_keywords(table, *more):
    """Decorator: append `table` (keyword -> one or two sentences) to the function's docstring with
    each keyword's default from the signature, then each of `more`, `(heading, table, defaults)`
    (the shared trainer options behind `**train_options`). The tables are also what the command's
    click options show as their help (`cmt.cli`), so an option's prose is written once and
    `help(cmt.mid_train)` says what `cmt-train mid --help` says."""
    def decorate(function):
        signature_defaults = {name: parameter.default for name, parameter in
                              inspect.signature(function).parameters.items()
                              if parameter.default is not inspect.Parameter.empty}
        lines = []
        for heading, texts, defaults in ((KEYWORDS_HEADING, table, signature_defaults), *more):
            lines += ["", f"    {heading}"]
            lines += [textwrap.fill(text, 100, initial_indent=f"      {name}"
                                    f"{f'={defaults[name]!r}' if name in defaults else ''}: ",
                                    subsequent_indent=" " * 8, break_on_hyphens=False)
                      for name, text in texts.items() if texts is table or name not in table]
        function.__doc__ = (function.__doc__ or "").rstrip() + "\n" + "\n".join(lines) + "\n"
        return function
    return decorate


def written_docstring(function):
    """The hand-written part of a docstring that `document_keywords` extended (what a test reads to
    hold the prose to one place)."""
    return (function.__doc__ or "").split(KEYWORDS_HEADING)[0]
