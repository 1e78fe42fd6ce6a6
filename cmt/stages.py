"""Stages of a whole-pipeline run (the demo, the benchmarks): each a call of one of the project's
entry points with its keyword arguments, the file that shows it finished, and the command line that
repeats it by hand (`cmt.flags.command_words`).

`Call.run` makes a call resumable: a finished one (its output there) is not run again, an
interrupted training run continues from its saved state (`resume=True`), and one that started but
saved nothing starts over in an empty folder.
"""
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cmt.flags import command_words
from cmt.trainers.run_files import STATE_FILE


@dataclass
class Call:
    """One stage: `function(**kwargs)`, finished when `output` exists; `program` is the command that
    does the same (`cmt-train mid`, `cmt-build`, ...)."""
    program: str
    function: Callable
    kwargs: dict
    output: Path
    trains: bool = False        # a training run into kwargs["out"], which resume=True continues

    def command(self, **extra):
        """The equivalent command line, as one string."""
        return shlex.join(self.words(**extra))

    def words(self, **extra):
        return command_words(self.program, {**self.kwargs, **extra})

    def resume_options(self):
        """`{"resume": True}` for a training run that saved its state; an empty dict otherwise, after
        clearing the folder of a training run that saved nothing."""
        if not self.trains:
            return {}
        folder = Path(self.kwargs["out"])
        if (folder / STATE_FILE).is_file():
            return {"resume": True}
        if folder.exists():
            shutil.rmtree(folder)   # started, nothing saved: nothing to keep
        return {}

    def run(self, log=print):
        """`(result, wall seconds)`, or `(None, None)` when the output exists already; `log` gets the
        command line first."""
        if Path(self.output).exists():
            return None, None
        extra = self.resume_options()
        log(self.command(**extra))
        start = time.perf_counter()
        result = self.function(**self.kwargs, **extra)
        return result, time.perf_counter() - start
