#!/usr/bin/env python
"""Train the digit classifier that judges generated MNIST samples.

The classifier trains on 4,000 of the 5,000 embedded MNIST digits and is evaluated on the other 1,000 (100 per
class, `split_embedded_mnist()` with seed 0). The diffusion model trains on all 5,000, so only this held-out split
measures the classifier fairly.

Besides the digits 0-9 it learns an 11th class, "not a digit", from synthetic images made on the fly: Gaussian
and uniform noise, sparse speckle, smooth blobs, tangled scribbles, two different digits overlaid, and flat gray
images. Without it a CNN gives confident digit labels to noise, so `judge_digits` would count garbage samples as
digits. `--num_classes 10` trains without it, for comparison.

Usage (about 130 s of CPU time with `--num_threads 1`, see DIGIT_CLASSIFIER.md):

    python examples/train_digit_classifier.py
    python examples/train_digit_classifier.py --output /tmp/classifier.safetensors --report /tmp/report.json
"""

import argparse
import datetime
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from diffusers_cunet.data import load_embedded_mnist_arrays
from diffusers_cunet.evaluation.digit_classifier import (
    DIGIT_CLASSIFIER_WEIGHTS_PATH,
    NUM_DIGITS,
    REJECT_CLASS,
    DigitClassifier,
    judge_digits,
    save_digit_classifier,
    split_embedded_mnist,
)


logger = logging.getLogger("train_digit_classifier")

IMAGE_SIZE = 28
NUM_EVAL_IMAGES = 1000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the MNIST digit classifier used to judge generated samples.")
    parser.add_argument(
        "--output",
        type=Path,
        default=DIGIT_CLASSIFIER_WEIGHTS_PATH,
        help="Where to write the safetensors weights (default: the file shipped in the package).",
    )
    parser.add_argument("--report", type=Path, default=None, help="Optional JSON file for the measured figures.")
    parser.add_argument("--epochs", type=int, default=15, help="Passes over the 4,000 training digits.")
    parser.add_argument("--batch_size", type=int, default=128, help="Digits per batch, before adding non-digits.")
    parser.add_argument(
        "--reject_fraction",
        type=float,
        default=0.15,
        help="Non-digit images added to each batch, as a fraction of --batch_size.",
    )
    parser.add_argument(
        "--augment_probability",
        type=float,
        default=0.5,
        help="Share of digits and non-digits that get the random affine and stroke-width changes; the rest stay sharp.",
    )
    parser.add_argument(
        "--augment_strength",
        type=float,
        default=0.6,
        help="Scale of the random affine: 1 means up to 15 degrees rotation, 15%% scaling, 0.2 shear, 3 pixels shift.",
    )
    parser.add_argument("--learning_rate", type=float, default=3e-3, help="Peak learning rate of the one-cycle schedule.")
    parser.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay.")
    parser.add_argument(
        "--num_classes",
        type=int,
        choices=(NUM_DIGITS, NUM_DIGITS + 1),
        default=NUM_DIGITS + 1,
        help="11 for the digits and a 'not a digit' class, 10 for the digits only.",
    )
    parser.add_argument(
        "--block_out_channels",
        type=int,
        nargs=3,
        default=(32, 64, 128),
        help="Channels of the classifier's three convolution stages.",
    )
    parser.add_argument(
        "--non_digit_kinds",
        default=",".join(NON_DIGIT_MAKERS),
        help=f"Comma-separated kinds of non-digit images for the reject class, from {', '.join(NON_DIGIT_MAKERS)}.",
    )
    parser.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice). On a busy machine 1 thread is often faster for this small model.",
    )
    parser.add_argument("--num_held_out", type=int, default=1000, help="Held-out digits, 1/10 from each class.")
    parser.add_argument("--split_seed", type=int, default=0, help="Seed of the train/held-out split.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for initialisation, batches and augmentation.")
    args = parser.parse_args()

    if args.epochs < 1 or args.batch_size < 1:
        parser.error(f"--epochs ({args.epochs}) and --batch_size ({args.batch_size}) must be at least 1.")
    if not 0.0 <= args.augment_probability <= 1.0:
        parser.error(f"--augment_probability={args.augment_probability} must lie in [0, 1].")
    if not 0.0 <= args.reject_fraction <= 1.0:
        parser.error(f"--reject_fraction={args.reject_fraction} must lie in [0, 1].")
    args.non_digit_kinds = [kind.strip() for kind in args.non_digit_kinds.split(",") if kind.strip()]
    unknown = sorted(set(args.non_digit_kinds) - set(NON_DIGIT_MAKERS))
    if unknown:
        parser.error(f"Unknown --non_digit_kinds {unknown}; choose from {', '.join(NON_DIGIT_MAKERS)}.")
    if args.num_classes > NUM_DIGITS and not args.non_digit_kinds:
        parser.error("--num_classes 11 needs at least one --non_digit_kinds entry to train the reject class.")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Augmentation of real digits. All images are (N, 1, 28, 28) in [-1, 1] with a black (-1) background.
