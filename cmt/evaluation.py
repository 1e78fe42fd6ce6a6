"""Evaluation: the metrics of a set of samples against a data set; `evaluate` is `cmt-eval`.

Toy data: energy distance and sliced Wasserstein against the fixed reference sample. mnist:
FD-MNIST (features of a small MNIST classifier, not Inception FID). Inception FID on request,
against EDM-format reference statistics or statistics of the data set's images, streamed from disk
a batch at a time (`cmt.metrics.FeatureSums`: memory does not grow with the set). A latent set
(cmt-encode) as data: the samples are latents, decoded through the VAE the set records (or `vae`)
before the detector sees them; the reference is `ref`, or the images the set was encoded from.
"""
import functools
from pathlib import Path

import numpy as np
import torch

from cmt.datasets import resolve_data
from cmt.datasets.files import read_npz
from cmt.distributed import distributed_state, map_batches
from cmt.errors import ArgumentError
from cmt.latents import LatentCodec, read_latent_record
from cmt.sampling import torch_device
from cmt.metrics import (INCEPTION_URL, FeatureSums, InceptionFID, embedded_metric, feature_statistics,
                         frechet_distance, load_reference_statistics, mnist_features, mnist_reference_statistics)

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


def evaluate_samples(samples, data, fid=None, state=None):
    """Metrics of `samples` for `data` (a spec or a resolved data set) as a dict of floats.

    Built-in data sets get their embedded metric (see `cmt.metrics.embedded_metric`); an
    `InceptionFID` passed as `fid` adds `"fid"` (with no reference statistics of its own, it uses
    those of the data set's images). state: an accelerate process state of several ranks (every
    rank calls): the ranks share the feature extraction, and every rank returns the same figures.
    """
    data = resolve_data(data)
    _check_shape(samples, data)
    if state is not None and state.num_processes > 1:
        return _evaluate_shared(samples, data, fid, state)
    results = embedded_metric(data, samples)
    if fid is not None:
        if data.kind != "images":
            raise ValueError(f"Inception FID needs image data; {data.name} holds 2-D points")
        reference = fid.reference if fid.reference is not None else data_statistics(fid, data)
        results["fid"] = frechet_distance(*fid.statistics(samples), *reference)
    return results


def data_statistics(fid, data, state=None):
    """Inception `(mu, sigma)` of every image of `data`: a streamed set a batch of `FEATURE_BATCH`
    at a time (the ranks of `state` take every world-th batch and add their sums: the same figures
    as one process's to float64 rounding), an in-memory one as it is."""
    batches = getattr(data, "batches", None)
    if batches is None:
        images = data.tensors()[0]
        if state is not None and state.num_processes > 1:
            return feature_statistics(shared_features(fid.features, images, state))
        return fid.statistics(images)
    rank, world = (0, 1) if state is None else (state.process_index, state.num_processes)
    sums = FeatureSums()
    for images, _ in batches(FEATURE_BATCH, first=rank, step=world):
        sums.add(fid.features(images))
    if world > 1:   # added up in rank order: every rank gets the same figures
        sums = functools.reduce(FeatureSums.merge, gather_all(sums, state), FeatureSums())
    return sums.statistics()


def gather_all(value, state):
    """Every rank's `value`, in rank order (this rank's own object at its place)."""
    values = [None] * state.num_processes
    torch.distributed.all_gather_object(values, value)
    values[state.process_index] = value
    return values


