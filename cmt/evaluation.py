"""Evaluation: the metrics of a set of samples against a data set; `evaluate` is `cmt-eval`.

Toy data: energy distance and sliced Wasserstein against the fixed reference sample. mnist:
FD-MNIST (features of a small MNIST classifier, not Inception FID). Inception FID and EDM2's
FD-DINOv2 on request, against reference statistics (an .npz) or statistics of the data set's images;
`reference_statistics` writes a data set's statistics of both in one streamed pass.
"""
from pathlib import Path

import numpy as np
import torch

from tqdm.auto import tqdm

from cmt.datasets import resolve_data
from cmt.datasets.files import read_npz
from cmt.dinov2 import DINOV2_URL, DINOv2Detector
from cmt.distributed import batch_starts, distributed_state, map_batches
from cmt.download import DownloadError
from cmt.errors import ArgumentError, FileFormatError, local_path_only
from cmt.sampling import torch_device
from cmt.metrics import (INCEPTION_URL, FeatureMoments, InceptionFID, embedded_metric, feature_statistics,
                         frechet_distance, load_reference_statistics, mnist_features, mnist_reference_statistics,
                         save_reference_statistics)

# Images per feature batch when the ranks of `accelerate launch` share the detector's work (the
# batch of `cmt.metrics.mnist_features`, so one process computes the same features).
FEATURE_BATCH = 1000


def read_samples_array(path):
    """`(samples, labels or None)` as stored (numpy, their own dtypes) in an .npz written by cmt-sample."""
    contents = read_npz(path)
    if "samples" not in contents:
        raise ValueError(f"{path}: no 'samples' array (found {sorted(contents)}); cmt-sample writes 'samples' and 'labels'")
    samples, labels = contents["samples"], contents.get("labels")
    if labels is not None and labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: 'labels' must be integers, found dtype {labels.dtype}")
    labels = None if labels is None else labels.astype(np.int64)
    if samples.ndim == 0 or len(samples) < 2:
        raise ValueError(f"{path}: 'samples' holds {len(samples) if samples.ndim else 0} item(s); metrics need at "
                         "least 2")
    return samples, labels


def load_samples(path):
    """`(samples, labels or None)` from an .npz written by cmt-sample (keys `samples`, `labels`)."""
    samples, labels = read_samples_array(path)
    return torch.from_numpy(samples.astype(np.float32)), None if labels is None else torch.from_numpy(labels)


def samples_in_range(samples, data, source="samples"):
    """`(float32 tensor, conversion or None)`: the samples as the metrics expect them, images in
    [-1, 1] (what cmt-sample writes). uint8 images (0..255, unambiguous) are converted, x / 127.5 - 1,
    and `conversion` says so; anything else that is not finite numbers in that range (float images
    in [0, 1] or 0..255, other integer types) is a ValueError saying what was found and what to do."""
    samples = np.asarray(samples)
    if samples.dtype.kind not in "fiu":
        raise ValueError(f"{source}: dtype {samples.dtype} is not numeric; expected float32 samples")
    if samples.dtype.kind == "f" and not np.isfinite(samples).all():
        bad = int((~np.isfinite(samples.reshape(len(samples), -1))).any(axis=1).sum())
        raise ValueError(f"{source}: {bad} of {len(samples)} samples hold NaN or inf (a diverged model?)")
    conversion = None
    if data.kind == "images":
        if samples.dtype == np.uint8:
            conversion = "uint8 images (0..255) converted to [-1, 1] as x / 127.5 - 1"
            samples = samples.astype(np.float32) / 127.5 - 1
        elif samples.dtype.kind in "iu":
            raise ValueError(f"{source}: integer images of dtype {samples.dtype}; expected float images in [-1, 1] "
                             "(or uint8 in 0..255)")
        low, high = float(samples.min()), float(samples.max())
        # Few-step samples overshoot [-1, 1] a little; 0..255 floats lie far beyond it.
        outside = float(np.mean(np.abs(samples) > 2.0))
        if outside > 0.1:
            raise ValueError(f"{source}: values span [{low:.4g}, {high:.4g}] ({outside:.1%} beyond +-2); images must "
                             "be in [-1, 1] (0..255 floats: x / 127.5 - 1)")
        if low >= 0 and high > 0.5 and conversion is None:
            raise ValueError(f"{source}: every value is in [{low:.4g}, {high:.4g}], none negative: images in [0, 1]? "
                             "they must be in [-1, 1] (x * 2 - 1), as cmt-sample writes them")
    return torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)), conversion