# ----------------------------------------------------------------------------------------------------------------


def random_affine(images: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Apply a different small rotation, scaling, shear and shift to each image.

    At `strength` 1: rotation up to 15 degrees, scaling by 0.85-1.15, shear up to 0.2 and shifts up to 3 pixels.
    """
    n = images.shape[0]

    def uniform(half_width: float) -> torch.Tensor:
        return (2.0 * torch.rand(n, generator=generator) - 1.0) * half_width * strength

    angle = uniform(15.0) * math.pi / 180.0
    scale = 1.0 + uniform(0.15)
    shear = uniform(0.2)
    # affine_grid works in coordinates where the image spans [-1, 1], so a pixel is 2 / 28 wide.
    shift_x, shift_y = uniform(3.0) * 2.0 / IMAGE_SIZE, uniform(3.0) * 2.0 / IMAGE_SIZE

    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos, -sin + shear * cos, shift_x], dim=1),
            torch.stack([sin, cos + shear * sin, shift_y], dim=1),
        ],
        dim=1,
    )  # (n, 2, 3), maps output coordinates to input coordinates
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # Sample in [0, 1] so that zero padding outside the image is the black background.
    warped = F.grid_sample((images + 1.0) / 2.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped * 2.0 - 1.0


def augment(images: torch.Tensor, probability: float, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Warp and re-stroke a random share of the images.

    Bilinear warping softens every image slightly. When every training image was warped, the sharp, unwarped
    held-out digits looked unlike any training digit, and the model sent 9% of them to the reject class.
    """
    chosen = torch.rand(images.shape[0], generator=generator) < probability
    output = images.clone()
    if chosen.any():
        output[chosen] = random_stroke_width(random_affine(images[chosen], generator, strength), generator)
    return output


def random_stroke_width(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Thicken a quarter of the digits and thin another quarter, as generated digits vary in stroke width."""
    choice = torch.rand(images.shape[0], generator=generator)
    thick = F.max_pool2d(images, kernel_size=3, stride=1, padding=1)
    # A 2x2 grayscale erosion, which keeps the anti-aliased edge softer than a binary one would.
    thin = -F.max_pool2d(-images, kernel_size=2, stride=1, padding=0)
    thin = F.pad(thin, (0, 1, 0, 1), value=-1.0)
    output = images.clone()
    output[choice < 0.25] = thick[choice < 0.25]
    output[(choice >= 0.25) & (choice < 0.5)] = thin[(choice >= 0.25) & (choice < 0.5)]
    return output


# ----------------------------------------------------------------------------------------------------------------
# Non-digit images for the reject class.
# ----------------------------------------------------------------------------------------------------------------


def make_gaussian_noise(n: int, generator: torch.Generator) -> torch.Tensor:
    mean = -1.0 + 1.5 * torch.rand(n, 1, 1, 1, generator=generator)
    std = 0.1 + 1.1 * torch.rand(n, 1, 1, 1, generator=generator)
    noise = torch.randn(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return (mean + std * noise).clamp(-1.0, 1.0)


def make_uniform_noise(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2.0 - 1.0


def make_speckle(n: int, generator: torch.Generator) -> torch.Tensor:
    density = 0.02 + 0.2 * torch.rand(n, 1, 1, 1, generator=generator)
    on = torch.rand(n, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator) < density
    return torch.where(on, 1.0, -1.0)


def make_smooth_blobs(n: int, generator: torch.Generator) -> torch.Tensor:
    """Low-resolution noise upsampled and squashed: soft shapes with the scale of a digit's strokes or larger."""
    blobs = []
    for _ in range(n):
        size = int(torch.randint(3, 9, (1,), generator=generator))
        coarse = torch.randn(1, 1, size, size, generator=generator)
        smooth = F.interpolate(coarse, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=False)
        gain = 1.0 + 4.0 * torch.rand(1, generator=generator)
        offset = torch.rand(1, generator=generator) * 1.5
        blobs.append(torch.tanh(gain * (smooth - offset)))
    return torch.cat(blobs)


def make_scribbles(n: int, generator: torch.Generator) -> torch.Tensor:
    """Long random polylines across the canvas, too tangled to read as one digit."""
    scribbles = []
    for _ in range(n):
        canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
        draw = ImageDraw.Draw(canvas)
        num_points = int(torch.randint(7, 14, (1,), generator=generator))
        points = (torch.rand(num_points, 2, generator=generator) * (IMAGE_SIZE - 6) + 3).tolist()
        width = int(torch.randint(1, 4, (1,), generator=generator))
        draw.line([tuple(point) for point in points], fill=255, width=width, joint="curve")
        scribbles.append(torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 127.5 - 1.0))
    return torch.stack(scribbles)[:, None]


def make_overlays(n: int, digits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Two digits of different classes drawn on top of each other (pixel-wise maximum).

    Pairs where one digit hides most of the other would teach the model to reject real digits, because a 1 inside
    a 4 still reads as a 4. Only pairs whose union has at least 40% more ink than the larger digit are kept.
    """
    first = torch.randint(0, len(digits), (n,), generator=generator)
    second = torch.randint(0, len(digits), (n,), generator=generator)
    overlays = torch.maximum(digits[first], digits[second])

    def ink(images: torch.Tensor) -> torch.Tensor:
        return (images > 0).flatten(1).sum(dim=1).float()

    different_class = labels[first] != labels[second]
    both_visible = ink(overlays) >= 1.4 * torch.maximum(ink(digits[first]), ink(digits[second]))
    return overlays[different_class & both_visible]


def make_flat(n: int, generator: torch.Generator) -> torch.Tensor:
    level = torch.rand(n, 1, 1, 1, generator=generator) * 2.0 - 1.0
    return level.expand(n, 1, IMAGE_SIZE, IMAGE_SIZE).clone()


NON_DIGIT_MAKERS = {
    "noise": make_gaussian_noise,
    "uniform": make_uniform_noise,
    "speckle": make_speckle,
    "blobs": make_smooth_blobs,
    "scribbles": make_scribbles,
    "overlays": make_overlays,
    "flat": make_flat,
}


def make_non_digits(
    n: int, kinds: list[str], digits: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Draw about `n` non-digit images, equally many of each kind in `kinds`."""
    share = math.ceil(n / len(kinds))
    parts = []
    for kind in kinds:
        if kind == "overlays":
            # About half of the random pairs pass the visibility filter, so draw twice as many.
            parts.append(make_overlays(2 * share, digits, labels, generator))
        else:
            parts.append(NON_DIGIT_MAKERS[kind](share, generator))
    images = torch.cat(parts)
    return images[torch.randperm(len(images), generator=generator)[:n]]


# ----------------------------------------------------------------------------------------------------------------
# Training and evaluation.
# ----------------------------------------------------------------------------------------------------------------


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) to float32 (N, 1, 28, 28) in [-1, 1]."""
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]


def train(
    args: argparse.Namespace,
    digits: torch.Tensor,
    labels: torch.Tensor,
) -> DigitClassifier:
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    classifier = DigitClassifier(num_classes=args.num_classes, block_out_channels=tuple(args.block_out_channels))
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(digits) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.learning_rate, total_steps=args.epochs * steps_per_epoch
    )
    num_non_digits = round(args.reject_fraction * args.batch_size) if args.num_classes > NUM_DIGITS else 0

    classifier.train()
    progress = tqdm(range(args.epochs * steps_per_epoch), desc="Training", unit="step")
    for epoch in range(args.epochs):
        order = torch.randperm(len(digits), generator=generator)
        total_loss, total_correct, total_seen = 0.0, 0, 0
        for start in range(0, len(digits), args.batch_size):
            batch_indices = order[start : start + args.batch_size]
            images = augment(digits[batch_indices], args.augment_probability, args.augment_strength, generator)
            targets = labels[batch_indices]
            if num_non_digits:
                non_digits = make_non_digits(num_non_digits, args.non_digit_kinds, digits, labels, generator)
                non_digits = augment(non_digits, args.augment_probability, args.augment_strength, generator)
                images = torch.cat([images, non_digits])
                targets = torch.cat([targets, torch.full((len(non_digits),), REJECT_CLASS, dtype=torch.long)])

            logits = classifier(images)
            loss = F.cross_entropy(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()

            total_loss += loss.item() * len(targets)
            total_correct += (logits.argmax(dim=-1) == targets).sum().item()
            total_seen += len(targets)
            progress.update(1)
            progress.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
        logger.info(
            "Epoch %d/%d: loss %.4f, training accuracy %.4f (augmented)",
            epoch + 1,
            args.epochs,
            total_loss / total_seen,
            total_correct / total_seen,
        )
    progress.close()
    return classifier.eval()


def make_blurred_noise(n: int, generator: torch.Generator) -> torch.Tensor:
    """White noise blurred with a Gaussian (sigma 1.5-4 px) and stretched to [-1, 1]: soft blobs of many sizes.

    This recipe differs from the blob generator used in training, so it checks that rejection generalises.
    """
    blobs = []
    for _ in range(n):
        sigma = 1.5 + 2.5 * torch.rand(1, generator=generator).item()
        radius = int(math.ceil(3 * sigma))
        coordinates = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(coordinates**2) / (2 * sigma**2))
        kernel = kernel / kernel.sum()
        noise = torch.randn(1, 1, IMAGE_SIZE + 2 * radius, IMAGE_SIZE + 2 * radius, generator=generator)
        blurred = F.conv2d(F.conv2d(noise, kernel.view(1, 1, 1, -1)), kernel.view(1, 1, -1, 1))
        low, high = blurred.min(), blurred.max()
        blobs.append((blurred - low) / (high - low) * 2.0 - 1.0)
    return torch.cat(blobs)


def load_sklearn_digits() -> tuple[torch.Tensor, torch.Tensor] | None:
    """scikit-learn's 8x8 digits (UCI optdigits, 1,797 images), scaled to a 20x20 box in a 28x28 frame like MNIST.

    These are a different distribution (16 gray levels, 8x8 source), so their accuracy is only a rough check of
    robustness, not a second held-out set of the same kind.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        logger.info("scikit-learn is not installed, so the optdigits check is skipped")
        return None

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=(20, 20), mode="bilinear", align_corners=False)
    images = F.pad(images, (4, 4, 4, 4)) * 2.0 - 1.0
    return images, torch.from_numpy(bunch.target).long()


