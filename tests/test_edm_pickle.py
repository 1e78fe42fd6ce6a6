"""Official EDM (v1) pickles read without running code, as teachers: tiny networks written in the
official format by the test (`edm_fixtures.write_edm_pickle` emulates NVlabs/edm's persistence; the
numbers are the official outputs of tests/fixtures/edm_tiny_io.safetensors), refused files, presets,
`cmt-convert`, `cmt.load_teacher` and `cmt-build` from such a pickle."""
import io
import pickle

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from safetensors.torch import load_file

import cmt
from cmt.builders.build import build_trajectories
from cmt.checkpoint import load_network, read_nvlabs_pickle
from cmt.cli.build import main as build_main
from cmt.cli.convert import main as convert_main
from cmt.errors import FileFormatError
from cmt.networks.nvlabs_pickle import UnsafePickleError, load_edm2_pickle, load_edm_pickle, load_nvlabs_pickle
from cmt.teachers import EDM_PRESETS, fetch_edm_checkpoint, resolve_teacher

from conftest import FIXTURES
from edm2_fixtures import Persistent, tiny_official_network, write_edm2_pickle
from edm_fixtures import TINY, fixture_io, official_kwargs, tiny_network, write_edm_pickle

IO = fixture_io()


def official_pickle(tmp_path, monkeypatch, network="ddpmpp", precond="EDMPrecond", label_dim=3, **entries):
    """A tiny network (fixture weights) pickled as NVlabs/edm would, whose stored module source would
    leave a marker file if it ever ran; returns (path, marker)."""
    marker = tmp_path / f"source-ran-{network}-{precond}"
    net = tiny_network(network, precond, label_dim)
    path = tmp_path / f"network-snapshot-{network}-{precond}.pkl"
    write_edm_pickle(path, monkeypatch, net, official_kwargs(network, label_dim),
                     module_src=f"open({str(marker)!r}, 'w').write('ran')\n", **entries)
    return path, marker


def run_official_inputs(net, label_dim=3):
    with torch.no_grad():
        return net(IO["x"], IO["sigma"], IO["labels"] if label_dim else None)


@pytest.mark.parametrize("network", ["ddpmpp", "adm"])
@pytest.mark.parametrize("precond", ["EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond", "ECMPrecond"])
def test_official_pickles_load_as_teachers_with_the_official_outputs(tmp_path, monkeypatch, network, precond):
    path, marker = official_pickle(tmp_path, monkeypatch, network, precond)
    expected = IO[f"D/{network}/{precond}/3"]
    teacher = cmt.load_teacher(path)   # any .pkl: the family from the pickled class
    assert isinstance(teacher, torch.nn.Module) and not teacher.training
    torch.testing.assert_close(run_official_inputs(teacher), expected, rtol=1e-5, atol=1e-5)
    net, identity = resolve_teacher("edm", ckpt=path)
    torch.testing.assert_close(run_official_inputs(net), expected, rtol=1e-5, atol=1e-5)
    assert identity["kind"] == "edm" and identity["official_class"] == precond and identity["preset"] is None
    assert identity["config"]["precond"] == precond and identity["encoder"] == {"kind": "standard_rgb"}
    assert not marker.exists()


def test_ect_snapshot_with_its_loss_and_bound_method_loads(tmp_path, monkeypatch):
    """ECT's snapshots hold its ECMLoss, whose state has a bound method (pickled as builtins.getattr)."""
    class ECMLoss(Persistent):
        def t_to_r_sigmoid(self, t):
            raise AssertionError("never called")

    loss = ECMLoss("ECMLoss", P_mean=-1.1, P_std=2.0, q=256)
    loss.state["t_to_r"] = loss.t_to_r_sigmoid
    path, marker = official_pickle(tmp_path, monkeypatch, "ddpmpp", "ECMPrecond", loss_fn=loss)
    loaded = load_nvlabs_pickle(path)
    assert loaded.kind == "edm" and loaded.class_name == "ECMPrecond" and loaded.net.sigma_min == 0.003
    torch.testing.assert_close(run_official_inputs(loaded.net), IO["D/ddpmpp/ECMPrecond/3"], rtol=1e-5, atol=1e-5)
    assert not marker.exists()


