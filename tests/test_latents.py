"""EDM2 latent scaling and decoding through a tiny randomly initialised diffusers AutoencoderKL."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from cmt.latents import EDM2_VAE, LatentCodec, edm2_latent_scaling, load_vae  # noqa: E402


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


def test_edm2_scaling_constants():
    scale, bias = edm2_latent_scaling()
    # EDM2: final std 0.5 and mean 0 from raw mean (5.81, 3.25, 0.12, -2.15), std (4.17, 4.62, 3.71, 3.28).
    assert scale == pytest.approx([0.5 / 4.17, 0.5 / 4.62, 0.5 / 3.71, 0.5 / 3.28], rel=1e-6)
    assert bias == pytest.approx([-5.81 * 0.5 / 4.17, -3.25 * 0.5 / 4.62, -0.12 * 0.5 / 3.71, 2.15 * 0.5 / 3.28],
                                 rel=1e-5)


def test_codec_round_trip_through_a_local_vae(vae_dir):
    vae = load_vae(vae_dir)
    scale, bias = edm2_latent_scaling()
    codec = LatentCodec.from_encoder_info({"kind": "stability_vae", "vae_name": EDM2_VAE, "scale": scale,
                                           "bias": bias}, vae=vae_dir)
    assert codec.describe()["scale"] == pytest.approx(scale)
    torch.manual_seed(1)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    latents = codec.encode(images, sample=False)
    assert latents.shape == (3, 4, 8, 8)
    # The raw latents are the VAE's posterior mean of [0, 1] pixels; undoing the scaling gives them back.
    raw = vae.encode((images + 1) / 2)["latent_dist"].mean
    torch.testing.assert_close((latents - torch.tensor(bias).reshape(1, 4, 1, 1))
                               / torch.tensor(scale).reshape(1, 4, 1, 1), raw, atol=1e-4, rtol=1e-4)
    decoded = codec.decode(latents)
    reconstruction = vae.decode(raw)["sample"].clamp(0, 1) * 2 - 1
    assert decoded.shape == images.shape and decoded.min() >= -1 and decoded.max() <= 1
    torch.testing.assert_close(decoded, reconstruction, atol=1e-4, rtol=1e-4)
    # Batching does not change the result; sampling draws from the posterior with the generator.
    codec.batch_size = 1
    torch.testing.assert_close(codec.decode(latents), decoded, atol=1e-5, rtol=1e-5)
    first = codec.encode(images, generator=torch.Generator().manual_seed(3))
    again = codec.encode(images, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again) and not torch.allclose(first, latents)


def test_sit_codec_runs_the_vae_on_pixels_in_minus_one_one(vae_dir):
    """SiT's record (cmt.sit_checkpoint.SIT_ENCODER): latents = 0.18215 * VAE(pixels in [-1, 1])."""
    vae = load_vae(vae_dir)
    info = {"kind": "stability_vae", "vae_name": "stabilityai/sd-vae-ft-mse", "scale": [0.18215] * 4,
            "bias": [0.0] * 4, "pixel_range": [-1, 1]}
    codec = LatentCodec.from_encoder_info(info, vae=vae_dir)
    assert codec.describe() == dict(info, scale=pytest.approx(info["scale"]), pixel_range=[-1.0, 1.0])
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    latents = codec.encode(images, sample=False)
    torch.testing.assert_close(latents, vae.encode(images)["latent_dist"].mean * 0.18215, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(codec.decode(latents), vae.decode(latents / 0.18215)["sample"].clamp(-1, 1),
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="pixel_range"):
        LatentCodec.from_encoder_info(dict(info, pixel_range=[0, 255]), vae=vae)


def test_pixel_models_have_no_codec_and_bad_sources_fail_clearly(tmp_path, monkeypatch):
    assert LatentCodec.from_encoder_info({"kind": "standard_rgb"}) is None
    with pytest.raises(ValueError, match="unknown latent encoder kind 'jpeg'"):
        LatentCodec.from_encoder_info({"kind": "jpeg"})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae(tmp_path)
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network tries in tests
    with pytest.raises(FileNotFoundError, match="could not load the VAE 'nobody/no-such-vae'"):
        load_vae("nobody/no-such-vae")