def evaluate(*, samples, data, fid=False, detector=None, ref=None, vae=None, device=None):
    """Score `samples` against `data`; the entry point behind `cmt-eval`.

    samples: an .npz from cmt-sample (key `samples`, optional `labels`), or the samples themselves
    (a tensor or array). data: mnist | toy:NAME | PATH (image folder, .npz, EDM dataset .zip).
    Toy data get energy distance and sliced Wasserstein against the fixed reference sample; mnist
    gets FD-MNIST (features of a small MNIST classifier, not Inception FID). fid: also Inception
    FID with `detector` (the TorchScript inception-2015-12-05.pt, path or URL) against the `ref`
    statistics (EDM-format .npz, path or URL), or against statistics of the `data` images when
    `ref` is None. data may also be a latent set (cmt-encode's folder): the samples are then its
    latents, decoded for the detector through the VAE it records (or `vae`, a diffusers
    AutoencoderKL directory or hub id), and the reference is `ref` or the images it was encoded
    from (FID only). device: for the detector and the VAE (default cuda if available, else cpu).

    Under `accelerate launch` the ranks share the feature extraction (same figures as one process);
    every rank returns the figures, rank 0 reports them.

    Images must be in [-1, 1] (as cmt-sample writes them); uint8 images are converted from 0..255
    (said in `conversion`); [0, 1] or 0..255 floats, NaN and other dtypes are refused
    (`samples_in_range`).

    Returns `{"samples": Path or None, "data": name, "count": int, "metrics": {name: float}, "rank": int,
    "conversion": str or None}`.
    """
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
    if device is not None:
        torch_device(device)
    latent_set = read_latent_record(data) if isinstance(data, (str, Path)) else None
    if latent_set is not None:
        return _evaluate_latents(values, samples_path, str(data), latent_set, fid=fid, detector=detector, ref=ref,
                                 vae=vae, device=device)
    if vae is not None:
        raise ArgumentError("vae", "decodes the latent samples of a latent set (cmt-encode); this data holds pixels "
                                   "or points: leave it out")
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
        values, conversion = samples_in_range(values, data, str(samples_path or "samples"))
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
                                  device=str(torch_device(device)) if device else
                                  ("cuda" if torch.cuda.is_available() else "cpu"))
        except ValueError as error:
            raise ArgumentError("detector", str(error)) from None
    state = distributed_state()
    metrics = evaluate_samples(values, data, fid=scorer, state=state)
    return {"samples": samples_path, "data": data.name, "count": len(values), "metrics": metrics,
            "rank": state.process_index, "conversion": conversion}


def _evaluate_latents(values, samples_path, name, record, *, fid, detector, ref, vae, device):
    """`evaluate` against a latent set: Inception FID of the samples decoded through its VAE."""
    if not fid:
        raise ArgumentError("data", f"{name} is a latent set: it has no built-in metric; ask for Inception FID "
                                    "(--fid --detector PATH [--ref PATH]), of the samples decoded through its VAE")
    if detector is None:
        raise ArgumentError("detector", "--fid needs --detector (fid=True needs a detector): the TorchScript "
                                        f"inception-2015-12-05.pt, a path or its URL {INCEPTION_URL}")
    shape = tuple(record.get("data_shape") or ())
    if values.ndim != 4 or tuple(values.shape[1:]) != shape or values.dtype.kind != "f":
        raise ArgumentError("samples", f"samples have shape {tuple(values.shape)} ({values.dtype}); {name} holds "
                                       f"latents [N, {', '.join(map(str, shape))}] (cmt-sample --npz keeps a latent "
                                       "network's latents)")
    if not np.isfinite(values).all():
        raise ArgumentError("samples", f"{samples_path or 'samples'}: hold NaN or inf (a diverged model?)")
    device = str(torch_device(device)) if device else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        codec = LatentCodec.from_encoder_info(record["encoder"], vae=vae, device=device)
    except (ImportError, OSError, ValueError) as error:
        raise ArgumentError("vae", f"{error} (the VAE that encoded {name})") from None
    try:
        scorer = InceptionFID(detector, reference=None if ref is None else load_reference_statistics(ref),
                              device=device)
    except ValueError as error:
        raise ArgumentError("ref" if ref is not None and "reference" in str(error) else "detector", str(error)) \
            from None
    state = distributed_state()
    reference = scorer.reference
    if reference is None:
        source = record.get("source", {})
        try:
            images = resolve_data(source.get("path"), source.get("resolution"), source.get("resize") or "center-crop")
        except (ValueError, TypeError) as error:
            raise ArgumentError("ref", f"{name} was encoded from {source.get('path')}, which cannot be read here "
                                       f"({error}); give FID reference statistics (--ref)") from None
        reference = data_statistics(scorer, images, state)
    sums = FeatureSums()
    for start in range(state.process_index * FEATURE_BATCH, len(values), state.num_processes * FEATURE_BATCH):
        latents = torch.from_numpy(np.ascontiguousarray(values[start:start + FEATURE_BATCH], np.float32))
        sums.add(scorer.features(codec.decode(latents.to(device)).cpu()))
    if state.num_processes > 1:
        sums = functools.reduce(FeatureSums.merge, gather_all(sums, state), FeatureSums())
    metrics = {"fid": frechet_distance(*sums.statistics(), *reference)}
    return {"samples": samples_path, "data": name, "count": len(values), "metrics": metrics,
            "rank": state.process_index, "conversion": None}


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
        reference = fid.reference if fid.reference is not None else data_statistics(fid, data, state)
        results["fid"] = frechet_distance(*features, *reference)
    return broadcast_object(results, state)


def broadcast_object(value, state):
    """Rank 0's `value` on every rank."""
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]