def test_refused_files_are_one_line_naming_the_file(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"ema": Exploit()}))
    with pytest.raises(FileFormatError) as refused:
        read_nvlabs_pickle(evil)
    message = str(refused.value)
    assert message.startswith(str(evil)) and "refusing global '" in message and "system'" in message
    assert "\n" not in message and "weights_only" not in message
    code = CliRunner().invoke(build_main, ["--teacher", "edm", "--teacher-ckpt", str(evil),
                                           "--out", str(tmp_path / "o")])
    errors = [line for line in code.output.splitlines() if line.startswith("Error")]   # click's usage error
    assert code.exit_code == 2 and len(errors) == 1 and "--teacher-ckpt" in errors[0]
    assert "refusing global" in errors[0] and str(evil) in errors[0]
    assert not marker.exists() and not (tmp_path / "o").exists()

    # A pickle hidden in a tensor storage blob goes through torch's weights-only loader and is refused.
    blob = io.BytesIO()
    torch.save(Exploit(), blob)
    hidden = tmp_path / "hidden.pkl"

    class Sneaky(pickle.Pickler):
        def reducer_override(self, obj):
            return (torch.storage._load_from_bytes, (blob.getvalue(),)) if isinstance(obj, Exploit) else NotImplemented

    with open(hidden, "wb") as handle:
        Sneaky(handle).dump({"ema": Exploit()})
    with pytest.raises(UnsafePickleError, match="refusing a tensor storage that holds Python objects"):
        load_nvlabs_pickle(hidden)
    with pytest.raises(FileFormatError, match="hidden.pkl: refused or unreadable"):
        read_nvlabs_pickle(hidden)
    assert not marker.exists()

    # Truncated: one line naming the file.
    path, source_marker = official_pickle(tmp_path, monkeypatch)
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FileFormatError) as broken:
        resolve_teacher("edm", ckpt=truncated)
    assert str(broken.value).startswith(str(truncated)) and "\n" not in str(broken.value)
    assert not source_marker.exists()


def test_pickles_of_other_networks_say_what_was_expected(tmp_path, monkeypatch):
    stylegan = tmp_path / "stylegan2-ffhq.pkl"
    write_edm2_pickle(stylegan, monkeypatch, dict(G=Persistent("Generator"), D=Persistent("Discriminator"),
                                                  G_ema=Persistent("Generator")), module_src="")
    with pytest.raises(FileFormatError, match=r"stylegan2-ffhq.pkl: not an EDM / EDM2 network pickle: expected a "
                                              r"dict with an 'ema' network, found a dict with 'G', 'D', 'G_ema'"):
        resolve_teacher(str(stylegan))
    generator = tmp_path / "generator.pkl"
    write_edm2_pickle(generator, monkeypatch, dict(ema=Persistent("Generator")), module_src="")
    with pytest.raises(FileFormatError, match=r"generator.pkl: its 'ema' network is of class Generator; expected an "
                                              r"EDM \(NVlabs/edm, ECT, sony/cmt\) network \(EDMPrecond, ECMPrecond"):
        resolve_teacher("edm", ckpt=generator)


