"""What the phases that train on a data set share (diffusion pre-training, post-training): the data
set from its spec, the stream of fresh draws from it, and the default network for it."""
from cmt.datasets import resolve_data
from cmt.errors import ArgumentError
from cmt.networks import build_network
from cmt.trainers.loop import RandomBatches

# The networks pre-training (and post-training from random weights) builds from scratch, sized for
# a few minutes on a CPU where an option is left out.
DEFAULT_ARCH = {
    "edm2": dict(channels=32, channel_mult=(1, 2, 2), num_blocks=1, attn_res=(4,)),
    "mlp": dict(channels=256, num_blocks=4),
}


PRETRAINING_ARCHITECTURES = tuple(DEFAULT_ARCH)


def training_data(data, resolution=None, argument="data"):
    """`resolve_data(data, resolution)`, its ValueError an ArgumentError of `argument`."""
    try:
        return resolve_data(data, resolution)
    except ValueError as error:
        raise ArgumentError(argument, str(error)) from None


def default_arch(data):
    """mlp for points, edm2 for images."""
    return "mlp" if len(data.data_shape) == 1 else "edm2"


def network_for(data, arch, channels=None, channel_mult=None, num_blocks=None, attn_res=None, dropout=0.0,
                cond=True):
    """The teacher network for `data`, with the `DEFAULT_ARCH` of `arch` where an option is None."""
    if arch not in DEFAULT_ARCH:
        raise ArgumentError("arch", f"{arch!r} is not one of {', '.join(PRETRAINING_ARCHITECTURES)}")
    defaults = DEFAULT_ARCH[arch]
    label_dim = data.label_dim if cond else 0
    channels = channels or defaults["channels"]
    num_blocks = num_blocks or defaults["num_blocks"]
    if arch == "mlp":
        return build_network(dict(architecture="mlp", data_shape=list(data.data_shape), label_dim=label_dim,
                                  width=channels, num_blocks=num_blocks, dropout=dropout))
    if len(data.data_shape) != 3 or data.data_shape[1] != data.data_shape[2]:
        raise ArgumentError("arch", f"edm2 needs square images [C, H, W]; {data.name} has shape "
                                    f"{list(data.data_shape)} (use mlp)")
    channel_mult = channel_mult or defaults["channel_mult"]
    attn_res = defaults["attn_res"] if attn_res is None else attn_res
    if data.data_shape[1] % 2 ** (len(channel_mult) - 1):
        raise ArgumentError("channel_mult", f"{len(channel_mult)} levels halve the resolution {data.data_shape[1]} "
                                            "to a non-integer size")
    return build_network(dict(architecture="edm2", img_resolution=data.data_shape[1],
                              img_channels=data.data_shape[0], label_dim=label_dim, model_channels=channels,
                              channel_mult=list(channel_mult), num_blocks=num_blocks,
                              attn_resolutions=list(attn_res), dropout=dropout))


def data_batches(data, batch_size, seed):
    """Fresh random draws (toy: new points; images: rows with replacement), resumable."""
    def draw(n, generator):
        x, labels = data.sample(n, generator)
        return {"data": x, "label": labels}
    return RandomBatches(draw, batch_size, seed)
