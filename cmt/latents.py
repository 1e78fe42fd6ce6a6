"""Latent-space data: Stable Diffusion VAE latents with EDM2's scaling or Stable Diffusion's.

EDM2 (`training/encoders.py`, `StabilityVAEEncoder`) runs the VAE on pixels in [0, 1] (not the
usual [-1, 1]) and maps its raw latents to "final" latents, the model's data, with per-channel
`final = raw * scale + bias`, `scale = final_std / raw_std`, `bias = final_mean - raw_mean * scale`.
MeanFlow (Gsunshine/meanflow `utils/vae_util.py` `LatentManager`, zhuyu-cs/MeanFlow `train.py`)
runs it on pixels in [-1, 1] and scales every channel by Stable Diffusion's 0.18215, no bias.
Both store the VAE posterior's moments (mean and std) once (EDM2's `dataset_tool.py encode`,
MeanFlow's `prepare_dataset.py`) and draw `mean + std * noise` afresh at every use
(`StabilityVAEEncoder.encode_latents`, `LatentDist.sample`); `SCALINGS` holds both recipes.
Our images are in [-1, 1], so `decode` returns [-1, 1] and `encode` takes [-1, 1]; the record
says which range the VAE itself sees (`pixel_range`; EDM2's [0, 1] when a record names none;
SiT and DiT, like MeanFlow, give it [-1, 1]: willisma/SiT train.py `Normalize(0.5, 0.5)`).
"""
import json
from pathlib import Path

import numpy as np
import torch

EDM2_VAE = "stabilityai/sd-vae-ft-mse"
EDM2_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)   # EDM2's statistics of the raw latents
EDM2_RAW_STD = (4.17, 4.62, 3.71, 3.28)
EDM2_FINAL_MEAN = 0.0
EDM2_FINAL_STD = 0.5
SD_SCALE = 0.18215                           # Stable Diffusion's latent scale (Gsunshine/meanflow vae_util.py)
# What a latent set made by cmt-encode is (its manifest's "dataset"); defined here, in the core,
# because evaluation recognises such a set by it (cmt.manifest reads and checks the whole manifest).
LATENT_DATASET = "cmt-latents"


def edm2_latent_scaling(raw_mean=EDM2_RAW_MEAN, raw_std=EDM2_RAW_STD, final_mean=EDM2_FINAL_MEAN,
                        final_std=EDM2_FINAL_STD):
    """`(scale, bias)` per channel, in float32 arithmetic as EDM2 computes them."""
    scale = np.float32(final_std) / np.float32(raw_std)
    bias = np.float32(final_mean) - np.float32(raw_mean) * scale
    return [float(v) for v in scale], [float(v) for v in bias]


def sd_latent_scaling(channels=4, scale=SD_SCALE):
    """`(scale, bias)` per channel of Stable Diffusion's convention: every channel times 0.18215."""
    return [float(np.float32(scale))] * channels, [0.0] * channels


# The recipes `cmt-encode --scaling` takes: the per-channel scale and bias of the final latents,
# the pixel range the VAE sees, and the VAE the recipe's own code loads.
SCALINGS = {
    "edm2": dict(scaling=edm2_latent_scaling, pixel_range=(0.0, 1.0), vae=EDM2_VAE,
                 source="NVlabs/edm2 training/encoders.py StabilityVAEEncoder"),
    "sd": dict(scaling=sd_latent_scaling, pixel_range=(-1.0, 1.0), vae=EDM2_VAE,
               source="Gsunshine/meanflow utils/vae_util.py LatentManager (vae_type mse, x 0.18215)"),
}


def scaling_record(name, channels=4):
    """The encoder record (`LatentCodec.describe` without the VAE) of a scaling in `SCALINGS`."""
    recipe = SCALINGS[name]
    scale, bias = recipe["scaling"]() if name == "edm2" else recipe["scaling"](channels)
    return {"kind": "stability_vae", "scaling": name, "scale": scale, "bias": bias,
            "pixel_range": list(recipe["pixel_range"])}


