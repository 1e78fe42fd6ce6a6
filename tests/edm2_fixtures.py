"""Test helpers: tiny networks saved as official EDM2 pickles, and a tiny Stable-Diffusion-shaped VAE.

`write_edm2_pickle` emulates NVlabs/edm2's `torch_utils.persistence`: every network module pickles
as `torch_utils.persistence._reconstruct_persistent_obj(meta)` with meta = {type, version,
module_src, class_name, state = the module's __dict__ with _init_args/_init_kwargs}, the top
level is a `dnnlib.util.EasyDict(ema=..., encoder=..., loss_fn=..., dataset_kwargs=...)`, and the
ema network is float16, as EDM2's training loop and reconstruct_phema.py write it.
"""
import pickle
import sys
import types

import numpy as np
import torch

from cmt.networks import edm2

PERSISTENT = (edm2.Precond, edm2.UNet, edm2.Block, edm2.MPConv, edm2.MPFourier)
INIT_KWARGS = dict(img_resolution=8, img_channels=4, label_dim=3, model_channels=16, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[4], dropout=0.0, use_fp16=True)


def fake_module(monkeypatch, name, **members):
    module = types.ModuleType(name)
    for key, value in members.items():
        value.__module__, value.__qualname__ = name, key
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


class Persistent:
    """An object EDM2 would pickle through persistence (encoders, the loss)."""

    def __init__(self, class_name, **state):
        self.class_name, self.state = class_name, state


def write_edm2_pickle(path, monkeypatch, data, module_src, persistent=PERSISTENT):
    """Pickle `data` as EDM2 would; `monkeypatch` (pytest's) holds the fake modules named in the file.
    `persistent`: the network classes that pickle through persistence (EDM's for `edm_fixtures`); a
    network's recorded init kwargs are its `_edm2_init_kwargs` / `_official_init_kwargs`."""
    def _reconstruct_persistent_obj(meta):
        raise AssertionError("never called: only its name goes into the pickle")

    class EasyDict(dict):
        pass

    fake_module(monkeypatch, "torch_utils")
    fake_module(monkeypatch, "torch_utils.persistence", _reconstruct_persistent_obj=_reconstruct_persistent_obj)
    fake_module(monkeypatch, "dnnlib")
    fake_module(monkeypatch, "dnnlib.util", EasyDict=EasyDict)

    class PersistencePickler(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, persistent):
                kwargs = getattr(obj, "_edm2_init_kwargs", None) or getattr(obj, "_official_init_kwargs", {})
                state = dict(obj.__dict__, _init_args=(), _init_kwargs=kwargs)
                class_name = type(obj).__name__
            elif isinstance(obj, Persistent):   # its state is the one dict, as persistence pickles __dict__
                state, class_name = obj.state, obj.class_name
                state.setdefault("_init_args", ())
                state.setdefault("_init_kwargs", {})
            else:
                return NotImplemented
            meta = dict(type="class", version=6, module_src=module_src, class_name=class_name, state=state)
            return _reconstruct_persistent_obj, (meta,)

    with open(path, "wb") as handle:
        PersistencePickler(handle, protocol=pickle.DEFAULT_PROTOCOL).dump(EasyDict(data))


def tiny_official_network(**overrides):
    torch.manual_seed(0)
    kwargs = dict(INIT_KWARGS, **overrides)
    net = edm2.Precond(**kwargs)
    with torch.no_grad():
        for param in net.parameters():
            if param.ndim == 0:
                param.fill_(0.6)
    net._edm2_init_kwargs = kwargs
    return net.eval().requires_grad_(False).to(torch.float16)  # as EDM2 stores its ema


def vae_encoder():
    """EDM2's img512 encoder record: the SD VAE and its latent statistics."""
    raw_mean, raw_std = np.float32([5.81, 3.25, 0.12, -2.15]), np.float32([4.17, 4.62, 3.71, 3.28])
    scale = np.float32(0.5) / raw_std
    return Persistent("StabilityVAEEncoder", vae_name="stabilityai/sd-vae-ft-mse", scale=scale,
                      bias=np.float32(0) - raw_mean * scale, batch_size=8, _vae=None)


def save_tiny_vae(path):
    """A random diffusers AutoencoderKL laid out as the SD VAE (4 latent channels, 8x down) but tiny."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 4, 4),
                        layers_per_block=1, latent_channels=4, norm_num_groups=2, sample_size=64)
    vae.save_pretrained(path)
    return path
