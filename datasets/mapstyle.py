"""What the streamed map-style sets (`ImageFiles`, `LatentSet`) share beyond their `__getitems__`:
reading given items, random items, all of them or consecutive batches through DataLoader workers,
with a worker's error (returned as data, `{"error": message}`) raised here as one line."""
import numpy as np
import torch

from cmt.errors import FileFormatError


def as_is(batch):
    """DataLoader's collate for sets whose `__getitems__` already returns a whole batch."""
    return batch


class MapStyleSet(torch.utils.data.Dataset):
    """A set of `size` items with `__getitems__(keys [B, 4] of (index, flip, epoch, seed)) -> {"data",
    "label"}` or `{"error": message}`; `as_float(data)` is what the rest of the project takes."""

    def as_float(self, data):
        return data

    def decode_indices(self, indices):
        """`(data, labels)` of `indices`, as floats."""
        batch = self.__getitems__(np.asarray(indices, np.int64)[:, None])
        if "error" in batch:
            raise FileFormatError(batch["error"])
        return self.as_float(batch["data"]), batch["label"]

    def sample(self, n, generator=None):
        """`n` random items (with replacement)."""
        return self.decode_indices(torch.randint(self.size, (n,), generator=generator).numpy())

    def tensors(self):
        """Everything in memory (for small sets; `batches` streams)."""
        return self.decode_indices(np.arange(self.size))

    def reference(self, n=None):
        """All items, or `n` of them drawn without replacement by a fixed generator."""
        if n is None or n >= self.size:
            return self.tensors()[0]
        return self.decode_indices(torch.randperm(self.size, generator=torch.Generator().manual_seed(0))[:n].numpy())[0]

    def batches(self, batch_size, first=0, step=1, workers=0):
        """Batches of consecutive items in order: batches `first, first + step, ...` (the ranks of a
        shared evaluation each take every `step`-th batch)."""
        starts = list(range(first * batch_size, self.size, step * batch_size))
        keys = [np.arange(start, min(start + batch_size, self.size))[:, None] for start in starts]
        loader = torch.utils.data.DataLoader(self, batch_sampler=keys, num_workers=workers, collate_fn=as_is)
        for batch in loader:
            if "error" in batch:
                raise FileFormatError(batch["error"])
            yield self.as_float(batch["data"]), batch["label"]
