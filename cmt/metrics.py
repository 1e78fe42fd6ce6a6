"""Sample-quality metrics.

- 2-D data: `energy_distance` and `sliced_wasserstein` against a fixed reference sample.
- `frechet_distance` between Gaussians fitted to features (`feature_statistics`).
- FD-MNIST (`mnist_fd`): the Frechet distance between the penultimate-layer features of a small
  CNN classifier trained on the 5k MNIST digits (weights shipped in `cmt/assets`). It is NOT the
  Inception FID: its numbers are only comparable with other FD-MNIST numbers.
- `InceptionFID`: the standard FID with the TorchScript Inception-v3 detector used by
  StyleGAN2-ADA / EDM and EDM-format reference statistics (`mu`, `sigma` in an .npz).
- FD-DINOv2 (EDM2's second metric) uses `cmt.dinov2.DINOv2Detector`'s features with the same
  `frechet_distance`; its reference statistics sit in the same .npz (`REFERENCE_KEYS`).
- `FeatureMoments`: mean and covariance accumulated batch by batch (float64), never all features.
- `embedded_metric(data, samples)`: the metric every command logs for the built-in data sets (the
  point metrics of at most `POINT_METRIC_MAX_SAMPLES` samples: `metric_note`).
"""

import functools
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from cmt.datasets import TOY_NAMES, load_mnist, reference_sample
from cmt.download import DownloadError, cache_dir, fetch
from cmt.outputs import write_npz

MNIST_CLASSIFIER = Path(__file__).resolve().parent / "assets" / "mnist_classifier.safetensors"
MNIST_RESOLUTION = 16
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


# ----------------------------------------------------------------------------------------------
# 2-D metrics


def energy_distance(x, y, chunk=4096):
    """Squared energy distance `2 E|X-Y| - E|X-X'| - E|Y-Y'|` (V-statistics, float64).

    Zero iff the two empirical distributions are equal; `x` `[N, D]`, `y` `[M, D]`.
    """
    x, y = x.detach().double().flatten(1), y.detach().to(x.device).double().flatten(1)

    def mean_distance(a, b):
        total = sum(torch.cdist(part, b).sum() for part in a.split(chunk))
        return total / (len(a) * len(b))

    return float(2 * mean_distance(x, y) - mean_distance(x, x) - mean_distance(y, y))


def sliced_wasserstein(x, y, n_projections=256, generator=None):
    """Sliced 2-Wasserstein distance over `n_projections` random directions.

    Each projection compares the quantile functions (at `m = max(N, M)` levels) of the two
    samples. Without a `generator` the directions come from a fixed seed, so the value is
    deterministic.
    """
    x, y = x.detach().float().flatten(1), y.detach().to(x.device).float().flatten(1)
    generator = generator or torch.Generator().manual_seed(0)
    directions = torch.randn(x.shape[1], n_projections, generator=generator).to(x.device)
    directions = directions / directions.norm(dim=0, keepdim=True)
    projected_x, projected_y = (x @ directions).T, (y @ directions).T
    if len(x) == len(y):
        quantiles_x, quantiles_y = projected_x.sort(dim=1).values, projected_y.sort(dim=1).values
    else:
        levels = (torch.arange(max(len(x), len(y)), device=x.device) + 0.5) / max(len(x), len(y))
        quantiles_x, quantiles_y = projected_x.quantile(levels, dim=1), projected_y.quantile(levels, dim=1)
    return float((quantiles_x - quantiles_y).square().mean().sqrt())


# ----------------------------------------------------------------------------------------------
# Frechet distance


