"""Users' image sets streamed from disk (issue 28): EDM zips, image folders and .npz arrays decoded one
item at a time, the training stream over them (ranks, workers, flips, exact resume), and bad input."""
import io
import json
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

import cmt
from cmt.datasets import resolve_data
from cmt.datasets.archive import NameTable, ZipMembers
from cmt.datasets.images import ImageFiles, resize_image
from cmt.datasets.stream import BatchStream
from cmt.errors import ArgumentError, FileFormatError
from cmt.metrics import FeatureMoments, feature_statistics
from cmt.trainers.data import check_data_fits, data_batches, training_data
from cmt.trainers.batches import to_device as _to_device


def png_bytes(array, mode=None):
    buffer = io.BytesIO()
    PIL.Image.fromarray(array, mode).save(buffer, "png")
    return buffer.getvalue()


def pixels(seed, size=(6, 6), channels=3):
    shape = (size[1], size[0], channels) if channels == 3 else (size[1], size[0])
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_zip(path, count=12, labels=True, order=None, size=(6, 6)):
    """An EDM-format zip: `00000/img0000000i.png`, alternately stored and deflated, with dataset.json."""
    names = [f"{i // 5:05d}/img{i:08d}.png" for i in range(count)]
    with zipfile.ZipFile(path, "w") as archive:
        for i, name in enumerate(names):
            archive.writestr(name, png_bytes(pixels(i, size)),
                             compress_type=zipfile.ZIP_DEFLATED if i % 2 else zipfile.ZIP_STORED)
        if labels:
            listed = [[name, i % 4] for i, name in enumerate(names)]
            archive.writestr("dataset.json", json.dumps({"labels": [listed[k] for k in (order or range(count))]}))
    return names


def test_zip_items_labels_and_index(tmp_path):
    names = write_zip(tmp_path / "a.zip")
    data = resolve_data(tmp_path / "a.zip")
    assert isinstance(data, ImageFiles) and data.kind == "images" and data.encoder is None
    assert (data.size, data.data_shape, data.label_dim) == (12, (3, 6, 6), 4)
    assert list(data.files.names) == names and data.labels.tolist() == [i % 4 for i in range(12)]
    for index in (0, 5):   # a stored and a deflated member decode to the PNG's pixels, uint8 CHW
        image, label = data[index]
        assert image.dtype == np.uint8 and np.array_equal(image, pixels(index).transpose(2, 0, 1))
    # Floats in [-1, 1] for metrics and the in-memory API.
    images, labels = data.tensors()
    assert images.dtype == torch.float32 and images[0].min() >= -1 and torch.allclose(
        images[3], torch.from_numpy(pixels(3).transpose(2, 0, 1)).float() / 127.5 - 1)
    assert [len(batch) for batch, _ in data.batches(5)] == [5, 5, 2]
    # dataset.json listing the images in another order (and leaving one out) reads the same labels.
    write_zip(tmp_path / "b.zip", order=[11, 3, 0, 7, 1, 2, 4, 5, 6, 8, 9])
    assert ImageFiles(tmp_path / "b.zip").labels.tolist() == [i % 4 for i in range(10)] + [-1, 3]
    # The index: names in one blob, not a Python object per member.
    table = NameTable(["b", "äé/x.png", ""])
    assert list(table) == ["b", "äé/x.png", ""] and len(table) == 3
    assert isinstance(data.files.names.blob, bytes) and data.files.offset.dtype == np.int64


def test_zip64_and_a_prefixed_archive_read_like_zipfile(tmp_path):
    path = tmp_path / "big.zip"
    with zipfile.ZipFile(path, "w", allowZip64=True) as archive:
        for i in reversed(range(3)):   # out of order: read sorted by name
            with archive.open(f"img{i}.png", "w", force_zip64=True) as member:   # zip64 extra fields
                member.write(png_bytes(pixels(i)))
    prefixed = tmp_path / "prefixed.zip"   # a self-extractor's stub before the archive
    prefixed.write_bytes(b"#!stub\n" * 10 + path.read_bytes())
    for source in (path, prefixed):
        members = ZipMembers(source, lambda name: name.endswith(".png"))
        with zipfile.ZipFile(source) as archive:
            assert [members.read(i) for i in range(3)] == [archive.read(f"img{i}.png") for i in range(3)]


