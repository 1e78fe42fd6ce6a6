"""Probability-flow ODE solvers over an EDM denoiser: whole trajectories or endpoints only.

The ODE is EDM's dx/dsigma = (x - D(x, sigma)) / sigma (variance-exploding, x = x0 + sigma * n).
Every solver walks a given decreasing grid `sigmas` (see `cmt.edm.sigma_grid`). Each one is a
short generator that yields `(state, denoiser calls)` after every step, so the same code fills a
whole `Trajectory` or returns the endpoint alone. Solves run under `torch.no_grad()`.

- `euler`: explicit Euler in sigma (identical to DDIM / `dpm++1m` in this parametrisation).
- `heun`: EDM's 2nd-order Heun sampler without churn; the step to sigma = 0 is plain Euler.
- `dpm++1m`, `dpm++2m`, `dpm++3m`: multistep DPM-Solver++ (Lu et al. 2022) in data-prediction
  form over lambda = -log(sigma), with lower orders on the first steps and `lower_order_final`,
  as the official CMT code uses to build its mid-training targets. One denoiser call per step;
  the model is not evaluated after the last step.

Besides these ODE solvers (`SOLVERS`), `FLOW_MAP` ("flowmap") walks the grid with a flow-map
network's own jumps (`flow_map_step`: `net(x, sigma, labels, target_sigma=next)`, then the DDIM
jump): the "solver" of a flow-map teacher (a MeanFlow or CMT flow-map student), whose every step is
the network's jump from one grid sigma to the next. It takes only flow-map networks.
"""
import math
from dataclasses import dataclass

import torch
import tqdm

from cmt.edm import broadcast_sigma, flow_map_jump


@dataclass
class Trajectory:
    """Stored states of one solve. `states[i]` is the batch at `sigmas[i]`, grid index `indices[i]`."""
    states: torch.Tensor   # [S, B, ...]; x_T first, the endpoint last
    sigmas: torch.Tensor   # [S] float64
    indices: list          # grid index of each stored state
    nfe: int               # denoiser calls

    @property
    def endpoint(self):
        return self.states[-1]


def _batch_sigma(sigma, x):
    """A python-float sigma as the `[B]` tensor the denoisers take; tensors pass through."""
    return sigma if torch.is_tensor(sigma) else torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)


def _call(denoiser, x, sigma, labels):
    return denoiser(x, _batch_sigma(sigma, x), labels)


def heun_step(denoiser, x, sigma, next_sigma, labels=None):
    """One step of EDM's Heun sampler (no churn) from `sigma` to `next_sigma`: Euler where `next_sigma` is 0.

    `denoiser(x, sigma [B], labels) -> D`. `sigma` and `next_sigma` are python floats (one grid
    step of the solvers below) or `[B]` tensors (one pair per sample, as ECD's teacher step); with
    tensors, samples whose `next_sigma` is 0 take the Euler step (their second call is evaluated at
    `sigma` and discarded, so every sigma the denoiser sees is positive).
    """
    sigma_b, next_b = broadcast_sigma(sigma, x), broadcast_sigma(next_sigma, x)
    slope = (x - _call(denoiser, x, sigma, labels)) / sigma_b
    x_euler = x + (next_b - sigma_b) * slope
    per_sample = torch.is_tensor(next_sigma)
    if not per_sample and next_sigma == 0:
        return x_euler
    second_sigma = torch.where(next_sigma > 0, next_sigma, sigma) if per_sample else next_sigma
    slope_next = (x_euler - _call(denoiser, x_euler, second_sigma, labels)) / broadcast_sigma(second_sigma, x)
    x_heun = x + (next_b - sigma_b) * (0.5 * slope + 0.5 * slope_next)
    return torch.where(next_b > 0, x_heun, x_euler) if per_sample else x_heun


def euler(denoiser, x, sigmas, labels):
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        slope = (x - _call(denoiser, x, sigma, labels)) / sigma
        x = x + (sigma_next - sigma) * slope
        yield x, 1


def heun(denoiser, x, sigmas, labels):
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = heun_step(denoiser, x, sigma, sigma_next, labels)
        yield x, 1 if sigma_next == 0 else 2


def dpmpp_update(x, sigmas, denoised, sigma_next):
    """One DPM-Solver++ step to `sigma_next` from `x` at `sigmas[0]`; its order is `len(denoised)`.

    `sigmas` and `denoised` list the current and earlier nodes, most recent first. With alpha = 1
    and lambda = -log(sigma), h = lambda_next - lambda_0, the step is

        x_next = (sigma_next / sigma_0) x - expm1(-h) D_0 + (terms in divided differences of D over lambda)

    (data-prediction form of Lu et al. 2022, `dpmsolver` variant of the 2nd-order update).

    The 3rd-order update is the one of the reference codes (DPM-Solver, k-diffusion, diffusers,
    hence the official CMT targets), which we match to 1e-14. Note: its `second` difference is about
    h^2 D''/2 where the exact integral needs h^2 D'', so this update's local error is O(h^3), not
    O(h^4), with a constant about 10x smaller than the 2nd-order update's (tests/test_solvers.py).
    """
    if sigma_next == 0:  # h = inf: every order reduces to the denoised value itself
        return denoised[0]
    order = len(denoised)
    lambdas = [-math.log(sigma) for sigma in sigmas[:order]]
    h = -math.log(sigma_next) - lambdas[0]
    phi_1 = math.expm1(-h)
    x_next = (sigma_next / sigmas[0]) * x - phi_1 * denoised[0]
    if order == 1:
        return x_next
    r0 = (lambdas[0] - lambdas[1]) / h
    diff_0 = (denoised[0] - denoised[1]) / r0
    if order == 2:
        return x_next - 0.5 * phi_1 * diff_0
    r1 = (lambdas[1] - lambdas[2]) / h
    diff_1 = (denoised[1] - denoised[2]) / r1
    first = diff_0 + (r0 / (r0 + r1)) * (diff_0 - diff_1)
    second = (diff_0 - diff_1) / (r0 + r1)
    phi_2 = phi_1 / h + 1
    phi_3 = phi_2 / h - 0.5
    return x_next + phi_2 * first - phi_3 * second


