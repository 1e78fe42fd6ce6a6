import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cmt.edm import sigma_grid
from cmt.gmm import gmm_denoiser, gmm_sample, random_gmm
from cmt.solvers import SOLVERS, dpmpp_update, heun_step, sample, sample_trajectory
from conftest import FIXTURES


@pytest.fixture(scope="module")
def dpmpp_reference():
    return load_file(FIXTURES / "dpmpp3m_gmm.safetensors")


class CountingDenoiser:
    """Wraps a denoiser, recording every call's sigma and labels."""

    def __init__(self, denoiser):
        self.denoiser, self.sigmas, self.labels = denoiser, [], []

    def __call__(self, x, sigma, labels=None):
        self.sigmas.append(sigma)
        self.labels.append(labels)
        return self.denoiser(x, sigma, labels)


def mixture_log_density(x, sigma, mu, logw, s):
    variance = s ** 2 + sigma ** 2
    distances = (x[:, None, :] - mu[None]).square().sum(-1)
    return torch.logsumexp(logw - distances / (2 * variance) - mu.shape[1] / 2 * math.log(2 * math.pi * variance), dim=1)


def test_gmm_denoiser_is_tweedie():
    # D(x) = x + sigma^2 grad log p_sigma(x), with p_sigma the mixture convolved with N(0, sigma^2).
    mu, logw, s = random_gmm(3, 5, std=0.3, generator=torch.Generator().manual_seed(0))
    denoiser = gmm_denoiser(mu, logw, s)
    for sigma in (0.05, 0.7, 20.0):
        x = (gmm_sample(mu, logw, s, 7, generator=torch.Generator().manual_seed(1))
             + sigma * torch.randn(7, 5, dtype=torch.float64)).requires_grad_()
        score, = torch.autograd.grad(mixture_log_density(x, sigma, mu, logw, s).sum(), x)
        torch.testing.assert_close(denoiser(x.detach(), torch.full((7,), sigma, dtype=torch.float64)),
                                   x.detach() + sigma ** 2 * score, rtol=1e-10, atol=1e-10)


def test_gmm_sample_statistics():
    mu = torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    logw = torch.tensor([0.25, 0.75], dtype=torch.float64).log()
    points = gmm_sample(mu, logw, 0.1, 20_000, generator=torch.Generator().manual_seed(0))
    right = points[:, 0] > 0
    assert right.double().mean().item() == pytest.approx(0.75, abs=0.015)
    torch.testing.assert_close(points[right].mean(0), mu[1], atol=0.01, rtol=0)
    assert points[right].std(0).tolist() == pytest.approx([0.1, 0.1], abs=0.005)


@pytest.mark.parametrize("steps", [16, 8])
def test_dpmpp3m_matches_reference(dpmpp_reference, steps):
    ref = dpmpp_reference
    denoiser = CountingDenoiser(gmm_denoiser(ref["mu"], ref["logw"], ref["s"]))
    sigmas = sigma_grid("logsnr", steps)
    trajectory = sample_trajectory(denoiser, ref["x_T"] / 80, sigmas, "dpm++3m")
    assert trajectory.nfe == len(denoiser.sigmas) == ref[f"dpmpp3m_nfe{steps}_calls"].item() == steps
    torch.testing.assert_close(trajectory.sigmas, ref[f"dpmpp3m_nfe{steps}_sigmas"], rtol=1e-13, atol=0)
    torch.testing.assert_close(trajectory.states, ref[f"dpmpp3m_nfe{steps}_traj"], rtol=0, atol=1e-10)
    # one call per grid point except the last: the model is never evaluated at sigma_min
    assert [call[0].item() for call in denoiser.sigmas] == pytest.approx(sigmas[:-1].tolist(), rel=1e-15)


@pytest.mark.parametrize("steps", [32, 8])
def test_heun_matches_reference(steps):
    ref = load_file(FIXTURES / "heun_gmm.safetensors")
    denoiser = gmm_denoiser(ref["mu"], ref["logw"], ref["s"])
    trajectory = sample_trajectory(denoiser, ref["noise"], sigma_grid("karras", steps), "heun")
    assert trajectory.nfe == 2 * steps - 1  # no correction on the step to sigma = 0
    torch.testing.assert_close(trajectory.endpoint, ref[f"heun_steps{steps}_x0"], rtol=0, atol=1e-10)
    torch.testing.assert_close(sample(denoiser, ref["noise"], sigma_grid("karras", steps), "heun"),
                               trajectory.endpoint, rtol=0, atol=0)