def test_folders_flat_and_one_subfolder_per_class(tmp_path):
    for klass, count in (("n02", 2), ("n01", 3)):
        (tmp_path / "classes" / klass).mkdir(parents=True)
        for i in range(count):
            (tmp_path / "classes" / klass / f"{i}.png").write_bytes(png_bytes(pixels(i)))
    data = ImageFiles(tmp_path / "classes")
    assert list(data.files.names)[:2] == ["n01/0.png", "n01/1.png"] and data.labels.tolist() == [0, 0, 0, 1, 1]
    (tmp_path / "classes" / "root.png").write_bytes(png_bytes(pixels(9)))   # an image at the root: no classes
    assert ImageFiles(tmp_path / "classes").label_dim == 0
    (tmp_path / "classes" / "dataset.json").write_text(json.dumps({"labels": [["n02/1.png", 7]]}))
    assert ImageFiles(tmp_path / "classes").labels.tolist() == [-1, -1, -1, -1, 7, -1]
    # Grayscale stays one channel; with a resolution, sizes and colours may mix (read as RGB).
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.png").write_bytes(png_bytes(pixels(0, (8, 6), channels=1), "L"))
    (tmp_path / "mixed" / "b.png").write_bytes(png_bytes(pixels(1, (10, 10))))
    mixed = ImageFiles(tmp_path / "mixed", resolution=4)
    assert mixed.data_shape == (3, 4, 4) and mixed[0][0].shape == (3, 4, 4)
    gray = PIL.Image.fromarray(pixels(0, (8, 6), channels=1)).convert("RGB")
    assert np.array_equal(mixed[0][0], np.asarray(resize_image(gray, 4)).transpose(2, 0, 1))
    adm = ImageFiles(tmp_path / "mixed", resolution=4, resize="adm")
    assert adm[1][0].shape == (3, 4, 4) and not np.array_equal(adm[1][0], mixed[1][0])


def test_npz_stored_is_memory_mapped_compressed_is_loaded(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)   # NHWC
    np.savez(tmp_path / "stored.npz", images=images, labels=np.array([0, 2, 1, 2, 0]))
    np.savez_compressed(tmp_path / "packed.npz", x=images.transpose(0, 3, 1, 2))
    stored, packed = ImageFiles(tmp_path / "stored.npz"), ImageFiles(tmp_path / "packed.npz")
    assert isinstance(stored.array, np.memmap) and not isinstance(packed.array, np.memmap)
    assert stored.data_shape == packed.data_shape == (3, 4, 4) and stored.label_dim == 3 and packed.label_dim == 0
    assert np.array_equal(stored[2][0], images[2].transpose(2, 0, 1)) and np.array_equal(packed[2][0], stored[2][0])
    floats = np.linspace(-1, 1, 2 * 64).reshape(2, 1, 8, 8).astype(np.float32)
    np.savez(tmp_path / "floats.npz", floats)
    data = ImageFiles(tmp_path / "floats.npz")
    assert data.dtype == np.float32 and np.array_equal(data[1][0], floats[1])
    assert ImageFiles(tmp_path / "floats.npz", resolution=4)[0][0].shape == (1, 4, 4)


def test_stream_is_split_deterministic_and_resumes_exactly(tmp_path):
    write_zip(tmp_path / "a.zip", count=11)
    data = ImageFiles(tmp_path / "a.zip")
    # Ranks split every epoch without overlap; each epoch is a new permutation.
    ranks = [BatchStream(data, 5, seed=3, rank=rank, world_size=2) for rank in range(2)]
    epoch0 = [set(ranks[rank].batch_keys(0)[:, 0]) for rank in range(2)]
    assert not epoch0[0] & epoch0[1] and len(epoch0[0] | epoch0[1]) == 10
    keys = ranks[0].batch_keys(1)   # crosses into epoch 1: the last item of epoch 0, then 4 of epoch 1
    assert keys[:, 2].tolist() == [1, 1, 1, 1, 1] and ranks[0].batch_keys(2)[0, 2] == 2
    # Workers decode the same batches as the in-process thread; a stream restored from its state
    # continues exactly as the uninterrupted one.
    plain = BatchStream(data, 4, seed=1, workers=0, xflip=True)
    workers = BatchStream(data, 4, seed=1, workers=2, xflip=True)
    first = [next(plain) for _ in range(4)]
    assert all(torch.equal(a["data"], next(workers)["data"]) for a in first)
    assert first[0]["data"].dtype == torch.uint8 and first[0]["label"].dtype == torch.int64
    resumed = BatchStream(data, 4, seed=1, workers=0, xflip=True)
    resumed.load_state_dict(plain.state_dict())
    for _ in range(3):
        expected, got = next(plain), next(resumed)
        assert torch.equal(expected["data"], got["data"]) and torch.equal(expected["label"], got["label"])
    workers.close()
    # xflip: an item's flip is drawn per epoch; a flipped item is its image mirrored left-right.
    keys = plain.batch_keys(0)
    flips = np.concatenate([plain.batch_keys(batch)[:, 1] for batch in range(20)])
    assert keys[:, 1].any() and not keys[:, 1].all() and 0.3 < flips.mean() < 0.7
    row = int(np.flatnonzero(keys[:, 1])[0])
    assert np.array_equal(first[0]["data"][row].numpy(), data[int(keys[row, 0])][0][:, :, ::-1])
    # On the device, uint8 images become [-1, 1] floats.
    moved = _to_device(first[0], torch.device("cpu"))
    assert moved["data"].dtype == torch.float32 and moved["data"].min() >= -1 and moved["data"].max() <= 1


