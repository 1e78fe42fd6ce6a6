"""cmt-encode (issue 28): an image set encoded once through a VAE into a latent set, read back one item at
a time as training data, inspected, and scored; with a tiny random SD-shaped AutoencoderKL."""
import io
import json
import subprocess
import warnings
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

diffusers = pytest.importorskip("diffusers")

import cmt  # noqa: E402
import cmt.cli.train  # noqa: E402
from cmt.builders.encode import encode_dataset  # noqa: E402
from cmt.cli.encode import main as encode_main  # noqa: E402
from cmt.cli.evaluate import main as eval_main  # noqa: E402
from cmt.cli.inspect import main as inspect_main  # noqa: E402
from cmt.datasets.latents import LatentSet  # noqa: E402
from cmt.datasets.stream import BatchStream  # noqa: E402
from cmt.errors import ArgumentError, FileFormatError  # noqa: E402
from cmt.latents import edm2_latent_scaling, load_vae  # noqa: E402
from cmt.metrics import InceptionFID, feature_statistics, frechet_distance  # noqa: E402
from cmt.trainers.data import check_data_fits, data_batches, training_data  # noqa: E402
from conftest import TWO_CPU_ENV, TWO_CPU_PROCESSES  # noqa: E402
from edm2_fixtures import save_tiny_vae  # noqa: E402

COUNT, SIDE = 10, 16   # 16x16 images -> 4 x 2 x 2 latents (the SD VAE's 8x down)
QUIET = dict(progress=False, log=lambda line: None, workers=0)


def png(seed, mode="RGB"):
    array = np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).convert(mode).save(buffer, "png")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode")
    with zipfile.ZipFile(root / "images.zip", "w") as archive:
        for i in range(COUNT):
            archive.writestr(f"img{i:04d}.png", png(i))
        archive.writestr("dataset.json", json.dumps({"labels": [[f"img{i:04d}.png", i % 3] for i in range(COUNT)]}))
    vae = save_tiny_vae(root / "vae")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = encode_dataset(source=root / "images.zip", out=root / "edm2", vae=str(vae), shard_size=4,
                                batch_size=3, **QUIET)
    return root, vae, result


def pixels(index):
    array = np.asarray(PIL.Image.open(io.BytesIO(png(index))))
    return torch.from_numpy(array.transpose(2, 0, 1).copy()).float()[None] / 127.5 - 1


