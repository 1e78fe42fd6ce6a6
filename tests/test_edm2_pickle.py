"""Official EDM2 pickles read without running code: tiny networks saved in that format by the test
(`edm2_fixtures.write_edm2_pickle` emulates EDM2's `torch_utils.persistence`)."""
import json
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cmt.checkpoint import load_network
from cmt.cli.convert import main as convert_main
from cmt.errors import ArgumentError
from cmt.networks import edm2
from cmt.networks.nvlabs_pickle import UnsafePickleError, load_edm2_pickle
from cmt.teachers import EDM2_PRESETS as PRESETS
from cmt.teachers import convert_checkpoint, fetch_edm2_checkpoint, resolve_teacher

from edm2_fixtures import Persistent, tiny_official_network, vae_encoder, write_edm2_pickle


@pytest.fixture()
def tiny_pickle(tmp_path, monkeypatch):
    marker = tmp_path / "source-ran"
    net = tiny_official_network()
    data = dict(ema=net, encoder=vae_encoder(), loss_fn=Persistent("EDM2Loss", P_mean=-0.4, P_std=1.0),
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="x.zip"))
    path = tmp_path / "edm2-tiny-0000001-0.100.pkl"
    # The stored source would leave a marker if anything ever executed it.
    write_edm2_pickle(path, monkeypatch, data, module_src=f"open({str(marker)!r}, 'w').write('ran')\n")
    return path, net, marker


def reference_outputs(net16):
    net = edm2.Precond(**net16._edm2_init_kwargs)
    net.load_state_dict({key: value.float() for key, value in net16.state_dict().items()})
    torch.manual_seed(1)
    x, sigma, labels = torch.randn(3, 4, 8, 8), torch.tensor([0.05, 1.0, 20.0]), torch.eye(3)
    with torch.no_grad():
        return (x, sigma, labels), net.eval()(x, sigma, labels)


def test_tiny_pickle_loads_without_running_code(tiny_pickle):
    path, net16, marker = tiny_pickle
    loaded = load_edm2_pickle(path)
    assert not marker.exists()
    inputs, expected = reference_outputs(net16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(*inputs), expected, rtol=0, atol=0)
    assert loaded.net.config["use_fp16"] is True and loaded.net.config["model_channels"] == 16
    assert all(p.dtype == torch.float32 for p in loaded.net.parameters())
    assert loaded.encoder["kind"] == "stability_vae" and loaded.encoder["vae_name"] == "stabilityai/sd-vae-ft-mse"
    np.testing.assert_allclose(loaded.encoder["scale"], 0.5 / np.float32([4.17, 4.62, 3.71, 3.28]), rtol=1e-6)
    np.testing.assert_allclose(loaded.encoder["bias"][0], -5.81 * 0.5 / 4.17, rtol=1e-5)
    # load_network and resolve_teacher take the same file.
    with torch.no_grad():
        torch.testing.assert_close(load_network(path)(*inputs), expected, rtol=0, atol=0)
    teacher, identity = resolve_teacher("edm2", ckpt=path)
    assert identity["kind"] == "edm2" and identity["encoder"]["kind"] == "stability_vae"
    assert len(identity["sha256"]) == 64 and identity["config"]["architecture"] == "edm2"
    assert not marker.exists()


def test_pickle_running_os_system_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": Exploit()}))
    with pytest.raises(UnsafePickleError, match=r"refusing global '(posix|os|nt)\.system'"):
        load_edm2_pickle(path)
    assert not marker.exists()
    result = CliRunner().invoke(convert_main, [str(path), str(tmp_path / "out.safetensors")])
    assert result.exit_code != 0 and "refusing global" in result.output
    assert not (tmp_path / "out.safetensors").exists() and not marker.exists()


def test_code_hidden_inside_a_persistent_state_is_refused(tmp_path, monkeypatch):
    class Sneaky:
        def __reduce__(self):
            return eval, ("__import__('os').getcwd()",)

    data = dict(ema=Persistent("Precond", _parameters={"x": Sneaky()}))
    path = tmp_path / "sneaky.pkl"
    write_edm2_pickle(path, monkeypatch, data, module_src="")
    with pytest.raises(UnsafePickleError, match="refusing global 'builtins.eval'"):
        load_edm2_pickle(path)


def test_not_a_network_pickle(tmp_path, monkeypatch):
    path = tmp_path / "loss.pkl"
    write_edm2_pickle(path, monkeypatch, dict(ema=Persistent("EDM2Loss", P_mean=0.0)), module_src="")
    with pytest.raises(ValueError, match="its 'ema' network is of class EDM2Loss; expected an EDM2"):
        load_edm2_pickle(path)


