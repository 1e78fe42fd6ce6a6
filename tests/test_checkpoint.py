"""Saving and loading networks: safetensors with configs, weights-only training checkpoints, errors."""
import json

import pytest
import torch
from safetensors.torch import save_file

from cmt.checkpoint import load_network, read_safetensors, save_network
from cmt.networks import build_network, load_state_dict_strict_or_explain
from cmt.networks.edm2 import Precond

MLP_CONFIG = {"architecture": "mlp", "data_shape": [2], "label_dim": 2, "width": 32, "num_blocks": 1}


def small_edm2():
    torch.manual_seed(0)
    net = Precond(img_resolution=8, img_channels=2, label_dim=3, model_channels=16, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[4])
    with torch.no_grad():
        for param in net.parameters():
            if param.ndim == 0:
                param.fill_(0.5)
    return net


def same_outputs(a, b, x):
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x, torch.tensor([0.4, 3.0])), b.eval()(x, torch.tensor([0.4, 3.0])),
                                   rtol=0, atol=0)


def test_safetensors_round_trip(tmp_path):
    net = small_edm2()
    path = save_network(tmp_path / "net.safetensors", net, extra_config={"step": 12})
    assert path == tmp_path / "net.safetensors"
    side = json.loads((tmp_path / "net.json").read_text())
    assert side["config"] == net.config and side["extra"] == {"step": 12}
    _, config, extra = read_safetensors(path)
    assert config == net.config and extra == {"step": 12}
    loaded = load_network(path)
    assert not loaded.training and loaded.config == net.config
    same_outputs(net, loaded, torch.randn(2, 2, 8, 8))


def test_training_checkpoint_picks_ema_then_net(tmp_path):
    torch.manual_seed(0)
    net, ema = build_network(MLP_CONFIG), build_network(MLP_CONFIG)
    path = tmp_path / "mid.pt"
    torch.save({"config": net.config, "net": net.state_dict(), "ema": ema.state_dict(), "step": 3}, path)
    x = torch.randn(2, 2)
    same_outputs(load_network(path), ema, x)
    same_outputs(load_network(path, key="net"), net, x)
    # A training config holding the network config under "network", and no EMA.
    torch.save({"config": {"network": net.config, "lr": 1e-3}, "net": net.state_dict()}, path)
    same_outputs(load_network(path), net, x)
    with pytest.raises(ValueError, match="no weights under 'opt'"):
        load_network(path, key="opt")


def test_training_checkpoint_with_code_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    path = tmp_path / "evil.pt"
    torch.save({"config": MLP_CONFIG, "net": Payload()}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        load_network(path)
    assert not marker.exists()


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_network(tmp_path / "nope.safetensors")

    net = build_network(MLP_CONFIG)
    path = save_network(tmp_path / "mlp.safetensors", net)
    tensors, _, _ = read_safetensors(path)

    bad = tmp_path / "unknown.safetensors"
    save_file(tensors, str(bad), metadata={"config": json.dumps({"architecture": "transformer"})})
    with pytest.raises(ValueError, match="unknown.safetensors: unknown architecture 'transformer'"):
        load_network(bad)

    wide = dict(MLP_CONFIG, width=48)
    save_file(tensors, str(bad), metadata={"config": json.dumps(wide)})
    with pytest.raises(ValueError, match=r"'inp.weight': file has \[32, 2\], network expects \[48, 2\]"):
        load_network(bad)

    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare))
    with pytest.raises(ValueError, match="no network config"):
        load_network(bare)

    with pytest.raises(ValueError, match="unknown network file type '.ckpt'"):
        (tmp_path / "x.ckpt").write_bytes(b"")
        load_network(tmp_path / "x.ckpt")


def test_strict_or_explain_lists_missing_and_unexpected():
    net = build_network(MLP_CONFIG)
    state = net.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["out.bias"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): out.bias .*unexpected keys \(1\): extra.weight"):
        load_state_dict_strict_or_explain(net, state, source="teacher.safetensors")
    del state["extra.weight"]
    load_state_dict_strict_or_explain(net, state, allow_missing={"out.bias"})


def test_resolve_teacher_paths_builtins_and_errors(tmp_path, monkeypatch):
    import cmt.teachers as teachers

    net = build_network(MLP_CONFIG)
    path = save_network(tmp_path / "teacher.safetensors", net)
    loaded, identity = teachers.resolve_teacher(str(path))
    assert identity["kind"] == "checkpoint" and identity["path"] == str(path)
    assert identity["config"] == net.config and len(identity["sha256"]) == 64
    same_outputs(loaded, net, torch.randn(2, 2))

    monkeypatch.setattr(teachers, "TEACHER_DIR", tmp_path / "assets")
    with pytest.raises(FileNotFoundError, match="built-in teacher 'toy:moons' is not available yet: .*toy-moons"):
        teachers.resolve_teacher("toy:moons")
    (tmp_path / "assets").mkdir()
    save_network(tmp_path / "assets" / "toy-moons.safetensors", net)
    _, identity = teachers.resolve_teacher("toy:moons")
    assert identity["kind"] == "builtin" and identity["name"] == "toy:moons"

    with pytest.raises(ValueError, match="unknown teacher 'cifar'; accepted: .*mnist, toy:checkerboard.*edm2-img64-s"):
        teachers.resolve_teacher("cifar")
    with pytest.raises(FileNotFoundError, match="teacher checkpoint not found: .*missing.pt"):
        teachers.resolve_teacher(str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="'edm2' needs a checkpoint"):
        teachers.resolve_teacher("edm2")