def test_global_order_of_convergence(dpmpp_reference):
    ref = dpmpp_reference
    denoiser = gmm_denoiser(ref["mu"], ref["logw"], ref["s"])
    noise = ref["x_T"] / 80
    exact = sample(denoiser, noise, sigma_grid("logsnr", 1024), "dpm++3m")  # ~1e-5 from the true solution
    step_counts = np.array([8, 16, 32, 64])
    errors, slopes = {}, {}
    for solver in SOLVERS:
        errors[solver] = np.array([(sample(denoiser, noise, sigma_grid("logsnr", steps), solver) - exact).norm().item()
                                   for steps in step_counts])
        slopes[solver] = -np.polyfit(np.log(step_counts), np.log(errors[solver]), 1)[0]
    # measured: euler 1.00, dpm++1m 1.00, heun 2.20, dpm++2m 2.12, dpm++3m 2.71
    assert 0.85 < slopes["euler"] < 1.2 and 0.85 < slopes["dpm++1m"] < 1.2
    assert 1.8 < slopes["heun"] < 2.5
    assert 1.8 < slopes["dpm++2m"] < 2.5
    assert slopes["dpm++3m"] >= 2.5
    assert errors["dpm++3m"][2] < errors["dpm++2m"][2] and errors["dpm++3m"][3] < 0.6 * errors["dpm++2m"][3]


def _local_errors(order, step_sizes):
    """One dpm++ update of `order` from exact states of a single Gaussian (closed-form ODE)."""
    generator = torch.Generator().manual_seed(0)
    mu, s = torch.randn(1, 8, generator=generator, dtype=torch.float64), 0.5
    denoiser = gmm_denoiser(mu, torch.zeros(1, dtype=torch.float64), s)
    x_at_one = torch.randn(4, 8, generator=generator, dtype=torch.float64)

    def exact(sigma):
        return mu + math.sqrt(s ** 2 + sigma ** 2) / math.sqrt(s ** 2 + 1) * (x_at_one - mu)

    errors = []
    for h in step_sizes:
        history = [math.exp(j * h) for j in range(order)]  # sigma = 1 now, then earlier (larger) sigmas
        denoised = [denoiser(exact(sigma), torch.tensor([sigma], dtype=torch.float64)) for sigma in history]
        x_next = dpmpp_update(exact(1.0), history, denoised, math.exp(-h))
        errors.append((x_next - exact(math.exp(-h))).norm().item())
    return np.array(errors)


def test_local_order_of_dpmpp_updates():
    step_sizes = np.array([0.05, 0.025, 0.0125])

    def slope(errors):
        return np.polyfit(np.log(step_sizes), np.log(errors), 1)[0]

    assert slope(_local_errors(1, step_sizes)) == pytest.approx(2, abs=0.15)
    assert slope(_local_errors(2, step_sizes)) == pytest.approx(3, abs=0.15)
    # The reference 3rd-order multistep update (DPM-Solver / k-diffusion / diffusers, matched above)
    # weights its second divided difference by half of what the exact integral needs, so its local
    # error is O(h^3) rather than O(h^4), like the 2nd-order update's but with a smaller constant.
    third = _local_errors(3, step_sizes)
    assert 2.5 < slope(third) < 3.3
    assert (third < 0.2 * _local_errors(2, step_sizes)).all()


def test_local_order_of_euler_and_heun():
    mu, s = torch.zeros(1, 3, dtype=torch.float64), 0.5
    denoiser = gmm_denoiser(mu, torch.zeros(1, dtype=torch.float64), s)
    x_at_one = torch.randn(4, 3, dtype=torch.float64)
    for solver, expected in (("euler", 2), ("heun", 3)):
        errors = []
        for h in (0.05, 0.025, 0.0125):
            sigma_next = math.exp(-h)
            exact = math.sqrt(s ** 2 + sigma_next ** 2) / math.sqrt(s ** 2 + 1) * x_at_one
            errors.append((sample(denoiser, x_at_one, [1.0, sigma_next], solver) - exact).norm().item())
        assert math.log2(errors[0] / errors[1]) == pytest.approx(expected, abs=0.15)
        assert math.log2(errors[1] / errors[2]) == pytest.approx(expected, abs=0.15)


