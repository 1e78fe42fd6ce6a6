"""Train the small MNIST classifier behind FD-MNIST and write cmt/assets/mnist_classifier.safetensors.

The 5,000 digits (16x16) are split per class into 4,000 for training and 1,000 held out (the last
100 of each class after a fixed shuffle). Prints the held-out accuracy and the FD-MNIST of a few
reference cases (real halves = noise floor, Gaussian noise, blurred digits).

    python benchmarks/train_mnist_classifier.py [--steps 3000] [--out PATH]
"""

import json
import time

import click
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cmt import metrics
from cmt.datasets import load_mnist


def split_digits(labels, held_out_per_class=100, seed=0):
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    held_out = torch.cat([order[labels[order] == digit][-held_out_per_class:] for digit in range(10)])
    train = order[~torch.isin(order, held_out)]
    return train, held_out


def shift(images, generator, pixels=1):
    """Random translation by up to `pixels` in each direction (background fill)."""
    padded = F.pad(images, (pixels,) * 4, value=-1.0)
    size = images.shape[-1]
    dx, dy = torch.randint(0, 2 * pixels + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + size, dx:dx + size]


def train_mnist_classifier(steps=3000, batch_size=128, seed=0):
    """Returns `(classifier, held-out accuracy)`."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = load_mnist(metrics.MNIST_RESOLUTION)
    train, held_out = split_digits(labels)
    net = metrics.MnistClassifier()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    for _ in range(steps):
        batch = train[torch.randint(len(train), (batch_size,), generator=generator)]
        loss = F.cross_entropy(net(shift(images[batch], generator)), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(images[held_out]).argmax(dim=1) == labels[held_out]).float().mean().item()
    return net, accuracy


def blur(images, sigma):
    radius = int(3 * sigma)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1) / sigma) ** 2)
    taps = taps / taps.sum()
    padded = F.pad(images, (radius,) * 4, mode="replicate")
    rows = F.conv2d(padded, taps.view(1, 1, 1, -1))
    return F.conv2d(rows, taps.view(1, 1, -1, 1))


def reference_cases():
    """FD-MNIST of the cases the README quotes."""
    images, labels = load_mnist(metrics.MNIST_RESOLUTION)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))
    half_a, half_b = images[order[:2500]], images[order[2500:]]
    noise = torch.randn(5000, 1, 16, 16, generator=torch.Generator().manual_seed(2)).clamp(-1, 1)
    one_class = images[labels == 3]
    return {
        "real half vs other half (2500/2500)": metrics.frechet_distance(
            *metrics.feature_statistics(metrics.mnist_features(half_a)),
            *metrics.feature_statistics(metrics.mnist_features(half_b)),
        ),
        "real half (2500) vs all 5k": metrics.mnist_fd(half_a),
        "real digits, 1000 random": metrics.mnist_fd(images[order[:1000]]),
        "digits shifted by 1 px": metrics.mnist_fd(torch.roll(images, 1, dims=3)),
        "blurred digits (sigma 0.5 px)": metrics.mnist_fd(blur(images, 0.5)),
        "blurred digits (sigma 1 px)": metrics.mnist_fd(blur(images, 1.0)),
        "only the digit 3 (500)": metrics.mnist_fd(one_class),
        "Gaussian noise, clamped": metrics.mnist_fd(noise),
    }


@click.command()
@click.option("--steps", default=3000, show_default=True, help="Optimizer steps.")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=str(metrics.MNIST_CLASSIFIER), show_default=True)
def main(steps, seed, out):
    start = time.time()
    net, accuracy = train_mnist_classifier(steps=steps, seed=seed)
    state = {name: tensor.contiguous() for name, tensor in net.state_dict().items()}
    save_file(state, out, metadata={"heldout_accuracy": f"{accuracy:.4f}", "steps": str(steps), "seed": str(seed)})
    print(f"held-out accuracy {accuracy:.4f} (1000 digits), trained in {time.time() - start:.0f} s -> {out}")
    metrics.mnist_classifier.cache_clear()
    metrics.mnist_reference_statistics.cache_clear()
    if out == str(metrics.MNIST_CLASSIFIER):
        print(json.dumps(reference_cases(), indent=2))


if __name__ == "__main__":
    main()
