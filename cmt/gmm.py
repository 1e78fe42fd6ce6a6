"""An isotropic Gaussian mixture with its exact EDM denoiser: a cheap teacher with a known answer.

Data x0 ~ sum_k w_k N(mu_k, s^2 I). Noised by x = x0 + sigma * n, the posterior mean is

    var_k  = s^2 + sigma^2
    post_k = softmax_k(log w_k - |x - mu_k|^2 / (2 var_k) - (d / 2) log var_k)
    D(x)   = sum_k post_k (mu_k + (s^2 / var_k)(x - mu_k))

so solvers, builders and benchmarks can be checked against the true probability-flow ODE.
"""
import torch


def gmm_denoiser(mu, logw, s):
    """The exact denoiser `denoiser(x, sigma, labels=None)` of the mixture (mu: [K, d], logw: [K], s: std).

    `x` is `[B, d]` or `[B, ...]` with prod(...) = d; sigma is a scalar or `[B]`. Labels are ignored.
    """
    mu = torch.as_tensor(mu)
    logw = torch.as_tensor(logw)
    s = float(s)
    if mu.ndim != 2 or logw.shape != (mu.shape[0],):
        raise ValueError(f"gmm_denoiser needs mu [K, d] and logw [K], got {tuple(mu.shape)} and {tuple(logw.shape)}")
    dim = mu.shape[1]

    def denoiser(x, sigma, labels=None):
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != dim:
            raise ValueError(f"data of shape {tuple(x.shape)} does not have the mixture's {dim} dimensions")
        means = mu.to(device=x.device, dtype=x.dtype)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(flat.shape[0])
        variance = s ** 2 + sigma[:, None] ** 2  # [B, 1]
        offsets = flat[:, None, :] - means[None]  # [B, K, d]
        logits = (logw.to(device=x.device, dtype=x.dtype)
                  - offsets.square().sum(-1) / (2 * variance) - dim / 2 * torch.log(variance))
        posterior = logits.softmax(dim=-1)  # [B, K]
        component_means = means[None] + (s ** 2 / variance)[..., None] * offsets
        return (posterior[..., None] * component_means).sum(1).reshape(x.shape)

    return denoiser


def gmm_sample(mu, logw, s, n, generator=None):
    """Draw `n` points `[n, d]` from the mixture (in mu's dtype)."""
    mu = torch.as_tensor(mu)
    logw = torch.as_tensor(logw)
    components = torch.multinomial(logw.softmax(0).to(torch.float64), n, replacement=True, generator=generator)
    noise = torch.randn(n, mu.shape[1], generator=generator, dtype=torch.float64).to(mu.dtype)
    return mu[components] + float(s) * noise


def random_gmm(num_components=4, dim=2, std=0.2, scale=1.0, generator=None, dtype=torch.float64):
    """A random mixture `(mu, logw, s)`: means ~ N(0, scale^2), weights from a Dirichlet-like draw."""
    mu = scale * torch.randn(num_components, dim, generator=generator, dtype=dtype)
    logw = torch.log_softmax(torch.randn(num_components, generator=generator, dtype=dtype), dim=0)
    return mu, logw, std
