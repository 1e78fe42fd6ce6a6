"""The streams of batches the training loop draws from, and how a batch reaches the device:
`RandomBatches` (fresh draws, resumable by its generator), `Counted` (a plain iterator, resumed by
replaying the batches it yielded), `to_device` (stored float16 and uint8 images upcast there)."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch


class RandomBatches:
    """An endless stream of batches drawn by `draw(n, generator) -> dict` (fresh samples of a toy
    distribution, random indices into a data set); resumable through its generator's state."""

    def __init__(self, draw: Callable[[int, torch.Generator], dict], batch_size: int, seed: int):
        self.draw, self.batch_size = draw, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return self.draw(self.batch_size, self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


class Counted:
    """Wraps a plain iterator without state: resumes by replaying (skipping) the batches it yielded."""

    def __init__(self, iterator: Iterator[dict]):
        self.iterator, self.count = iterator, 0

    def __next__(self) -> dict:
        self.count += 1
        return next(self.iterator)

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        for _ in range(int(state["count"])):
            next(self)


def to_device(batch: Any, device: torch.device) -> Any:
    """The batch on `device`; half-precision tensors (a shard reader's stored float16) cross in
    their own dtype and are upcast there, so objectives see float32 data; uint8 tensors are images
    (0..255, streamed from disk) and become [-1, 1] there (EDM2's StandardRGBEncoder: x / 127.5 - 1)."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        if batch.dtype == torch.uint8:
            return batch.float() / 127.5 - 1
        return batch.float() if batch.dtype in (torch.float16, torch.bfloat16) else batch
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch
