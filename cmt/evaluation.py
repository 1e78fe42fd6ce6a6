"""Evaluation: the metrics of a set of samples against a data set; `evaluate` is `cmt-eval`.

Toy data: energy distance and sliced Wasserstein against the fixed reference sample. mnist:
FD-MNIST (features of a small MNIST classifier, not Inception FID). Inception FID and EDM2's
FD-DINOv2 on request, against reference statistics (an .npz) or statistics of the data set's images,
streamed a batch at a time (`cmt.metrics.FeatureMoments`: memory does not grow with the set);
`reference_statistics` writes a data set's statistics of both in one pass. A latent set (cmt-encode)
as data: the samples are latents, decoded through the VAE the set records (or `vae`) before the
detectors see them; the reference is `ref`, or the images the set was encoded from.

One module of ~420 lines: scoring samples and writing reference statistics share the data set's
reading, the detectors and the ranks' split of the work.
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
from cmt.latents import LatentCodec, read_latent_record
from cmt.sampling import torch_device
from cmt.metrics import (INCEPTION_URL, FeatureMoments, InceptionFID, embedded_metric, feature_statistics,
                         frechet_distance, load_reference_statistics, metric_note, mnist_features,
                         mnist_reference_statistics, save_reference_statistics, too_few_for_a_metric)
from cmt.options import checked_keywords, document_keywords

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
    too_few = too_few_for_a_metric(len(samples) if samples.ndim else 0)
    if too_few:
        raise ValueError(f"{path}: 'samples' holds {too_few}")
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


def image_batches(images, rank=0, world=1):
    """Batches of up to `FEATURE_BATCH` images of `images` (a tensor, an in-memory data set, or a
    streamed one that decodes a batch at a time), rank `rank` of `world` taking batches rank,
    rank + world, ..."""
    batches = getattr(images, "batches", None)
    if batches is not None:
        for batch, _ in batches(FEATURE_BATCH, first=rank, step=world):
            yield batch
        return
    if hasattr(images, "tensors"):
        images = images.tensors()[0]
    for position, start in enumerate(batch_starts(len(images), FEATURE_BATCH)):
        if position % world == rank:
            yield images[start:start + FEATURE_BATCH]


def streamed_statistics(features, images, state=None, progress=None):
    """`{name: (mu, sigma)}` of each `features[name](batch)` over `images` (`image_batches`), in one
    pass whose moments are summed as they come (`FeatureMoments`: memory flat in the number of
    images). state: an accelerate process state of several ranks (every rank calls): rank r takes
    batches r, r + world, ... and the moments are summed over the ranks in rank order (the same
    figures on every rank; one process's up to float64 rounding). progress: a tqdm bar advanced by
    images."""
    rank, world = (0, 1) if state is None else (state.process_index, state.num_processes)
    moments = {name: FeatureMoments() for name in features}
    for batch in image_batches(images, rank, world):
        for name, function in features.items():
            moments[name].add(function(batch))
        if progress is not None:
            progress.update(len(batch) * world)
    if world > 1:
        for values in moments.values():
            values.all_reduce()
    return {name: values.statistics() for name, values in moments.items()}


def _frechet_metrics(samples, data, detectors, state, decode=None):
    """`{name: Frechet distance}` of each detector (`{name: scorer}`, a scorer with `features` and
    `reference`) between `samples` (first turned into images by `decode`, if given: latents) and
    its reference, else the images of `data`."""
    features = {name: scorer.features for name, scorer in detectors.items()}
    sample_features = features if decode is None else \
        {name: (lambda batch, function=function: function(decode(batch))) for name, function in features.items()}
    sample_statistics = streamed_statistics(sample_features, samples, state)
    missing = {name: function for name, function in features.items() if detectors[name].reference is None}
    data_statistics = streamed_statistics(missing, data, state) if missing else {}
    return {name: frechet_distance(*sample_statistics[name],
                                   *(detectors[name].reference if name not in missing else data_statistics[name]))
            for name in detectors}


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
    detectors = {name: scorer for name, scorer in (("fid", fid), ("fd_dinov2", fd_dinov2)) if scorer is not None}
    if detectors and data.kind != "images":
        raise ValueError(f"{' and '.join(detectors)} need image data; {data.name} holds 2-D points")
    shared = state is not None and state.num_processes > 1
    results = _embedded_shared(samples, data, state) if shared else embedded_metric(data, samples)
    results.update(_frechet_metrics(samples, data, detectors, state if shared else None))
    return results


# What each keyword of `evaluate` means: its docstring and cmt-eval's help (`cmt.options.document_keywords`).
EVALUATE_HELP = {
    "samples": "Samples .npz (key 'samples', optional 'labels'), e.g. from cmt-sample (not with --ref-stats); in "
               "Python also the samples themselves (a tensor or array).",
    "data": "mnist | toy:NAME | PATH (image folder, .npz, EDM dataset .zip, cmt-encode latent set).",
    "fid": "Also compute Inception FID (needs --detector).",
    "detector": f"TorchScript inception-2015-12-05.pt: a path, or its URL {INCEPTION_URL}.",
    "ref": "Reference statistics .npz, path or URL: EDM's fid-refs (mu, sigma; fd_dinov2_mu, fd_dinov2_sigma for "
           "FD-DINOv2) or one written by --ref-stats [default: computed from the --data images].",
    "fd_dinov2": "Also compute EDM2's FD-DINOv2 (DINOv2 ViT-L/14 features).",
    "dinov2": f"DINOv2 weights (.pth), a path or URL [default: {DINOV2_URL}, downloaded once into the cmt cache].",
    "ref_stats": "Write the reference statistics of the --data images for --fid / --fd-dinov2 to this .npz instead "
                 "of scoring samples.",
    "vae": "A latent set as --data: the AutoencoderKL that decodes the samples, a directory or hub id [default: the "
           "one it records].",
    "device": "Device for the detectors and the VAE [default: cuda if available, else cpu].",
}


@document_keywords(EVALUATE_HELP)
@checked_keywords
def evaluate(*, samples=None, data, fid=False, detector=None, ref=None, fd_dinov2=False, dinov2=None, ref_stats=None,
             vae=None, device=None):
    """Score `samples` against `data`; the entry point behind `cmt-eval`.

    Toy data get energy distance and sliced Wasserstein against the fixed reference sample; mnist
    gets FD-MNIST (features of a small MNIST classifier, not Inception FID); `fid` and `fd_dinov2`
    add the Frechet distances (`cmt.dinov2`: DINOv2 ViT-L/14 features of the images resized to 224)
    against `ref` or the `data` images' statistics. A latent set (cmt-encode's folder) as data: the
    samples are its latents, decoded for the detectors through the VAE it records (or `vae`), and
    the reference is `ref` or the images it was encoded from. With `ref_stats`, the statistics are
    written in one streamed pass instead (`reference_statistics`).

    Under `accelerate launch` the ranks share the feature extraction (same figures as one process);
    every rank returns the figures, rank 0 reports them.

    Images must be in [-1, 1] (as cmt-sample writes them); uint8 images are converted from 0..255
    (said in `conversion`); [0, 1] or 0..255 floats, NaN and other dtypes are refused
    (`samples_in_range`).

    Returns `{"samples": Path or None, "data": name, "count": int, "metrics": {name: float}, "rank": int,
    "conversion": str or None, "metric_note": str or None (the point metrics scored a subset:
    `cmt.metrics.metric_note`)}`, with `ref_stats` `{"ref_stats": Path, "data", "count", "metrics": [names],
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
    if device is not None:
        torch_device(device)
    latent_set = read_latent_record(data) if isinstance(data, (str, Path)) else None
    if latent_set is not None:
        return _evaluate_latents(values, samples_path, str(data), latent_set, fid=fid, detector=detector, ref=ref,
                                 fd_dinov2=fd_dinov2, dinov2=dinov2, vae=vae, device=device)
    if vae is not None:
        raise ArgumentError("vae", "decodes the latent samples of a latent set (cmt-encode); this data holds pixels "
                                   "or points: leave it out")
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
    if too_few_for_a_metric(len(values)):   # samples given as an array (a file was checked when read)
        raise ArgumentError("samples", f"the samples hold {too_few_for_a_metric(len(values))}")
    device = _detector_device(device)
    scorer = _inception(detector, device, ref) if fid else None
    dinov2_scorer = _dinov2(dinov2, device, ref) if fd_dinov2 else None
    state = distributed_state()
    metrics = evaluate_samples(values, data, fid=scorer, state=state, fd_dinov2=dinov2_scorer)
    return {"samples": samples_path, "data": data.name, "count": len(values), "metrics": metrics,
            "rank": state.process_index, "conversion": conversion, "metric_note": metric_note(data, len(values))}


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
    state = distributed_state()
    with tqdm(total=len(data), unit="image", desc="cmt-eval --ref-stats", dynamic_ncols=True,
              disable=not (progress and state.is_main_process)) as bar:
        statistics = streamed_statistics(features, data, state, progress=bar)
    if state.is_main_process:
        save_reference_statistics(out, statistics, len(data), data=data.name)
    state.wait_for_everyone()
    return {"ref_stats": out, "data": data.name, "count": len(data), "metrics": list(statistics),
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


def _embedded_shared(samples, data, state):
    """The embedded metric over several ranks: FD-MNIST's features in shared batches, the point
    metrics (cheap) on rank 0; the figures broadcast, so every rank returns them."""
    results = {}
    if data.name == "mnist":
        mu, sigma = feature_statistics(shared_features(mnist_features, samples, state))
        results["fd_mnist"] = frechet_distance(mu, sigma, *mnist_reference_statistics())
    elif state.is_main_process:
        results = embedded_metric(data, samples)
    return broadcast_object(results, state)


def _evaluate_latents(values, samples_path, name, record, *, fid, detector, ref, fd_dinov2, dinov2, vae, device):
    """`evaluate` against a latent set: the Frechet metrics of the samples decoded through its VAE."""
    if not (fid or fd_dinov2):
        raise ArgumentError("data", f"{name} is a latent set: it has no built-in metric; ask for Inception FID "
                                    "(--fid --detector PATH [--ref PATH]) or FD-DINOv2 (--fd-dinov2), of the samples "
                                    "decoded through its VAE")
    if fid and detector is None:
        raise ArgumentError("detector", "--fid needs --detector (fid=True needs a detector): the TorchScript "
                                        f"inception-2015-12-05.pt, a path or its URL {INCEPTION_URL}")
    shape = tuple(record.get("data_shape") or ())
    if values.ndim != 4 or tuple(values.shape[1:]) != shape or values.dtype.kind != "f":
        raise ArgumentError("samples", f"samples have shape {tuple(values.shape)} ({values.dtype}); {name} holds "
                                       f"latents [N, {', '.join(map(str, shape))}] (cmt-sample --npz keeps a latent "
                                       "network's latents)")
    if not np.isfinite(values).all():
        raise ArgumentError("samples", f"{samples_path or 'samples'}: hold NaN or inf (a diverged model?)")
    device = _detector_device(device)
    try:
        codec = LatentCodec.from_encoder_info(record["encoder"], vae=vae, device=device)
    except (ImportError, OSError, ValueError) as error:
        raise ArgumentError("vae", f"{error} (the VAE that encoded {name})") from None
    detectors = {}
    if fid:
        detectors["fid"] = _inception(detector, device, ref)
    if fd_dinov2:
        detectors["fd_dinov2"] = _dinov2(dinov2, device, ref)
    images = None
    if any(scorer.reference is None for scorer in detectors.values()):
        source = record.get("source", {})
        try:
            images = resolve_data(source.get("path"), source.get("resolution"), source.get("resize") or "center-crop")
        except (ValueError, TypeError) as error:
            raise ArgumentError("ref", f"{name} was encoded from {source.get('path')}, which cannot be read here "
                                       f"({error}); give reference statistics (--ref)") from None

    state = distributed_state()
    latents = torch.from_numpy(np.ascontiguousarray(values, np.float32))
    metrics = _frechet_metrics(latents, images, detectors, state,
                               decode=lambda batch: codec.decode(batch.to(device)).cpu())
    return {"samples": samples_path, "data": name, "count": len(values), "metrics": metrics,
            "rank": state.process_index, "conversion": None}


def broadcast_object(value, state):
    """Rank 0's `value` on every rank."""
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]
