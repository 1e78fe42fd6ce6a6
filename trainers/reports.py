"""The sample-and-score report every training phase logs: samples of the EMA network from fixed
seeds, the built-in metric of a data set, and a picture in `samples/` that TensorBoard shows too.

Pre-training samples its ODE once (`cmt.trainers.diffusion`); the student phases their 1- and
2-step samplers (`cmt.trainers.students`). Both call `sample_and_score`.
"""
from pathlib import Path

from tqdm.auto import tqdm

from cmt.labels import pick_labels
from cmt.metrics import embedded_metric
from cmt.outputs import step_file_name
from cmt.sampling import check_finite, generate, metric_title, save_samples

# The reports' samples use seeds from here on (cmt-sample's start at 0), their labels are drawn from
# the step: the same noise at every report of a run.
REPORT_SEED = 10**6


def sample_and_score(net, out, step, *, sampling, num_samples, title, data=None, suffix="", draw=None,
                     grid=None, nrow=None, progress=False):
    """`num_samples` samples of `net` by `generate(**sampling)` (seeds `REPORT_SEED`..., random labels
    from `step`), scored by the built-in metric of the resolved data set `data` (None: no metric) as
    `{metric}{suffix}`, and drawn to `out/samples/step-NNNNNNN{suffix with - for _}.png` as
    `samples{suffix}` (`title` and the metric above it). draw: samples -> the picture's images
    (None, or a draw that returns None: no picture, e.g. latents whose VAE is not at hand). grid:
    `(seeds, labels)` to draw instead of the scored samples (a class-cycling grid); the scored ones
    are drawn when there are none (points)."""
    scalars, samples = {}, None
    if num_samples:
        seeds = list(range(REPORT_SEED, REPORT_SEED + num_samples))
        labels = pick_labels("random", num_samples, net.label_dim, seed=step)
        with tqdm(total=num_samples, unit="sample", desc=title, leave=False,
                  disable=not progress, dynamic_ncols=True) as bar:
            samples = generate(net, seeds, labels, progress=bar, **sampling)
        check_finite(samples, f"the sampler of {title}")   # fit reports it once the model is saved
        scalars = {f"{name}{suffix}": float(value)
                   for name, value in (embedded_metric(data, samples) if data is not None else {}).items()}
    if draw is None:
        return scalars
    shown = samples
    if grid is not None and not (samples is not None and samples.ndim == 2):
        shown = generate(net, list(grid[0]), grid[1], **sampling)
        check_finite(shown, f"the sampler of {title}")
    if shown is None:
        return scalars
    picture = Path(out) / "samples" / step_file_name("step", step, suffix.replace("_", "-") + ".png")
    reference = data.reference() if data is not None and shown.ndim == 2 else None
    metrics = {name[:len(name) - len(suffix)] if suffix else name: value for name, value in scalars.items()}
    shown = draw(shown)
    if shown is None:   # the picture could not be made (a latent student's VAE is not at hand)
        return scalars
    save_samples(shown, picture, reference=reference, nrow=nrow,
                 title=metric_title(title, metrics))
    return {**scalars, f"samples{suffix}": picture}
