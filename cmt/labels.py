"""Class labels: one grammar and one check for every command that takes them (cmt-build's
trajectories, cmt-sample's samples, the training reports).

`random` (drawn), `cycle` (0, 1, ..., label_dim - 1, 0, ...), a class id K, or `none`: no label, the
unconditional model that a network trained with label dropout holds. Left out (None): random for a
class-conditional network, none for an unconditional one. Refused with one line naming `labels`:
a class (or random / cycle) for an unconditional network, which would be dropped; `none` for a
class-conditional network known to be trained without label dropout (EDM2's and the built-in MNIST
teacher), whose label-free output is not a model of the data; a class out of range.

Networks take labels one-hot `[B, label_dim]` or None; data sets and shards store integer class
ids, -1 for no label (`cmt.datasets.one_hot_labels` turns ids into what a network takes).
"""
import torch

from cmt.errors import ArgumentError

LABELS_HELP = ("Class labels: random, cycle (0, 1, ...), a class id, or none (unconditional: only for a network "
               "trained with label dropout) [default: random for a class-conditional network, else none].")


def parse_labels(spec, label_dim, label_dropout=None, argument="labels"):
    """A labels option checked against a network of `label_dim` classes whose share of label-free
    training is `label_dropout` (None: unknown, then `none` is allowed) -> "random", "cycle", a
    class id (int), or None (no labels)."""
    if spec is None:
        return "random" if label_dim else None
    if not label_dim:
        if spec == "none":
            return None
        raise ArgumentError(argument, f"{spec!r}: the network is unconditional (it takes no labels); leave labels out")
    if spec == "none":
        if label_dropout is not None and not label_dropout > 0:
            raise ArgumentError(argument, f"none: the network is class-conditional ({label_dim} classes) and was "
                                          "trained without label dropout, so it has no unconditional model; give "
                                          "random, cycle or a class id")
        return None
    if spec in ("random", "cycle"):
        return spec
    try:
        label = int(spec)
    except (TypeError, ValueError):
        raise ArgumentError(argument, f"must be random, cycle, none or a class id in [0, {label_dim - 1}], got "
                                      f"{spec!r}") from None
    if isinstance(spec, float) and spec != label or not 0 <= label < label_dim:
        raise ArgumentError(argument, f"{spec!r}: class out of range; a class id lies in [0, {label_dim - 1}]")
    return label


def pick_labels(spec, num, label_dim, seed=0):
    """Integer class ids `[num]` for a labels option (`parse_labels`, its label dropout unknown):
    "random" (from `seed`), "cycle", one class, or "none" (-1: no label). Every choice is "no
    label" (-1) for an unconditional network: what the reports and pictures of any network ask for."""
    if not label_dim:
        return torch.full((num,), -1, dtype=torch.int64)
    spec = parse_labels(spec, label_dim)
    if spec is None:
        return torch.full((num,), -1, dtype=torch.int64)
    if spec == "random":
        return torch.randint(label_dim, (num,), generator=torch.Generator().manual_seed(seed))
    if spec == "cycle":
        return torch.arange(num) % label_dim
    return torch.full((num,), int(spec), dtype=torch.int64)
