import json
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from cmt.datasets import TOY_NAMES, one_hot_labels, reference_sample, resolve_data, sample_toy


@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_is_centered_with_sigma_data_scale(name):
    x = sample_toy(name, 20000, torch.Generator().manual_seed(3))
    assert x.shape == (20000, 2) and x.dtype == torch.float32
    assert x.mean(dim=0).abs().max() < 0.02
    assert abs(x.var(dim=0).mean().sqrt().item() - 0.5) < 0.01


def test_toy_shapes_are_what_their_names_say():
    board = sample_toy("checkerboard", 5000, torch.Generator().manual_seed(0))
    cell = torch.floor(board / (board.abs().max() / 2 + 1e-6)).long() + 2
    colour = ((cell[:, 0] + cell[:, 1]) % 2).float().mean()
    assert min(colour, 1 - colour) < 0.005  # one colour of squares (up to points on the edges)
    points = sample_toy("8gaussians", 4000, torch.Generator().manual_seed(0))
    angles = torch.atan2(points[:, 1], points[:, 0]) / (2 * torch.pi / 8)
    assert (angles - angles.round()).abs().median() < 0.15  # clustered at 8 directions


def test_toy_reference_is_fixed_and_fresh_samples_differ():
    a, b = reference_sample("moons"), reference_sample("moons")
    assert torch.equal(a, b) and a.shape == (4096, 2)
    data = resolve_data("toy:moons")
    assert torch.equal(data.reference(), a)
    x1, labels = data.sample(10, torch.Generator().manual_seed(1))
    x2, _ = data.sample(10, torch.Generator().manual_seed(2))
    assert not torch.equal(x1, x2) and torch.equal(labels, torch.full((10,), -1))
    assert data.kind == "toy" and data.data_shape == (2,) and data.label_dim == 0
    with pytest.raises(ValueError, match="endless"):
        data.tensors()


def test_mnist_images_labels_and_resolutions():
    data = resolve_data("mnist")
    images, labels = data.tensors()
    assert data.kind == "images" and data.label_dim == 10 and data.size == 5000
    assert images.shape == (5000, 1, 16, 16) and images.dtype == torch.float32
    assert images.min() == -1 and images.max() == 1
    assert torch.equal(torch.bincount(labels), torch.full((10,), 500))
    # background is -1, ink in the middle
    assert images[:, :, 0, :].mean() < -0.99 and images[:, :, 6:10, 6:10].mean() > -0.5
    native = resolve_data("mnist", resolution=28).images
    padded = resolve_data("mnist", resolution=32).images
    assert native.shape[-1] == 28 and torch.equal(padded[:, :, 2:30, 2:30], native)
    assert (padded[:, :, :2] == -1).all()
    x, y = data.sample(64, torch.Generator().manual_seed(0))
    assert x.shape == (64, 1, 16, 16) and y.shape == (64,) and y.max() <= 9


def test_mnist_digit_classes_differ():
    images, labels = resolve_data("mnist").tensors()
    ones, zeros = images[labels == 1].mean(0), images[labels == 0].mean(0)
    # a '0' has ink at the left/right of the centre where a '1' has none
    assert zeros[0, 8, 3:6].mean() > ones[0, 8, 3:6].mean() + 0.5


def _digit_png(path, value, size=(12, 12), mode="L"):
    array = np.full(size[::-1] + ((3,) if mode == "RGB" else ()), value, dtype=np.uint8)
    PIL.Image.fromarray(array, mode).save(path)


def test_image_folder_recursive_gray_and_resize(tmp_path):
    (tmp_path / "sub").mkdir()
    _digit_png(tmp_path / "a.png", 0)
    _digit_png(tmp_path / "sub" / "b.PNG", 255)
    (tmp_path / "notes.txt").write_text("not an image")
    data = resolve_data(tmp_path)
    assert data.data_shape == (1, 12, 12) and data.label_dim == 0 and data.size == 2
    images = data.tensors()[0]
    assert images[0].max() == -1 and images[1].min() == 1
    assert resolve_data(tmp_path, resolution=8).data_shape == (1, 8, 8)


