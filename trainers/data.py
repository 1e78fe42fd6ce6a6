"""What the phases that train on a data set share (diffusion pre-training, post-training): the data
set from its spec, the stream of fresh draws from it, and the default network for it.

Data sets: the built-in ones in memory (mnist, toy:NAME), a user's images streamed from disk (a
folder, an .npz, an EDM zip: `cmt.datasets.images.ImageFiles`), or a latent set made by cmt-encode
(`cmt.datasets.latents.LatentSet`: VAE latents, with the VAE and scaling that decode them). The
streamed ones are drawn by `cmt.datasets.stream.BatchStream` (epochs without replacement, split
across ranks, decoded by DataLoader workers, resumable); the in-memory ones by `RandomBatches`.
"""
import os

import torch

from cmt.datasets import resolve_data
from cmt.datasets.latents import LatentSet, is_latent_set
from cmt.datasets.stream import BatchStream, decoding_workers
from cmt.errors import ArgumentError
from cmt.images import MAX_GRID_IMAGES
from cmt.latents import decode_latents
from cmt.networks import build_network
from cmt.networks.sit import SIT_PRESETS, sit_config
from cmt.trainers.batches import RandomBatches

# The networks pre-training (and post-training from random weights) builds from scratch, sized for
# a few minutes on a CPU where an option is left out.
DEFAULT_ARCH = {
    "edm2": dict(channels=32, channel_mult=(1, 2, 2), num_blocks=1, attn_res=(4,)),
    "mlp": dict(channels=256, num_blocks=4),
}


PRETRAINING_ARCHITECTURES = tuple(DEFAULT_ARCH)
# Post-training from random weights also builds a SiT / DiT of a named size (`cmt.networks.sit.SIT_PRESETS`,
# sit-s/2 ... sit-xl/8) for the data's latent shape and classes, in MeanFlow's time convention: MeanFlow
# trains DiT-B/4 from scratch (Gsunshine/meanflow configs/run_b4.yml `model.cls: DiT_B_4`, its
# models_dit.py DiT_B_4 = depth 12, hidden 768, patch 4, 12 heads, learn_sigma False).
STUDENT_ARCHITECTURES = PRETRAINING_ARCHITECTURES + tuple(SIT_PRESETS)


def check_arch(arch, choices=PRETRAINING_ARCHITECTURES):
    """ArgumentError naming `arch` unless it is one of `choices` (with STUDENT_ARCHITECTURES: or any SiT size)."""
    sizes = tuple(SIT_PRESETS) if set(SIT_PRESETS) & set(choices) else ()
    if arch not in choices and arch not in sizes:
        raise ArgumentError("arch", f"{arch!r} is not one of {', '.join(dict.fromkeys(choices + sizes))}")


def training_data(data, resolution=None, argument="data"):
    """The data set `data` names: a latent set (a cmt-encode folder) as a `LatentSet`, anything else
    through `resolve_data(data, resolution)`; a ValueError (a bad file among them) is an
    ArgumentError of `argument`."""
    try:
        if is_latent_set(data):
            if resolution is not None:
                raise ValueError(f"{data} is a latent set of shape {list(LatentSet(data).data_shape)}; resolution "
                                 "does not apply to it (encode the images at another resolution instead)")
            return data if isinstance(data, LatentSet) else LatentSet(data)
        return resolve_data(data, resolution)
    except ValueError as error:
        raise ArgumentError(argument, str(error)) from None


def check_data_fits(data, net, argument="data"):
    """ArgumentError naming `argument` unless `net` takes `data`: its shape, its classes, and pixels
    for a pixel network, latents for a latent one (told apart by their channels: 1 or 3 are pixels)."""
    shape, expected = tuple(data.data_shape), tuple(net.data_shape)
    latent_data, pixel_net = data.encoder is not None, len(expected) == 3 and expected[0] in (1, 3)
    if len(shape) == 3 and latent_data and pixel_net:
        raise ArgumentError(argument, f"{data.name} is a latent set ({list(shape)}, {data.encoder.get('vae_name')} "
                                      f"latents); the network works on pixels {list(expected)}: give it the images")
    if len(shape) == 3 and not latent_data and shape[0] in (1, 3) and len(expected) == 3 and not pixel_net:
        raise ArgumentError(argument, f"{data.name} holds pixel images {list(shape)}; the network works on "
                                      f"{expected[0]}-channel latents {list(expected)}: encode the images with "
                                      "cmt-encode and give it the latent set")
    if shape != expected or (net.label_dim and data.label_dim != net.label_dim):
        reason = getattr(data, "unlabelled", None) if not data.label_dim else None
        missing = f" ({reason}: it has no labels)" if net.label_dim and reason else ""
        raise ArgumentError(
            argument, f"{data.name} holds data of shape {shape} with {data.label_dim} classes{missing}; the "
                      f"network takes shape {expected} with {net.label_dim} classes")


def check_batch_fits(data, batch_size):
    """A streamed set (images, latents: drawn in epochs without replacement) holds at least one batch:
    a larger one would repeat items within itself, and one far above the set spends step 1 decoding it
    over and over; an ArgumentError naming batch_size and the set's count before anything is made.
    Built-in sets are drawn with replacement (toy: fresh points) and have no such bound."""
    if isinstance(data, torch.utils.data.Dataset) and batch_size > len(data):
        raise ArgumentError("batch_size", f"{batch_size} is more than the {len(data)} items of {data.name}: give "
                                          f"at most {len(data)} (one batch, one epoch)")


def default_arch(data):
    """mlp for points, edm2 for images."""
    return "mlp" if len(data.data_shape) == 1 else "edm2"