def feature_statistics(features):
    """Mean `[D]` and covariance `[D, D]` (float64 numpy) of features `[N, D]`."""
    features = np.asarray(features.detach().cpu() if torch.is_tensor(features) else features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


class FeatureMoments:
    """Running sums of features for their mean and covariance, batch by batch (memory flat in the
    number of images, as EDM2's `calculate_stats_for_iterable`): count, sum `[D]` and sum of outer
    products `[D, D]`, all float64 (`dim` None: sized by the first batch). `merge` adds another's
    sums, `all_reduce` every rank's; `statistics()` equals `feature_statistics` of all rows to
    float64 rounding."""

    def __init__(self, dim=None):
        self.count = 0
        self.sum = None if dim is None else np.zeros(dim, dtype=np.float64)
        self.outer = None if dim is None else np.zeros((dim, dim), dtype=np.float64)

    def add(self, features):
        features = np.asarray(features.detach().cpu() if torch.is_tensor(features) else features, dtype=np.float64)
        if self.sum is None:
            self.sum, self.outer = np.zeros(features.shape[1]), np.zeros((features.shape[1],) * 2)
        self.count += len(features)
        self.sum += features.sum(axis=0)
        self.outer += features.T @ features
        return self

    def merge(self, other):
        if other.sum is not None:
            if self.sum is None:
                self.sum, self.outer = np.zeros_like(other.sum), np.zeros_like(other.outer)
            self.count += other.count
            self.sum += other.sum
            self.outer += other.outer
        return self

    def all_reduce(self):
        """The sums of every rank of the torch.distributed group (each added its own batches), added in
        rank order, so every rank holds the same figures; an object gather, whatever the backend."""
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, (self.count, self.sum, self.outer))
        total = FeatureMoments()
        for count, sums, outer in parts:
            part = FeatureMoments()
            part.count, part.sum, part.outer = count, sums, outer
            total.merge(part)
        self.count, self.sum, self.outer = total.count, total.sum, total.outer
        return self

    def statistics(self):
        """Mean `[D]` and unbiased covariance `[D, D]`, as `feature_statistics` (np.cov) gives them."""
        if self.count < 2:
            raise ValueError(f"feature statistics need at least 2 images, got {self.count}")
        mu = self.sum / self.count
        return mu, (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """`|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))` in float64.

    When the product is singular (few samples, dead features) the square root is taken of
    `(sigma1 + eps I)(sigma2 + eps I)` instead, as pytorch-fid does.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"frechet_distance: shapes differ: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
        try:
            root = scipy.linalg.sqrtm(sigma1 @ sigma2)
        except (scipy.linalg.LinAlgWarning, np.linalg.LinAlgError):
            root = None
    if root is None or not np.isfinite(root).all():
        offset = np.eye(len(sigma1)) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            root = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    distance = np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(np.real(root))
    return max(float(distance), 0.0)


# ----------------------------------------------------------------------------------------------
# FD-MNIST


class MnistClassifier(nn.Module):
    """A small CNN for 16x16 digits in [-1, 1]; `features` are its 64-d penultimate activations."""

    def __init__(self, feature_dim=64, num_classes=10):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.SiLU(),  # 8x8
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),  # 4x4
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images):
        return self.trunk(images)

    def forward(self, images):
        return self.head(self.features(images))


def to_mnist_resolution(images):
    """Bring digits `[N, 1, R, R]` to 16x16: 32 is cropped to 28 (undoing the padding), then resampled."""
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
        raise ValueError(f"FD-MNIST needs grayscale square images [N, 1, R, R]; got shape {tuple(images.shape)}")
    images = images.float()
    if images.shape[-1] == 32:
        images = images[:, :, 2:30, 2:30]
    if images.shape[-1] != MNIST_RESOLUTION:
        size = (MNIST_RESOLUTION, MNIST_RESOLUTION)
        images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    return images.clamp(-1, 1)


@functools.cache
def mnist_classifier():
    """The shipped classifier (eval mode, CPU). Re-make it with benchmarks/train_mnist_classifier.py."""
    if not MNIST_CLASSIFIER.is_file():
        raise ValueError(f"{MNIST_CLASSIFIER} is missing; re-make it with `python benchmarks/train_mnist_classifier.py`")
    net = MnistClassifier()
    net.load_state_dict(load_file(MNIST_CLASSIFIER))
    return net.eval().requires_grad_(False)


@torch.no_grad()
def mnist_features(images, batch_size=1000):
    """Penultimate features `[N, 64]` (float64 numpy) of digits in [-1, 1]."""
    images = to_mnist_resolution(images.detach())
    net = mnist_classifier()
    return np.concatenate([net.features(batch.cpu()).double().numpy() for batch in images.split(batch_size)])


@functools.cache
def mnist_reference_statistics():
    images, _ = load_mnist(MNIST_RESOLUTION)
    return feature_statistics(mnist_features(images))


def mnist_fd(images):
    """FD-MNIST of `images` `[N, 1, R, R]` in [-1, 1] against the 5,000 MNIST digits (not Inception FID)."""
    mu, sigma = feature_statistics(mnist_features(images))
    return frechet_distance(mu, sigma, *mnist_reference_statistics())


# ----------------------------------------------------------------------------------------------
# The metric each built-in data set is judged by

# The point metrics (toy data) score at most this many samples, the first ones (sample i comes from
# seed + i, so they are a random subset of the rest): energy distance is quadratic in the count
# (here ~2 s at 8192, 13 s at 20 k, minutes at 200 k), and the fixed 4096-point reference bounds
# the figures' precision whatever the count. `metric_note` says when a metric used fewer samples.
POINT_METRIC_MAX_SAMPLES = 8192
# A metric compares two distributions; fewer samples than this make none (one sample has no spread,
# FD's covariance needs two): cmt-sample skips it, cmt-eval refuses.
MIN_METRIC_SAMPLES = 2


def too_few_for_a_metric(count):
    """Why `count` samples make no metric ("1 sample; ..."), or None when they make one."""
    if count >= MIN_METRIC_SAMPLES:
        return None
    return (f"{count} sample{'s' * (count != 1)}; a metric compares distributions and needs at least "
            f"{MIN_METRIC_SAMPLES}")


def _data_name(data):
    return data if isinstance(data, str) else data.name


def metric_sample_count(data, count):
    """How many of `count` samples the built-in metric of `data` scores (`POINT_METRIC_MAX_SAMPLES`
    at most for toy data; all for the others)."""
    name = _data_name(data)
    return min(count, POINT_METRIC_MAX_SAMPLES) if name.startswith("toy:") else count


def metric_note(data, count):
    """A line for the user when the built-in metric of `data` scores fewer than the `count` samples
    given (None otherwise)."""
    scored = metric_sample_count(data, count)
    if scored == count:
        return None
    return (f"metrics of the first {scored} of the {count} samples: energy distance is quadratic in the count, "
            "and the 4096-point reference bounds their precision")


def embedded_metric(data, samples):
    """Metrics of `samples` for a built-in data set, as a dict of floats.

    `data` is a spec string or a resolved data set: `toy:NAME` gives `energy_distance` and
    `sliced_wasserstein` against the fixed reference sample (of the first `POINT_METRIC_MAX_SAMPLES`
    samples: `metric_note`), `mnist` gives `fd_mnist`; other data sets have no built-in metric
    (empty dict; use `InceptionFID`).
    """
    name = _data_name(data)
    if name.startswith("toy:") and name[4:] in TOY_NAMES:
        if samples.ndim != 2 or samples.shape[1] != 2:
            raise ValueError(f"{name}: samples must be 2-D points [N, 2]; got shape {tuple(samples.shape)}")
        samples = samples[:metric_sample_count(name, len(samples))]
        reference = reference_sample(name[4:])
        return {"energy_distance": energy_distance(samples, reference), "sliced_wasserstein": sliced_wasserstein(samples, reference)}
    if name == "mnist":
        return {"fd_mnist": mnist_fd(samples)}
    return {}


# ----------------------------------------------------------------------------------------------
# Inception FID


def _local_file(path_or_url, what):
    """A local path as is; an http(s) URL fetched once into the cache (`$CMT_CACHE/fid`, see cmt.download)."""
    try:
        # Earlier versions downloaded these files into the cache root: a copy there is used in place.
        return fetch(path_or_url, subdir="fid", also_look_in=[cache_dir()])
    except DownloadError as error:
        raise ValueError(f"{what}: {error}") from None


# The arrays of each metric in a reference-statistics .npz: Inception FID under EDM's own names (its
# fid-refs files are such an .npz), FD-DINOv2 beside them (EDM2 keeps both in a .pkl; cmt never
# loads pickles). `cmt-eval --ref-stats` writes them.
REFERENCE_KEYS = {"fid": ("mu", "sigma"), "fd_dinov2": ("fd_dinov2_mu", "fd_dinov2_sigma")}


def load_reference_statistics(path_or_url, metric="fid"):
    """`(mu, sigma)` of `metric` ("fid" or "fd_dinov2") from a reference .npz, by path or URL: EDM's
    fid-refs format (`mu`, `sigma`) or what `cmt-eval --ref-stats` writes (also `fd_dinov2_mu`,
    `fd_dinov2_sigma`)."""
    path = _local_file(path_or_url, "reference statistics")
    mu_key, sigma_key = REFERENCE_KEYS[metric]
    try:
        with np.load(path, allow_pickle=False) as contents:
            return contents[mu_key].astype(np.float64), contents[sigma_key].astype(np.float64)
    except (OSError, ValueError, KeyError) as error:
        if metric == "fid":
            raise ValueError(f"{path}: expected an .npz with arrays 'mu' and 'sigma' (EDM fid-refs format): "
                             f"{error}") from None
        raise ValueError(f"{path}: expected an .npz with arrays {mu_key!r} and {sigma_key!r} (FD-DINOv2 reference "
                         f"statistics; make them with cmt-eval --data DATA --ref-stats OUT.npz --fd-dinov2): "
                         f"{error}") from None


def save_reference_statistics(path, statistics, count, data=None):
    """Write `{metric: (mu, sigma)}` to an .npz under `REFERENCE_KEYS` (with `num_images`, `data`)."""
    arrays = {"num_images": np.int64(count), **({"data": np.str_(data)} if data is not None else {})}
    for metric, (mu, sigma) in statistics.items():
        mu_key, sigma_key = REFERENCE_KEYS[metric]
        arrays[mu_key], arrays[sigma_key] = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    return write_npz(path, **arrays)


class InceptionFID:
    """FID with the TorchScript Inception-v3 detector `inception-2015-12-05.pt` of StyleGAN2-ADA/EDM.

    `detector`: path (or URL) of the TorchScript `.pt` (`INCEPTION_URL`); the `.pkl` of
    EDM/StyleGAN3 is a pickle and is refused. `reference`: an EDM `.npz` (`mu`, `sigma`), by path
    or URL, or a `(mu, sigma)` pair, e.g. from `statistics(real_images)`.
    """

    def __init__(self, detector, reference=None, device="cpu", batch_size=100):
        if str(detector).endswith(".pkl"):
            raise ValueError(f"detector {detector}: pickles are not loaded; pass the TorchScript inception-2015-12-05.pt ({INCEPTION_URL})")
        path = _local_file(detector, "Inception detector")
        try:
            with warnings.catch_warnings():
                # TorchScript is deprecated in torch, but the reference detector only exists in that form.
                warnings.simplefilter("ignore", DeprecationWarning)
                self.detector = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError) as error:
            reason = str(error).split(". ")[0]
            raise ValueError(f"detector {path}: not a TorchScript file ({reason}); expected inception-2015-12-05.pt") from None
        self.device, self.batch_size = device, batch_size
        self.reference = load_reference_statistics(reference) if isinstance(reference, (str, Path)) else reference

    @torch.no_grad()
    def features(self, images):
        """2048-d features of images `[N, C, H, W]` in [-1, 1] (grayscale is repeated to RGB)."""
        parts = []
        for batch in images.detach().split(self.batch_size):
            pixels = (batch.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
            if pixels.shape[1] == 1:
                pixels = pixels.repeat(1, 3, 1, 1)
            parts.append(self.detector(pixels.to(self.device), return_features=True).double().cpu().numpy())
        return np.concatenate(parts)

    def statistics(self, images):
        return feature_statistics(self.features(images))

    def __call__(self, images):
        if self.reference is None:
            raise ValueError("InceptionFID has no reference statistics: pass reference= an EDM .npz or (mu, sigma)")
        return frechet_distance(*self.statistics(images), *self.reference)
