"""Latent-space data for EDM2's img512 models: Stable Diffusion VAE latents with EDM2's own scaling.

EDM2 (`training/encoders.py`, `StabilityVAEEncoder`) runs the VAE on pixels in [0, 1] (not the
usual [-1, 1]) and maps its raw latents to "final" latents, the model's data, with per-channel
`final = raw * scale + bias`, `scale = final_std / raw_std`, `bias = final_mean - raw_mean * scale`.
Our images are in [-1, 1], so `decode` returns [-1, 1] and `encode` takes [-1, 1]. An encoder
record may say `"vae_input_range": [-1, 1]`: SiT and DiT run the same VAE on pixels in [-1, 1]
(willisma/SiT train.py `Normalize(0.5, 0.5)`, sample.py decodes straight to [-1, 1]).
"""
from pathlib import Path

import numpy as np
import torch

EDM2_VAE = "stabilityai/sd-vae-ft-mse"
EDM2_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)   # EDM2's statistics of the raw latents
EDM2_RAW_STD = (4.17, 4.62, 3.71, 3.28)
EDM2_FINAL_MEAN = 0.0
EDM2_FINAL_STD = 0.5


def edm2_latent_scaling(raw_mean=EDM2_RAW_MEAN, raw_std=EDM2_RAW_STD, final_mean=EDM2_FINAL_MEAN,
                        final_std=EDM2_FINAL_STD):
    """`(scale, bias)` per channel, in float32 arithmetic as EDM2 computes them."""
    scale = np.float32(final_std) / np.float32(raw_std)
    bias = np.float32(final_mean) - np.float32(raw_mean) * scale
    return [float(v) for v in scale], [float(v) for v in bias]


def load_vae(name_or_dir=EDM2_VAE, device="cpu"):
    """diffusers' `AutoencoderKL` from a local directory or a hub id (the hub's cache first)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as error:
        raise ImportError("latent-space teachers need diffusers: pip install 'cmt[latent]'") from error
    source = str(name_or_dir)
    if Path(source).exists():
        if not (Path(source) / "config.json").is_file():
            raise FileNotFoundError(f"{source}: not a diffusers AutoencoderKL directory (no config.json)")
        vae = AutoencoderKL.from_pretrained(source)
    else:
        try:
            vae = AutoencoderKL.from_pretrained(source, local_files_only=True)
        except OSError:
            try:
                vae = AutoencoderKL.from_pretrained(source)
            except OSError as error:
                raise FileNotFoundError(
                    f"could not load the VAE {source!r} ({error.__class__.__name__}): offline and not in the "
                    "Hugging Face cache? Download it (e.g. `huggingface-cli download stabilityai/sd-vae-ft-mse`) "
                    "or pass a local directory with config.json and the weights") from error
    return vae.eval().requires_grad_(False).to(device)


class LatentCodec:
    """Images in [-1, 1] <-> EDM2 final latents through a VAE, in batches of `batch_size`."""

    def __init__(self, vae, scale, bias, vae_name=None, batch_size=8, vae_input_range=(0.0, 1.0)):
        self.vae = vae
        self.scale = torch.as_tensor(scale, dtype=torch.float32)
        self.bias = torch.as_tensor(bias, dtype=torch.float32)
        self.vae_name = vae_name
        self.batch_size = int(batch_size)
        self.vae_input_range = tuple(float(value) for value in vae_input_range)
        if self.vae_input_range not in ((0.0, 1.0), (-1.0, 1.0)):
            raise ValueError(f"vae_input_range must be [0, 1] (EDM2) or [-1, 1] (SiT), got {list(vae_input_range)}")

    @classmethod
    def from_encoder_info(cls, info, vae=None, device="cpu"):
        """The codec for an EDM2 encoder record (`identity["encoder"]`); None for pixel models.

        `vae`: an AutoencoderKL, or a directory / hub id to load; default: the record's VAE name."""
        if info is None or info.get("kind") == "standard_rgb":
            return None
        if info.get("kind") != "stability_vae":
            raise ValueError(f"unknown latent encoder kind {info.get('kind')!r}")
        name = info.get("vae_name", EDM2_VAE)
        if vae is None or isinstance(vae, (str, Path)):
            vae = load_vae(vae or name, device=device)
        return cls(vae, info["scale"], info["bias"], vae_name=name,
                   vae_input_range=info.get("vae_input_range", (0.0, 1.0)))

    def describe(self):
        record = {"kind": "stability_vae", "vae_name": self.vae_name, "scale": self.scale.tolist(),
                  "bias": self.bias.tolist()}
        if self.vae_input_range != (0.0, 1.0):
            record["vae_input_range"] = list(self.vae_input_range)
        return record

    def _channels(self, values, like):
        return values.to(like.device).reshape(1, -1, 1, 1)

    @torch.no_grad()
    def encode(self, images, generator=None, sample=True):
        """Final latents of images in [-1, 1]; `sample=False` takes the posterior mean."""
        latents = []
        for batch in images.split(self.batch_size):
            pixels = batch.to(torch.float32)
            if self.vae_input_range == (0.0, 1.0):
                pixels = (pixels + 1) / 2  # EDM2's VAE input range is [0, 1]
            posterior = self.vae.encode(pixels.to(self.vae.dtype))["latent_dist"]
            mean, std = posterior.mean.to(torch.float32), posterior.std.to(torch.float32)
            if sample:
                mean = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)
            latents.append(mean)
        raw = torch.cat(latents)
        return raw * self._channels(self.scale, raw) + self._channels(self.bias, raw)

    @torch.no_grad()
    def decode(self, latents):
        """Images in [-1, 1] from final latents."""
        raw = (latents.to(torch.float32) - self._channels(self.bias, latents)) / self._channels(self.scale, latents)
        pixels = torch.cat([self.vae.decode(batch.to(self.vae.dtype))["sample"].to(torch.float32)
                            for batch in raw.split(self.batch_size)])
        if self.vae_input_range == (0.0, 1.0):
            return pixels.clamp(0, 1) * 2 - 1
        return pixels.clamp(-1, 1)
