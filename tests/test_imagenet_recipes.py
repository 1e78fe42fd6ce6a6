"""The ImageNet recipes end to end at tiny sizes (issue 28), each through its whole pipeline with the
recipe's own data handling and a tiny network in place of the official one:

- imagenet512: a tiny EDM2 latent teacher standing in for EDM2-XXL (the recipe's preset, found in the
  cmt cache) -> cmt-build --recipe -> mid-training with the recipe (E-LatentLPIPS, random weights of
  its network in the cache) -> ECT, and ECD with the autoguided teacher + guide pair the recipe names
  (tiny local files in the cache under the official names; offline and absent, one line names them);
- imagenet64-ect: a tiny EDM2 img64-shaped pixel network as the recipe's init, on a streamed image
  folder with one sub-folder per class;
- imagenet256-meanflow: latents made by cmt-encode (--scaling sd --flips) through a tiny random-weight
  AutoencoderKL, a tiny SiT in place of the recipe's random sit-b/4, flips drawn as the recipe does.
Every student's sample pictures are decoded through the recorded VAE.
"""
import io
import json
import warnings
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import cmt  # noqa: E402
from cmt.checkpoint import load_network  # noqa: E402
from cmt.cli.build import main as build_main  # noqa: E402
from cmt.cli.encode import main as encode_main  # noqa: E402
from cmt.cli.sample import main as sample_main  # noqa: E402
from cmt.cli.train import main as train_main  # noqa: E402
from cmt.elatentlpips import ELatentLPIPS, cached_elatentlpips  # noqa: E402
from cmt.errors import ArgumentError  # noqa: E402
from cmt.networks.sit import SIT_PRESETS  # noqa: E402
from conftest import invoke_command  # noqa: E402
from edm2_fixtures import Persistent, save_tiny_vae, tiny_official_network, vae_encoder, write_edm2_pickle  # noqa: E402

CLASSES = 3
QUIET = dict(progress=False, workers=0)


def png(seed, side):
    array = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, "png")
    return buffer.getvalue()


def image_zip(path, count, side):
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(count):
            archive.writestr(f"img{i:04d}.png", png(i, side))
        archive.writestr("dataset.json", json.dumps({"labels": [[f"img{i:04d}.png", i % CLASSES]
                                                               for i in range(count)]}))
    return path


def edm2_pickle(path, net, encoder):
    with pytest.MonkeyPatch.context() as patch:
        write_edm2_pickle(path, patch, dict(ema=net, encoder=encoder), module_src="")


def latent_encoder(vae):
    """EDM2's img512 encoder record, with the tiny VAE as its VAE."""
    encoder = vae_encoder()
    encoder.state["vae_name"] = str(vae)
    return encoder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The cmt cache with the recipes' official files as tiny stand-ins, a tiny VAE, image sets."""
    root = tmp_path_factory.mktemp("imagenet")
    cache = root / "cache"
    (cache / "edm2").mkdir(parents=True)
    vae = save_tiny_vae(root / "vae")
    # EDM2-XXL (mid-training's teacher), the ECD teacher and its guide: 4 x 8 x 8 latents, 3 classes
    edm2_pickle(cache / "edm2" / "edm2-img512-xxl-0939524-0.070.pkl", tiny_official_network(), latent_encoder(vae))
    edm2_pickle(cache / "edm2" / "edm2-img512-xxl-0939524-0.075.pkl", tiny_official_network(), latent_encoder(vae))
    edm2_pickle(cache / "edm2" / "edm2-img512-m-0268435-0.155.pkl", tiny_official_network(model_channels=8),
                latent_encoder(vae))
    # EDM2-S img64 (imagenet64-ect's init): pixels, here 16 x 16, with dropout in its 16-px blocks
    edm2_pickle(cache / "edm2" / "edm2-img64-s-1073741-0.075.pkl",
                tiny_official_network(img_resolution=16, img_channels=3, channel_mult=[1, 2], attn_resolutions=[8]),
                Persistent("StandardRGBEncoder"))
    # E-LatentLPIPS's published file, as random weights of the same network
    (cache / "elatentlpips").mkdir()
    torch.save({key: value for key, value in ELatentLPIPS("sd15", weights="random").state_dict().items()
                if key != "filter"}, cache / "elatentlpips" / "sd15_latest_vgg16_tuned.pth")
    # ImageNet-512 stand-in: 64 x 64 images -> 4 x 8 x 8 EDM2 latents
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cmt.encode_dataset(source=image_zip(root / "img512.zip", 8, 64), out=root / "img512-latents", vae=str(vae),
                           scaling="edm2", batch_size=4, shard_size=4, workers=0, progress=False, log=lambda line: None)
    # ImageNet-64 stand-in: class sub-folders of 16 x 16 PNGs
    for i in range(9):
        folder = root / "imagenet64" / f"n0{i % CLASSES:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{i}.png").write_bytes(png(100 + i, 16))
    image_zip(root / "img256.zip", 8, 16)
    return root, cache, vae


