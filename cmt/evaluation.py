"""cmt-eval: score generated samples against a data set.

\b
    cmt-eval --samples samples.npz --data toy:checkerboard
    cmt-eval --samples samples.npz --data mnist --json
    cmt-eval --samples samples.npz --data images.zip --fid --detector inception-2015-12-05.pt [--ref refs.npz]

Toy data: energy distance and sliced Wasserstein against the fixed reference sample. mnist:
FD-MNIST (features of a small MNIST classifier, not Inception FID). --fid: Inception FID against
the --ref statistics, or against statistics of the --data images when --ref is not given.
"""

import json
import zipfile

import click
import numpy as np
import torch

from cmt.datasets import resolve_data
from cmt.metrics import InceptionFID, embedded_metric, frechet_distance, INCEPTION_URL


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


@click.command(help=__doc__)
@click.option("--samples", "samples_path", required=True, type=click.Path(exists=True, dir_okay=False), help="Samples .npz (key 'samples', optional 'labels'), e.g. from cmt-sample.")
@click.option("--data", "data_spec", required=True, help="mnist | toy:NAME | PATH (image folder, .npz, EDM dataset .zip).")
@click.option("--fid", is_flag=True, help="Also compute Inception FID (needs --detector).")
@click.option("--detector", default=None, help=f"TorchScript inception-2015-12-05.pt: a path, or its URL {INCEPTION_URL}.")
@click.option("--ref", default=None, help="EDM-format FID reference statistics .npz (mu, sigma), path or URL; default: computed from --data.")
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True, help="Device for the Inception detector.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def main(samples_path, data_spec, fid, detector, ref, device, as_json):
    try:
        samples, _ = load_samples(samples_path)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--samples") from None
    try:
        data = resolve_data(data_spec)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--data") from None
    if not fid and (detector or ref):
        raise click.UsageError("--detector and --ref are only used with --fid")
    if fid and detector is None:
        raise click.UsageError(f"--fid needs --detector: the TorchScript inception-2015-12-05.pt (download it from {INCEPTION_URL})")
    if fid and data.kind != "images":
        raise click.UsageError(f"--fid needs image data; {data.name} holds 2-D points")
    if not fid and data.kind == "images" and data.name != "mnist":
        raise click.UsageError(f"{data.name} has no built-in metric; pass --fid --detector PATH [--ref PATH]")
    try:
        _check_shape(samples, data)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--samples") from None
    try:
        detector_net = InceptionFID(detector, reference=ref, device=device) if fid else None
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--detector/--ref") from None
    results = evaluate_samples(samples, data, fid=detector_net)
    if as_json:
        click.echo(json.dumps({"samples": str(samples_path), "data": data.name, "count": len(samples), **results}))
    else:
        click.echo(f"{len(samples)} samples from {samples_path} vs {data.name}")
        for name, value in results.items():
            click.echo(f"  {name}: {value:.6g}")


if __name__ == "__main__":
    main()