def test_convert_then_load_safetensors(tiny_pickle, tmp_path):
    path, net16, marker = tiny_pickle
    out = tmp_path / "tiny.safetensors"
    result = CliRunner().invoke(convert_main, [str(path), str(out)])
    assert result.exit_code == 0, result.output
    inputs, expected = reference_outputs(net16)
    with torch.no_grad():
        torch.testing.assert_close(load_network(out)(*inputs), expected, rtol=0, atol=0)
    extra = json.loads(out.with_suffix(".json").read_text())["extra"]
    assert extra["encoder"]["kind"] == "stability_vae"
    _, identity = resolve_teacher("edm2", ckpt=out)
    assert identity["encoder"] == extra["encoder"]

    before = out.read_bytes()
    result = CliRunner().invoke(convert_main, [str(path), str(out)])
    assert result.exit_code != 0 and "--overwrite" in result.output and out.read_bytes() == before
    assert not marker.exists()


def test_presets_use_the_cache_and_fail_clearly_offline(tiny_pickle, tmp_path, monkeypatch):
    path, _, _ = tiny_pickle
    assert PRESETS["edm2-img64-s"].endswith("/posthoc-reconstructions/edm2-img64-s-1073741-0.075.pkl")
    cache = tmp_path / "cache"
    monkeypatch.setenv("CMT_CACHE", str(cache))   # the one cache setting (cmt.download)
    (cache / "edm2").mkdir(parents=True)
    (cache / "edm2" / "edm2-img64-s-1073741-0.075.pkl").write_bytes(path.read_bytes())
    net, identity = resolve_teacher("edm2-img64-s")
    assert identity["preset"] == "edm2-img64-s" and identity["path"].endswith("edm2-img64-s-1073741-0.075.pkl")
    assert identity["path"] == str(cache / "edm2" / "edm2-img64-s-1073741-0.075.pkl")
    with pytest.raises(FileNotFoundError, match=r"edm2-img512-xs-2147483-0.135.pkl by hand and put it at .*cache"):
        fetch_edm2_checkpoint("http://127.0.0.1:9/edm2-img512-xs-2147483-0.135.pkl")
    assert not list((cache / "edm2").glob("*.part"))   # nothing half-written is left behind


def test_convert_checkpoint_library(tiny_pickle, tmp_path):
    path, net16, marker = tiny_pickle
    written = convert_checkpoint(source=path, out=tmp_path / "tiny.safetensors")
    assert written["out"] == tmp_path / "tiny.safetensors" and written["source"] == path
    assert written["encoder"]["kind"] == "stability_vae" and written["parameters"] > 0
    inputs, expected = reference_outputs(net16)
    with torch.no_grad():
        torch.testing.assert_close(load_network(written["out"])(*inputs), expected, rtol=0, atol=0)
    for kwargs, argument in [({"out": tmp_path / "tiny.safetensors"}, "out"), ({"out": tmp_path / "x.pt"}, "out"),
                             ({"source": tmp_path / "missing.pkl"}, "source")]:
        with pytest.raises(ArgumentError) as error:
            convert_checkpoint(**{"source": path, "out": tmp_path / "new.safetensors", **kwargs})
        assert error.value.argument == argument
    assert convert_checkpoint(source=path, out=tmp_path / "tiny.safetensors", overwrite=True)["out"].is_file()
    assert not marker.exists()


def test_guided_teachers_from_pickles(tiny_pickle, tmp_path, monkeypatch):
    path, net16, _ = tiny_pickle
    guide_path = tmp_path / "guide.pkl"
    guide16 = tiny_official_network(model_channels=8)
    write_edm2_pickle(guide_path, monkeypatch, dict(ema=guide16), module_src="")
    inputs, expected = reference_outputs(net16)
    _, weak = reference_outputs(guide16)

    guided, identity = resolve_teacher("edm2", ckpt=path, guidance=1.7, guide_ckpt=guide_path)
    with torch.no_grad():
        torch.testing.assert_close(guided(*inputs), weak + 1.7 * (expected - weak), atol=1e-5, rtol=1e-5)
    assert identity["kind"] == "edm2" and identity["guidance"]["kind"] == "autoguidance"
    assert identity["guidance"]["weight"] == 1.7 and identity["guidance"]["guide"]["path"] == str(guide_path)
    assert guided.data_shape == (4, 8, 8) and guided.label_dim == 3

    # EDM2 trains no label dropout: classifier-free guidance of its class-conditional nets against their
    # own label-free output is refused (issue 9); an unconditional guide network gives it.
    with pytest.raises(ArgumentError, match="unconditional guide") as refused:
        resolve_teacher(str(path), guidance=2.0)
    assert refused.value.argument == "guidance"
    uncond_path = tmp_path / "uncond.pkl"
    uncond16 = tiny_official_network(model_channels=8, label_dim=0)
    write_edm2_pickle(uncond_path, monkeypatch, dict(ema=uncond16), module_src="")
    cfg, identity = resolve_teacher(str(path), guidance=2.0, guide_ckpt=uncond_path)
    assert identity["guidance"]["kind"] == "classifier_free" and identity["guidance"]["guide"]["path"] == str(uncond_path)
    with torch.no_grad():
        uncond = load_edm2_pickle(uncond_path).net(inputs[0], inputs[1], None)
        torch.testing.assert_close(cfg(*inputs), uncond + 2.0 * (expected - uncond), atol=1e-5, rtol=1e-5)