def test_keep_stores_chosen_states(dpmpp_reference):
    ref = dpmpp_reference
    denoiser = gmm_denoiser(ref["mu"], ref["logw"], ref["s"])
    sigmas = sigma_grid("logsnr", 8)
    full = sample_trajectory(denoiser, ref["x_T"] / 80, sigmas)
    kept = sample_trajectory(denoiser, ref["x_T"] / 80, sigmas, keep=[5, 2])
    assert kept.indices == [0, 2, 5, 8] and kept.states.shape == (4, 6, 48) and kept.nfe == 8
    torch.testing.assert_close(kept.states, full.states[[0, 2, 5, 8]], rtol=0, atol=0)
    torch.testing.assert_close(kept.sigmas, sigmas[[0, 2, 5, 8]], rtol=0, atol=0)
    assert full.states.shape == (9, 6, 48) and full.indices == list(range(9))
    with pytest.raises(ValueError, match="out of range"):
        sample_trajectory(denoiser, ref["x_T"] / 80, sigmas, keep=[9])


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_float32_batches_and_labels(solver):
    mu, logw, s = random_gmm(3, 12, generator=torch.Generator().manual_seed(2))
    denoiser64 = gmm_denoiser(mu, logw, s)
    denoiser = CountingDenoiser(lambda x, sigma, labels: denoiser64(x.double(), sigma.double()).float())
    noise = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    labels = torch.eye(5)
    trajectory = sample_trajectory(denoiser, noise, sigma_grid("karras", 6), solver, labels=labels)
    assert trajectory.states.shape == (7, 5, 3, 2, 2) and trajectory.states.dtype == torch.float32
    assert all(sigma.shape == (5,) and sigma.dtype == torch.float32 for sigma in denoiser.sigmas)
    assert all(passed is labels for passed in denoiser.labels)
    assert trajectory.nfe == len(denoiser.sigmas) == (11 if solver == "heun" else 6)
    torch.testing.assert_close(trajectory.states[0], 80 * noise)
    reference = sample(denoiser64, noise.double(), sigma_grid("karras", 6), solver)
    torch.testing.assert_close(trajectory.endpoint.double(), reference, rtol=1e-4, atol=1e-4)


def test_bad_arguments():
    denoiser = gmm_denoiser(torch.zeros(1, 2), torch.zeros(1), 0.5)
    noise = torch.randn(2, 2)
    with pytest.raises(ValueError, match="valid solvers: euler, heun, dpm\\+\\+1m, dpm\\+\\+2m, dpm\\+\\+3m"):
        sample(denoiser, noise, sigma_grid("karras", 4), "dpm++4m")
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample(denoiser, noise, [0.5, 1.0, 0.0], "euler")
    with pytest.raises(ValueError, match="at least 2 sigmas"):
        sample(denoiser, noise, [1.0], "euler")


def test_heun_step_is_the_heun_solver_step_and_works_per_sample():
    generator = torch.Generator().manual_seed(0)
    mu, logw, s = random_gmm(3, 2, 0.3, 1.0, generator)
    denoiser = gmm_denoiser(mu, logw, s)
    x = torch.randn(4, 2, generator=generator, dtype=torch.float64) * 5
    sigmas = [5.0, 1.0, 0.0]
    solved = sample(denoiser, x / 5.0, sigmas, solver="heun")
    stepped = heun_step(denoiser, heun_step(denoiser, x, 5.0, 1.0), 1.0, 0.0)
    torch.testing.assert_close(solved, stepped, rtol=0, atol=0)
    # [B] sigmas: each sample takes its own step; next sigma 0 is an Euler step.
    sigma = torch.tensor([5.0, 5.0, 2.0, 2.0], dtype=torch.float64)
    next_sigma = torch.tensor([1.0, 0.0, 0.5, 0.0], dtype=torch.float64)
    per_sample = heun_step(denoiser, x, sigma, next_sigma)
    for i in range(4):
        alone = heun_step(denoiser, x[i:i + 1], float(sigma[i]), float(next_sigma[i]))
        torch.testing.assert_close(per_sample[i:i + 1], alone)
    euler = x[1:2] - 5.0 * (x[1:2] - denoiser(x[1:2], torch.tensor([5.0], dtype=torch.float64))) / 5.0
    torch.testing.assert_close(per_sample[1:2], euler)