def test_image_folder_mixed_sizes_and_colour(tmp_path):
    _digit_png(tmp_path / "a.png", 10, size=(12, 12))
    _digit_png(tmp_path / "b.jpg", 200, size=(16, 20), mode="RGB")
    with pytest.raises(ValueError, match="different sizes"):
        resolve_data(tmp_path)
    data = resolve_data(tmp_path, resolution=8)
    assert data.data_shape == (3, 8, 8)


def test_npz_layouts_and_labels(tmp_path):
    nhwc = np.random.default_rng(0).integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=nhwc, labels=np.array([0, 1, 2, 1, 0]))
    data = resolve_data(tmp_path / "a.npz")
    assert data.data_shape == (3, 8, 8) and data.label_dim == 3
    assert abs(data.tensors()[0][2, 1, 3, 4].item() - (nhwc[2, 3, 4, 1] / 127.5 - 1)) < 1e-6
    nchw = np.linspace(-1, 1, 4 * 64).reshape(4, 1, 8, 8).astype(np.float32)
    np.savez(tmp_path / "b.npz", nchw, y=np.eye(4)[[3, 2, 1, 0]])
    data = resolve_data(tmp_path / "b.npz", resolution=4)
    assert data.data_shape == (1, 4, 4) and data.labels.tolist() == [3, 2, 1, 0]
    np.savez(tmp_path / "c.npz", x=np.zeros((3, 8, 8), np.float32))
    assert resolve_data(tmp_path / "c.npz").labels.tolist() == [-1, -1, -1]


def test_edm_zip_with_and_without_labels(tmp_path):
    for name, value in [("00000/img00000000.png", 0), ("00000/img00000001.png", 255)]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        _digit_png(tmp_path / name, value)
    with zipfile.ZipFile(tmp_path / "data.zip", "w") as archive:
        for name in ["00000/img00000000.png", "00000/img00000001.png"]:
            archive.write(tmp_path / name, name)
        archive.writestr("dataset.json", json.dumps({"labels": [["00000/img00000001.png", 7]]}))
    data = resolve_data(tmp_path / "data.zip")
    assert data.labels.tolist() == [-1, 7] and data.label_dim == 8 and data.data_shape == (1, 12, 12)
    with zipfile.ZipFile(tmp_path / "plain.zip", "w") as archive:
        archive.write(tmp_path / "00000/img00000000.png", "img.png")
        archive.writestr("dataset.json", json.dumps({"labels": None}))
    assert resolve_data(tmp_path / "plain.zip").label_dim == 0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: "toy:spiral", "toy:checkerboard"),
        (lambda p: "moons", "toy:moons"),
        (lambda p: str(p / "missing.npz"), "no such file"),
        (lambda p: (p / "empty").mkdir() or str(p / "empty"), "no images"),
        (lambda p: (p / "data.txt").write_text("1 2") and str(p / "data.txt"), "neither a folder"),
        (lambda p: (p / "bad.npz").write_bytes(b"junk") and str(p / "bad.npz"), "not a readable .npz"),
        (lambda p: np.savez(p / "keys.npz", pixels=np.zeros((2, 4, 4))) or str(p / "keys.npz"), "accepted: x, images"),
        (lambda p: np.savez(p / "range.npz", x=np.full((2, 1, 4, 4), 3.0)) or str(p / "range.npz"), r"expected \[-1, 1\]"),
        (lambda p: np.savez(p / "lab.npz", x=np.zeros((2, 1, 4, 4)), labels=np.zeros(3)) or str(p / "lab.npz"), "'labels'"),
        (lambda p: (p / "bad.zip").write_bytes(b"junk") and str(p / "bad.zip"), "not a readable zip"),
    ],
)
def test_bad_specs_raise_one_clear_error(tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        resolve_data(make(tmp_path))


def test_unreadable_image_names_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        resolve_data(tmp_path)


def test_one_hot_labels():
    assert one_hot_labels(torch.tensor([1, -1]), 0) is None
    assert one_hot_labels(torch.tensor([2, -1]), 3).tolist() == [[0, 0, 1], [0, 0, 0]]
