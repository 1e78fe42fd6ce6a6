"""cmt: consistency mid-training for consistency, mean-flow and flow-map models.

The pipeline's entry points are plain functions, imported lazily so that `import cmt` (and any
`cmt.edm`-style core import) stays light:

    cmt.train_diffusion(data=..., out=..., ...)      # phase 1: a diffusion teacher
    cmt.encode_dataset(source=..., out=..., vae=...)  # a latent set: images through a VAE, once
    cmt.build_trajectories(teacher=..., out=..., ...) # phase 2a: trajectory shards
    cmt.mid_train(data=..., out=..., target=...)      # phase 2b: CMT mid-training
    cmt.post_train(init=..., method=..., data=..., out=...)  # phase 3: ECT / ECD / MeanFlow
    cmt.sample(ckpt=..., ...)                         # samples of a teacher or a student
    cmt.evaluate(samples=..., data=...)               # the metric of a set of samples
    cmt.load_teacher("edm", ckpt=...)                 # any teacher the commands take, as a denoiser module
    cmt.reconstruct_ema(snapshots=..., std=..., out=...)  # post-hoc EMA of any length from snapshots
"""
import importlib
import os

# OpenMP threads that spin while waiting make torch many times slower on small CPUs shared with
# other processes (measured here: 0.8 s -> 7 s per MNIST step on 2 busy cores). Set before torch is
# imported by any cmt command; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

# name -> module that defines it (PEP 562 lazy attributes, as diffusers does)
_ENTRY_POINTS = {
    "train_diffusion": "cmt.trainers.diffusion",
    "build_trajectories": "cmt.builders.build",
    "encode_dataset": "cmt.builders.encode",
    "inspect_trajectories": "cmt.builders.inspect",
    "mid_train": "cmt.trainers.mid",
    "post_train": "cmt.trainers.post",
    "sample": "cmt.sampling",
    "evaluate": "cmt.evaluation",
    "load_teacher": "cmt.teachers",
    "reconstruct_ema": "cmt.posthoc_ema",
    "ArgumentError": "cmt.errors",
}
__all__ = sorted(_ENTRY_POINTS)


def __getattr__(name):
    if name in _ENTRY_POINTS:
        return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
    raise AttributeError(f"module 'cmt' has no attribute {name!r}")