def _check_shape(samples, data):
    if data.kind == "toy" and (samples.ndim != 2 or samples.shape[1] != 2):
        raise ValueError(f"samples have shape {tuple(samples.shape)} but {data.name} holds 2-D points [N, 2]")
    if data.kind == "images" and (samples.ndim != 4 or samples.shape[1] != data.data_shape[0]):
        raise ValueError(f"samples have shape {tuple(samples.shape)} but {data.name} holds images [N, {', '.join(map(str, data.data_shape))}]")


def shared_features(features, samples, state):
    """`features(batch)` of every sample, the batches of `FEATURE_BATCH` shared by the ranks of `state`."""
    parts = map_batches(lambda start, stop: features(samples[start:stop]), len(samples), FEATURE_BATCH, state=state)
    return np.concatenate(parts)


def streamed_statistics(features, images, state=None, progress=None):
    """`{name: (mu, sigma)}` of each `features[name](batch)` over `images`, in one pass of batches of
    `FEATURE_BATCH` whose moments are summed as they come (`FeatureMoments`: memory flat in the number
    of images). state: an accelerate process state of several ranks (every rank calls): rank r takes
    batches r, r + world, ... and the moments are summed over the ranks (same figures as one process,
    up to float64 rounding). progress: a tqdm bar advanced by images."""
    rank, world = (0, 1) if state is None else (state.process_index, state.num_processes)
    moments = {name: None for name in features}
    for position, start in enumerate(batch_starts(len(images), FEATURE_BATCH)):
        if position % world != rank:
            continue
        batch = images[start:start + FEATURE_BATCH]
        for name, function in features.items():
            values = function(batch)
            moments[name] = moments[name] or FeatureMoments(values.shape[1])
            moments[name].add(values)
        if progress is not None:
            progress.update(len(batch) * world)
    if world > 1:
        for name, function in features.items():   # a rank without batches learns the width from one image
            moments[name] = moments[name] or FeatureMoments(function(images[:1]).shape[1])
            moments[name].all_reduce()
    return {name: moments[name].statistics() for name in features}


def _fd_dinov2(samples, data, scorer, state):
    """FD-DINOv2 of `samples` against `scorer.reference`, or against the data set's images."""
    if data.kind != "images":
        raise ValueError(f"FD-DINOv2 needs image data; {data.name} holds 2-D points")
    sample_statistics = streamed_statistics({"fd_dinov2": scorer.features}, samples, state)["fd_dinov2"]
    reference = scorer.reference if scorer.reference is not None else \
        streamed_statistics({"fd_dinov2": scorer.features}, data.tensors()[0], state)["fd_dinov2"]
    return frechet_distance(*sample_statistics, *reference)


def evaluate_samples(samples, data, fid=None, state=None, fd_dinov2=None):
    """Metrics of `samples` for `data` (a spec or a resolved data set) as a dict of floats.

    Built-in data sets get their embedded metric (see `cmt.metrics.embedded_metric`); an
    `InceptionFID` passed as `fid` adds `"fid"`, a `cmt.dinov2.DINOv2Detector` passed as `fd_dinov2`
    adds `"fd_dinov2"` (with no reference statistics of their own, they use those of the data set's
    images). state: an accelerate process state of several ranks (every rank calls): the ranks share
    the feature extraction, and every rank returns the same figures.
    """
    data = resolve_data(data)
    _check_shape(samples, data)
    if state is not None and state.num_processes > 1:
        results = _evaluate_shared(samples, data, fid, state)
        if fd_dinov2 is not None:
            results["fd_dinov2"] = _fd_dinov2(samples, data, fd_dinov2, state)
        return results
    results = embedded_metric(data, samples)
    if fid is not None:
        if data.kind != "images":
            raise ValueError(f"Inception FID needs image data; {data.name} holds 2-D points")
        reference = fid.reference if fid.reference is not None else fid.statistics(data.tensors()[0])
        results["fid"] = frechet_distance(*fid.statistics(samples), *reference)
    if fd_dinov2 is not None:
        results["fd_dinov2"] = _fd_dinov2(samples, data, fd_dinov2, None)
    return results


