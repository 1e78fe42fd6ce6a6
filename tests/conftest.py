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
from cmt.gmm import gmm_denoiser, random_gmm
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
