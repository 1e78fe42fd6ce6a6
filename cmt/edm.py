"""EDM math in one place: preconditioning, sigma grids, sigma sampling, time conversions.

Everything here follows the variance-exploding form of EDM (Karras et al. 2022),
`x_sigma = x0 + sigma * noise`. Functions take python floats or tensors of any dtype/device;
a `[B]` sigma broadcasts against `[B, ...]` data through `broadcast_sigma`.
"""
import math

import torch

# EDM's settings (Karras et al. 2022, Table 1), the defaults of every trainer, builder and sampler.
SIGMA_DATA = 0.5
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0
# The intermediate sigma of 2-step consistency sampling (jump to 0, re-noise to it, jump again): the
# `mid_t=[0.821]` default of ECT's evaluation script (locuslab/ect ct_eval.py), as used for iCT/ECT's
# CIFAR-10 2-step figures. The training reports and `cmt-sample --sampler flowmap --steps 2` use it.
TWO_STEP_SIGMA = 0.821


def broadcast_sigma(sigma, x):
    """Reshape a scalar or `[B]` sigma so that it broadcasts against `x` of shape `[B, ...]`.

    Python floats pass through unchanged; tensors are moved to x's device (dtype kept, so a
    float64 sigma still promotes float32 data where the caller wants it to).
    """
    if not torch.is_tensor(sigma):
        return sigma
    sigma = sigma.to(device=x.device)
    if sigma.ndim == 0:
        return sigma
    if sigma.ndim != 1 or sigma.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"sigma of shape {tuple(sigma.shape)} does not match data of shape {tuple(x.shape)}: "
                         "expected a scalar or a [B] tensor")
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def _sqrt(value):
    return torch.sqrt(value) if torch.is_tensor(value) else math.sqrt(value)


def _log(value):
    return torch.log(value) if torch.is_tensor(value) else math.log(value)


def edm_scalings(sigma, sigma_data=SIGMA_DATA, sigma_min=0.0):
    """EDM preconditioning `(c_skip, c_out, c_in, c_noise)` with `D = c_skip x + c_out F(c_in x, c_noise)`.

    With `sigma_min > 0` this is the consistency-model boundary form: c_skip(sigma_min) = 1 and
    c_out(sigma_min) = 0, so the model is the identity at sigma_min whatever F outputs.
    """
    variance = sigma ** 2 + sigma_data ** 2
    shifted = sigma - sigma_min
    c_skip = sigma_data ** 2 / (shifted ** 2 + sigma_data ** 2)
    c_out = shifted * sigma_data / _sqrt(variance)
    c_in = 1 / _sqrt(variance)
    c_noise = _log(sigma) / 4
    return c_skip, c_out, c_in, c_noise


def karras_sigmas(n, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    """EDM's `n` decreasing sigmas, uniform in sigma^(1/rho), from sigma_max to sigma_min (float64)."""
    if n < 1:
        raise ValueError(f"karras_sigmas needs n >= 1, got {n}")
    if n == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    ramp = torch.arange(n, dtype=torch.float64) / (n - 1)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def logsnr_sigmas(n, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX):
    """`n` decreasing sigmas uniform in lambda = -log(sigma) (geometric in sigma), float64."""
    if n < 1:
        raise ValueError(f"logsnr_sigmas needs n >= 1, got {n}")
    if n == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)
    sigmas = log_sigmas.exp()
    # Pin the endpoints exactly, exp(log(x)) is off by an ulp.
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return sigmas


SIGMA_GRIDS = ("karras", "logsnr")


def sigma_grid(kind, steps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO):
    """The `steps + 1` sigmas a solver of `steps` steps walks, float64.

    "karras": EDM's grid of `steps` sigmas then a final 0 (EDM's Heun sampler).
    "logsnr": geometric from sigma_max to sigma_min, no 0 (the official CMT DPM-Solver++ grid).
    """
    if steps < 1:
        raise ValueError(f"sigma_grid needs steps >= 1, got {steps}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_grid needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if kind == "karras":
        return torch.cat([karras_sigmas(steps, sigma_min, sigma_max, rho), torch.zeros(1, dtype=torch.float64)])
    if kind == "logsnr":
        return logsnr_sigmas(steps + 1, sigma_min, sigma_max)
    raise ValueError(f"unknown sigma grid {kind!r}; valid: {', '.join(SIGMA_GRIDS)}")


def sample_lognormal_sigmas(n, p_mean, p_std, generator=None, device=None, dtype=torch.float32):
    """EDM's training sigmas: log(sigma) ~ N(p_mean, p_std^2), `[n]`."""
    normal = torch.randn(n, generator=generator, device=device, dtype=dtype)
    return (normal * p_std + p_mean).exp()


def sigma_to_t(sigma):
    """Linear-interpolation time of an EDM sigma: t = sigma / (1 + sigma)."""
    return sigma / (1 + sigma)


def t_to_sigma(t):
    """Inverse of `sigma_to_t`: sigma = t / (1 - t)."""
    return t / (1 - t)


def x_to_z(x, sigma):
    """EDM state to interpolation state: z_t = x_sigma / (1 + sigma) = (1 - t) x0 + t noise."""
    return x / (1 + broadcast_sigma(sigma, x))


def z_to_x(z, t):
    """Interpolation state to EDM state: x_sigma = z_t / (1 - t)."""
    return z / (1 - broadcast_sigma(t, z))


def flow_map_jump(x, sigma, target_sigma, denoised):
    """The DDIM jump from sigma to target_sigma given D(x): D + (target_sigma / sigma) (x - D)."""
    ratio = broadcast_sigma(target_sigma, x) / broadcast_sigma(sigma, x)
    return denoised + ratio * (x - denoised)