def evaluate(*, samples=None, data, fid=False, detector=None, ref=None, fd_dinov2=False, dinov2=None, ref_stats=None,
             device=None):
    """Score `samples` against `data`; the entry point behind `cmt-eval`.

    samples: an .npz from cmt-sample (key `samples`, optional `labels`), or the samples themselves
    (a tensor or array). data: mnist | toy:NAME | PATH (image folder, .npz, EDM dataset .zip).
    Toy data get energy distance and sliced Wasserstein against the fixed reference sample; mnist
    gets FD-MNIST (features of a small MNIST classifier, not Inception FID). fid: also Inception
    FID with `detector` (the TorchScript inception-2015-12-05.pt, path or URL). fd_dinov2: also
    EDM2's FD-DINOv2 (`cmt.dinov2`: DINOv2 ViT-L/14 features of the images resized to 224), with
    the weights `dinov2` (a path or URL; default the official dinov2_vitl14_pretrain.pth, downloaded
    once into `$CMT_CACHE/dinov2`). Both against the `ref` statistics (an .npz, path or URL: EDM's
    fid-refs `mu`, `sigma` for FID, `fd_dinov2_mu`, `fd_dinov2_sigma` for FD-DINOv2, as `ref_stats`
    writes them), or against statistics of the `data` images when `ref` is None. device: for the
    detectors (default cuda if available, else cpu).

    ref_stats: instead of scoring samples, write the reference statistics of the `data` images for
    `fid` and/or `fd_dinov2` to this .npz, in one streamed pass (`reference_statistics`).

    Under `accelerate launch` the ranks share the feature extraction (same figures as one process);
    every rank returns the figures, rank 0 reports them.

    Images must be in [-1, 1] (as cmt-sample writes them); uint8 images are converted from 0..255
    (said in `conversion`); [0, 1] or 0..255 floats, NaN and other dtypes are refused
    (`samples_in_range`).

    Returns `{"samples": Path or None, "data": name, "count": int, "metrics": {name: float}, "rank": int,
    "conversion": str or None}`, with `ref_stats` `{"ref_stats": Path, "data", "count", "metrics": [names],
    "rank"}`.
    """
    if ref_stats is not None:
        if samples is not None:
            raise ArgumentError("samples", "--ref-stats writes the statistics of --data; leave --samples out")
        if ref is not None:
            raise ArgumentError("ref", "--ref-stats computes the statistics; leave --ref out")
        return reference_statistics(data=data, out=ref_stats, fid=fid, detector=detector, fd_dinov2=fd_dinov2,
                                    dinov2=dinov2, device=device)
    if samples is None:
        raise ArgumentError("samples", "give the samples to score (or --ref-stats OUT to write the statistics of "
                                       "--data)")
    if isinstance(samples, (str, Path)):
        samples_path = Path(samples)
        if not samples_path.is_file():
            raise ArgumentError("samples", f"{samples_path} does not exist")
        try:
            values, _ = read_samples_array(samples_path)
        except ValueError as error:
            raise ArgumentError("samples", str(error)) from None
    else:
        samples_path = None
        values = samples.detach().cpu().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
    data = _resolve(data)
    _check_detectors(data, fid, detector, fd_dinov2, dinov2, ref=ref)
    if not (fid or fd_dinov2) and data.kind == "images" and data.name != "mnist":
        raise ArgumentError("data", f"{data.name} has no built-in metric; ask for Inception FID "
                                    "(--fid --detector PATH [--ref PATH]) or FD-DINOv2 (--fd-dinov2)")
    try:
        _check_shape(values, data)
        values, conversion = samples_in_range(values, data, str(samples_path or "samples"))
    except ValueError as error:
        raise ArgumentError("samples", str(error)) from None
    device = _detector_device(device)
    scorer = _inception(detector, device, ref) if fid else None
    dinov2_scorer = _dinov2(dinov2, device, ref) if fd_dinov2 else None
    state = distributed_state()
    metrics = evaluate_samples(values, data, fid=scorer, state=state, fd_dinov2=dinov2_scorer)
    return {"samples": samples_path, "data": data.name, "count": len(values), "metrics": metrics,
            "rank": state.process_index, "conversion": conversion}


