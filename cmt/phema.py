"""Power-function EMA and its post-hoc reconstruction math (EDM2, Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", Section 3 and Appendix C).

The averaging profile of a power-function EMA at training time t weighs the weights seen at time
tau in [0, t] by `p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`. Its length is given relative to
the training time, as the standard deviation of that profile over t: `sigma_rel` ("EMA std" below,
`std`). EDM2 tracks two profiles during training (std 0.050 and 0.100, `DEFAULT_STDS`), stores both
at every snapshot, and afterwards solves a small least-squares problem to combine the stored
snapshots into the profile of any other std (`solve_posthoc_coefficients`), so the EMA length is
chosen after training. The formulas follow NVlabs/edm2 `training/phema.py` (equation numbers of the
paper's appendix in each docstring); the code here is our own.

Time unit: images seen, as EDM2 counts it (`cur_nimg`); `PowerFunctionEMA.update(net, step,
batch_size)` takes the trainer's optimizer step (1 after the first step) and batch size and advances
its image count by `(step - last step) * batch_size`. With a constant batch size every formula only
sees ratios of times, so the result is the same as counting steps: the per-step decay is
`beta = (1 - 1 / step)^(gamma + 1)`, and the reconstruction coefficients are unchanged when all
times are scaled.

The tracker:

    ema = PowerFunctionEMA(net, stds=(0.050, 0.100))     # after the net is on its device
    for step in range(1, max_steps + 1):                    # 1 after the first optimizer step
        ...optimizer.step()...
        ema.update(net, step, batch_size)
        if step % snapshot_every == 0:
            written = ema.snapshot(out / "snapshots")       # {"files": [...], "bytes": N}
    state = ema.state_dict(); ema.load_state_dict(state)    # plain tensors, lists, ints: resumable

Snapshots are `phema-NNNNNNN-0.050.safetensors` (step in 7 digits, the std in 3 decimals as EDM2
names its pickles), each a network file of `cmt.checkpoint.save_weights` in the network's own dtype,
with `"phema": {"std", "exp", "step", "nimg"}` in its metadata; `cmt.posthoc_ema.reconstruct_ema`
combines them.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from cmt.checkpoint import save_weights
from cmt.errors import ArgumentError
from cmt.networks import network_config
from cmt.outputs import STEP_DIGITS

# EDM2's defaults: two tracked profiles (NVlabs/edm2 training/phema.py, PowerFunctionEMA(stds=[0.050, 0.100])).
DEFAULT_STDS = (0.050, 0.100)
# std of the power-function profile of exponent 0 (a uniform average over [0, t]): the longest
# profile of a non-negative exponent; EDM2's reconstruct_phema.py accepts stds below 0.289 only.
MAX_STD = math.sqrt(1 / 12)
SNAPSHOT_PREFIX = "phema"
# The snapshots of EDM2's released runs are stored every 8 Mi images (training_loop.py, snapshot_nimg).


# ---- the math (float64 numpy) -------------------------------------------------------------------

def exp_to_std(exp):
    """The relative std of the power-function profile of exponent `exp` (Eq. 123):
    `sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))`."""
    exp = np.asarray(exp, dtype=np.float64)
    return np.sqrt((exp + 1) / ((exp + 2) ** 2 * (exp + 3)))


def std_to_exp(std):
    """The exponent gamma whose profile has relative std `std` (Eq. 126, Algorithm 2): the largest
    real root of `gamma^3 + 7 gamma^2 + (16 - std^-2) gamma + (12 - std^-2) = 0`, i.e. Eq. 123 solved
    for gamma."""
    std = np.asarray(std, dtype=np.float64)
    inverse_square = std.reshape(-1) ** -2
    roots = [np.roots([1.0, 7.0, 16.0 - value, 12.0 - value]) for value in inverse_square]
    exps = [max(root.real for root in candidates if abs(root.imag) <= 1e-9 * max(1.0, abs(root)))
            for candidates in roots]
    return np.asarray(exps, dtype=np.float64).reshape(std.shape)


def power_function_beta(std, t_next, t_delta):
    """The decay that advances a power-function EMA of relative std `std` from time `t_next -
    t_delta` to `t_next` (Eq. 127): `(1 - t_delta / t_next)^(gamma + 1)`; 0 at the first update
    (`t_delta == t_next`), so the average starts as the weights themselves."""
    return (1.0 - np.float64(t_delta) / np.float64(t_next)) ** (std_to_exp(std) + 1.0)


def p_dot_p(t_a, std_a, t_b, std_b):
    """The inner product of two normalised power-function profiles (Eq. 151, Algorithm 3): the
    profile ending at `t_a` with std `std_a` and the one ending at `t_b` with std `std_b`,
    `int_0^min(t_a, t_b) p_a(tau) p_b(tau) dtau`, written with ratios <= 1 so it stays finite for
    long profiles (exponents of hundreds). Broadcasts."""
    t_a, t_b = np.asarray(t_a, dtype=np.float64), np.asarray(t_b, dtype=np.float64)
    gamma_a, gamma_b = std_to_exp(std_a), std_to_exp(std_b)
    t_min = np.minimum(t_a, t_b)
    scale = (gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1)
    return scale * (t_min / t_a) ** (gamma_a + 1) * (t_min / t_b) ** (gamma_b + 1) / t_min


def solve_posthoc_coefficients(in_times, in_stds, out_time, out_stds):
    """Coefficients `[len(in), len(out)]`: column k combines the snapshots (their times and stds)
    into the profile of std `out_stds[k]` at `out_time`, in the least-squares sense over profiles
    (Algorithm 3): `A x = b` with `A_ij = <p_i, p_j>`, `b_i = <p_i, p_out>`, then each column
    normalised to sum to 1 (weights stay an average). Only snapshots at times <= `out_time` belong
    in the inputs (a later snapshot saw weights the target did not)."""
    in_times, in_stds = np.broadcast_arrays(np.asarray(in_times, dtype=np.float64),
                                            np.asarray(in_stds, dtype=np.float64))
    out_times, out_stds = np.broadcast_arrays(np.asarray(out_time, dtype=np.float64),
                                              np.asarray(out_stds, dtype=np.float64))
    column, row = (lambda x: x.reshape(-1, 1)), (lambda x: x.reshape(1, -1))
    gram = p_dot_p(column(in_times), column(in_stds), row(in_times), row(in_stds))
    target = p_dot_p(column(in_times), column(in_stds), row(out_times), row(out_stds))
    try:
        coefficients = np.linalg.solve(gram, target)
    except np.linalg.LinAlgError:   # repeated snapshots make the Gram matrix singular
        coefficients = np.linalg.lstsq(gram, target, rcond=None)[0]
    return coefficients / coefficients.sum(axis=0, keepdims=True)


def check_stds(stds, argument="stds"):
    """`stds` as a tuple of floats, each in (0, MAX_STD); ArgumentError naming `argument` otherwise."""
    values = [stds] if isinstance(stds, (int, float)) else list(stds)
    if not values:
        raise ArgumentError(argument, "give at least one EMA std")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) \
                or not 0 < float(value) < MAX_STD:
            raise ArgumentError(argument, f"an EMA std (sigma_rel) must be a number in (0, {MAX_STD:.4f}), got "
                                          f"{value!r}")
    return tuple(float(value) for value in values)


def snapshot_name(step, std):
    """`phema-0001000-0.050.safetensors`: EDM2's `network-snapshot-KKKKKKK-0.050.pkl` naming, in
    optimizer steps as the project's other snapshots."""
    return f"{SNAPSHOT_PREFIX}-{int(step):0{STEP_DIGITS}d}-{std:.3f}.safetensors"