def network_for(data, arch, channels=None, channel_mult=None, num_blocks=None, attn_res=None, dropout=0.0,
                cond=True):
    """The teacher network for `data`, with the `DEFAULT_ARCH` of `arch` where an option is None; or
    a SiT of the size `arch` names (`STUDENT_ARCHITECTURES`) for the data's shape and classes."""
    label_dim = data.label_dim if cond else 0
    if arch in SIT_PRESETS:
        if attn_res:
            raise ArgumentError("attn_res", f"{', '.join(map(str, attn_res))}: a SiT attends in every block; leave "
                                            "it out")
        try:
            config = sit_config(arch, data_shape=tuple(data.data_shape), label_dim=label_dim, dropout=dropout,
                                time_convention="meanflow")
        except ArgumentError as error:
            raise ArgumentError("arch", f"{data.name} ({list(data.data_shape)}): {error.message}") from None
        return build_network(config)
    if arch not in DEFAULT_ARCH:
        raise ArgumentError("arch", f"{arch!r} is not one of {', '.join(STUDENT_ARCHITECTURES)}")
    defaults = DEFAULT_ARCH[arch]
    channels = channels or defaults["channels"]
    num_blocks = num_blocks or defaults["num_blocks"]
    if arch == "mlp":
        if attn_res:
            raise ArgumentError("attn_res", f"{', '.join(map(str, attn_res))}: the mlp network has no attention "
                                            "layers; leave it out")
        return build_network(dict(architecture="mlp", data_shape=list(data.data_shape), label_dim=label_dim,
                                  width=channels, num_blocks=num_blocks, dropout=dropout))
    if len(data.data_shape) != 3:
        raise ArgumentError("arch", f"edm2 needs images [C, H, W]; {data.name} holds data of shape "
                                    f"{list(data.data_shape)} (use mlp)")
    if data.data_shape[1] != data.data_shape[2]:   # the data's doing, not the network's
        raise ArgumentError("data", f"{data.name}: its images are {data.data_shape[1]} x {data.data_shape[2]} (H x W), "
                                    "not square; the image networks take square images (--resolution N "
                                    "center-crops each to N x N)")
    channel_mult = channel_mult or defaults["channel_mult"]
    attn_res = defaults["attn_res"] if attn_res is None else attn_res
    if data.data_shape[1] % 2 ** (len(channel_mult) - 1):
        raise ArgumentError("channel_mult", f"{len(channel_mult)} levels halve the resolution {data.data_shape[1]} "
                                            "to a non-integer size")
    levels = [data.data_shape[1] >> level for level in range(len(channel_mult))]
    missing = [resolution for resolution in attn_res if resolution not in levels]
    if missing:   # EDM2's UNet would build no attention there, without a word
        raise ArgumentError("attn_res", f"{', '.join(map(str, missing))}: not a resolution of this network; its "
                                        f"levels are {', '.join(map(str, levels))} ('' for no attention)")
    return build_network(dict(architecture="edm2", img_resolution=data.data_shape[1],
                              img_channels=data.data_shape[0], label_dim=label_dim, model_channels=channels,
                              channel_mult=list(channel_mult), num_blocks=num_blocks,
                              attn_resolutions=list(attn_res), dropout=dropout))


def pictures(data, samples, count=MAX_GRID_IMAGES):
    """What a sample grid shows of `samples` of `data`: themselves, or for a latent set the first
    `count` decoded through the VAE it records (`cmt.latents.decode_latents`)."""
    if getattr(data, "encoder", None) is None:
        return samples
    return decode_latents(samples[:count], data.encoder, device=samples.device)


# How a streamed data set (image files, a latent set) is drawn: the keywords of the phases that
# read one (diffusion, post), described once for their docstrings and commands.
STREAM_HELP = {
    "xflip": "Random left-right mirroring of the training images [default: off for images (EDM's, ECT's and "
             "sony/cmt's runs), on for a latent set that stored both flips (MeanFlow's)].",
    "workers": "DataLoader workers decoding a streamed data set (images, latent sets); auto: every core of this rank "
               "but one (at most 8).",
}


def check_stream_options(xflip, workers):
    """ArgumentError naming `xflip` / `workers` unless they are None / a bool and 'auto' / a count >= 0."""
    if xflip is not None and not isinstance(xflip, bool):
        raise ArgumentError("xflip", f"must be True, False or None (the data's default), got {xflip!r}")
    decoding_workers(workers)


def data_batches(data, batch_size, seed, *, workers="auto", xflip=None):
    """The training stream of `data`, resumable. Built-in sets: fresh random draws (toy: new points;
    mnist: rows with replacement) seeded by this rank's `seed`. Streamed sets (`ImageFiles`,
    `LatentSet`): a `BatchStream` (epochs without replacement; the ranks of torch.distributed split
    each epoch, so all use rank 0's seed) with `workers` DataLoader workers ("auto": every core of
    this rank but one) and xflip (random left-right mirroring; None: off for images, MeanFlow's
    RandomHorizontalFlip when set; on for a latent set that stored both flips, as
    zhuyu-cs/MeanFlow's dataset.py draws them)."""
    if isinstance(data, torch.utils.data.Dataset):
        rank, world_size = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
            shared = [seed]
            torch.distributed.broadcast_object_list(shared, src=0)
            seed = shared[0]
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or world_size)
        if xflip is None:
            xflip = bool(getattr(data, "flips", False))
        return BatchStream(data, batch_size, seed, rank=rank, world_size=world_size,
                           workers=decoding_workers(workers, local_ranks), xflip=xflip)

    if xflip:
        raise ArgumentError("xflip", f"mirrors streamed images and latents; {data.name} is a built-in set drawn "
                                     "in memory (leave it out)")

    def draw(n, generator):
        x, labels = data.sample(n, generator)
        return {"data": x, "label": labels}
    return RandomBatches(draw, batch_size, seed)