@pytest.fixture
def cache(world, monkeypatch):
    monkeypatch.setenv("CMT_CACHE", str(world[1]))
    cached_elatentlpips.cache_clear()
    yield world[1]
    cached_elatentlpips.cache_clear()


def pictures(out, step):
    return [out / "samples" / f"step-{step:07d}-{steps}step.png" for steps in (1, 2)]


def test_imagenet512_build_mid_ect_and_ecd(world, cache, tmp_path):
    root, _, vae = world
    # cmt-build --recipe imagenet512: the recipe's teacher (EDM2-XXL, from the cache), DPM-Solver++(3M)
    code, output = invoke_command(build_main, "--recipe", "imagenet512", "--out", tmp_path / "shards",
                                  "--num-trajectories", 4, "--nfe", 4, "--shard-size", 4, "--no-progress")
    assert code == 0, output
    assert "teacher=edm2-img512-xxl" in output
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["teacher"]["preset"] == "edm2-img512-xxl" and manifest["teacher"]["encoder"]["vae_name"] == str(vae)
    # mid-training with the recipe: E-LatentLPIPS with its augmentation, on EDM2 latents
    mid = cmt.mid_train(data=tmp_path / "shards", recipe="imagenet512", out=tmp_path / "mid", max_steps=2,
                        batch_size=8, num_samples=4, **QUIET)
    checkpoint = torch.load(mid["checkpoint"], weights_only=True)
    assert checkpoint["options"]["loss"] == "elatentlpips" and checkpoint["options"]["elatentlpips_augment"] == "bgcno"
    assert np.isfinite(mid["metrics"]["loss"])
    assert all(path.is_file() for path in pictures(tmp_path / "mid", 2))      # decoded through the tiny VAE
    assert PIL.Image.open(pictures(tmp_path / "mid", 2)[0]).mode == "RGB"
    # post-training on the latent set: ECT, then ECD with the recipe's autoguided teacher pair
    latents = str(root / "img512-latents")
    ect = cmt.post_train(recipe="imagenet512", method="ect", init=mid["checkpoint"], data=latents,
                         out=tmp_path / "ect", max_steps=2, batch_size=4, num_samples=4, **QUIET)
    record = load_network(ect["model"]).record
    assert record["recipe"]["name"] == "imagenet512" and record["stage"] == 9 and record["encoder"]["scaling"] == "edm2"
    assert all(path.is_file() for path in pictures(tmp_path / "ect", 2))
    ecd = cmt.post_train(recipe="imagenet512", method="ecd", init=mid["checkpoint"], data=latents,
                         out=tmp_path / "ecd", max_steps=2, batch_size=4, num_samples=4, **QUIET)
    record = load_network(ecd["model"]).record
    assert record["teacher"] == "edm2-img512-xxl-0939524-0.075.pkl"
    guidance = record["teacher_guidance"]
    assert guidance["weight"] == 2.05 and "edm2-img512-m-0268435-0.155.pkl" in json.dumps(guidance)
    assert all(path.is_file() for path in pictures(tmp_path / "ecd", 2))


def test_imagenet512_ecd_offline_names_the_missing_file(world, tmp_path, offline_hub):
    mid_like = world[1] / "edm2" / "edm2-img512-xxl-0939524-0.070.pkl"
    with pytest.raises(ArgumentError) as error:
        cmt.post_train(recipe="imagenet512", method="ecd", init=str(mid_like), data=str(world[0] / "img512-latents"),
                       out=tmp_path / "ecd", max_steps=1, batch_size=4, num_samples=4, **QUIET)
    message = str(error.value)
    assert "edm2-img512-xxl-0939524-0.075.pkl" in message and str(offline_hub / "cmt-cache" / "edm2") in message
    assert "\n" not in message and not (tmp_path / "ecd" / "post.pt").exists()


