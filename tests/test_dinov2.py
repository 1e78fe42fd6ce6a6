"""FD-DINOv2 (cmt.dinov2, cmt-eval --fd-dinov2, --ref-stats): our ViT against the official DINOv2 code
and EDM2's detector (fixtures), the official ViT-L/14 layout by name, and the metric's plumbing with a
tiny DINOv2-shaped network (weights from a formula)."""
import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import cmt
from cmt.cli.evaluate import main as eval_main
from cmt.datasets.resolve import ImageData
from cmt.dinov2 import (DINOV2_URL, VITL14, DINOv2Detector, DinoVisionTransformer, config_from_state_dict,
                        load_dinov2, preprocess, to_uint8)
from cmt.download import DownloadError
from cmt.evaluation import evaluate_samples, streamed_statistics
from cmt.metrics import FeatureMoments, feature_statistics, frechet_distance, load_reference_statistics
from conftest import FIXTURES
from dinov2_formula import TINY, formula_weights

REFERENCE = load_file(FIXTURES / "dinov2_tiny_io.safetensors")
SHAPES = json.loads((FIXTURES / "dinov2_tiny.json").read_text())["shapes"]


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """The tiny network's weights as an official-style .pth (a plain state dict, torch.save)."""
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_tiny.pth"
    torch.save(formula_weights(SHAPES), path)
    return path


def test_the_official_vitl14_checkpoint_names_fit_our_network():
    keys = json.loads((FIXTURES / "dinov2_vitl14_keys.json").read_text())["keys"]
    with torch.device("meta"):
        net = DinoVisionTransformer(**VITL14)
    assert {name: list(value.shape) for name, value in net.state_dict().items()} == keys
    state = {name: torch.empty(shape, device="meta") for name, shape in keys.items()}
    assert config_from_state_dict(state) == {**VITL14, "in_chans": 3}


def test_features_match_the_official_model_and_edm2s_preprocessing(tiny_weights):
    net = load_dinov2(tiny_weights)
    assert net.config == {**TINY, "in_chans": 3}
    with torch.no_grad():
        # EDM2's DINOv2Detector: uint8 pixels, bicubic antialiased resize to 224, ImageNet normalisation.
        torch.testing.assert_close(net(preprocess(REFERENCE["pixels"])), REFERENCE["features"], rtol=1e-5, atol=1e-5)
        # The model alone: a non-square input (position embeddings resampled to 3 x 2) and the native 518.
        torch.testing.assert_close(net(REFERENCE["direct_input"]), REFERENCE["direct_features"], rtol=1e-5, atol=1e-5)
    pixels = REFERENCE["pixels"]
    detector = DINOv2Detector(tiny_weights, batch_size=3)
    images = pixels.float() / 127.5 - 1 + 0.2 / 255   # exactly these pixels again after to_uint8
    assert torch.equal(to_uint8(images), pixels)
    np.testing.assert_allclose(detector.features(images), REFERENCE["features"].double().numpy(), rtol=1e-5, atol=1e-5)
    gray = images[:, :1]
    assert torch.equal(to_uint8(gray), pixels[:, :1].repeat(1, 3, 1, 1))


def test_the_weights_are_downloaded_into_the_cache_or_named_when_offline(offline_hub):
    with pytest.raises(DownloadError) as caught:
        load_dinov2()
    message = str(caught.value)
    assert "dinov2_vitl14_pretrain.pth" in message and str(offline_hub / "cmt-cache" / "dinov2") in message
    # A copy put where the message says is used without any network access.
    (offline_hub / "cmt-cache" / "dinov2").mkdir(parents=True, exist_ok=True)
    torch.save(formula_weights(SHAPES), offline_hub / "cmt-cache" / "dinov2" / "dinov2_vitl14_pretrain.pth")
    assert load_dinov2(DINOV2_URL).config["width"] == TINY["width"]


def test_a_foreign_weight_file_is_refused(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a DINOv2 state dict"):
        load_dinov2(tmp_path / "other.pth")


def test_streamed_moments_equal_the_statistics_of_all_features():
    features = np.random.default_rng(0).normal(size=(1234, 5)) @ np.diag([1.0, 2.0, 0.5, 3.0, 1.0]) + 4.0
    moments = FeatureMoments(5)
    for part in np.array_split(features, 7):
        moments.add(part)
    mu, sigma = moments.statistics()
    expected_mu, expected_sigma = feature_statistics(features)
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-12)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-10, atol=1e-12)


