"""cmt-inspect --preview on a latent dataset: cmt-build from a tiny official-format EDM2 latent pickle,
then the preview decoded through a tiny diffusers AutoencoderKL (8x down, as the SD VAE)."""
import functools
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("diffusers")

from cmt.builders.build import Teacher, build_trajectories  # noqa: E402
from cmt.builders.inspect import inspect_trajectories  # noqa: E402
from cmt.cli.build import main as build_main  # noqa: E402
from cmt.cli.inspect import main as inspect_main  # noqa: E402
from cmt.errors import ArgumentError  # noqa: E402
from cmt.gmm import gmm_denoiser, random_gmm  # noqa: E402
from cmt.images import LABEL_HEIGHT, readable_scale  # noqa: E402
from cmt.latents import load_vae  # noqa: E402
from cmt.manifest import TrajectoryDataset  # noqa: E402

from conftest import invoke_command  # noqa: E402
from edm2_fixtures import Persistent, save_tiny_vae, tiny_official_network, vae_encoder, write_edm2_pickle  # noqa: E402

TRAJECTORIES, STATES, LATENT, PIXELS = 4, 5, 8, 64  # nfe 4 keeps 5 states; 8x8 latents decode to 64x64


@pytest.fixture(scope="module")
def latent_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    data = dict(ema=tiny_official_network(), encoder=vae_encoder(),
                loss_fn=Persistent("EDM2Loss", P_mean=-0.4, P_std=1.0))
    with pytest.MonkeyPatch.context() as monkeypatch:
        write_edm2_pickle(root / "tiny.pkl", monkeypatch, data, module_src="")
    result = CliRunner().invoke(build_main, ["--teacher", "edm2", "--teacher-ckpt", str(root / "tiny.pkl"),
                                             "--nfe", "4", "--num-trajectories", str(TRAJECTORIES),
                                             "--out", str(root / "shards"), "--no-progress"])
    assert result.exit_code == 0, result.output
    return root / "shards", save_tiny_vae(root / "vae")


inspect = functools.partial(invoke_command, inspect_main)   # cmt-inspect in this process


# The preview enlarges small decoded images to the readable size and labels its columns on top.
SCALE = readable_scale(PIXELS, PIXELS)
CELL = SCALE * PIXELS


def tile(png, row, column):
    top, left = LABEL_HEIGHT + 2 + row * (CELL + 2), 2 + column * (CELL + 2)
    return png[top:top + CELL:SCALE, left:left + CELL:SCALE].astype(np.int64)


def test_preview_decodes_latent_trajectories(latent_set, tmp_path):
    shards, vae_dir = latent_set
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["teacher"]["encoder"]["kind"] == "stability_vae" and manifest["data_shape"] == [4, LATENT, LATENT]
    out = tmp_path / "preview.png"
    code, text = inspect(shards, "--preview", out, "--vae", vae_dir)
    assert code == 0, text
    png = np.asarray(Image.open(out))
    assert png.shape == (LABEL_HEIGHT + TRAJECTORIES * (CELL + 2) + 2, STATES * (CELL + 2) + 2, 3)

    # Tiles are the VAE's decoding of each state divided by sqrt(1 + sigma^2 / sigma_data^2), in EDM2's
    # raw-latent units (final = raw * scale + bias) and [0, 1] pixels.
    dataset = TrajectoryDataset(str(shards))
    states = torch.from_numpy(dataset.read_shard(dataset.shards[0])["states"].astype(np.float32))
    encoder, sigmas = manifest["teacher"]["encoder"], manifest["kept_sigmas"]
    scale, bias = (torch.tensor(encoder[key]).reshape(4, 1, 1) for key in ("scale", "bias"))
    vae = load_vae(vae_dir)
    for row, column in ((0, 0), (3, 0), (1, STATES - 1), (2, 2)):
        latent = states[row, column] / math.sqrt(1 + sigmas[column] ** 2 / 0.5 ** 2)
        with torch.no_grad():
            pixels = vae.decode(((latent - bias) / scale)[None])["sample"][0].clamp(0, 1)
        expected = (pixels * 255).round().permute(1, 2, 0).numpy().astype(np.int64)
        assert np.abs(tile(png, row, column) - expected).max() <= 1, (row, column)
    # Different states decode to different pictures (the decoder is not ignoring its input).
    assert np.abs(tile(png, 0, 0) - tile(png, 0, STATES - 1)).mean() > 1


def test_latent_preview_needs_a_vae(latent_set, tmp_path):
    shards, _ = latent_set
    out = tmp_path / "preview.png"
    code, text = inspect(shards, "--preview", out)
    assert code == 2 and "--vae: this dataset holds VAE latents" in text and "the hub id stabilityai/sd-vae-ft-mse" in text
    assert not out.exists()
    with pytest.raises(ArgumentError, match="the hub id stabilityai/sd-vae-ft-mse") as error:
        inspect_trajectories(shards, preview=out)
    assert error.value.argument == "vae" and not out.exists()
    (tmp_path / "empty").mkdir()
    code, text = inspect(shards, "--preview", out, "--vae", tmp_path / "empty")
    assert code == 2 and "--vae" in text and "no config.json" in text and not out.exists()
    code, text = inspect(shards, "--vae", tmp_path / "empty")
    assert code == 2 and "--preview: the vae decodes the preview" in text and "(OUT.png) too" in text
    code, text = inspect(shards)  # the summary alone needs no VAE
    assert code == 0 and "states    [4, 5, 4, 8, 8] float16" in text


def test_vae_is_refused_for_pixel_datasets(latent_set, tmp_path):
    _, vae_dir = latent_set
    mu, logw, s = random_gmm(2, 3 * 4 * 4, std=0.2, generator=torch.Generator().manual_seed(0))
    teacher = Teacher(gmm_denoiser(mu, logw, s), (3, 4, 4), 0,
                      {"kind": "gmm", "name": "gmm-pixels", "sha256": "0" * 64, "config": {"architecture": "gmm"}},
                      dtype=torch.float64)
    build_trajectories(teacher=teacher, out=tmp_path / "pixels", num_trajectories=2, batch_size=2, shard_size=2, nfe=2,
                       progress=False, log=lambda message: None)
    code, text = inspect(tmp_path / "pixels", "--preview", tmp_path / "pixels.png", "--vae", vae_dir)
    assert code == 2 and "no latent encoder" in text and not (tmp_path / "pixels.png").exists()
