"""PNG image grids, trajectory grids and 2-D scatter plots (PIL and matplotlib's Agg backend)."""
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from cmt.edm import SIGMA_DATA
from cmt.outputs import atomic_path


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


# Pictures meant for people: a small image (MNIST's 16 px) is enlarged, by repeating pixels, until
# a grid cell is at least READABLE_CELL px, and a grid shows at most MAX_GRID_IMAGES samples (the
# .npz beside it holds them all).
READABLE_CELL = 64
MAX_GRID_IMAGES = 64
LABEL_HEIGHT = 14   # px of the strip above a grid that carries its column labels


def readable_scale(height, width, min_cell=READABLE_CELL):
    """The integer nearest-neighbour factor that makes an `height x width` image at least `min_cell` px."""
    return max(1, math.ceil(min_cell / max(height, width))) if min_cell else 1


def image_grid(images, nrow=None, padding=2, pad_value=1.0, scale=1, column_labels=None):
    """Tile `[N, C, H, W]` images in [-1, 1] into one PIL image, `nrow` images per row, each enlarged
    `scale` times (nearest neighbour); `column_labels` (one text per column) go in a strip on top."""
    return grid_with_layout(images, nrow=nrow, padding=padding, pad_value=pad_value, scale=scale,
                            column_labels=column_labels)[0]


def grid_with_layout(images, nrow=None, padding=2, pad_value=1.0, scale=1, column_labels=None):
    """`(PIL image, layout)` of `image_grid`; layout: rows, columns, cell `(height, width)` in px,
    the label strip's height `header` (0 without labels) and the `column_labels` drawn."""
    pixels = _to_uint8(images)
    if scale > 1:
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    count, height, width, channels = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(count))
    nrows = math.ceil(count / nrow)
    if column_labels is not None and len(column_labels) != nrow:
        raise ValueError(f"got {len(column_labels)} column labels for {nrow} columns")
    header = LABEL_HEIGHT if column_labels is not None else 0
    fill = round((pad_value + 1) * 127.5)
    canvas = np.full((header + nrows * (height + padding) + padding, nrow * (width + padding) + padding, channels),
                     fill, dtype=np.uint8)
    for index in range(count):
        top = header + padding + (index // nrow) * (height + padding)
        left = padding + (index % nrow) * (width + padding)
        canvas[top:top + height, left:left + width] = pixels[index]
    image = Image.fromarray(canvas[..., 0] if channels == 1 else canvas)
    if column_labels is not None:
        draw = ImageDraw.Draw(image)
        ink = 0 if fill > 127 else 255
        for column, text in enumerate(column_labels):
            draw.text((padding + column * (width + padding), 1), str(text), fill=ink if channels == 1 else (ink,) * 3)
    layout = {"rows": nrows, "columns": nrow, "cell": (height, width), "header": header,
              "column_labels": None if column_labels is None else [str(text) for text in column_labels]}
    return image, layout


def save_image_grid(images, path, nrow=None, padding=2, min_cell=None, max_images=None, column_labels=None):
    """Save `[N, C, H, W]` images in [-1, 1] (1 or 3 channels) as one PNG grid; returns the path.

    min_cell: enlarge small images (nearest neighbour) to at least this many px (`READABLE_CELL` for
    pictures people look at; None: as they are). max_images: show only the first ones."""
    path = Path(path)
    images = torch.as_tensor(images)
    if max_images is not None:
        images = images[:max_images]
    scale = readable_scale(*images.shape[-2:], min_cell) if images.ndim == 4 else 1
    grid = image_grid(images, nrow=nrow, padding=padding, scale=scale, column_labels=column_labels)
    with atomic_path(path) as temporary:
        grid.save(temporary)
    return path


def sigma_label(sigma):
    """How a column of a trajectory picture names its noise level."""
    return f"s={float(sigma):.3g}"


def save_trajectory_grid(states, path, sigmas=None, sigma_data=SIGMA_DATA, padding=2, min_cell=None, label=False):
    """Save `[N, S, C, H, W]` trajectories as a grid: one row per trajectory, noise -> endpoint;
    `label` writes each column's sigma above it (needs `sigmas`), `min_cell` as `save_image_grid`.

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
    labels = [sigma_label(sigma) for sigma in sigmas] if label and sigmas is not None else None
    return save_image_grid(shown.reshape(count * length, *states.shape[2:]), path, nrow=length, padding=padding,
                           min_cell=min_cell, column_labels=labels)


def scatter_figure(points, reference=None, limits=None, panel_size=4.0, dpi=100, max_points=20000, title=None,
                   label="samples", reference_label="reference"):
    """The matplotlib `Figure` of `save_scatter` (title, panel titles, legend), not yet saved."""
    panels = [(points, None)] if torch.is_tensor(points) or isinstance(points, np.ndarray) else list(points)
    if not panels:
        raise ValueError("save_scatter needs at least one panel of points")
    arrays = []
    for panel_points, panel_title in panels:
        array = torch.as_tensor(panel_points).detach().float().cpu().numpy()
        if array.ndim != 2 or array.shape[1] != 2:
            raise ValueError(f"scatter points must be [N, 2], got shape {array.shape} (panel {panel_title!r})")
        arrays.append((array[:max_points], panel_title))
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
    for axis, (array, panel_title) in zip(axes[0], arrays):
        if reference is not None:
            axis.scatter(reference[:, 0], reference[:, 1], s=2, c="0.8", linewidths=0,
                         label=f"{reference_label} ({len(reference)})")
        axis.scatter(array[:, 0], array[:, 1], s=2, c="tab:blue", linewidths=0, label=f"{label} ({len(array)})")
        axis.set_xlim(limits)
        axis.set_ylim(limits)
        axis.set_aspect("equal")
        if panel_title:
            axis.set_title(panel_title, fontsize=9)
    if reference is not None or title:
        axes[0][0].legend(loc="upper right", fontsize=7, markerscale=4, framealpha=0.8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def save_scatter(points, path, reference=None, limits=None, panel_size=4.0, dpi=100, max_points=20000, title=None,
                 label="samples", reference_label="reference"):
    """Save 2-D points as side-by-side scatter panels; returns the path.

    `points`: a `[N, 2]` array or a list of `(points, panel title)`. `reference` (e.g. the data) is
    drawn in grey behind every panel. All panels share fixed, square axes (`limits=(low, high)`, by
    default taken from the reference, or else from all points), so panels can be compared by eye.
    `title` (e.g. what was sampled and its metric) goes on top; the legend names `label` (the points)
    and `reference_label`, with their counts.
    """
    figure = scatter_figure(points, reference=reference, limits=limits, panel_size=panel_size, dpi=dpi,
                            max_points=max_points, title=title, label=label, reference_label=reference_label)
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary)
    return path
