"""Post-training methods as a table: what a method provides, so that `post_train` names none.

A method is one module (`cmt.trainers.ect`: ECT and ECD; `cmt.trainers.meanflow`: MeanFlow) that
defines a `PostMethod`; `cmt.trainers.post.METHODS` lists them, one line each. Adding a method is
its module and that line (docs/design.md, "How to add a post-training method"); the command's
options, `help(cmt.post_train)` and the option checks come from the table.
"""
import dataclasses
from typing import Callable, Mapping, Optional

import torch

from cmt.options import Option


@dataclasses.dataclass
class MethodSetup:
    """What a method's `build` gets: its options resolved (`PostMethod.prepare` applied), the student
    (built from the init, on the CPU), the frozen teacher it asked for (`PostMethod.teacher`), else
    None, the run's length, and the record of how the student will be sampled
    (`cmt.sampling.student_sampler`; None: the default one of `PostMethod.sampler`)."""
    options: dict
    student: torch.nn.Module
    teacher: Optional[torch.nn.Module]
    max_steps: int
    sampler: Optional[dict] = None


def _no_teacher(options):
    return None


def _as_given(options, init_record, max_steps):
    return dict(options)


def _no_check(options, student):
    return None


@dataclasses.dataclass(frozen=True)
class PostMethod:
    """A post-training method.

    name, summary: its `--method` value and one line about it.
    options: its own keywords of `post_train` (`cmt.options.Option`: default, type, range, help).
    student: the student's network config from the init's (a consistency boundary form, a flow-map
        input, ...); the weights are the init's.
    sampler: how its students are sampled (`cmt.sampling.STUDENT_SAMPLERS`), saved with them.
    build: `(MethodSetup) -> objective(net, batch, ctx)`, the shared trainer's objective.
    residual: what its loss resolves, for the precision guard's message (a half precision is refused).
    teacher: `(options) -> why it needs a frozen diffusion teacher with these options, or None`.
    prepare: `(options, init_record, max_steps) -> options` resolved from the init (its file's
        record, `cmt.checkpoint.network_record`) and the run's length; what changed is recorded.
    check: `(options, student) -> None`, raising `ArgumentError` for options the student cannot take.
    record: `(options) -> {name: value}` this method adds to the student's record.
    follows_guidance: its frozen teacher takes the guidance that the init's dataset manifest records
        (the flow map mid-training fitted) unless `guidance` is given ("none": unguided).
    probe: `(MethodSetup, batch, generator) -> (x, sigma, labels, residual, what)`: the inputs of the
        network whose output difference the loss resolves and that residual (`what` names it), for
        the TF32 guard (`cmt.trainers.precision`); None: the loss resolves no small residual.
    """
    name: str
    summary: str
    options: Mapping[str, Option]
    student: Callable[[dict], dict]
    sampler: str
    build: Callable[[MethodSetup], Callable]
    residual: str
    teacher: Callable[[dict], Optional[str]] = _no_teacher
    prepare: Callable[[dict, dict, int], dict] = _as_given
    check: Callable[[dict, torch.nn.Module], None] = _no_check
    record: Callable[[dict], dict] = lambda options: {}
    follows_guidance: bool = False
    probe: Optional[Callable] = None

    def defaults(self):
        return {name: option.default for name, option in self.options.items()}
