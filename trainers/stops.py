"""How a training run stops before its end without losing what it trained: signals, allocation
failures, a failed peer process. The loop (`cmt.trainers.loop`) decides what to save; this module
says what happened.

- Signals (`StopSignals`): the first SIGINT / SIGTERM asks the run to stop. Where the loop has said the
  weights are untouched since the last finished step (`interruptible`: reading the batch, the forward
  and backward passes, the sampling; single-process runs only, since ranks of a multi-process run must
  stop at the same step), the handler raises `Interrupted` at once, so a step that never ends (a
  stalled read, a huge batch) stops within the signal's next Python instruction; elsewhere (the
  optimizer step, a save) the loop stops at the end of the step. A second signal raises `StopNow`
  wherever the run is: it stops at once (exit 130 / 143), keeping the last state written.
- Allocation failures (`allocation_failure`): torch's `OutOfMemoryError`, the CPU allocator's "can't
  allocate memory", numpy's `MemoryError`.
- Peer failures (`peer_failure`): a collective that fails because another process of the run died
  (gloo's "Connection closed by peer"): that process's own error is the one to read.
"""
from __future__ import annotations

import contextlib
import signal
import threading

import torch

# Exit codes of a run stopped by a signal (after saving its state): the shell's 128 + signal number.
SIGNAL_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
# The CPU allocator's and CUDA's words for an allocation that failed (c10/core/impl/alloc_cpu.cpp:
# "DefaultCPUAllocator: can't allocate memory" / "not enough memory"; CUDA: "out of memory").
_ALLOCATION_WORDS = ("can't allocate memory", "not enough memory", "out of memory")
# What a collective says when the process at the other end is gone (gloo transport/tcp/pair.cc, NCCL).
_PEER_WORDS = ("connection closed by peer", "connection reset by peer", "broken pipe", "remote worker crash",
               "communicator was aborted")


class Interrupted(BaseException):
    """The first signal, raised inside an interruptible section (not an Exception: nothing in between
    catches it as an error)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class StopNow(BaseException):
    """A second signal: stop at once (not an `Interrupted`: nothing is saved for it)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """SIGINT / SIGTERM during training, in the main thread only: `signum` remembers the first; see
    the module's docstring for when the handler raises."""

    def __init__(self, interruptible_steps: bool = True):
        self.signum, self.previous = None, {}
        self.allowed = interruptible_steps
        self.inside = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNAL_EXIT_CODES:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise StopNow(signum)
        self.signum = signum
        if self.inside:
            self.inside = False
            raise Interrupted(signum)

    @contextlib.contextmanager
    def interruptible(self):
        """A section the first signal may cut short (raising `Interrupted`): the weights it started
        with are untouched until it ends or `hold()` is called. A signal that came before raises at once."""
        if not self.allowed:
            yield
            return
        if self.signum is not None:
            raise Interrupted(self.signum)
        self.inside = True
        try:
            yield
        finally:
            self.inside = False

    def hold(self):
        """From here the weights change: a first signal waits for the end of the step."""
        self.inside = False

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False


def allocation_failure(error: BaseException) -> bool:
    """Whether `error` is a failed memory allocation (CPU or GPU)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(word in str(error).lower() for word in _ALLOCATION_WORDS)


def peer_failure(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another process of the run is gone."""
    if not isinstance(error, RuntimeError):
        return False
    if type(error).__name__ in ("DistBackendError", "DistNetworkError"):
        return True
    return any(word in str(error).lower() for word in _PEER_WORDS)


def first_line(error: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message`, cut to `limit` characters (for a one-line report)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."
