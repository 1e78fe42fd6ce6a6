"""SiT checkpoints as teachers and students: official and MeanFlow-port files by name, sizes read from
the state dict, one-line refusals; a SiT teacher through the trajectory builder."""
import argparse
import urllib.error

import numpy as np
import pytest
import torch

import cmt.download
from cmt.builders.build import build_trajectories
from cmt.checkpoint import load_network, save_network
from cmt.download import DownloadError
from cmt.edm import sigma_grid
from cmt.errors import FileFormatError
from cmt.manifest import TrajectoryDataset
from cmt.networks.edm2 import Precond
from cmt.networks.sit import SIT_PRESETS, SiT
from cmt.sit_checkpoint import SIT_ENCODER, load_meanflow_checkpoint
from cmt.solvers import sample_trajectory
from cmt.teachers import resolve_teacher, teacher_label_dropout

TINY = dict(depth=2, hidden_size=32, num_heads=2)


@pytest.fixture(autouse=True)
def tiny_sizes(monkeypatch):
    """Two tiny sizes beside SiT's own, so checkpoints of a named size stay a few KB."""
    monkeypatch.setitem(SIT_PRESETS, "sit-t/2", dict(TINY, patch_size=2))
    monkeypatch.setitem(SIT_PRESETS, "sit-t/4", dict(TINY, patch_size=4))


def random_sit(seed, **options):
    torch.manual_seed(seed)
    net = SiT(**{**dict(data_shape=(4, 8, 8), label_dim=10, patch_size=2, **TINY), **options})
    with torch.no_grad():
        for value in net.state_dict().values():   # no zero layers: every input matters
            if value.dtype.is_floating_point and not value.any():
                value.normal_(0, 0.1)
    return net.eval()


def sample_inputs():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(3, 4, 8, 8, generator=generator) * 3, torch.tensor([4.0, 1.0, 0.2]), \
        torch.nn.functional.one_hot(torch.tensor([0, 9, 3]), 10).float()


def test_official_state_dict_loads_by_name_with_its_sizes_read_from_it(tmp_path):
    source = random_sit(0, learn_sigma=True)
    path = tmp_path / "SiT-T-2.pt"
    torch.save(source.state_dict(), path)   # the released file's form: the state dict itself
    net, identity = resolve_teacher("sit-t/2", ckpt=path)
    assert net.config == source.config and identity["kind"] == "sit" and identity["size"] == "sit-t/2"
    assert identity["encoder"] == SIT_ENCODER and teacher_label_dropout(identity, net) == 0.1
    x, sigma, labels = sample_inputs()
    with torch.no_grad():
        assert torch.equal(net(x, sigma, labels), source(x, sigma, labels))
    # any size name resolves; classes, latent size and learn_sigma come from the weights
    other = random_sit(1, data_shape=(4, 16, 16), label_dim=3, patch_size=4)
    torch.save(other.state_dict(), tmp_path / "p4.pt")
    loaded, _ = resolve_teacher("sit-t/4", ckpt=tmp_path / "p4.pt")
    assert loaded.config == other.config


def test_train_py_checkpoint_loads_its_ema_weights(tmp_path):
    ema, model = random_sit(2), random_sit(3)
    path = tmp_path / "0400000.pt"
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": {"state": {}},
                "args": argparse.Namespace(model="SiT-T/2", global_seed=0)}, path)
    net, _ = resolve_teacher("sit-t/2", ckpt=str(path))
    x, sigma, labels = sample_inputs()
    with torch.no_grad():
        assert torch.equal(net(x, sigma, labels), ema(x, sigma, labels))


def test_meanflow_port_checkpoint_loads_as_a_flow_map_student(tmp_path):
    port = random_sit(4, flow_map=True, time_convention="meanflow")
    path = tmp_path / "meanflow.pt"
    torch.save({"model": port.state_dict(), "ema": port.state_dict(), "args": argparse.Namespace(model="SiT-T/2")},
               path)
    student = load_meanflow_checkpoint(path, size="sit-t/2")
    assert student.flow_map and student.config["time_convention"] == "meanflow" and student.config == port.config
    x, sigma, labels = sample_inputs()
    with torch.no_grad():
        assert torch.equal(student(x, sigma, labels, target_sigma=0.0), port(x, sigma, labels, target_sigma=0.0))
    with pytest.raises(FileFormatError, match="meanflow.pt: a MeanFlow flow-map network .* not a SiT teacher"):
        resolve_teacher("sit-t/2", ckpt=path)
    teacher = tmp_path / "teacher.pt"
    torch.save(random_sit(5).state_dict(), teacher)
    with pytest.raises(FileFormatError, match="teacher.pt: a SiT without r_embedder"):
        load_meanflow_checkpoint(teacher)


def test_our_own_sit_checkpoints_resolve_by_path_and_by_size(tmp_path):
    source = random_sit(6)
    path = save_network(tmp_path / "ours.safetensors", source, extra_config={"encoder": SIT_ENCODER})
    by_size, identity = resolve_teacher("sit-t/2", ckpt=path)
    by_path, _ = resolve_teacher(str(path))
    assert by_size.config == by_path.config == source.config and identity["encoder"] == SIT_ENCODER
    with pytest.raises(FileFormatError, match=r"ours.safetensors: holds a SiT of depth 2, hidden size 32, patch 2 "
                                              r"\(sit-t/2\); expected sit-t/4"):
        resolve_teacher("sit-t/4", ckpt=path)