def test_training_on_a_zip_resumes_exactly(tmp_path):
    write_zip(tmp_path / "a.zip", count=20, size=(8, 8))
    options = dict(data=str(tmp_path / "a.zip"), batch_size=4, channels=8, channel_mult=(1, 2), num_blocks=1,
                   attn_res=(), num_samples=0, progress=False, log_every=1, ckpt_every=2, sample_steps=1)
    whole = cmt.train_diffusion(out=tmp_path / "whole", max_steps=4, **options)
    cmt.train_diffusion(out=tmp_path / "part", max_steps=2, **options)
    resumed = cmt.train_diffusion(out=tmp_path / "part", max_steps=4, resume=True, **options)
    state = torch.load(tmp_path / "part" / "training-state.pt", weights_only=True)
    assert state["data"] == [{"batches": 4}]
    first, second = (torch.load(path / "training-state.pt", weights_only=True)["ema"]
                     for path in (tmp_path / "whole", tmp_path / "part"))
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert whole["metrics"]["loss"] == resumed["metrics"]["loss"]


def test_streamed_reference_statistics_match_the_whole_set():
    features = np.random.default_rng(0).normal(size=(300, 6)) * 2 + 1
    sums = FeatureMoments()
    for part in np.array_split(features, 7):
        sums.add(part)
    halves = FeatureMoments().add(features[:100]).merge(FeatureMoments().add(features[100:]))
    for mu, sigma in (sums.statistics(), halves.statistics()):
        expected = feature_statistics(features)
        np.testing.assert_allclose(mu, expected[0], atol=1e-12)
        np.testing.assert_allclose(sigma, expected[1], atol=1e-12)


# ---- bad input ------------------------------------------------------------------------------------

def test_a_corrupt_member_is_one_line_naming_it_also_from_a_worker(tmp_path):
    names = write_zip(tmp_path / "a.zip", count=6)
    raw = bytearray((tmp_path / "a.zip").read_bytes())
    member = png_bytes(pixels(2))   # stored: its bytes lie in the file as they are
    at = bytes(raw).index(member) + len(member) // 2
    raw[at:at + 8] = b"\x00" * 8
    (tmp_path / "a.zip").write_bytes(bytes(raw))
    data = ImageFiles(tmp_path / "a.zip")   # headers are intact: the damage is found at the read
    with pytest.raises(FileFormatError, match=f"a.zip: member {names[2]} is corrupt"):
        data.read(2)
    for workers in (0, 2):
        stream = BatchStream(data, 6, seed=0, workers=workers)
        with pytest.raises(FileFormatError) as error:
            next(stream)
        assert "\n" not in str(error.value) and names[2] in str(error.value)


@pytest.mark.parametrize("case, match", [
    ("truncated", "b.png: truncated PNG"),
    ("junk", "c.png: cannot read the image"),
    ("sizes", "different sizes"),
    ("gray", "grayscale mixed with colour"),
])
def test_damage_and_mixtures_are_found_when_the_set_is_opened(tmp_path, case, match):
    (tmp_path / "a.png").write_bytes(png_bytes(pixels(0)))
    other = {"truncated": ("b.png", png_bytes(pixels(1))[:-20]), "junk": ("c.png", b"\x89PNJ not an image"),
             "sizes": ("d.png", png_bytes(pixels(1, (5, 6)))),
             "gray": ("e.png", png_bytes(pixels(1, channels=1), "L"))}[case]
    (tmp_path / other[0]).write_bytes(other[1])
    with pytest.raises(FileFormatError, match=match) as error:
        resolve_data(tmp_path)
    assert "\n" not in str(error.value)
    with pytest.raises(ArgumentError) as error:   # the commands' data argument names the file too
        training_data(str(tmp_path))
    assert error.value.argument == "data" and other[0] in error.value.message


def test_a_zip_without_labels_given_to_a_conditional_network(tmp_path):
    write_zip(tmp_path / "plain.zip", labels=False)
    data = training_data(str(tmp_path / "plain.zip"))
    net = cmt.networks.build_network(dict(architecture="edm2", img_resolution=6, img_channels=3, label_dim=4,
                                          model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[]))
    with pytest.raises(ArgumentError, match="no dataset.json in .*plain.zip: it has no labels.* 4 classes"):
        check_data_fits(data, net)
    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as archive:
        archive.writestr("a.png", png_bytes(pixels(0)))
        archive.writestr("dataset.json", json.dumps({"labels": [["a.png", [0, 1]]]}))
    with pytest.raises(FileFormatError, match=r"bad.zip: member dataset.json: must be \{\"labels\""):
        ImageFiles(tmp_path / "bad.zip")


def test_streams_pick_their_kind(tmp_path):
    write_zip(tmp_path / "a.zip", count=4)
    assert isinstance(data_batches(training_data(str(tmp_path / "a.zip")), 2, 0, workers=0), BatchStream)
    assert not isinstance(data_batches(training_data("toy:moons"), 2, 0), BatchStream)
