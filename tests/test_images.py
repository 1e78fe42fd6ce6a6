import numpy as np
import pytest
import torch
from PIL import Image

from cmt.images import save_image_grid, save_scatter, save_trajectory_grid


def test_image_grid_layout_and_values(tmp_path):
    images = -torch.ones(10, 3, 8, 6)
    images[3] = 1.0  # 4th image white: first row, last column of a 4-wide grid
    path = save_image_grid(images, tmp_path / "sub" / "grid.png")
    grid = Image.open(path)
    assert grid.mode == "RGB" and grid.size == (4 * (6 + 2) + 2, 3 * (8 + 2) + 2)
    pixels = np.asarray(grid)
    assert (pixels[2:10, 2:8] == 0).all()  # first image black
    assert (pixels[2:10, 3 * 8 + 2:3 * 8 + 8] == 255).all()  # 4th image white
    assert (pixels[0] == 255).all()  # white padding


def test_image_grid_gray_and_nrow(tmp_path):
    images = torch.linspace(-1, 1, 6 * 5 * 5).reshape(6, 1, 5, 5)
    grid = Image.open(save_image_grid(images, tmp_path / "gray.png", nrow=6, padding=0))
    assert grid.mode == "L" and grid.size == (30, 5)
    pixels = np.asarray(grid)
    assert pixels[0, 0] == 0 and pixels[-1, -1] == 255


def test_image_grid_rejects_latents(tmp_path):
    with pytest.raises(ValueError, match="latents are not images"):
        save_image_grid(torch.zeros(2, 4, 8, 8), tmp_path / "latent.png")
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        save_image_grid(torch.zeros(4, 8, 8), tmp_path / "flat.png")
    assert not (tmp_path / "latent.png").exists()


def test_trajectory_grid_rescales_noisy_states(tmp_path):
    generator = torch.Generator().manual_seed(0)
    endpoint = 0.5 * torch.randn(3, 1, 1, 16, 16, generator=generator)
    sigmas = torch.tensor([80.0, 5.0, 0.5, 0.0])
    states = endpoint + sigmas.reshape(1, 4, 1, 1, 1) * torch.randn(3, 4, 1, 16, 16, generator=generator)
    for name, kwargs in (("given", {"sigmas": sigmas}), ("measured", {})):
        grid = Image.open(save_trajectory_grid(states, tmp_path / f"{name}.png", **kwargs))
        assert grid.size == (4 * 18 + 2, 3 * 18 + 2)
        pixels = np.asarray(grid)
        noisiest = pixels[2:18, 2:18]
        # sigma = 80 noise shown at the data's scale: few pixels saturate (clamping alone saturates ~99%)
        assert np.isin(noisiest, [0, 255]).mean() < 0.1
    with pytest.raises(ValueError, match="3 sigmas"):
        save_trajectory_grid(states, tmp_path / "bad.png", sigmas=sigmas[:3])


def test_scatter_panels(tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(500, 2, generator=generator)
    path = save_scatter([(data, "data"), (0.5 * data, "samples"), (data + 1, "shifted")], tmp_path / "scatter.png",
                        reference=data)
    assert Image.open(path).size == (1200, 400)
    assert Image.open(save_scatter(data.numpy(), tmp_path / "one.png", limits=(-3, 3))).size == (400, 400)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        save_scatter(torch.zeros(10, 3), tmp_path / "bad.png")