def test_mismatches_are_one_line_naming_the_file_and_the_expectation(tmp_path):
    sit = tmp_path / "sit.pt"
    torch.save(random_sit(7).state_dict(), sit)
    cases = [
        (dict(name_or_path="sit-xl/2", ckpt=sit),
         "sit.pt: holds a SiT of depth 2, hidden size 32, patch 2; sit-xl/2 has depth 28, hidden size 1152, patch 2"),
        (dict(name_or_path="sit-t/4", ckpt=sit), "sit.pt: holds a SiT of depth 2, hidden size 32, patch 2; sit-t/4 has"),
        (dict(name_or_path="edm2", ckpt=sit), "sit.pt: an official SiT / MeanFlow state dict, not a cmt checkpoint; "
                                              "load it as a SiT teacher: --teacher sit-xl/2"),
    ]
    custom = tmp_path / "custom.pt"   # by its path alone, the size comes from the weights: one of SiT's or none
    torch.save(random_sit(7, depth=3).state_dict(), custom)
    cases.append((dict(name_or_path=str(custom)), "custom.pt: a SiT of depth 3, hidden size 32, patch 2 is none of "
                                                  "the sizes"))
    pickle = tmp_path / "edm2-img64-s.pkl"
    pickle.write_bytes(b"\x80\x04N.")
    cases.append((dict(name_or_path="sit-t/2", ckpt=pickle),
                  "edm2-img64-s.pkl: an EDM / EDM2 network pickle, not a SiT checkpoint"))
    torch.manual_seed(0)
    edm2 = save_network(tmp_path / "edm2.safetensors", Precond(img_resolution=8, img_channels=4, model_channels=8,
                                                               channel_mult=[1], num_blocks=1, attn_resolutions=[]))
    cases.append((dict(name_or_path="sit-t/2", ckpt=edm2),
                  "edm2.safetensors: holds a network of architecture 'edm2', not a SiT"))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    cases.append((dict(name_or_path="sit-t/2", ckpt=tmp_path / "other.pt"), "other.pt: not a SiT checkpoint"))
    broken = random_sit(8).state_dict()
    del broken["blocks.1.mlp.fc2.bias"]
    torch.save(broken, tmp_path / "broken.pt")
    cases.append((dict(name_or_path="sit-t/2", ckpt=tmp_path / "broken.pt"),
                  "missing keys \\(1\\): blocks.1.mlp.fc2.bias"))
    for kwargs, message in cases:
        with pytest.raises(FileFormatError, match=message) as error:
            resolve_teacher(**kwargs)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="teacher 'sit-b/4' needs a checkpoint"):
        resolve_teacher("sit-b/4")


def test_sit_xl2_without_a_checkpoint_is_the_release_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CMT_CACHE", str(tmp_path))

    def offline(url, target, sha256):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(cmt.download, "_download", offline)
    with pytest.raises(DownloadError, match="SiT-XL-2-256x256.pt .*or pass the path of a local copy instead"):
        resolve_teacher("sit-xl/2")
    cached = tmp_path / "sit" / "SiT-XL-2-256x256.pt"
    cached.parent.mkdir()
    torch.save(random_sit(9).state_dict(), cached)   # found in the cache: no download; wrong size here
    with pytest.raises(FileFormatError, match="sit/SiT-XL-2-256x256.pt: holds a SiT of depth 2, hidden size 32"):
        resolve_teacher("sit-xl/2")


@pytest.mark.parametrize("label_dim", [0, 10])
def test_sit_teacher_through_the_builder(tmp_path, label_dim):
    net = random_sit(10, label_dim=label_dim, learn_sigma=True)
    path = save_network(tmp_path / "sit.safetensors", net)
    build_trajectories(teacher=str(path), out=tmp_path / "shards", solver="euler", nfe=3, num_trajectories=5,
                       batch_size=5, shard_size=5, dtype="float32", progress=False, log=lambda message: None)
    dataset = TrajectoryDataset(tmp_path / "shards")
    arrays = dataset.read_shard(dataset.shards[0])
    assert dataset.manifest["teacher"]["config"]["architecture"] == "sit" and len(dataset) == 5
    labels = None
    if label_dim:
        assert (arrays["label"] >= 0).all() and len(set(arrays["label"].tolist())) > 1
        labels = torch.nn.functional.one_hot(torch.from_numpy(arrays["label"]), label_dim).float()
    else:
        assert (arrays["label"] == -1).all()
    loaded = load_network(path)
    expected = sample_trajectory(loaded, torch.from_numpy(arrays["noise"]), sigma_grid("logsnr", 3), solver="euler",
                                 labels=labels)
    np.testing.assert_allclose(arrays["states"], expected.states.transpose(0, 1).numpy(), rtol=1e-6, atol=1e-6)
