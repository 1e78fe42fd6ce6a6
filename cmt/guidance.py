"""Guided denoisers: autoguidance and classifier-free guidance, as EDM2's sampler does them.

Both are denoisers `D(x, sigma, labels=None)` that the solvers call like a network:
`D = D_guide + weight * (D_main - D_guide)`, where the guide is a weaker network (autoguidance,
Karras et al. 2024) or the same / another network without labels (classifier-free guidance).

`apply_guidance` is the one way the rest of the package guides a network (the builder and the
teacher loader both call it): it picks the kind and returns the one record of what it did, so the
same request is recorded, and hashed into a build configuration, the same way everywhere.
"""
import torch

from cmt.errors import ArgumentError


class GuidedDenoiser(torch.nn.Module):
    """`guide(x) + weight * (net(x) - guide(x))`; `guide_labels=False` calls the guide without labels."""

    def __init__(self, net, guide, weight, kind, guide_labels=True, guide_identity=None, channels=None):
        super().__init__()
        if guide is not net and tuple(guide.data_shape) != tuple(net.data_shape):
            raise ValueError(f"guide network data shape {tuple(guide.data_shape)} differs from the main "
                             f"network's {tuple(net.data_shape)}")
        self.net, self.guide = net, guide
        self.weight = float(weight)
        self.kind = kind
        self.guide_labels = guide_labels
        self.guide_identity = guide_identity
        self.channels = None if channels is None else int(channels)   # guide only the first `channels`
        self.data_shape, self.label_dim, self.sigma_data = net.data_shape, net.label_dim, net.sigma_data
        self.flow_map = False
        self.config = net.config

    def forward(self, x, sigma, labels=None):
        denoised = self.net(x, sigma, labels).to(torch.float32)
        if self.weight == 1:
            return denoised
        reference = self.guide(x, sigma, labels if self.guide_labels else None).to(torch.float32)
        guided = reference.lerp(denoised, self.weight)
        if self.channels is None:
            return guided
        return torch.cat([guided[:, :self.channels], denoised[:, self.channels:]], dim=1)

    def describe(self):
        guide = self.guide_identity or {}
        record = {"kind": self.kind, "weight": self.weight,
                  "guide": {key: guide.get(key) for key in ("kind", "path", "sha256")} if guide else None}
        return record if self.channels is None else dict(record, channels=self.channels)


def autoguidance(net, guide, weight, guide_identity=None):
    """EDM2's autoguidance: a smaller / less trained `guide` of the same task, with labels."""
    return GuidedDenoiser(net, guide, weight, "autoguidance", guide_labels=True, guide_identity=guide_identity)


def classifier_free_guidance(net, weight, uncond=None, uncond_identity=None, channels=None):
    """Classifier-free guidance against `uncond` (default: `net` itself with labels=None, which for
    EDM2 networks is the all-zero label, for SiT its null class). Needs a class-conditional `net`.
    `channels`: guide only the first `channels` channels, the rest stay conditional (SiT's and DiT's
    `forward_with_cfg` guide 3 of the 4 latent channels: `cmt.networks.sit.SIT_CFG_CHANNELS`)."""
    if net.label_dim == 0:
        raise ValueError("classifier-free guidance needs a class-conditional teacher (label_dim > 0)")
    return GuidedDenoiser(net, net if uncond is None else uncond, weight, "classifier_free",
                          guide_labels=False, guide_identity=uncond_identity, channels=channels)


def apply_guidance(net, guidance=None, guide=None, guide_identity=None, label_dropout=None):
    """`(denoiser, record)`: `net` guided with weight `guidance`, and the one record of the guidance.

    - `guidance` None or 1: no guidance, `(net, None)`. At weight 1 every guided denoiser is `net`
      itself, so "no guidance" and "weight 1" (with or without a guide) are one teacher and one
      record: None, what a dataset built without guidance has always recorded.
    - `guide` (a network, `guide_identity` its `resolve_teacher` identity): autoguidance by it; an
      unconditional guide (label_dim 0) of a class-conditional `net`: classifier-free guidance against it.
    - otherwise: classifier-free guidance against `net` without labels (class-conditional nets only),
      refused when `label_dropout` (the share of label-free training the teacher records; None:
      unknown) is 0: such a net's label-free output was never trained (EDM2's official nets).
    Classifier-free guidance guides the first `net.cfg_channels` channels only where the network
    says so (SiT: 3 of 4 latent channels, willisma/SiT models.py `forward_with_cfg`); the record then
    holds `"channels"`. A flow-map network is refused (its jumps take no guidance).

    record: `{"kind": "autoguidance" | "classifier_free", "weight": w, "guide": {"kind", "path",
    "sha256"} or None[, "channels": C]}`. Bad input raises `ArgumentError` naming `guidance` or `guide`.
    """
    if guidance is None:
        if guide is not None:
            raise ArgumentError("guidance", "a guide network needs a guidance weight (EDM2 uses about 1.4 to 2.5)")
        return net, None
    if float(guidance) == 1:
        return net, None
    if getattr(net, "flow_map", False):
        raise ArgumentError("guidance", "guides a diffusion denoiser; this network is a flow map (a CMT flow-map or "
                                        "MeanFlow student), whose jumps take no guidance: leave it out")
    if not float(guidance) >= 0:   # D_guide + w (D_main - D_guide): w < 0 pushes away from the main network
        raise ArgumentError("guidance", f"the guidance weight must be >= 0 (1: none; EDM2 uses about 1.4 to 2.5), "
                                        f"got {guidance}")
    if guide is None and net.label_dim and label_dropout is not None and float(label_dropout) == 0:
        raise ArgumentError("guidance", "classifier-free guidance needs a teacher trained with label dropout, and "
                                        "this one records none (EDM2's class-conditional networks have none): pass "
                                        "an unconditional guide network (guide_ckpt), or a guide for autoguidance")
    try:
        # A network may guide only some channels (SiT / DiT: `cfg_channels` = 3, as their forward_with_cfg).
        channels = getattr(net, "cfg_channels", None)
        if guide is not None and net.label_dim and not guide.label_dim:
            guided = classifier_free_guidance(net, guidance, uncond=guide, uncond_identity=guide_identity,
                                              channels=channels)
        elif guide is not None:
            guided = autoguidance(net, guide, guidance, guide_identity=guide_identity)
        else:
            guided = classifier_free_guidance(net, guidance, channels=channels)
    except ValueError as error:
        raise ArgumentError("guide" if guide is not None else "guidance", str(error)) from None
    return guided.eval(), guided.describe()
