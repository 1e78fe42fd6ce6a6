import json
import re
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cmt import metrics
from cmt.datasets import load_mnist, reference_sample, sample_toy
import cmt
from cmt.cli.evaluate import main
from cmt.errors import ArgumentError
from cmt.evaluation import evaluate_samples


# ----------------------------------------------------------------------------------------------
# Frechet distance


def test_frechet_distance_matches_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    std1, std2 = rng.uniform(0.2, 2, size=6), rng.uniform(0.2, 2, size=6)
    expected = np.square(mu1 - mu2).sum() + np.square(std1 - std2).sum()
    assert metrics.frechet_distance(mu1, np.diag(std1**2), mu2, np.diag(std2**2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_full_covariances_and_symmetry():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    sigma1, sigma2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu = rng.normal(size=5)
    # tr sqrt(S1 S2) = sum of sqrt of the (real, non-negative) eigenvalues of S1 S2
    expected = np.square(mu).sum() + np.trace(sigma1 + sigma2) - 2 * np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).real).sum()
    forward = metrics.frechet_distance(mu, sigma1, np.zeros(5), sigma2)
    assert forward == pytest.approx(expected, rel=1e-8)
    assert metrics.frechet_distance(np.zeros(5), sigma2, mu, sigma1) == pytest.approx(forward, rel=1e-8)
    assert metrics.frechet_distance(mu, sigma1, mu, sigma1) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_singular_covariances_stay_finite():
    sigma1, sigma2 = np.diag([1.0, 0.0, 4.0]), np.diag([0.0, 1.0, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distance = metrics.frechet_distance(np.zeros(3), sigma1, np.zeros(3), sigma2)
    # exact value 3; the eps offset costs about 2 * sqrt(eps) per singular direction
    assert distance == pytest.approx(1 + 1 + 1, abs=1e-2)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.frechet_distance(np.zeros(3), sigma1, np.zeros(2), np.eye(2))


def test_feature_statistics():
    features = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mu, sigma = metrics.feature_statistics(features)
    assert np.allclose(mu, [2, 4]) and np.allclose(sigma, np.cov(features.numpy(), rowvar=False))


# ----------------------------------------------------------------------------------------------
# 2-D metrics


def test_energy_distance_known_values():
    x = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    assert metrics.energy_distance(x, x) == pytest.approx(0, abs=1e-12)
    # two point masses a distance 5 apart: 2 * 5 - 0 - 0
    assert metrics.energy_distance(torch.zeros(4, 2), torch.tensor([[3.0, 4.0]]).repeat(7, 1)) == pytest.approx(10)
    assert metrics.energy_distance(x, x + torch.tensor([1.0, 0.0]), chunk=64) > 0.3


def test_sliced_wasserstein_of_a_translation():
    x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    shift = torch.tensor([0.6, 0.8])
    # projections of a translation by v move every quantile by <v, theta>; E<v, theta>^2 = |v|^2 / 2
    value = metrics.sliced_wasserstein(x, x + shift, n_projections=2000)
    assert value == pytest.approx(1 / np.sqrt(2), rel=0.03)
    assert metrics.sliced_wasserstein(x, x) == 0
    assert metrics.sliced_wasserstein(x, x[:500] + shift) > 0.5  # unequal sizes
    assert metrics.sliced_wasserstein(x, x + shift) == metrics.sliced_wasserstein(x, x + shift)  # fixed directions


@pytest.mark.parametrize("name", ["checkerboard", "8gaussians", "moons"])
def test_toy_metric_fresh_samples_near_zero_shifted_far(name):
    fresh = sample_toy(name, 4096, torch.Generator().manual_seed(7))
    same = metrics.embedded_metric(f"toy:{name}", fresh)
    shifted = metrics.embedded_metric(f"toy:{name}", fresh + 0.15)
    assert set(same) == {"energy_distance", "sliced_wasserstein"}
    assert same["energy_distance"] < 3e-3 and same["sliced_wasserstein"] < 0.05
    assert shifted["energy_distance"] > 10 * same["energy_distance"] and shifted["sliced_wasserstein"] > 0.1
    if name == "checkerboard":
        other = sample_toy("rings", 4096, torch.Generator().manual_seed(7))
        assert metrics.energy_distance(other, reference_sample(name)) > 10 * same["energy_distance"]
    assert metrics.embedded_metric(f"toy:{name}", reference_sample(name))["energy_distance"] == pytest.approx(0, abs=1e-12)


def test_embedded_metric_other_data_and_bad_shapes():
    assert metrics.embedded_metric("some/folder", torch.zeros(4, 3, 8, 8)) == {}
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        metrics.embedded_metric("toy:moons", torch.zeros(4, 3))


# ----------------------------------------------------------------------------------------------
# FD-MNIST


def test_mnist_classifier_recognises_digits():
    images, labels = load_mnist(16)
    with torch.no_grad():
        predicted = metrics.mnist_classifier()(images).argmax(dim=1)
    assert (predicted == labels).float().mean() > 0.97
    assert metrics.MNIST_CLASSIFIER.stat().st_size < 500_000


def test_fd_mnist_real_halves_far_below_noise_and_blur():
    images, _ = load_mnist(16)
    order = torch.randperm(5000, generator=torch.Generator().manual_seed(0))
    half = images[order[:2500]]
    noise = torch.randn(2500, 1, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    blurred = torch.nn.functional.avg_pool2d(half, 3, stride=1, padding=1, count_include_pad=False)
    real, blur, random = metrics.mnist_fd(half), metrics.mnist_fd(blurred), metrics.mnist_fd(noise)
    assert real < 0.05 * blur and blur < random
    assert metrics.embedded_metric("mnist", half) == {"fd_mnist": real}


def test_fd_mnist_accepts_28_and_padded_32():
    assert metrics.mnist_fd(load_mnist(28)[0]) == pytest.approx(0, abs=1e-6)
    assert metrics.mnist_fd(load_mnist(32)[0]) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="grayscale"):
        metrics.mnist_fd(torch.zeros(4, 3, 16, 16))


# ----------------------------------------------------------------------------------------------
# Inception FID with a small TorchScript stand-in for inception-2015-12-05.pt


class _StandInDetector(torch.nn.Module):
    """Same call as the real detector: uint8 [N, 3, H, W] and return_features -> features [N, D]."""

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pixels = images.float() / 255
        return torch.cat([pixels.mean(dim=(2, 3)), torch.nn.functional.avg_pool2d(pixels, 4).flatten(1)], dim=1)


@pytest.fixture
def detector_path(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_StandInDetector()).save(str(tmp_path / "detector.pt"))
    return tmp_path / "detector.pt"


def _images(seed, n=256, offset=0.0):
    return (torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 1.6 - 0.8 + offset).clamp(-1, 1)


def test_inception_fid_pipeline(detector_path, tmp_path):
    real, fake = _images(0), _images(1, offset=0.3)
    scorer = metrics.InceptionFID(detector_path, batch_size=10)
    features = scorer.features(real)
    pixels = ((real * 127.5 + 128).clamp(0, 255).to(torch.uint8).float() / 255).repeat(1, 3, 1, 1)
    assert features.shape == (256, 3 + 3 * 4) and np.allclose(features[:, :3], pixels.mean(dim=(2, 3)).numpy(), atol=1e-6)
    mu, sigma = scorer.statistics(real)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    with_ref = metrics.InceptionFID(detector_path, reference=tmp_path / "ref.npz")
    assert with_ref(fake) == pytest.approx(metrics.frechet_distance(*scorer.statistics(fake), mu, sigma))
    assert with_ref(fake) > 10 * with_ref(_images(2))


def test_inception_fid_errors(detector_path, tmp_path):
    with pytest.raises(ValueError, match="pickles are not loaded"):
        metrics.InceptionFID(tmp_path / "inception-2015-12-05.pkl")
    with pytest.raises(ValueError, match="no such file"):
        metrics.InceptionFID(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        metrics.InceptionFID(tmp_path / "junk.pt")
    np.savez(tmp_path / "bad_ref.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        metrics.InceptionFID(detector_path, reference=tmp_path / "bad_ref.npz")
    with pytest.raises(ValueError, match="no reference statistics"):
        metrics.InceptionFID(detector_path)(_images(0))


# ----------------------------------------------------------------------------------------------
# cmt-eval


def _write_samples(path, samples, **extra):
    np.savez(path, samples=np.asarray(samples), **extra)
    return str(path)


def test_cmt_eval_toy_text_and_json(tmp_path):
    good = _write_samples(tmp_path / "good.npz", sample_toy("moons", 2048, torch.Generator().manual_seed(1)))
    bad = _write_samples(tmp_path / "bad.npz", sample_toy("moons", 2048, torch.Generator().manual_seed(1)) * 1.5)
    runner = CliRunner()
    result = runner.invoke(main, ["--samples", good, "--data", "toy:moons"])
    assert result.exit_code == 0, result.output
    assert "energy_distance" in result.output and "sliced_wasserstein" in result.output
    good_json = json.loads(runner.invoke(main, ["--samples", good, "--data", "toy:moons", "--json"]).output)
    bad_json = json.loads(runner.invoke(main, ["--samples", bad, "--data", "toy:moons", "--json"]).output)
    assert good_json["count"] == 2048 and good_json["data"] == "toy:moons"
    assert bad_json["energy_distance"] > 5 * good_json["energy_distance"]


def test_cmt_eval_mnist(tmp_path):
    images, labels = load_mnist(16)
    path = _write_samples(tmp_path / "digits.npz", images[::5].numpy(), labels=labels[::5].numpy())  # every class
    result = CliRunner().invoke(main, ["--samples", path, "--data", "mnist", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["fd_mnist"] < 50


def test_cmt_eval_fid_against_data_folder(tmp_path, detector_path):
    data = tmp_path / "data.npz"
    np.savez(data, x=_images(0).numpy())
    samples = _write_samples(tmp_path / "samples.npz", _images(1).numpy())
    result = CliRunner().invoke(main, ["--samples", samples, "--data", str(data), "--fid", "--detector", str(detector_path), "--json"])
    assert result.exit_code == 0, result.output
    fid = json.loads(result.output)["fid"]
    scorer = metrics.InceptionFID(detector_path)
    assert fid == pytest.approx(metrics.frechet_distance(*scorer.statistics(_images(1)), *scorer.statistics(_images(0))))
    assert evaluate_samples(_images(1), str(data), fid=scorer)["fid"] == pytest.approx(fid)


@pytest.mark.parametrize(
    "arguments, match",
    [
        (["--data", "toy:moons", "--samples", "{missing}"], "does not exist"),
        (["--data", "toy:nope", "--samples", "{points}"], "toy:checkerboard"),
        (["--data", "toy:moons", "--samples", "{wrong_key}"], "no 'samples' array"),
        (["--data", "toy:moons", "--samples", "{images}"], r"\[N, 2\]"),
        (["--data", "mnist", "--samples", "{points}"], "holds images"),
        (["--data", "mnist", "--samples", "{images}", "--fid"], "--fid needs --detector"),
        (["--data", "toy:moons", "--samples", "{points}", "--fid", "--detector", "x.pt"], "needs image data"),
        (["--data", "mnist", "--samples", "{images}", "--fid", "--detector", "{missing}"], "no such file"),
        (["--data", "mnist", "--samples", "{images}", "--ref", "r.npz"], "only used with --fid"),
        (["--data", "{images}", "--samples", "{images}"], "no built-in metric"),
    ],
)
def test_cmt_eval_errors_exit_2_with_a_clear_message(tmp_path, arguments, match):
    paths = {
        "missing": str(tmp_path / "missing.npz"),
        "points": _write_samples(tmp_path / "points.npz", np.zeros((8, 2), np.float32)),
        "images": _write_samples(tmp_path / "images.npz", np.zeros((8, 1, 16, 16), np.float32)),
        "wrong_key": str(tmp_path / "wrong.npz"),
    }
    np.savez(paths["wrong_key"], x=np.zeros((8, 2)))
    result = CliRunner().invoke(main, [argument.format(**paths) for argument in arguments])
    assert result.exit_code == 2
    assert re.search(match, result.output), result.output


def test_evaluate_entry_point(tmp_path, detector_path):
    points = sample_toy("moons", 2048, torch.Generator().manual_seed(1))
    path = _write_samples(tmp_path / "good.npz", points)
    result = cmt.evaluate(samples=path, data="toy:moons")
    assert result["count"] == 2048 and result["data"] == "toy:moons" and str(result["samples"]) == path
    assert set(result["metrics"]) == {"energy_distance", "sliced_wasserstein"}
    assert cmt.evaluate(samples=points, data="toy:moons")["metrics"] == result["metrics"]   # samples in memory
    data = tmp_path / "data.npz"
    np.savez(data, x=_images(0).numpy())
    fid = cmt.evaluate(samples=_images(1), data=str(data), fid=True, detector=str(detector_path))["metrics"]["fid"]
    scorer = metrics.InceptionFID(detector_path)
    assert fid == pytest.approx(metrics.frechet_distance(*scorer.statistics(_images(1)), *scorer.statistics(_images(0))))


@pytest.mark.parametrize("kwargs, argument", [
    ({"samples": "missing.npz"}, "samples"),
    ({"data": "toy:nope"}, "data"),
    ({"fid": True}, "detector"),
    ({"ref": "r.npz"}, "ref"),
    ({"data": "toy:moons", "fid": True, "detector": "x.pt"}, "data"),
    ({"fid": True, "detector": "missing.pt"}, "detector"),
])
def test_evaluate_errors_name_the_argument(tmp_path, kwargs, argument):
    images = _write_samples(tmp_path / "images.npz", np.zeros((8, 1, 16, 16), np.float32))
    options = {"samples": images, "data": "mnist", **kwargs}
    if options["samples"] == "missing.npz":
        options["samples"] = tmp_path / "missing.npz"
    with pytest.raises(ArgumentError) as error:
        cmt.evaluate(**options)
    assert error.value.argument == argument


def test_the_point_metrics_score_at_most_their_cap_and_say_so(monkeypatch):
    monkeypatch.setattr(metrics, "POINT_METRIC_MAX_SAMPLES", 64)
    points = sample_toy("moons", 200, torch.Generator().manual_seed(0))
    capped = metrics.embedded_metric("toy:moons", points)
    assert capped == metrics.embedded_metric("toy:moons", points[:64])   # the first 64: work flat in the count
    assert capped != metrics.embedded_metric("toy:moons", points[:63])
    assert metrics.metric_note("toy:moons", 200).startswith("metrics of the first 64 of the 200 samples")
    assert metrics.metric_note("toy:moons", 64) is None and metrics.metric_note("mnist", 10**6) is None
    assert metrics.too_few_for_a_metric(1) == "1 sample; a metric compares distributions and needs at least 2"
    assert metrics.too_few_for_a_metric(2) is None
    with pytest.raises(ArgumentError, match="the samples hold 1 sample"):
        cmt.evaluate(samples=points[:1], data="toy:moons")
    assert cmt.evaluate(samples=points, data="toy:moons")["metric_note"].startswith("metrics of the first 64")
