"""Parity of our SiT / DiT (cmt.networks.sit) with the reference classes, from the stored reference
outputs (tests/fixtures/README.md, "SiT and the MeanFlow port's SiT"); prints the table of
docs/benchmarks.md ("SiT parity"). No reference code runs here: the fixtures hold its numbers.

Per tiny network (SiT patch 2 with learn_sigma, patch 4, patch 8 with learn_sigma, the MeanFlow
port's patch 2): the max over samples of max|ours - reference| / max|reference| for the network in
its own time (`transformer`: SiT's velocity, the port's average velocity) and for our EDM-space
denoiser D = z - t u at the same point (the reference D computed in float64 from the reference
output). Then SiT's ODE sampler (s = linspace(0, 1, 9) from pure noise) against ours: the first
step in t through `average_velocity` (t = 1 is pure noise, sigma = infinity), the rest by
`cmt.solvers` in sigma: Euler, Euler with classifier-free guidance at 4 (through
`cmt.guidance.apply_guidance`, the build's path: 3 guided channels), Heun in sigma, and Heun in t
over `average_velocity` (SiT's own rule).

    python benchmarks/sit_parity.py

The last line holds the figures as name=value pairs.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
from test_sit import one_hot, tiny_case  # noqa: E402  (the fixtures' weights formula, written once)

from cmt.guidance import apply_guidance  # noqa: E402
from cmt.solvers import sample_trajectory  # noqa: E402

NAMES = {"sit_p2_ls": "SiT, patch 2, learn_sigma", "sit_p4": "SiT, patch 4", "sit_p8_ls": "SiT, patch 8, learn_sigma",
         "port_p2": "MeanFlow port, patch 2"}


def relative(ours, reference):
    """max over samples of max|ours - reference| / max|reference| (in float64)."""
    ours, reference = ours.double(), reference.double()
    return float(((ours - reference).flatten(1).abs().max(1).values
                  / reference.flatten(1).abs().max(1).values).max())


def network_errors(fixture, name):
    io = fixture[1]
    net = tiny_case(fixture, name)
    z, t, labels, reference = io[f"{name}.x"], io[f"{name}.t"], one_hot(io[f"{name}.y"]), io[f"{name}.out"]
    port = name.startswith("port")
    r = io[f"{name}.r"] if port else None
    ours_t = t if port else 1 - t   # SiT's s is our 1 - t
    with torch.no_grad():
        native = net.transformer(z, t, net.class_index(labels, len(z), z.device), t - r if port else None)
        denoised = net(z / (1 - ours_t)[:, None, None, None], ours_t / (1 - ours_t), labels,
                       target_sigma=r / (1 - r) if port else None)
    velocity = reference.double() if port else -reference.double()
    expected = z.double() - ours_t.double()[:, None, None, None] * velocity
    return relative(native, reference), relative(denoised, expected)


def trajectory_errors(fixture):
    io = fixture[1]
    net = tiny_case(fixture, "sit_p2_ls")
    grid, noise, labels = io["ode.grid"], io["ode.noise"], one_hot(io["ode.y"])
    guided, _ = apply_guidance(net, 4.0, label_dropout=0.1)
    sigmas = ((1 - grid[1:].double()) / grid[1:].double())   # s > 0 as sigma = (1 - s) / s
    errors = {}
    with torch.no_grad():
        for key, denoiser, solver in (("euler", net, "euler"), ("euler_cfg4", guided, "euler"),
                                      ("heun2", net, "heun")):
            reference = io[f"ode.{key}"]
            velocity = net.average_velocity(noise, 1.0, None, labels)
            if denoiser is guided:   # SiT's forward_with_cfg at s = 0: channels 0-2 guided
                unconditional = net.average_velocity(noise, 1.0, None, None)
                velocity = torch.cat([unconditional.lerp(velocity, 4.0)[:, :3], velocity[:, 3:]], dim=1)
            if solver == "heun":   # SiT's heun2 step from s = 0 averages the slopes at s = 0 and s_1, in t
                euler = noise - float(grid[1]) * velocity
                velocity = 0.5 * (velocity + net.average_velocity(euler, 1 - float(grid[1]), None, labels))
            first = noise - float(grid[1]) * velocity
            start = first / float(grid[1])
            trajectory = sample_trajectory(denoiser, start / sigmas[0], sigmas, solver=solver, labels=labels)
            states = torch.cat([first[None], trajectory.states[1:] * grid[2:].reshape(-1, 1, 1, 1, 1)])
            errors[key] = max(relative(state, expected) for state, expected in zip(states, reference[1:]))
        z, times, worst = noise, 1 - grid, 0.0   # Heun in t over average_velocity: SiT's own rule
        for index in range(len(grid) - 1):
            step = times[index + 1] - times[index]
            slope = net.average_velocity(z, times[index], None, labels)
            z = z + step * 0.5 * (slope + net.average_velocity(z + step * slope, times[index + 1], None, labels))
            worst = max(worst, relative(z, io["ode.heun2"][index + 1]))
        errors["heun2_in_t"] = worst
    return errors


def main():
    fixture = json.loads((TESTS / "fixtures" / "sit_tiny.json").read_text()), \
        load_file(TESTS / "fixtures" / "sit_tiny_io.safetensors")
    torch.set_num_threads(1)
    print(f"{'network (tiny width, float32)':32s} {'own time (u / v)':>18s} {'denoiser D':>12s}")
    pairs = []
    for name, label in NAMES.items():
        native, denoiser = network_errors(fixture, name)
        print(f"{label:32s} {native:18.2e} {denoiser:12.2e}")
        pairs += [f"{name}_native={native:.3g}", f"{name}_D={denoiser:.3g}"]
    print()
    print(f"{'SiT ODE sampler, 8 steps, against ours':40s} {'max rel. error over the states':>30s}")
    labels = {"euler": "Euler (first step in t, then sigma)", "euler_cfg4": "Euler, CFG 4 (apply_guidance)",
              "heun2": "Heun in sigma (ours) vs Heun in t", "heun2_in_t": "Heun in t over average_velocity"}
    for key, value in trajectory_errors(fixture).items():
        print(f"{labels[key]:40s} {value:30.2e}")
        pairs.append(f"ode_{key}={value:.3g}")
    print(" ".join(pairs))


if __name__ == "__main__":
    main()