def test_imagenet64_ect_streams_a_class_folder_from_the_recipes_init(world, cache, tmp_path):
    root = world[0]
    result = cmt.post_train(recipe="imagenet64-ect", data=str(root / "imagenet64"), out=tmp_path / "ect64",
                            max_steps=2, batch_size=4, num_samples=4, xflip=True, progress=False, workers=1)
    student = load_network(result["model"])
    record = student.record
    assert record["init"] == "edm2-img64-s-1073741-0.075.pkl" and record["method"] == "ect"
    assert student.data_shape == (3, 16, 16) and student.label_dim == CLASSES
    assert student.config["dropout"] == 0.4 and student.config["dropout_res"] == 16
    run = json.loads((tmp_path / "ect64" / "run.json").read_text())
    assert run["options"]["xflip"] is True and run["recipe"]["values"]["q"] == 4.0
    assert all(path.is_file() for path in pictures(tmp_path / "ect64", 2))


def test_imagenet256_meanflow_from_cmt_encode_to_a_tiny_sit(world, cache, tmp_path, monkeypatch):
    root, _, vae = world
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code, output = invoke_command(encode_main, "--source", root / "img256.zip", "--out", tmp_path / "latents",
                                      "--vae", vae, "--scaling", "sd", "--flips", "--shard-size", 4, "--batch-size", 4,
                                      "--workers", 0, "--no-progress")
    assert code == 0, output
    # The recipe's own student (a random sit-b/4), at a tiny width and depth: the command as a user runs it.
    monkeypatch.setitem(SIT_PRESETS, "sit-b/4", dict(depth=2, hidden_size=32, num_heads=2, patch_size=2))
    code, output = invoke_command(train_main, "post", "--recipe", "imagenet256-meanflow", "--data", tmp_path / "latents",
                                  "--out", tmp_path / "mf", "--max-steps", 2, "--batch-size", 4, "--num-samples", 4,
                                  "--workers", 0, "--no-progress")
    assert code == 0, output
    student = load_network(tmp_path / "mf" / "post.safetensors")
    assert student.config["architecture"] == "sit" and student.config["data_shape"] == [4, 2, 2]
    assert student.config["depth"] == 2 and student.record["init"] == "random"
    assert student.record["encoder"]["scaling"] == "sd" and student.record["encoder"]["vae_name"] == str(vae)
    run = json.loads((tmp_path / "mf" / "run.json").read_text())
    assert run["options"]["xflip"] is None   # the recipe's flips: the set stored both, one drawn per use
    assert all(path.is_file() for path in pictures(tmp_path / "mf", 2))


def test_latents_and_pixels_mixed_up_and_a_vae_that_does_not_fit_are_one_line(world, cache, tmp_path):
    root, cache_dir, vae = world
    pixel_init = cache_dir / "edm2" / "edm2-img64-s-1073741-0.075.pkl"
    latent_init = cache_dir / "edm2" / "edm2-img512-xxl-0939524-0.070.pkl"
    wide = tmp_path / "wide-vae"
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 4, 4),
                            layers_per_block=1, latent_channels=8, norm_num_groups=2).save_pretrained(wide)
    cases = [
        (train_main, ["post", "--init", pixel_init, "--method", "ect", "--data", root / "img512-latents"],
         ["--data", "is a latent set", "works on pixels"]),
        (train_main, ["post", "--init", latent_init, "--method", "ect", "--data", root / "imagenet64"],
         ["--data", "holds pixel images", "cmt-encode"]),
        (sample_main, ["--ckpt", latent_init, "--vae", wide, "--num-samples", 2, "--out", tmp_path / "x.png"],
         ["--vae", "8-channel latents", "4 channels"]),
    ]
    for command, args, named in cases:
        code, output = invoke_command(command, *args, *(["--out", tmp_path / "run", "--max-steps", 1, "--no-progress"]
                                                        if command is train_main else ["--no-progress"]))
        assert code == 2, output
        assert len([line for line in output.splitlines() if line.startswith("Error")]) == 1, output
        assert "Traceback" not in output and all(word in output for word in named), output
    assert not (tmp_path / "run").exists() and not (tmp_path / "x.png").exists()


def test_stream_options_are_checked_by_name(tmp_path):
    for options, argument in ((dict(workers=-1), "workers"), (dict(xflip="yes"), "xflip"), (dict(xflip=True), "xflip")):
        with pytest.raises(ArgumentError) as error:
            cmt.post_train(init="toy:moons", method="ect", data="toy:moons", out=tmp_path / "post", max_steps=1,
                           batch_size=4, num_samples=4, progress=False, **options)
        assert error.value.argument == argument
        with pytest.raises(ArgumentError) as error:
            cmt.train_diffusion(data="toy:moons", out=tmp_path / "teacher", max_steps=1, batch_size=4, num_samples=0,
                                progress=False, **options)
        assert error.value.argument == argument