def read_latent_record(path):
    """The manifest of the cmt-encode latent set at `path` (a local folder), or None when `path`
    is not one. Only JSON is read here; `cmt.manifest.LatentManifest` checks every field."""
    manifest = Path(str(path)) / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        record = json.loads(manifest.read_text())
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("dataset") == LATENT_DATASET else None


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

    def __init__(self, vae, scale, bias, vae_name=None, batch_size=8, pixel_range=(0.0, 1.0)):
        self.vae = vae
        self.scale = torch.as_tensor(scale, dtype=torch.float32)
        self.bias = torch.as_tensor(bias, dtype=torch.float32)
        self.vae_name = vae_name
        self.batch_size = int(batch_size)
        self.pixel_range = tuple(float(v) for v in pixel_range)
        channels = getattr(getattr(vae, "config", None), "latent_channels", None)
        if channels is not None and self.scale.numel() not in (1, int(channels)):
            raise ValueError(f"the VAE {vae_name or ''} makes {channels}-channel latents; these latents have "
                             f"{self.scale.numel()} channels (their scaling's): give the VAE they were encoded with")
        if self.pixel_range not in ((0.0, 1.0), (-1.0, 1.0)):
            raise ValueError(f"pixel_range must be [0, 1] (EDM2) or [-1, 1] (Stable Diffusion, SiT, MeanFlow), got "
                             f"{list(pixel_range)}")

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
                   pixel_range=info.get("pixel_range", (0.0, 1.0)))

    def describe(self):
        return {"kind": "stability_vae", "vae_name": self.vae_name, "scale": self.scale.tolist(),
                "bias": self.bias.tolist(), "pixel_range": list(self.pixel_range)}

    def to_vae_pixels(self, images):
        """Images in [-1, 1] -> the range the VAE sees (EDM2: [0, 1]; Stable Diffusion: [-1, 1])."""
        low, high = self.pixel_range
        return (images.to(torch.float32) + 1) * ((high - low) / 2) + low

    def from_vae_pixels(self, pixels):
        """The VAE's output, clamped to its range -> images in [-1, 1]."""
        low, high = self.pixel_range
        return (pixels.to(torch.float32).clamp(low, high) - low) * (2 / (high - low)) - 1

    @torch.no_grad()
    def moments(self, images):
        """The VAE posterior's `(mean, std)` (float32) of images in [-1, 1]: what a latent set stores
        (EDM2's `encode_pixels`, MeanFlow's latent_dist mean and std), one VAE call."""
        posterior = self.vae.encode(self.to_vae_pixels(images).to(self.vae.dtype))["latent_dist"]
        return posterior.mean.to(torch.float32), posterior.std.to(torch.float32)

    def final(self, mean, std=None, noise=None):
        """Final latents from raw moments: `(mean + std * noise) * scale + bias` (the mean alone
        without noise), EDM2's `encode_latents`."""
        raw = mean if noise is None else mean + std * noise
        return raw * self._channels(self.scale, raw) + self._channels(self.bias, raw)

    def _channels(self, values, like):
        return values.to(like.device).reshape(1, -1, 1, 1)

    @torch.no_grad()
    def encode(self, images, generator=None, sample=True):
        """Final latents of images in [-1, 1]; `sample=False` takes the posterior mean."""
        latents = []
        for batch in images.split(self.batch_size):
            mean, std = self.moments(batch)
            if sample:
                mean = mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)
            latents.append(mean)
        return self.final(torch.cat(latents))

    @torch.no_grad()
    def decode(self, latents):
        """Images in [-1, 1] from final latents."""
        raw = (latents.to(torch.float32) - self._channels(self.bias, latents)) / self._channels(self.scale, latents)
        pixels = torch.cat([self.vae.decode(batch.to(self.vae.dtype))["sample"].to(torch.float32)
                            for batch in raw.split(self.batch_size)])
        return self.from_vae_pixels(pixels)


def decode_latents(latents, encoder, vae=None, device="cpu", batch_size=8):
    """Images in [-1, 1] `[N, 3, H, W]` from a latent network's samples (or a latent set's items):
    the VAE and scaling an `encoder` record names (a latent set's `.encoder`, an EDM2 checkpoint's
    `identity["encoder"]`); `vae` loads another copy (a local directory or hub id) instead of the
    recorded `vae_name`. This is what the pictures and the FID of a latent student decode through."""
    codec = LatentCodec.from_encoder_info(encoder, vae=vae, device=device)
    if codec is None:
        return latents
    codec.batch_size = batch_size
    return torch.cat([codec.decode(part.to(device)).cpu() for part in latents.split(max(batch_size, 1) * 8)])