@torch.no_grad()
def evaluate(
    classifier: DigitClassifier,
    held_out_digits: torch.Tensor,
    held_out_labels: torch.Tensor,
) -> dict:
    generator = torch.Generator().manual_seed(12345)  # differs from every training seed
    logits = classifier(held_out_digits)
    digit_logits = logits[:, :NUM_DIGITS]
    held_out = judge_digits(held_out_digits, classifier=classifier)
    results = {
        "held_out_accuracy": (logits.argmax(dim=-1) == held_out_labels).float().mean().item(),
        "held_out_accuracy_digits_only": (digit_logits.argmax(dim=-1) == held_out_labels).float().mean().item(),
        "held_out_confident_share": held_out["confident_share"],
        "held_out_reject_share": held_out["reject_share"],
        "held_out_padded_32_accuracy": (
            classifier(F.pad(held_out_digits, (2, 2, 2, 2), value=-1.0)).argmax(dim=-1) == held_out_labels
        )
        .float()
        .mean()
        .item(),
    }

    garbage = {
        "standard_gaussian_noise": torch.randn(NUM_EVAL_IMAGES, 1, IMAGE_SIZE, IMAGE_SIZE, generator=generator).clamp(
            -1.0, 1.0
        ),
        "blurred_noise_blobs": make_blurred_noise(NUM_EVAL_IMAGES, generator),
        "varied_gaussian_noise": make_gaussian_noise(NUM_EVAL_IMAGES, generator),
        "smooth_blobs": make_smooth_blobs(NUM_EVAL_IMAGES, generator),
        "scribbles": make_scribbles(NUM_EVAL_IMAGES, generator),
        "overlaid_held_out_digits": make_overlays(NUM_EVAL_IMAGES, held_out_digits, held_out_labels, generator),
    }
    for name, images in garbage.items():
        results[f"{name}_confident_share"] = judge_digits(images, classifier=classifier)["confident_share"]

    sklearn_digits = load_sklearn_digits()
    if sklearn_digits is not None:
        images, labels = sklearn_digits
        judged = judge_digits(images, classifier=classifier)
        results["optdigits_accuracy"] = (judged["predictions"] == labels).float().mean().item()
        results["optdigits_confident_share"] = judged["confident_share"]

    return results


