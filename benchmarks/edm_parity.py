"""Parity of our EDM (v1) networks and builder with the official code, as a table (docs/parity.md).

1. Networks: every case of tests/fixtures/edm_tiny.json (DDPM++, NCSN++, a skip SongUNet and ADM
   under EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond and sony/cmt's ECMPrecond, with and without
   labels, ECMPrecond's train mode, augment labels): our network with the fixture's formula weights
   against the official output (`edm_tiny_io.safetensors`), as the max over samples of
   max |ours - official| / max |official|.
2. Trajectories: the tiny conditional DDPM++ under EDMPrecond written as NVlabs/edm pickles it,
   through `cmt-build --teacher edm --teacher-ckpt PKL --nfe 16 --seed 7 --num-trajectories 3
   --dtype float32` (the command, in this process), against sony/cmt's DPM-Solver++(3M) on the
   official network (`edm_dpmpp3m_traj.safetensors`): the max over states and samples of
   max |ours - official| / max |official state|, the noise and labels compared exactly.

The fixtures and their helpers are the test suite's (tests/fixtures/README.md says how each was
made). Prints a Markdown table, then name=value pairs on its last line.

    python benchmarks/edm_parity.py
"""
import sys
import tempfile
from pathlib import Path

import click
import pytest
import torch
import zarr
from click.testing import CliRunner
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import FIXTURES  # noqa: E402
from edm_fixtures import TINY, fixture_io, official_kwargs, tiny_network, write_edm_pickle  # noqa: E402

from cmt.cli.build import main as build_main  # noqa: E402


def relative_error(ours, official):
    """max |ours - official| / max |official|, per sample; the worst sample."""
    per_sample = (ours - official).abs().flatten(1).max(1).values / official.abs().flatten(1).max(1).values
    return per_sample.max().item()


def network_errors():
    """{case key: relative error} for every fixture case."""
    io, errors = fixture_io(), {}
    for case in TINY["cases"]:
        net = tiny_network(case["network"], case["precond"], case["label_dim"])
        if case.get("mode") == "train":
            net.train()
        labels = io["labels"] if case["label_dim"] and case.get("labels", "onehot") is not None else None
        extra = dict(augment_labels=io["augment_labels"]) if case.get("augment") else {}
        with torch.no_grad():
            errors[case["key"]] = relative_error(net(io["x"], io["sigma"], labels, **extra), io["D/" + case["key"]])
    return errors


def trajectory_error(scratch):
    """(relative error of the states, noise equal, labels equal, sigma relative error) of cmt-build
    from an official-format pickle against the official solver on the official network."""
    settings = TINY["trajectory"]
    path = Path(scratch) / "network-snapshot.pkl"
    with pytest.MonkeyPatch.context() as monkeypatch:
        write_edm_pickle(path, monkeypatch, tiny_network(settings["network"], settings["precond"], settings["label_dim"]),
                         official_kwargs(settings["network"], settings["label_dim"]), module_src="")
    out = Path(scratch) / "shards"
    result = CliRunner().invoke(build_main, ["--teacher", "edm", "--teacher-ckpt", str(path), "--out", str(out),
                                             "--nfe", str(settings["nfe"]), "--seed", str(settings["seed"]),
                                             "--num-trajectories", str(settings["count"]), "--dtype", "float32",
                                             "--no-progress"])
    if result.exit_code:
        raise SystemExit(result.output)
    group = zarr.open_group(str(out / "shard-000000.zarr"), mode="r")
    official = load_file(str(FIXTURES / "edm_dpmpp3m_traj.safetensors"))
    states = torch.from_numpy(group["states"][:]).transpose(0, 1)   # [S, B, ...] as the official solver's
    scale = official["states"].flatten(2).abs().max(2).values[..., None, None, None]
    sigmas = torch.from_numpy(group["sigmas"][:])
    return {"states": ((states - official["states"]).abs() / scale).max().item(),
            "noise_equal": bool(torch.equal(torch.from_numpy(group["noise"][:]), official["noise"])),
            "labels_equal": group["label"][:].tolist() == official["labels"].tolist(),
            "sigmas": ((sigmas - official["sigmas"].double()).abs() / official["sigmas"].double()).max().item()}


@click.command()
def main():
    torch.set_num_threads(1)
    errors = network_errors()
    preconds = list(dict.fromkeys(case["precond"] for case in TINY["cases"]))
    networks = list(dict.fromkeys(case["network"] for case in TINY["cases"]))
    print("| network | " + " | ".join(preconds) + " |")
    print("|---|" + "---|" * len(preconds))
    for network in networks:
        cells = []
        for precond in preconds:
            worst = [value for key, value in errors.items() if key.split("/")[:2] == [network, precond]]
            cells.append(f"{max(worst):.1e} ({len(worst)})" if worst else "")
        print(f"| {network} | " + " | ".join(cells) + " |")
    with tempfile.TemporaryDirectory(prefix="edm-parity-") as scratch:
        trajectory = trajectory_error(scratch)
    print(f"\ncmt-build from an official-format pickle against the official DPM-Solver++(3M), 3 trajectories of "
          f"16 steps: states {trajectory['states']:.1e} relative, sigmas {trajectory['sigmas']:.1e} relative, noise "
          f"{'equal' if trajectory['noise_equal'] else 'DIFFERENT'}, labels "
          f"{'equal' if trajectory['labels_equal'] else 'DIFFERENT'}")
    print(f"networks_max_rel={max(errors.values()):.3g} network_cases={len(errors)} "
          f"trajectory_max_rel={trajectory['states']:.3g} sigmas_max_rel={trajectory['sigmas']:.3g}")


if __name__ == "__main__":
    main()