def test_ranks_share_the_batches_and_sum_their_moments(monkeypatch):
    """Under two processes each rank streams its own batches (0, 2 / 1) and the sums are all-reduced:
    the two ranks' moments together are the statistics of every image."""
    monkeypatch.setattr("cmt.evaluation.FEATURE_BATCH", 10)
    reduced = []
    monkeypatch.setattr(FeatureMoments, "all_reduce", lambda self: reduced.append(self))
    images = torch.randn(25, 4, generator=torch.Generator().manual_seed(0)) * 3 + 1
    seen = []

    class Rank:
        num_processes = 2

        def __init__(self, index):
            self.process_index = index

    for rank in (0, 1):
        streamed_statistics({"f": lambda batch: seen.append((rank, len(batch))) or batch.double().numpy()}, images,
                            state=Rank(rank))
    assert seen == [(0, 10), (0, 5), (1, 10)]
    combined = FeatureMoments(4)
    for part in reduced:
        combined.count, combined.sum, combined.outer = (combined.count + part.count, combined.sum + part.sum,
                                                        combined.outer + part.outer)
    for value, expected in zip(combined.statistics(), feature_statistics(images)):
        np.testing.assert_allclose(value, expected, rtol=1e-10, atol=1e-12)


def image_data(tmp_path, name, seed, count=16, size=16, offset=0.0):
    generator = torch.Generator().manual_seed(seed)
    images = (torch.rand(count, 3, size, size, generator=generator) * 1.6 - 0.8 + offset).clamp(-1, 1)
    np.savez(tmp_path / name, x=images.numpy())
    return tmp_path / name, images


def test_fd_dinov2_of_samples_against_data_and_its_reference_file(tmp_path, tiny_weights, monkeypatch):
    monkeypatch.setattr("cmt.evaluation.FEATURE_BATCH", 6)   # several streamed batches
    data, real = image_data(tmp_path, "data.npz", 0)
    _, fake = image_data(tmp_path, "fake.npz", 1, offset=0.3)
    result = cmt.evaluate(samples=fake, data=str(data), fd_dinov2=True, dinov2=str(tiny_weights))
    detector = DINOv2Detector(tiny_weights)
    expected = frechet_distance(*feature_statistics(detector.features(fake)), *feature_statistics(detector.features(real)))
    assert set(result["metrics"]) == {"fd_dinov2"}
    assert result["metrics"]["fd_dinov2"] == pytest.approx(expected, rel=1e-6)
    same = cmt.evaluate(samples=real, data=str(data), fd_dinov2=True, dinov2=str(tiny_weights))["metrics"]["fd_dinov2"]
    assert same < 1e-6 * expected
    # The statistics of the data set, written once, give the same figure.
    written = cmt.evaluate(data=str(data), ref_stats=tmp_path / "refs.npz", fd_dinov2=True, dinov2=str(tiny_weights))
    assert written["ref_stats"] == tmp_path / "refs.npz" and written["count"] == 16
    mu, sigma = load_reference_statistics(tmp_path / "refs.npz", "fd_dinov2")
    expected_mu, expected_sigma = feature_statistics(detector.features(real))
    np.testing.assert_allclose(mu, expected_mu, rtol=1e-10)
    np.testing.assert_allclose(sigma, expected_sigma, rtol=1e-8, atol=1e-12)
    with_ref = cmt.evaluate(samples=fake, data=str(data), fd_dinov2=True, dinov2=str(tiny_weights),
                            ref=tmp_path / "refs.npz")
    assert with_ref["metrics"]["fd_dinov2"] == pytest.approx(expected, rel=1e-6)