def describe_machine() -> str:
    """CPU model, core count, torch threads and torch version, for the record of a measurement."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass  # not Linux, or no model name: keep the platform's description
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def main() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args()
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    started, started_cpu = time.perf_counter(), time.process_time()

    images, labels = load_embedded_mnist_arrays()
    train_indices, held_out_indices = split_embedded_mnist(args.num_held_out, seed=args.split_seed)
    training_digits, training_labels = to_tensor(images[train_indices]), torch.from_numpy(labels[train_indices]).long()
    held_out_digits = to_tensor(images[held_out_indices])
    held_out_labels = torch.from_numpy(labels[held_out_indices]).long()
    logger.info(
        "Training on %d digits, holding out %d, with %d classes and %d torch threads",
        len(train_indices),
        len(held_out_indices),
        args.num_classes,
        torch.get_num_threads(),
    )

    classifier = train(args, training_digits, training_labels)
    training_seconds = time.perf_counter() - started
    # CPU time is less sensitive than wall time to other programs on a shared machine.
    training_cpu_seconds = time.process_time() - started_cpu

    results = evaluate(classifier, held_out_digits, held_out_labels)
    results = {name: round(value, 4) for name, value in results.items()}
    results.update(
        {
            "training_seconds": round(training_seconds, 1),
            "training_cpu_seconds": round(training_cpu_seconds, 1),
            "command": " ".join(["python", *sys.argv]),
            "date": datetime.date.today().isoformat(),
            "machine": describe_machine(),
            "num_training_digits": len(train_indices),
            "num_held_out_digits": len(held_out_indices),
            "split_seed": args.split_seed,
            "seed": args.seed,
        }
    )
    for name, value in results.items():
        logger.info("%s: %s", name, value)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_digit_classifier(classifier, args.output, metadata={name: str(value) for name, value in results.items()})
    logger.info("Wrote %s", args.output)
    if args.report is not None:
        args.report.write_text(json.dumps(results, indent=2) + "\n")
        logger.info("Wrote %s", args.report)


if __name__ == "__main__":
    main()
