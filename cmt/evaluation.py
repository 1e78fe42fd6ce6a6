"""Evaluation: the metrics of a set of samples against a data set; `evaluate` is `cmt-eval`.

Toy data: energy distance and sliced Wasserstein against the fixed reference sample. mnist:
FD-MNIST (features of a small MNIST classifier, not Inception FID). Inception FID on request,
against EDM-format reference statistics or statistics of the data set's images.
"""
import zipfile
from pathlib import Path

import numpy as np
import torch

from cmt.datasets import resolve_data
from cmt.errors import ArgumentError
from cmt.metrics import INCEPTION_URL, InceptionFID, embedded_metric, frechet_distance, load_reference_statistics


def load_samples(path):
    """`(samples, labels or None)` from an .npz written by cmt-sample (keys `samples`, `labels`)."""
    try:
        with np.load(path, allow_pickle=False) as contents:
            if "samples" not in contents.files:
                raise ValueError(f"{path}: no 'samples' array (found {sorted(contents.files)}); cmt-sample writes 'samples' and 'labels'")
            samples = torch.from_numpy(contents["samples"].astype(np.float32))
            labels = torch.from_numpy(contents["labels"].astype(np.int64)) if "labels" in contents.files else None
    except (OSError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: not a readable .npz file ({error})") from None
    if len(samples) < 2:
        raise ValueError(f"{path}: 'samples' holds {len(samples)} item(s); metrics need at least 2")
    return samples, labels


def _check_shape(samples, data):
    if data.kind == "toy" and (samples.ndim != 2 or samples.shape[1] != 2):
        raise ValueError(f"samples have shape {tuple(samples.shape)} but {data.name} holds 2-D points [N, 2]")
    if data.kind == "images" and (samples.ndim != 4 or samples.shape[1] != data.data_shape[0]):
        raise ValueError(f"samples have shape {tuple(samples.shape)} but {data.name} holds images [N, {', '.join(map(str, data.data_shape))}]")


def evaluate_samples(samples, data, fid=None):
    """Metrics of `samples` for `data` (a spec or a resolved data set) as a dict of floats.

    Built-in data sets get their embedded metric (see `cmt.metrics.embedded_metric`); an
    `InceptionFID` passed as `fid` adds `"fid"` (with no reference statistics of its own, it uses
    those of the data set's images).
    """
    data = resolve_data(data)
    _check_shape(samples, data)
    results = embedded_metric(data, samples)
    if fid is not None:
        if data.kind != "images":
            raise ValueError(f"Inception FID needs image data; {data.name} holds 2-D points")
        reference = fid.reference if fid.reference is not None else fid.statistics(data.tensors()[0])
        results["fid"] = frechet_distance(*fid.statistics(samples), *reference)
    return results


def evaluate(*, samples, data, fid=False, detector=None, ref=None, device=None):
    """Score `samples` against `data`; the entry point behind `cmt-eval`.

    samples: an .npz from cmt-sample (key `samples`, optional `labels`), or the samples themselves
    (a tensor or array). data: mnist | toy:NAME | PATH (image folder, .npz, EDM dataset .zip).
    Toy data get energy distance and sliced Wasserstein against the fixed reference sample; mnist
    gets FD-MNIST (features of a small MNIST classifier, not Inception FID). fid: also Inception
    FID with `detector` (the TorchScript inception-2015-12-05.pt, path or URL) against the `ref`
    statistics (EDM-format .npz, path or URL), or against statistics of the `data` images when
    `ref` is None. device: for the detector (default cuda if available, else cpu).

    Returns `{"samples": Path or None, "data": name, "count": int, "metrics": {name: float}}`.
    """
    if isinstance(samples, (str, Path)):
        samples_path = Path(samples)
        if not samples_path.is_file():
            raise ArgumentError("samples", f"{samples_path} does not exist")
        try:
            values, _ = load_samples(samples_path)
        except ValueError as error:
            raise ArgumentError("samples", str(error)) from None
    else:
        samples_path, values = None, torch.as_tensor(np.asarray(samples), dtype=torch.float32)
    try:
        data = resolve_data(data)
    except ValueError as error:
        raise ArgumentError("data", str(error)) from None
    if not fid and (detector or ref):
        raise ArgumentError("detector" if detector else "ref", "only used with --fid (fid=True)")
    if fid and detector is None:
        raise ArgumentError("detector", "--fid needs --detector (fid=True needs a detector): the TorchScript "
                                        f"inception-2015-12-05.pt, a path or its URL {INCEPTION_URL}")
    if fid and data.kind != "images":
        raise ArgumentError("data", f"Inception FID needs image data; {data.name} holds 2-D points")
    if not fid and data.kind == "images" and data.name != "mnist":
        raise ArgumentError("data", f"{data.name} has no built-in metric; ask for Inception FID "
                                    "(--fid --detector PATH [--ref PATH])")
    try:
        _check_shape(values, data)
    except ValueError as error:
        raise ArgumentError("samples", str(error)) from None
    scorer = None
    if fid:
        try:
            reference = None if ref is None else load_reference_statistics(ref)
        except ValueError as error:
            raise ArgumentError("ref", str(error)) from None
        try:
            scorer = InceptionFID(detector, reference=reference,
                                  device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except ValueError as error:
            raise ArgumentError("detector", str(error)) from None
    metrics = evaluate_samples(values, data, fid=scorer)
    return {"samples": samples_path, "data": data.name, "count": len(values), "metrics": metrics}