def test_edm2_moments_scaling_and_record(setup):
    root, vae_dir, result = setup
    manifest = json.loads((root / "edm2" / "manifest.json").read_text())
    assert manifest["dataset"] == "cmt-latents" and manifest["count"] == COUNT and manifest["data_shape"] == [4, 2, 2]
    assert [entry["count"] for entry in manifest["shards"]] == [4, 4, 2] and manifest["label_dim"] == 3
    encoder = manifest["encoder"]
    assert encoder["scaling"] == "edm2" and encoder["pixel_range"] == [0.0, 1.0] and encoder["vae_name"] == str(vae_dir)
    assert encoder["scale"] == pytest.approx(edm2_latent_scaling()[0]) and len(encoder["vae_sha256"]) == 64
    data = LatentSet(root / "edm2")
    assert data.kind == "latents" and data.data_shape == (4, 2, 2) and data.labels.tolist() == [i % 3 for i in range(10)]
    # EDM2's encode_pixels: the VAE posterior of [0, 1] pixels; the stored moments are its mean and std.
    vae = load_vae(vae_dir)
    posterior = vae.encode((pixels(5) + 1) / 2)["latent_dist"]
    mean, std = data.moments(5)
    np.testing.assert_allclose(mean, posterior.mean[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(std, posterior.std[0].numpy(), atol=1e-5)
    # An item is (mean + std * noise) * scale + bias, its noise seeded by the key (index, flip, epoch, seed).
    scale, bias = (np.asarray(encoder[key], np.float32).reshape(4, 1, 1) for key in ("scale", "bias"))
    noise = np.random.default_rng([7, 2, 5]).standard_normal((4, 2, 2), np.float32)
    batch = data.__getitems__(np.array([[5, 0, 2, 7], [5, 0, 2, 7], [5, 0, 3, 7]]))
    np.testing.assert_allclose(batch["data"][0].numpy(), (mean + std * noise) * scale + bias, rtol=1e-6)
    assert torch.equal(batch["data"][0], batch["data"][1]) and not torch.equal(batch["data"][0], batch["data"][2])
    np.testing.assert_allclose(LatentSet(root / "edm2", sample=False)[5][0], mean * scale + bias, rtol=1e-6)
    assert result["data_shape"] == [4, 2, 2] and len(result["shards"]) == 3


def test_sd_scaling_and_flips(setup, tmp_path):
    root, vae_dir, _ = setup
    encode_dataset(source=root / "images.zip", out=tmp_path / "sd", vae=str(vae_dir), scaling="sd", flips=True,
                   shard_size=8, **QUIET)
    data = LatentSet(tmp_path / "sd")
    assert data.flips and data.encoder["scale"] == pytest.approx([0.18215] * 4) and data.encoder["bias"] == [0.0] * 4
    vae = load_vae(vae_dir)   # MeanFlow's: the VAE sees [-1, 1] pixels; flips: the mirrored image's moments
    for flip in (False, True):
        image = pixels(3).flip(-1) if flip else pixels(3)
        np.testing.assert_allclose(data.moments(3, flip=flip)[0], vae.encode(image)["latent_dist"].mean[0].numpy(),
                                   atol=1e-5)
    stream = data_batches(data, 4, seed=0, workers=0)   # stored flips are drawn by default
    assert isinstance(stream, BatchStream) and stream.xflip and next(stream)["data"].shape == (4, 4, 2, 2)


def test_resume_rebuilds_only_what_is_missing_and_refuses_other_options(setup, tmp_path):
    root, vae_dir, _ = setup
    options = dict(source=root / "images.zip", vae=str(vae_dir), shard_size=4, batch_size=3, **QUIET)
    out = tmp_path / "set"
    encode_dataset(out=out, **options)
    fresh = {path.name: path.read_bytes() for path in sorted(out.glob("shard-*/**/*")) if path.is_file()}
    (out / "shard-000001.json").unlink()   # as if killed before shard 1 was recorded
    (out / "manifest.json").unlink()
    before = (out / "shard-000000.zarr" / "mean" / "c" / "0" / "0" / "0" / "0").stat().st_mtime_ns
    encode_dataset(out=out, **options)
    assert (out / "shard-000000.zarr" / "mean" / "c" / "0" / "0" / "0" / "0").stat().st_mtime_ns == before
    assert {path.name: path.read_bytes() for path in sorted(out.glob("shard-*/**/*")) if path.is_file()} == fresh
    assert json.loads((out / "manifest.json").read_text())["count"] == COUNT
    with pytest.raises(ArgumentError, match="another configuration.*batch_size") as error:
        encode_dataset(out=out, **{**options, "batch_size": 2})
    assert error.value.argument == "out"


def test_ranks_split_the_shards_and_write_the_same_bytes(setup, tmp_path):
    root, vae_dir, _ = setup
    command = [*TWO_CPU_PROCESSES, "-m", "cmt.cli.encode", "--source", str(root / "images.zip"), "--vae",
               str(vae_dir), "--shard-size", "4", "--batch-size", "3", "--workers", "0", "--no-progress",
               "--out", str(tmp_path / "two")]
    result = subprocess.run(command, env=TWO_CPU_ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    files = lambda folder: {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.glob("shard-*/**/*"))
                            if p.is_file()}
    assert files(tmp_path / "two") == files(root / "edm2")


def test_refusals_name_the_option(setup, tmp_path):
    root, vae_dir, _ = setup
    wide = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 4),
                                   layers_per_block=1, latent_channels=8, norm_num_groups=2)
    cases = [
        (dict(vae=wide), "vae", "8-channel latents; the edm2 scaling has statistics for 4"),
        (dict(vae=str(vae_dir), resolution=12), "vae", "downsamples by 8; the images are 12x12"),
        (dict(vae=str(vae_dir), source="mnist"), "source", "not a built-in data set"),
        (dict(vae=str(tmp_path)), "vae", "no config.json"),
        (dict(vae=str(vae_dir), scaling="sdxl"), "scaling", "not one of edm2, sd"),
    ]
    for options, argument, match in cases:
        options = {"source": root / "images.zip", "out": tmp_path / "x", **options}
        with pytest.raises(ArgumentError, match=match) as error:
            encode_dataset(**options, **QUIET)
        assert error.value.argument == argument
    assert not (tmp_path / "x").exists()
    result = CliRunner().invoke(encode_main, ["--source", str(root / "images.zip"), "--out", str(tmp_path / "y"),
                                              "--vae", str(vae_dir), "--resolution", "12", "--no-progress"])
    assert result.exit_code == 2 and "--vae" in result.output and "Traceback" not in result.output


