import math

import pytest
import torch
from safetensors.torch import load_file

from cmt import edm
from conftest import FIXTURES


def test_scalings_known_values():
    c_skip, c_out, c_in, c_noise = edm.edm_scalings(0.5)
    assert c_skip == pytest.approx(0.5)
    assert c_out == pytest.approx(0.25 / math.sqrt(0.5))
    assert c_in == pytest.approx(1 / math.sqrt(0.5))
    assert c_noise == pytest.approx(math.log(0.5) / 4)
    c_skip, c_out, c_in, _ = edm.edm_scalings(80.0)
    assert c_skip == pytest.approx(0.25 / (6400 + 0.25))
    assert c_out == pytest.approx(80 * 0.5 / math.sqrt(6400.25))


def test_scalings_tensors_match_floats_and_keep_dtype():
    sigmas = torch.tensor([0.002, 0.3, 1.0, 80.0], dtype=torch.float32)
    for sigma_min in (0.0, 0.002):
        tensors = edm.edm_scalings(sigmas, sigma_min=sigma_min)
        for column, sigma in enumerate(sigmas.tolist()):
            floats = edm.edm_scalings(sigma, sigma_min=sigma_min)
            for tensor, value in zip(tensors, floats):
                assert tensor.dtype == torch.float32
                assert tensor[column].item() == pytest.approx(value, rel=1e-5, abs=1e-7)


def test_scalings_give_unit_variance_input_and_target():
    # EDM's design: c_in x and the effective target (x0 - c_skip x) / c_out both have unit variance.
    generator = torch.Generator().manual_seed(0)
    x0 = 0.5 * torch.randn(200_000, generator=generator, dtype=torch.float64)
    noise = torch.randn(200_000, generator=generator, dtype=torch.float64)
    for sigma in (0.05, 0.5, 3.0, 40.0):
        x = x0 + sigma * noise
        c_skip, c_out, c_in, _ = edm.edm_scalings(sigma)
        assert (c_in * x).std().item() == pytest.approx(1.0, abs=0.01)
        assert ((x0 - c_skip * x) / c_out).std().item() == pytest.approx(1.0, abs=0.01)


def test_boundary_form_is_identity_at_sigma_min():
    sigma_min = 0.002
    c_skip, c_out, _, _ = edm.edm_scalings(torch.tensor([sigma_min], dtype=torch.float64), sigma_min=sigma_min)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    network_output = torch.randn_like(x)
    sigma = torch.full((3,), sigma_min, dtype=torch.float64)
    c_skip, c_out, _, _ = edm.edm_scalings(sigma, sigma_min=sigma_min)
    denoised = edm.broadcast_sigma(c_skip, x) * x + edm.broadcast_sigma(c_out, x) * network_output
    torch.testing.assert_close(denoised, x, rtol=0, atol=0)
    # away from the boundary it approaches the plain EDM form
    boundary, plain = edm.edm_scalings(80.0, sigma_min=sigma_min), edm.edm_scalings(80.0)
    for a, b in zip(boundary, plain):
        assert a == pytest.approx(b, rel=1e-4)


def test_karras_sigmas():
    sigmas = edm.karras_sigmas(18)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (18,)
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[-1].item() == pytest.approx(0.002)
    assert (sigmas[1:] < sigmas[:-1]).all()
    # uniform in sigma^(1/rho)
    steps = torch.diff(sigmas ** (1 / 7))
    torch.testing.assert_close(steps, steps[:1].expand_as(steps))
    assert edm.karras_sigmas(1).tolist() == [80.0]


def test_logsnr_sigmas_are_geometric():
    sigmas = edm.logsnr_sigmas(9, 0.002, 80.0)
    assert sigmas[0].item() == 80.0 and sigmas[-1].item() == 0.002
    ratios = sigmas[1:] / sigmas[:-1]
    torch.testing.assert_close(ratios, ratios[:1].expand_as(ratios))
    assert ratios[0].item() == pytest.approx((0.002 / 80) ** (1 / 8))


def test_sigma_grid_kinds():
    karras = edm.sigma_grid("karras", 8)
    assert karras.shape == (9,) and karras[-1].item() == 0.0
    torch.testing.assert_close(karras[:-1], edm.karras_sigmas(8))
    logsnr = edm.sigma_grid("logsnr", 16)
    assert logsnr.shape == (17,) and logsnr[-1].item() == 0.002
    reference = load_file(FIXTURES / "dpmpp3m_gmm.safetensors")
    for steps in (8, 16):
        torch.testing.assert_close(edm.sigma_grid("logsnr", steps), reference[f"dpmpp3m_nfe{steps}_sigmas"],
                                   rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="karras, logsnr"):
        edm.sigma_grid("cosine", 8)
    with pytest.raises(ValueError, match="steps >= 1"):
        edm.sigma_grid("karras", 0)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        edm.sigma_grid("logsnr", 4, sigma_min=1.0, sigma_max=0.5)


def test_lognormal_sigmas():
    generator = torch.Generator().manual_seed(1)
    sigmas = edm.sample_lognormal_sigmas(100_000, -0.4, 1.0, generator=generator)
    assert sigmas.shape == (100_000,) and sigmas.dtype == torch.float32 and (sigmas > 0).all()
    assert sigmas.log().mean().item() == pytest.approx(-0.4, abs=0.02)
    assert sigmas.log().std().item() == pytest.approx(1.0, abs=0.02)
    again = edm.sample_lognormal_sigmas(100_000, -0.4, 1.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(sigmas, again, rtol=0, atol=0)


def test_time_conversions_round_trip_and_interpolation():
    sigma = torch.tensor([0.002, 0.5, 1.0, 80.0], dtype=torch.float64)
    t = edm.sigma_to_t(sigma)
    assert ((t > 0) & (t < 1)).all()
    torch.testing.assert_close(edm.t_to_sigma(t), sigma)
    assert edm.sigma_to_t(1.0) == 0.5 and edm.t_to_sigma(0.5) == 1.0
    x0 = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    noise = torch.randn_like(x0)
    x_sigma = x0 + edm.broadcast_sigma(sigma, x0) * noise
    z = edm.x_to_z(x_sigma, sigma)
    t_b = edm.broadcast_sigma(t, x0)
    torch.testing.assert_close(z, (1 - t_b) * x0 + t_b * noise)
    torch.testing.assert_close(edm.z_to_x(z, t), x_sigma)


def test_flow_map_jump_is_exact_for_a_point_mass():
    # For data concentrated at one point x0 the denoiser is D = x0 and the ODE is x_s = x0 + s * noise.
    x0 = torch.randn(5, 2, dtype=torch.float64)
    noise = torch.randn_like(x0)
    sigma = torch.tensor([80.0, 10.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    target = sigma / 7
    x = x0 + sigma[:, None] * noise
    torch.testing.assert_close(edm.flow_map_jump(x, sigma, target, x0), x0 + target[:, None] * noise)
    torch.testing.assert_close(edm.flow_map_jump(x, sigma, 0.0, x0), x0)
    torch.testing.assert_close(edm.flow_map_jump(x, sigma, sigma, x0), x)


def test_broadcast_sigma():
    x = torch.zeros(3, 1, 4, 4)
    assert edm.broadcast_sigma(torch.ones(3), x).shape == (3, 1, 1, 1)
    assert edm.broadcast_sigma(torch.tensor(2.0), x).shape == ()
    assert edm.broadcast_sigma(0.5, x) == 0.5
    with pytest.raises(ValueError, match=r"\[B\]"):
        edm.broadcast_sigma(torch.ones(2), x)