def test_ref_stats_writes_fid_and_fd_dinov2_in_one_pass(tmp_path, tiny_weights, monkeypatch):
    """One pass over the data: every batch goes through both detectors once; the file holds EDM's FID
    names and the FD-DINOv2 ones, readable by --ref."""
    data, real = image_data(tmp_path, "data.npz", 0)
    calls = []

    def counting(name, function):
        return lambda batch: calls.append((name, len(batch))) or function(batch)

    def mean_features(images):   # a stand-in Inception detector's features
        return images.float().mean(dim=(2, 3)).double().numpy()

    class StandIn:
        def __init__(self, *args, **kwargs):
            self.features, self.reference = counting("fid", mean_features), None

    def dinov2(weights, device, ref):
        detector = DINOv2Detector(weights, device=device)
        detector.features = counting("fd_dinov2", detector.features)
        return detector

    monkeypatch.setattr("cmt.evaluation.InceptionFID", StandIn)
    monkeypatch.setattr("cmt.evaluation._dinov2", dinov2)
    monkeypatch.setattr("cmt.evaluation.FEATURE_BATCH", 10)
    code = CliRunner().invoke(eval_main, ["--data", str(data), "--ref-stats", str(tmp_path / "refs.npz"), "--fid",
                                          "--detector", "x.pt", "--fd-dinov2", "--dinov2", str(tiny_weights)])
    assert code.exit_code == 0, code.output
    assert "wrote" in code.output and "fid, fd_dinov2" in code.output
    assert calls == [("fid", 10), ("fd_dinov2", 10), ("fid", 6), ("fd_dinov2", 6)]
    with np.load(tmp_path / "refs.npz", allow_pickle=False) as contents:
        assert set(contents) == {"mu", "sigma", "fd_dinov2_mu", "fd_dinov2_sigma", "num_images", "data"}
        assert int(contents["num_images"]) == 16 and contents["mu"].shape == (3,)
        np.testing.assert_allclose(contents["mu"], mean_features(real).mean(axis=0), rtol=1e-12)


@pytest.mark.parametrize("arguments, match", [
    (["--samples", "{samples}", "--data", "toy:moons", "--fd-dinov2"], "needs image data"),
    (["--samples", "{samples}", "--data", "{data}", "--dinov2", "w.pth"], "only used with --fd-dinov2"),
    (["--samples", "{samples}", "--data", "{data}", "--fd-dinov2", "--dinov2", "{missing}"], "no such file"),
    (["--samples", "{samples}", "--data", "{data}", "--fd-dinov2", "--dinov2", "{weights}", "--ref", "{fid_only}"],
     "fd_dinov2_mu"),
    (["--data", "{data}", "--ref-stats", "{out}"], "--fid .* and/or --fd-dinov2"),
    (["--data", "{data}", "--ref-stats", "{out}", "--fd-dinov2", "--samples", "{samples}"], "leave --samples out"),
    (["--data", "{data}"], "give the samples"),
])
def test_cmt_eval_fd_dinov2_errors_exit_2_naming_the_option(tmp_path, tiny_weights, arguments, match):
    data, _ = image_data(tmp_path, "data.npz", 0)
    samples, _ = image_data(tmp_path, "samples.npz", 1)
    np.savez(tmp_path / "fid_only.npz", mu=np.zeros(3), sigma=np.eye(3))
    paths = {"data": data, "samples": tmp_path / "samples_s.npz", "missing": tmp_path / "missing.pth",
             "weights": tiny_weights, "fid_only": tmp_path / "fid_only.npz", "out": tmp_path / "refs.npz"}
    np.savez(paths["samples"], samples=np.load(samples)["x"])
    result = CliRunner().invoke(eval_main, [argument.format(**paths) for argument in arguments])
    assert result.exit_code == 2, result.output
    assert re.search(match, result.output), result.output


def test_offline_without_weights_cmt_eval_names_the_file(offline_hub, tmp_path):
    data, real = image_data(tmp_path, "data.npz", 0)
    np.savez(tmp_path / "samples.npz", samples=real.numpy())
    result = CliRunner().invoke(eval_main, ["--samples", str(tmp_path / "samples.npz"), "--data", str(data),
                                            "--fd-dinov2"])
    assert result.exit_code == 2 and "--dinov2" in result.output
    assert "dinov2_vitl14_pretrain.pth" in result.output and "Offline?" in result.output


def test_evaluate_samples_takes_a_detector_with_its_reference(tiny_weights):
    real = torch.rand(12, 3, 14, 14, generator=torch.Generator().manual_seed(0)) * 2 - 1
    detector = DINOv2Detector(tiny_weights)
    statistics = streamed_statistics({"fd_dinov2": detector.features}, real)["fd_dinov2"]
    detector.reference = statistics
    fake = (real + 0.4).clamp(-1, 1)
    data = ImageData("images", real, torch.full((12,), -1), 0)
    value = evaluate_samples(fake, data, fd_dinov2=detector)["fd_dinov2"]
    assert value == pytest.approx(frechet_distance(*feature_statistics(detector.features(fake)), *statistics), rel=1e-6)
    assert value > 0