# ---- the tracker --------------------------------------------------------------------------------

class PowerFunctionEMA:
    """Power-function EMAs of `net`'s parameters for each std in `stds` (EDM2's PowerFunctionEMA).

    The averages are kept apart from any module, one list of tensors per profile, in float32 for
    half-precision parameters (a half-precision running average loses the small updates), otherwise
    in the parameters' dtype; buffers are not averaged: a snapshot takes them from `net` as it is then
    (EDM2's `get()` does the same). `update` is one `torch._foreach_lerp_` over every profile.
    """

    def __init__(self, net: torch.nn.Module, stds=DEFAULT_STDS):
        self.net = net
        self.stds = check_stds(stds)
        self.exps = [float(std_to_exp(std)) for std in self.stds]
        self.names = [name for name, _ in net.named_parameters()]
        # The Parameter objects, not detached views: `net.to(device)` swaps their data in place of them.
        self._params = list(net.parameters())
        self.averages = [[param.detach().to(self._accumulator_dtype(param.dtype), copy=True) for param in self._params]
                         for _ in self.stds]
        self.step = 0    # optimizer steps averaged so far
        self.nimg = 0    # images seen so far (EDM2's cur_nimg): the time unit of the profiles

    @staticmethod
    def _accumulator_dtype(dtype):
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def betas(self, step, batch_size):
        """The decay of each profile for an update at optimizer step `step` (see `update`)."""
        t_next = self.nimg + (step - self.step) * batch_size
        return [float(power_function_beta(std, t_next, t_next - self.nimg)) for std in self.stds]

    @torch.no_grad()
    def update(self, net: torch.nn.Module, step: int, batch_size: int) -> None:
        """Average in `net`'s current parameters after optimizer step `step` (1 after the first step;
        a step may be skipped, e.g. updating every k steps: the decay accounts for the gap)."""
        if int(step) != step or step <= self.step:
            raise ValueError(f"PowerFunctionEMA.update: step {step} must be an integer after the last update's "
                             f"step {self.step}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"PowerFunctionEMA.update: batch_size must be a positive integer, got {batch_size}")
        betas = self.betas(step, batch_size)
        params = self._params if net is self.net else list(net.parameters())
        if len(params) != len(self._params):
            raise ValueError(f"PowerFunctionEMA.update: the network has {len(params)} parameters, the EMA tracks "
                             f"{len(self._params)}")
        if not params:
            return self._advance(step, batch_size)
        accumulate = self._accumulator_dtype(params[0].dtype)
        if self.averages[0][0].device != params[0].device or self.averages[0][0].dtype != accumulate:
            # the network moved or was cast since (as a whole): the averages follow it, once
            self.averages = [[average.to(param.device, self._accumulator_dtype(param.dtype))
                              for average, param in zip(profile, params)] for profile in self.averages]
        sources = params              # the usual case: the averages have the parameters' dtype, no copies
        if any(param.dtype != average.dtype for param, average in zip(params, self.averages[0])):
            # half-precision parameters: float32 copies to average in
            sources = [param.to(average.dtype) for param, average in zip(params, self.averages[0])]
        targets = [average for profile in self.averages for average in profile]
        weights = [weight for beta in betas for weight in [1.0 - beta] * len(params)]
        torch._foreach_lerp_(targets, sources * len(self.stds), weights)
        self._advance(step, batch_size)

    def _advance(self, step, batch_size):
        self.nimg += (step - self.step) * batch_size
        self.step = int(step)

    def averaged_state_dict(self, std=None, index=None) -> dict:
        """The averaged weights of one profile (by its std, or its index) as `net.state_dict()` names
        them, in the network's own dtypes, with `net`'s current buffers: what a snapshot stores."""
        if index is None:
            if std is None or not any(math.isclose(std, value, abs_tol=5e-7) for value in self.stds):
                raise ValueError(f"PowerFunctionEMA tracks stds {', '.join(map(str, self.stds))}; got {std!r}")
            index = next(i for i, value in enumerate(self.stds) if math.isclose(std, value, abs_tol=5e-7))
        averages = dict(zip(self.names, self.averages[index]))
        state = {}
        for name, value in self.net.state_dict().items():
            source = averages.get(name, value)   # a buffer: the network's own, as it is now
            state[name] = source.detach().to(device="cpu", dtype=value.dtype)
        return state

    def snapshot(self, out_dir, step=None, extra=None) -> dict:
        """Write every profile at the last update as `out_dir/phema-NNNNNNN-STD.safetensors` (network
        files loadable wherever a checkpoint is); `extra`: more metadata (the run's phase, data...).
        Returns `{"files": [Path, ...], "bytes": total size}`."""
        if step is not None and int(step) != self.step:
            raise ValueError(f"PowerFunctionEMA.snapshot: asked for step {step}, the averages are at step {self.step}")
        files = []
        for index, (std, exp) in enumerate(zip(self.stds, self.exps)):
            info = {**(extra or {}), "step": self.step,
                    "phema": {"std": std, "exp": exp, "step": self.step, "nimg": self.nimg}}
            path = Path(out_dir) / snapshot_name(self.step, std)
            files.append(save_weights(path, self.averaged_state_dict(index=index), network_config(self.net), info))
        return {"files": files, "bytes": sum(path.stat().st_size for path in files)}

    def state_dict(self) -> dict:
        """Plain values (a list of floats, ints, lists of dicts of tensors) for `torch.save` and a
        `torch.load(weights_only=True)` resume."""
        return {"stds": list(self.stds), "step": self.step, "nimg": self.nimg,
                "averages": [dict(zip(self.names, profile)) for profile in self.averages]}

    def load_state_dict(self, state: dict) -> None:
        stds = tuple(float(std) for std in state["stds"])
        if len(stds) != len(self.stds) or not all(math.isclose(a, b, abs_tol=5e-7) for a, b in zip(stds, self.stds)):
            raise ValueError(f"the saved power-function EMA tracks stds {stds}, this one {self.stds}")
        for profile, saved in zip(self.averages, state["averages"]):
            if set(saved) != set(self.names):
                raise ValueError("the saved power-function EMA averages other parameters: "
                                 f"{sorted(set(saved) ^ set(self.names))[:5]}")
            for name, average in zip(self.names, profile):
                average.copy_(saved[name])
        self.step, self.nimg = int(state["step"]), int(state["nimg"])
