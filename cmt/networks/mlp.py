"""A small MLP denoiser for 2-D points (or any flat data), with EDM preconditioning.

Same interface as the EDM2 `Precond`: `forward(x, sigma, labels=None, target_sigma=None,
return_logvar=False)` returns D(x; sigma). The noise level enters through Fourier features of
EDM's c_noise; `flow_map=True` adds a second embedding for `target_sigma` whose output layer
starts at zero, so a student loaded from a teacher starts out as that teacher.
"""
import contextlib
import math

import torch

from cmt.edm import SIGMA_DATA, edm_scalings
from cmt.networks.family import NetworkFamily, batch_sigmas, target_noise_labels


class FourierEmbedding(torch.nn.Module):
    """cos/sin features of a scalar at fixed random frequencies, `[B] -> [B, 2 * num_freqs]`."""

    def __init__(self, num_freqs, scale=1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_freqs) * scale)

    def forward(self, x):
        angles = torch.outer(x.to(torch.float32), self.freqs)
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class ResidualBlock(torch.nn.Module):
    def __init__(self, width, emb_width, dropout=0.0):
        super().__init__()
        self.emb = torch.nn.Linear(emb_width, width)
        self.fc0 = torch.nn.Linear(width, width)
        self.fc1 = torch.nn.Linear(width, width)
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, h, emb):
        y = self.fc0(torch.nn.functional.silu(h)) + self.emb(emb)
        y = self.fc1(self.dropout(torch.nn.functional.silu(y)))
        return h + y


class MLPDenoiser(torch.nn.Module):
    """EDM-preconditioned residual MLP over flat data of shape `data_shape`."""

    def __init__(self, data_shape=(2,), label_dim=0, width=256, num_blocks=4, emb_width=128, fourier_freqs=64,
                 dropout=0.0, sigma_data=SIGMA_DATA, sigma_min=0.0, flow_map=False, logvar_channels=64):
        super().__init__()
        self.config = dict(architecture="mlp", data_shape=list(data_shape), label_dim=label_dim, width=width,
                           num_blocks=num_blocks, emb_width=emb_width, fourier_freqs=fourier_freqs, dropout=dropout,
                           sigma_data=sigma_data, sigma_min=sigma_min, flow_map=flow_map,
                           logvar_channels=logvar_channels)
        self.data_shape = tuple(data_shape)
        self.label_dim = label_dim
        self.sigma_data = sigma_data
        self.sigma_min = sigma_min
        self.flow_map = flow_map
        num_features = math.prod(self.data_shape)

        self.emb_fourier = FourierEmbedding(fourier_freqs)
        self.emb_noise = torch.nn.Linear(2 * fourier_freqs, emb_width)
        self.emb_label = torch.nn.Linear(label_dim, emb_width, bias=False) if label_dim else None
        if flow_map:
            self.emb_fourier_target = FourierEmbedding(fourier_freqs)
            self.emb_target = torch.nn.Linear(2 * fourier_freqs, emb_width)
            torch.nn.init.zeros_(self.emb_target.weight)
            torch.nn.init.zeros_(self.emb_target.bias)
        self.emb_out = torch.nn.Linear(emb_width, emb_width)
        self.inp = torch.nn.Linear(num_features, width)
        self.blocks = torch.nn.ModuleList(ResidualBlock(width, emb_width, dropout) for _ in range(num_blocks))
        self.out = torch.nn.Linear(width, num_features)
        self.logvar_fourier = FourierEmbedding(logvar_channels // 2)
        self.logvar_linear = torch.nn.Linear(logvar_channels, 1)

    @property
    def flow_map_keys(self):
        """State-dict keys that exist only because of `flow_map=True` (absent from a teacher)."""
        if not self.flow_map:
            return set()
        return {key for key in self.state_dict() if key.startswith(("emb_fourier_target.", "emb_target."))}

    @contextlib.contextmanager
    def frozen_weight_norm(self):
        """No-op twin of `Precond.frozen_weight_norm` (this network has no forced weight norm)."""
        yield self

    def forward(self, x, sigma, labels=None, target_sigma=None, return_logvar=False):
        x = x.to(torch.float32)
        batch = x.shape[0]
        sigma = batch_sigmas(x, sigma)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data, self.sigma_min)

        emb = self.emb_noise(self.emb_fourier(c_noise))
        if self.flow_map:
            emb = emb + self.emb_target(self.emb_fourier_target(target_noise_labels(x, target_sigma)))
        if self.emb_label is not None and labels is not None:
            emb = emb + self.emb_label(labels.to(torch.float32).reshape(-1, self.label_dim))
        emb = torch.nn.functional.silu(self.emb_out(torch.nn.functional.silu(emb)))

        h = self.inp((c_in[:, None] * x.reshape(batch, -1)))
        for block in self.blocks:
            h = block(h, emb)
        F_x = self.out(torch.nn.functional.silu(h)).reshape(x.shape)
        shape = (-1,) + (1,) * (x.ndim - 1)
        D_x = c_skip.reshape(shape) * x + c_out.reshape(shape) * F_x
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(shape)
            return D_x, logvar
        return D_x


# Default learning rates of the toy networks, this project's: pre-training as the built-in 2-D
# teachers were trained (cmt/assets/teachers/README.md); the student phases' rates keep the
# official CMT ratio (mid-training at twice post-training's rate, sony/cmt run scripts).
FAMILY = NetworkFamily(name="mlp", build=MLPDenoiser, learning_rates={"diffusion": 3e-3, "mid": 2e-4, "post": 1e-4})
