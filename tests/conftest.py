"""What the test modules share: one thread per test, an offline torch hub, and the helpers and tiny
configs that several modules use (import them with `from conftest import ...`)."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cmt.builders.build import Teacher, build_trajectories
from cmt.checkpoint import save_network
from cmt.flags import command_words
from cmt.gmm import gmm_denoiser, gmm_sample, random_gmm
from cmt.networks import build_network
from cmt.trainers.loop import Context

# The reference numbers of the official implementations (their README says where each came from).
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# `accelerate launch` with two CPU processes, one thread each: prefix a module (`-m cmt.cli.build ...`).
def cpu_processes(count):
    """`accelerate launch` with `count` CPU processes (one thread each with TWO_CPU_ENV): prefix a
    script or `-m module`."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(count),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


TWO_CPU_PROCESSES = cpu_processes(2)
TWO_CPU_ENV = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}

# Trainer tests: a student-sized MLP for the objective tests, a smaller teacher for the end-to-end
# runs, and trainer options of a run of a few seconds.
MLP = dict(architecture="mlp", data_shape=[2], width=64, num_blocks=2, emb_width=32, fourier_freqs=16)
TEACHER = dict(architecture="mlp", data_shape=[2], width=32, num_blocks=2, emb_width=16, fourier_freqs=8)
FAST = dict(batch_size=16, progress=False, num_samples=64, log_every=2)
POST_FAST = dict(FAST, data="toy:moons")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread per test: tiny networks run fastest so, and in-process builds then match the
    single-threaded subprocesses that the determinism tests compare them with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """No network, an empty torch hub directory (the folder yielded; its `checkpoints/` is where
    torchvision keeps files) and an empty cmt cache (`$CMT_CACHE` = the folder's `cmt-cache/`):
    every download fails as it does offline."""
    import urllib.error
    import urllib.request

    from cmt.lpips import cached_lpips

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(urllib.request, "urlopen", offline)   # cmt.download's only way out
    monkeypatch.setenv("CMT_CACHE", str(tmp_path / "cmt-cache"))
    cached_lpips.cache_clear()
    yield tmp_path
    cached_lpips.cache_clear()


def invoke_command(command, *args):
    """A click command in this process: `(exit code, output)`; an exception that is not the command's
    own exit is raised, with its traceback."""
    result = CliRunner().invoke(command, [str(arg) for arg in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def gmm_teacher(data_shape=(2,), label_dim=0, components=4, seed=0):
    """The exact denoiser of a Gaussian mixture, in float64, as a builder `Teacher`: a teacher with a
    known answer."""
    dim = int(np.prod(data_shape))
    mu, logw, s = random_gmm(components, dim, std=0.2, generator=torch.Generator().manual_seed(seed))
    identity = {"kind": "gmm", "name": "gmm-test", "sha256": "0" * 64, "config": {"architecture": "gmm", "dim": dim}}
    return Teacher(gmm_denoiser(mu, logw, s), data_shape, label_dim, identity, dtype=torch.float64)


def context(step=0, seed=0):
    """An objective's context outside the training loop (no accelerator)."""
    return Context(step=step, max_steps=1000, generator=torch.Generator().manual_seed(seed),
                   device=torch.device("cpu"), accelerator=None)


def make_shards(root, name, teacher_config, seed=123, num_trajectories=24, shard_size=12):
    """A random teacher of `teacher_config` saved as `root/name.safetensors`, and a tiny trajectory
    dataset of it in `root/name-shards`."""
    torch.manual_seed(seed)
    path = save_network(root / f"{name}.safetensors", build_network(teacher_config))
    build_trajectories(teacher=str(path), out=root / f"{name}-shards", nfe=4, num_trajectories=num_trajectories,
                       batch_size=8, shard_size=shard_size, labels=None, progress=False, log=lambda message: None)
    return path, root / f"{name}-shards"


def command_line(options):
    """Keyword arguments of an entry point as its command's flags (`cmt.flags.command_words`)."""
    return command_words("", options)


def mixture(seed=0):
    """A 2-D mixture of 4 Gaussians of std 0.1: `(mu, log weights, std)` in float32."""
    mu, logw, s = random_gmm(4, 2, std=0.1, generator=torch.Generator().manual_seed(seed))
    return mu.float(), logw.float(), s


def mixture_points(n, seed=0):
    """A batch `{"data", "label"}` of `n` points of `mixture()`, unlabelled."""
    mu, logw, s = mixture()
    x = gmm_sample(mu, logw, s, n, generator=torch.Generator().manual_seed(seed))
    return {"data": x, "label": torch.full((n,), -1)}


def train_on_mixture(net, objective, steps=150, batch_size=64, lr=3e-3, watch=None):
    """Adam on fresh mixture samples; returns `watch` (default the loss) on held-out data before/after."""
    def evaluate():
        with torch.no_grad():
            result = objective(net.eval(), mixture_points(512, seed=99), context(seed=99))
            return float(watch(result) if watch else (result[0] if isinstance(result, tuple) else result).mean())

    before = evaluate()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for step in range(steps):
        result = objective(net, mixture_points(batch_size, seed=step + 1), context(step, seed=step + 1))
        loss = result[0] if isinstance(result, tuple) else result
        optimizer.zero_grad()
        loss.mean().backward()
        optimizer.step()
    return before, evaluate()


@pytest.fixture(scope="session")
def mid_students(tmp_path_factory):
    """A teacher checkpoint, its trajectories, and a 2-step mid-trained student of each target (endpoint,
    flowmap), shared by the post-training tests (read only)."""
    from cmt.trainers.mid import mid_train
    root = tmp_path_factory.mktemp("mid-students")
    teacher, shards = make_shards(root, "teacher", TEACHER, num_trajectories=16, shard_size=1000)
    paths = {"teacher": teacher, "shards": shards}
    for target in ("endpoint", "flowmap"):
        paths[target] = mid_train(data=shards, out=root / target, target=target, max_steps=2, workers=0,
                                  **FAST)["checkpoint"]
    return paths