def reference_statistics(*, data, out, fid=False, detector=None, fd_dinov2=False, dinov2=None, device=None,
                         progress=True):
    """Write the reference statistics of the `data` images to `out` (.npz) for Inception FID (`fid`,
    with `detector`) and/or FD-DINOv2 (`fd_dinov2`, with the weights `dinov2`), in one pass over the
    images: each batch goes through every detector and its features are added to float64 running
    sums (`FeatureMoments`), so memory does not grow with the number of images. The file holds `mu`,
    `sigma` (FID, EDM's fid-refs names), `fd_dinov2_mu`, `fd_dinov2_sigma`, `num_images` and `data`;
    `evaluate(ref=out)` reads it. Under `accelerate launch` the ranks share the batches and rank 0
    writes. Returns `{"ref_stats": Path, "data": name, "count": int, "metrics": [names], "rank": int}`."""
    local_path_only("ref_stats", out)
    out = Path(out)
    if out.suffix != ".npz":
        raise ArgumentError("ref_stats", f"{out}: the statistics are written to an .npz file")
    data = _resolve(data)
    if not (fid or fd_dinov2):
        raise ArgumentError("ref_stats", "say which statistics to write: --fid (with --detector) and/or --fd-dinov2")
    _check_detectors(data, fid, detector, fd_dinov2, dinov2)
    if data.kind != "images":
        raise ArgumentError("data", f"reference statistics need image data; {data.name} holds 2-D points")
    device = _detector_device(device)
    features = {}
    if fid:
        features["fid"] = _inception(detector, device, None).features
    if fd_dinov2:
        features["fd_dinov2"] = _dinov2(dinov2, device, None).features
    images = data.tensors()[0]
    state = distributed_state()
    with tqdm(total=len(images), unit="image", desc="cmt-eval --ref-stats", dynamic_ncols=True,
              disable=not (progress and state.is_main_process)) as bar:
        statistics = streamed_statistics(features, images, state, progress=bar)
    if state.is_main_process:
        save_reference_statistics(out, statistics, len(images), data=data.name)
    state.wait_for_everyone()
    return {"ref_stats": out, "data": data.name, "count": len(images), "metrics": list(statistics),
            "rank": state.process_index}


def _resolve(data):
    try:
        return resolve_data(data)
    except ValueError as error:
        raise ArgumentError("data", str(error)) from None


def _check_detectors(data, fid, detector, fd_dinov2, dinov2, ref=None):
    """What the Frechet metrics need, checked before any work (ArgumentError naming the keyword)."""
    if not fid and detector:
        raise ArgumentError("detector", "only used with --fid (fid=True)")
    if not (fid or fd_dinov2) and ref:
        raise ArgumentError("ref", "only used with --fid or --fd-dinov2")
    if not fd_dinov2 and dinov2:
        raise ArgumentError("dinov2", "only used with --fd-dinov2 (fd_dinov2=True)")
    if fid and detector is None:
        raise ArgumentError("detector", "--fid needs --detector (fid=True needs a detector): the TorchScript "
                                        f"inception-2015-12-05.pt, a path or its URL {INCEPTION_URL}")
    for wanted, name in ((fid, "Inception FID"), (fd_dinov2, "FD-DINOv2")):
        if wanted and data.kind != "images":
            raise ArgumentError("data", f"{name} needs image data; {data.name} holds 2-D points")


def _detector_device(device):
    if device is not None:
        return str(torch_device(device))
    return "cuda" if torch.cuda.is_available() else "cpu"


def _inception(detector, device, ref):
    try:
        reference = None if ref is None else load_reference_statistics(ref, "fid")
    except ValueError as error:
        raise ArgumentError("ref", str(error)) from None
    try:
        return InceptionFID(detector, reference=reference, device=device)
    except ValueError as error:
        raise ArgumentError("detector", str(error)) from None


def _dinov2(weights, device, ref):
    try:
        reference = None if ref is None else load_reference_statistics(ref, "fd_dinov2")
    except ValueError as error:
        raise ArgumentError("ref", str(error)) from None
    try:
        return DINOv2Detector(weights or DINOV2_URL, device=device, reference=reference)
    except (ValueError, DownloadError, FileFormatError) as error:
        raise ArgumentError("dinov2", str(error)) from None


def _evaluate_shared(samples, data, fid, state):
    """`evaluate_samples` over several ranks: features in shared batches; point metrics (cheap) on
    rank 0; the figures broadcast, so every rank returns them."""
    results = {}
    if data.name == "mnist":
        mu, sigma = feature_statistics(shared_features(mnist_features, samples, state))
        results["fd_mnist"] = frechet_distance(mu, sigma, *mnist_reference_statistics())
    elif state.is_main_process:
        results = embedded_metric(data, samples)
    if fid is not None:
        if data.kind != "images":
            raise ValueError(f"Inception FID needs image data; {data.name} holds 2-D points")
        features = feature_statistics(shared_features(fid.features, samples, state))
        if fid.reference is not None:
            reference = fid.reference
        else:
            images = data.tensors()[0]
            reference = feature_statistics(shared_features(fid.features, images, state))
        results["fid"] = frechet_distance(*features, *reference)
    return broadcast_object(results, state)


def broadcast_object(value, state):
    """Rank 0's `value` on every rank."""
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]