def _dpmpp_multistep(denoiser, x, sigmas, labels, order):
    """DPM-Solver++(order)M: one denoiser call per step, reusing earlier denoised values.

    Step order = min(order, steps taken + 1, steps left): lower orders while the history fills and
    on the final steps (`lower_order_final`), which keeps few-step solves stable.
    """
    steps = len(sigmas) - 1
    denoised = []  # most recent first
    for index in range(steps):
        denoised.insert(0, _call(denoiser, x, sigmas[index], labels))
        del denoised[order:]
        step_order = min(order, index + 1, steps - index)
        history = sigmas[index::-1]
        x = dpmpp_update(x, history, denoised[:step_order], sigmas[index + 1])
        yield x, 1


def dpmpp_1m(denoiser, x, sigmas, labels):
    return _dpmpp_multistep(denoiser, x, sigmas, labels, order=1)


def dpmpp_2m(denoiser, x, sigmas, labels):
    return _dpmpp_multistep(denoiser, x, sigmas, labels, order=2)


def dpmpp_3m(denoiser, x, sigmas, labels):
    return _dpmpp_multistep(denoiser, x, sigmas, labels, order=3)


SOLVERS = {
    "euler": euler,
    "heun": heun,
    "dpm++1m": dpmpp_1m,
    "dpm++2m": dpmpp_2m,
    "dpm++3m": dpmpp_3m,
}


def flow_map_step(net, x, sigma, next_sigma, labels=None):
    """One jump of a flow-map network (`net.flow_map`) from `sigma` to `next_sigma` (floats or `[B]`):
    `D + (next_sigma / sigma) (x - D)` with `D = net(x, sigma, labels, target_sigma=next_sigma)`."""
    return flow_map_jump(x, sigma, next_sigma, net(x, sigma, labels, target_sigma=next_sigma))


def flow_map(net, x, sigmas, labels):
    """The flow-map network's own jumps along the grid, one network call each."""
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = flow_map_step(net, x, sigma, sigma_next, labels)
        yield x, 1


# Not an ODE solver (not in SOLVERS): the jumps of a flow-map network, which the builder and the
# trajectory functions below take where a solver is named.
FLOW_MAP = "flowmap"
_STEPPERS = {**SOLVERS, FLOW_MAP: flow_map}


def _prepare(noise, sigmas, solver):
    if solver not in _STEPPERS:
        raise ValueError(f"unknown solver {solver!r}; valid solvers: {', '.join(SOLVERS)} (and {FLOW_MAP} for a "
                         "flow-map network)")
    sigma_list = [float(sigma) for sigma in torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)]
    if len(sigma_list) < 2:
        raise ValueError(f"a solver needs at least 2 sigmas (one step), got {len(sigma_list)}")
    if any(b >= a for a, b in zip(sigma_list[:-1], sigma_list[1:])) or sigma_list[-1] < 0:
        raise ValueError(f"sigmas must be strictly decreasing and non-negative, got {sigma_list}")
    if 0 in sigma_list[:-1]:
        raise ValueError("only the last sigma may be 0")
    return sigma_list, noise * sigma_list[0]


@torch.no_grad()
def sample_trajectory(denoiser, noise, sigmas, solver="dpm++3m", labels=None, keep=None, progress=False):
    """Solve the probability-flow ODE from `sigmas[0] * noise` along `sigmas`, storing states
    (solver `FLOW_MAP`: a flow-map network's jumps along `sigmas` instead).

    `keep`: grid indices to store (default all); the first and last are always stored.
    """
    sigma_list, x = _prepare(noise, sigmas, solver)
    last = len(sigma_list) - 1
    if keep is None:
        kept = set(range(last + 1))
    else:
        kept = {int(index) for index in keep}
        if any(not -last - 1 <= index <= last for index in kept):
            raise ValueError(f"keep indices {sorted(kept)} out of range for {last + 1} sigmas")
        kept = {index % (last + 1) for index in kept} | {0, last}
    indices = sorted(kept)
    states = [x] if 0 in kept else []
    nfe = 0
    steps = _STEPPERS[solver](denoiser, x, sigma_list, labels)
    for index, (x, calls) in enumerate(tqdm.tqdm(steps, total=last, disable=not progress, desc=solver), start=1):
        nfe += calls
        if index in kept:
            states.append(x)
    return Trajectory(states=torch.stack(states), sigmas=torch.tensor([sigma_list[i] for i in indices], dtype=torch.float64),
                      indices=indices, nfe=nfe)


@torch.no_grad()
def sample(denoiser, noise, sigmas, solver="dpm++3m", labels=None, progress=False):
    """The endpoint of the solve only (nothing else is kept in memory)."""
    sigma_list, x = _prepare(noise, sigmas, solver)
    steps = _STEPPERS[solver](denoiser, x, sigma_list, labels)
    for x, _ in tqdm.tqdm(steps, total=len(sigma_list) - 1, disable=not progress, desc=solver):
        pass
    return x