def test_a_file_of_the_other_family_names_the_teacher_kind_that_reads_it(tmp_path, monkeypatch):
    edm_path, _ = official_pickle(tmp_path, monkeypatch)
    edm2_path = tmp_path / "edm2-tiny.pkl"
    write_edm2_pickle(edm2_path, monkeypatch, dict(ema=tiny_official_network()), module_src="")
    with pytest.raises(FileFormatError, match="class Precond; expected an EDM .* it is an EDM2 .* use teacher 'edm2'"):
        resolve_teacher("edm", ckpt=edm2_path)
    with pytest.raises(FileFormatError, match="class EDMPrecond; expected an EDM2 .* use teacher 'edm'"):
        resolve_teacher("edm2", ckpt=edm_path)
    with pytest.raises(ValueError, match="use teacher 'edm2'"):
        load_edm_pickle(edm2_path)
    assert load_edm_pickle(edm_path).kind == "edm" and load_edm2_pickle(edm2_path).kind == "edm2"
    result = CliRunner().invoke(build_main, ["--teacher", "edm2", "--teacher-ckpt", str(edm_path),
                                             "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--teacher-ckpt" in result.output and "use teacher 'edm'" in result.output
    # Without a kind asked for, each is what its class says.
    assert resolve_teacher(str(edm2_path))[1]["kind"] == "edm2" and resolve_teacher(str(edm_path))[1]["kind"] == "edm"
    with pytest.raises(ValueError, match="is an EDM2 preset; use teacher 'edm2'"):
        resolve_teacher("edm", ckpt="edm2-img64-s")


def test_presets_come_from_the_cache_and_fail_clearly_offline(tmp_path, monkeypatch, offline_hub):
    assert EDM_PRESETS["edm-cifar10-32x32-uncond-vp"] == \
        "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl"
    assert EDM_PRESETS["baseline-imagenet-64x64-cond-adm"] == \
        "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/baseline/baseline-imagenet-64x64-cond-adm.pkl"
    assert len(EDM_PRESETS) == 18
    with pytest.raises(FileNotFoundError, match=r"edm-cifar10-32x32-uncond-vp.pkl by hand and put it at "
                                                r".*cmt-cache/edm/edm-cifar10-32x32-uncond-vp.pkl") as offline:
        resolve_teacher("edm-cifar10-32x32-uncond-vp")
    assert "\n" not in str(offline.value)
    with pytest.raises(FileNotFoundError, match="baseline-cifar10-32x32-uncond-ve.pkl by hand"):
        fetch_edm_checkpoint("baseline-cifar10-32x32-uncond-ve")
    path, _ = official_pickle(tmp_path, monkeypatch)
    cached = offline_hub / "cmt-cache" / "edm" / "edm-cifar10-32x32-uncond-vp.pkl"
    assert not list(cached.parent.glob("*.part"))   # nothing half-written is left behind
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(path.read_bytes())
    for spec in (("edm-cifar10-32x32-uncond-vp",), ("edm", "edm-cifar10-32x32-uncond-vp")):
        net, identity = resolve_teacher(*spec)
        assert identity["preset"] == "edm-cifar10-32x32-uncond-vp" and identity["path"] == str(cached)
        torch.testing.assert_close(run_official_inputs(net), IO["D/ddpmpp/EDMPrecond/3"], rtol=1e-5, atol=1e-5)


def test_convert_an_edm_pickle_then_use_its_export(tmp_path, monkeypatch):
    path, marker = official_pickle(tmp_path, monkeypatch, "adm", "iDDPMPrecond")
    out = tmp_path / "adm.safetensors"
    result = CliRunner().invoke(convert_main, [str(path), str(out)])
    assert result.exit_code == 0 and "iDDPMPrecond" in result.output, result.output
    expected = IO["D/adm/iDDPMPrecond/3"]
    torch.testing.assert_close(run_official_inputs(load_network(out)), expected, rtol=1e-5, atol=1e-5)
    net, identity = resolve_teacher("edm", ckpt=out)
    assert identity["kind"] == "edm" and identity["config"]["precond"] == "iDDPMPrecond"
    torch.testing.assert_close(run_official_inputs(net), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run_official_inputs(cmt.load_teacher("edm", ckpt=out)), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="architecture 'edm', not an EDM2 one; use teacher 'edm'"):
        resolve_teacher("edm2", ckpt=out)
    assert not marker.exists()


def test_load_teacher_takes_every_kind_of_teacher(tmp_path, monkeypatch):
    builtin = cmt.load_teacher("toy:moons")
    assert isinstance(builtin, torch.nn.Module) and builtin(torch.zeros(3, 2), torch.ones(3)).shape == (3, 2)
    edm2_path = tmp_path / "edm2-tiny.pkl"
    write_edm2_pickle(edm2_path, monkeypatch, dict(ema=tiny_official_network()), module_src="")
    edm2 = cmt.load_teacher("edm2", ckpt=edm2_path)
    assert edm2.config["architecture"] == "edm2" and edm2(torch.zeros(2, 4, 8, 8), torch.ones(2)).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="teacher 'edm' needs a checkpoint"):
        cmt.load_teacher("edm")


def trajectory_fixture():
    return load_file(str(FIXTURES / "edm_dpmpp3m_traj.safetensors"))


def read_shards(out):
    group = zarr.open_group(str(out / "shard-000000.zarr"), mode="r")
    return {name: group[name][:] for name in ("states", "sigmas", "label", "noise")}


def check_official_trajectories(arrays):
    official = trajectory_fixture()
    torch.testing.assert_close(torch.from_numpy(arrays["noise"]), official["noise"], rtol=0, atol=0)
    assert arrays["label"].tolist() == official["labels"].tolist()
    np.testing.assert_allclose(arrays["sigmas"], official["sigmas"].double(), rtol=1e-6)
    states = torch.from_numpy(arrays["states"]).transpose(0, 1)          # [S, B, ...] as the official solver's
    scale = official["states"].flatten(2).abs().max(2).values[..., None, None, None]   # per state and sample
    assert ((states - official["states"]).abs() / scale).max() < 2e-6


def test_build_from_an_official_pickle_reproduces_the_official_trajectories(tmp_path, monkeypatch):
    settings = TINY["trajectory"]
    path, marker = official_pickle(tmp_path, monkeypatch, settings["network"], settings["precond"],
                                   settings["label_dim"])
    built = build_trajectories(teacher=str(path), out=tmp_path / "lib", nfe=settings["nfe"], seed=settings["seed"],
                               num_trajectories=settings["count"], labels="random", dtype="float32", progress=False,
                               log=lambda message: None)
    check_official_trajectories(read_shards(built["out"]))
    result = CliRunner().invoke(build_main, ["--teacher", "edm", "--teacher-ckpt", str(path), "--out",
                                             str(tmp_path / "cli"), "--nfe", "16", "--seed", str(settings["seed"]),
                                             "--num-trajectories", str(settings["count"]), "--dtype", "float32",
                                             "--no-progress"])
    assert result.exit_code == 0, result.output
    check_official_trajectories(read_shards(tmp_path / "cli"))
    assert not marker.exists()
