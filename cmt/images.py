"""PNG image grids, trajectory grids and 2-D scatter plots (PIL and matplotlib's Agg backend)."""
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from cmt.edm import SIGMA_DATA


def _to_uint8(images):
    """`[N, C, H, W]` in [-1, 1] to `[N, H, W, C]` uint8, checking that these are images at all."""
    images = torch.as_tensor(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {images.shape[1]} (shape {tuple(images.shape)}); "
                         "latents are not images: decode them with the VAE first")
    pixels = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def image_grid(images, nrow=None, padding=2, pad_value=1.0):
    """Tile `[N, C, H, W]` images in [-1, 1] into one PIL image, `nrow` images per row."""
    pixels = _to_uint8(images)
    count, height, width, channels = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(count))
    nrows = math.ceil(count / nrow)
    fill = round((pad_value + 1) * 127.5)
    canvas = np.full((nrows * (height + padding) + padding, nrow * (width + padding) + padding, channels),
                     fill, dtype=np.uint8)
    for index in range(count):
        top = padding + (index // nrow) * (height + padding)
        left = padding + (index % nrow) * (width + padding)
        canvas[top:top + height, left:left + width] = pixels[index]
    return Image.fromarray(canvas[..., 0] if channels == 1 else canvas)


def save_image_grid(images, path, nrow=None, padding=2):
    """Save `[N, C, H, W]` images in [-1, 1] (1 or 3 channels) as one PNG grid; returns the path."""
    path = Path(path)
    grid = image_grid(images, nrow=nrow, padding=padding)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def save_trajectory_grid(states, path, sigmas=None, sigma_data=SIGMA_DATA, padding=2):
    """Save `[N, S, C, H, W]` trajectories as a grid: one row per trajectory, noise -> endpoint.

    A state at sigma has standard deviation about sqrt(sigma_data^2 + sigma^2), so at sigma = 80 it
    would be pure saturated noise after clamping. Dividing it by sqrt(1 + sigma^2 / sigma_data^2)
    brings every column back to the data's scale, so one sees the image emerging. Without `sigmas`
    the same scale is measured from each column's own standard deviation.
    """
    states = torch.as_tensor(states).detach().float().cpu()
    if states.ndim != 5:
        raise ValueError(f"trajectory states must be [N, S, C, H, W], got shape {tuple(states.shape)}")
    count, length = states.shape[:2]
    if sigmas is not None:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32).reshape(-1)
        if sigmas.shape[0] != length:
            raise ValueError(f"got {sigmas.shape[0]} sigmas for trajectories of {length} states")
        scale = (1 + sigmas ** 2 / sigma_data ** 2).sqrt()
    else:
        scale = (states.transpose(0, 1).reshape(length, -1).std(dim=1) / sigma_data).clamp(min=1)
    shown = (states / scale.reshape(1, length, 1, 1, 1)).clamp(-1, 1)
    return save_image_grid(shown.reshape(count * length, *states.shape[2:]), path, nrow=length, padding=padding)


def save_scatter(points, path, reference=None, limits=None, panel_size=4.0, dpi=100, max_points=20000):
    """Save 2-D points as side-by-side scatter panels; returns the path.

    `points`: a `[N, 2]` array or a list of `(points, title)`. `reference` (e.g. the data) is drawn in
    grey behind every panel. All panels share fixed, square axes (`limits=(low, high)`, by default
    taken from the reference, or else from all points), so panels can be compared by eye.
    """
    panels = [(points, None)] if torch.is_tensor(points) or isinstance(points, np.ndarray) else list(points)
    if not panels:
        raise ValueError("save_scatter needs at least one panel of points")
    arrays = []
    for panel_points, title in panels:
        array = torch.as_tensor(panel_points).detach().float().cpu().numpy()
        if array.ndim != 2 or array.shape[1] != 2:
            raise ValueError(f"scatter points must be [N, 2], got shape {array.shape} (panel {title!r})")
        arrays.append((array[:max_points], title))
    if reference is not None:
        reference = torch.as_tensor(reference).detach().float().cpu().numpy()[:max_points]
    if limits is None:
        basis = reference if reference is not None else np.concatenate([array for array, _ in arrays])
        low, high = np.percentile(basis, [0.5, 99.5])
        margin = 0.15 * (high - low) + 1e-6
        limits = (low - margin, high + margin)

    # A bare Figure renders with Agg and touches no pyplot state (safe on headless machines).
    figure = Figure(figsize=(panel_size * len(arrays), panel_size), dpi=dpi)
    axes = figure.subplots(1, len(arrays), squeeze=False)
    for axis, (array, title) in zip(axes[0], arrays):
        if reference is not None:
            axis.scatter(reference[:, 0], reference[:, 1], s=2, c="0.8", linewidths=0)
        axis.scatter(array[:, 0], array[:, 1], s=2, c="tab:blue", linewidths=0)
        axis.set_xlim(limits)
        axis.set_ylim(limits)
        axis.set_aspect("equal")
        if title:
            axis.set_title(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