def test_latent_sets_as_training_data(setup, tmp_path):
    root, vae_dir, _ = setup
    data = training_data(str(root / "edm2"))
    assert isinstance(data, LatentSet) and data.encoder["scaling"] == "edm2"
    with pytest.raises(ArgumentError, match="resolution does not apply"):
        training_data(str(root / "edm2"), resolution=8)
    pixel_net = cmt.networks.build_network(dict(architecture="edm2", img_resolution=16, img_channels=3, label_dim=3,
                                                model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[]))
    with pytest.raises(ArgumentError, match="edm2 is a latent set.*works on pixels"):
        check_data_fits(data, pixel_net)
    latent_net = cmt.networks.build_network(dict(pixel_net.config, img_resolution=2, img_channels=4))
    check_data_fits(data, latent_net)
    with pytest.raises(ArgumentError, match="holds pixel images.*encode the images with cmt-encode"):
        check_data_fits(training_data(str(root / "images.zip"), resolution=2), latent_net)
    # Diffusion pre-training on it: the model records the VAE; its sample grid is decoded pixels.
    run = cmt.train_diffusion(data=str(root / "edm2"), out=tmp_path / "teacher", max_steps=2, batch_size=4,
                              channels=8, channel_mult=(1,), num_blocks=1, attn_res=(), num_samples=0,
                              progress=False, sample_steps=1)
    assert json.loads(run["model"].with_suffix(".json").read_text())["extra"]["encoder"]["vae_name"] == str(vae_dir)
    grid = PIL.Image.open(tmp_path / "teacher" / "samples" / "step-0000002.png")
    assert grid.mode == "RGB"


def test_a_nan_in_a_latent_set_stops_training_naming_its_shard(setup, tmp_path):
    import shutil
    root, _, _ = setup
    shutil.copytree(root / "edm2", tmp_path / "edm2")
    rows = LatentSet(tmp_path / "edm2").rows["mean"][1]   # shard 1 holds items 4..7
    rows.read(2)
    offset = int(rows.index[2][0])
    with open(rows.path, "r+b") as file:   # item 6's stored mean (uncompressed float32): a NaN
        file.seek(offset)
        file.write(np.float32(np.nan).tobytes())
    latents = LatentSet(tmp_path / "edm2")
    assert "error" not in latents.__getitems__(np.array([[5, 0, 0, 0], [7, 0, 0, 0]]))
    drawn = latents.__getitems__(np.array([[5, 0, 0, 0], [6, 0, 0, 0]]))
    assert "shard-000001" in drawn["error"] and "item 6" in drawn["error"] and "NaN or inf" in drawn["error"]
    with pytest.raises(FileFormatError, match="item 6"):
        latents[6]
    result = CliRunner().invoke(cmt.cli.train.main, ["diffusion", "--data", str(tmp_path / "edm2"), "--max-steps", "4",
                                                     "--batch-size", "10", "--channels", "8", "--channel-mult", "1",
                                                     "--num-blocks", "1", "--attn-res", "", "--num-samples", "0",
                                                     "--no-progress", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "shard-000001" in result.output and "item 6" in result.output


def test_inspect_and_eval_read_a_latent_set(setup, tmp_path):
    root, vae_dir, _ = setup
    result = CliRunner().invoke(inspect_main, [str(root / "edm2"), "--verify", "--preview", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert "edm2 scaling" in result.output and "[10, 4, 2, 2]" in result.output and "all checksums match" in result.output
    assert PIL.Image.open(tmp_path / "p.png").mode == "RGB"
    # FID of latent samples: decoded through the recorded VAE, against the images the set came from.
    from test_metrics import _StandInDetector
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_StandInDetector()).save(str(tmp_path / "detector.pt"))
    latents = LatentSet(root / "edm2", sample=False).tensors()[0]
    np.savez(tmp_path / "samples.npz", samples=latents.numpy())
    result = CliRunner().invoke(eval_main, ["--samples", str(tmp_path / "samples.npz"), "--data", str(root / "edm2"),
                                            "--fid", "--detector", str(tmp_path / "detector.pt"), "--json"])
    assert result.exit_code == 0, result.output
    scorer = InceptionFID(tmp_path / "detector.pt")
    decoded = LatentSet(root / "edm2").decode(latents)
    images = cmt.datasets.resolve_data(str(root / "images.zip")).tensors()[0]
    expected = frechet_distance(*feature_statistics(scorer.features(decoded)), *scorer.statistics(images))
    assert json.loads(result.output)["fid"] == pytest.approx(expected, rel=1e-6)
    result = CliRunner().invoke(eval_main, ["--samples", str(tmp_path / "samples.npz"), "--data", str(root / "edm2")])
    assert result.exit_code == 2 and "latent set" in result.output
