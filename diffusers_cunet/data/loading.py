"""Dataset loading: a Hub dataset, a local image folder, or the embedded MNIST subset."""

import logging
import os
from pathlib import Path
from typing import Optional, Union

import datasets
from PIL import Image

from .embedded import load_embedded_mnist
from .transforms import GRAYSCALE_MODES


class ImageReadError(RuntimeError, ValueError):
    """A training image that cannot be decoded. The message names the file and the fix.

    It is a `ValueError` too, so callers that report bad input as one line (the training script) catch it.
    """


logger = logging.getLogger(__name__)

AnyDataset = Union[datasets.Dataset, datasets.IterableDataset]

# Column names tried, in order, when no column has the matching feature type.
IMAGE_COLUMN_NAMES = ("image", "img", "images", "pixel_values")
LABEL_COLUMN_NAMES = ("label", "labels", "class", "class_label", "target")



def load_training_dataset(
    dataset_name: Optional[str] = None,
    dataset_config_name: Optional[str] = None,
    train_data_dir: Optional[Union[str, os.PathLike]] = None,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    split: str = "train",
) -> datasets.Dataset:
    """
    Load the training images from the Hub, from a local image folder, or from the embedded MNIST subset.

    Args:
        dataset_name (`str`, *optional*):
            A dataset id on the Hugging Face Hub (for example `"nielsr/CelebA-faces"`) or a local dataset directory,
            loaded with `datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)`.
        dataset_config_name (`str`, *optional*):
            The dataset configuration, for datasets that have several. Only used with `dataset_name`.
        train_data_dir (`str` or `os.PathLike`, *optional*):
            A folder of image files, loaded with the `imagefolder` builder. Subfolder names become the `label`
            column (`datasets.ClassLabel`) when images sit in one subfolder per class.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Where 🤗 Datasets stores downloaded and prepared files. Defaults to the 🤗 Datasets cache.
        split (`str`, *optional*, defaults to `"train"`):
            The split to return. The embedded MNIST subset has only `"train"`.

    Returns:
        `datasets.Dataset`: The requested split. With neither `dataset_name` nor `train_data_dir`, the 5,000
        embedded MNIST digits (see [`load_embedded_mnist`]).

    Raises:
        `ValueError`: If both `dataset_name` and `train_data_dir` are given, if `train_data_dir` contains no image
            files, or if a split other than `"train"` is requested from the embedded subset.
        `FileNotFoundError`: If `train_data_dir` does not exist.
        `NotADirectoryError`: If `train_data_dir` is a file.
    """
    if dataset_name is not None and train_data_dir is not None:
        raise ValueError(
            f"Both dataset_name={dataset_name!r} and train_data_dir={str(train_data_dir)!r} were given. Pass "
            "dataset_name for a Hub dataset or train_data_dir for a local image folder, not both."
        )
    if dataset_config_name is not None and dataset_name is None:
        raise ValueError(
            f"dataset_config_name={dataset_config_name!r} was given without dataset_name. A configuration only "
            "applies to a Hub dataset; pass dataset_name as well or drop dataset_config_name."
        )
    cache_dir = None if cache_dir is None else os.fspath(cache_dir)

    if dataset_name is not None:
        logger.info("Loading dataset %r (config %r, split %r)", dataset_name, dataset_config_name, split)
        return datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)

    if train_data_dir is not None:
        data_dir = _check_image_folder(train_data_dir)
        logger.info("Loading image folder %s (split %r)", data_dir, split)
        return datasets.load_dataset("imagefolder", data_dir=os.fspath(data_dir), cache_dir=cache_dir, split=split)

    if split != "train":
        raise ValueError(
            f"The embedded MNIST subset has only the 'train' split, but split={split!r} was requested. Pass "
            "split='train', or give dataset_name or train_data_dir for a dataset with other splits."
        )
    logger.info("No dataset given; using the embedded MNIST subset (5,000 digits)")
    return load_embedded_mnist()


def _check_image_folder(train_data_dir: Union[str, os.PathLike]) -> Path:
    """Check that `train_data_dir` is a folder with at least one image file below it, and return it as a `Path`."""
    data_dir = Path(train_data_dir).expanduser()
    if not data_dir.exists():
        raise FileNotFoundError(
            f"train_data_dir={str(train_data_dir)!r} does not exist. Pass an existing folder of images."
        )
    if not data_dir.is_dir():
        raise NotADirectoryError(
            f"train_data_dir={str(train_data_dir)!r} is a file, not a folder. Pass the folder that contains the images."
        )

    image_extensions = {extension.lower() for extension in Image.registered_extensions()}
    for path in data_dir.rglob("*"):
        if path.is_file() and path.suffix.lower() in image_extensions:
            return data_dir

    raise ValueError(
        f"train_data_dir={str(train_data_dir)!r} contains no image files (searched recursively for extensions that "
        "Pillow opens, such as .png and .jpg). Put the training images in this folder or one subfolder per class."
    )


def detect_image_column(dataset: AnyDataset, image_column: Optional[str] = None) -> str:
    """
    Find the column that contains the images.

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`):
            The dataset to inspect.
        image_column (`str`, *optional*):
            A column name chosen by the user. It is checked to exist and returned.

    Returns:
        `str`: The one column of feature type `datasets.Image`. When several columns have that type, the one named
        `image` or `img`. When none has it (for example a streamed dataset without features), the first column
        named `image`, `img`, `images` or `pixel_values`.

    Raises:
        `ValueError`: If `image_column` is not a column, if no image column is found, or if several image columns
            exist and none has a standard name.
    """
    column_names = _column_names(dataset, explicit_column=image_column)
    if image_column is not None:
        if image_column not in column_names:
            raise ValueError(
                f"image_column={image_column!r} is not a column of the dataset. Available columns: {column_names}."
            )
        return image_column

    features = dataset.features or {}
    image_typed = [name for name in column_names if isinstance(features.get(name), datasets.Image)]
    if len(image_typed) == 1:
        return image_typed[0]
    if len(image_typed) > 1:
        for name in IMAGE_COLUMN_NAMES:
            if name in image_typed:
                return name
        raise ValueError(
            f"The dataset has several image columns {image_typed}. Choose one with image_column "
            "(--image_column in the training script)."
        )

    for name in IMAGE_COLUMN_NAMES:
        if name in column_names:
            return name
    raise ValueError(
        f"No image column found: no column has the datasets.Image feature type or one of the names "
        f"{list(IMAGE_COLUMN_NAMES)}. Available columns: {column_names}. Choose one with image_column "
        "(--image_column in the training script)."
    )


def detect_label_column(dataset: AnyDataset, label_column: Optional[str] = None) -> Optional[str]:
    """
    Find the column that contains integer class labels, if the dataset has one.

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`):
            The dataset to inspect.
        label_column (`str`, *optional*):
            A column name chosen by the user. It is checked to exist and to contain integer labels.

    Returns:
        `str` or `None`: The one column of feature type `datasets.ClassLabel`, or the one named `label` or `labels`
        when several have that type. Without a `ClassLabel` column, an integer column named `label`, `labels`,
        `class`, `class_label` or `target`. `None` when there is none, so only unconditional training is possible.

    Raises:
        `ValueError`: If `label_column` is not a column or does not contain integers, or if several `ClassLabel`
            columns exist and none has a standard name.
    """
    column_names = _column_names(dataset, explicit_column=label_column)
    features = dataset.features or {}

    if label_column is not None:
        if label_column not in column_names:
            raise ValueError(
                f"label_column={label_column!r} is not a column of the dataset. Available columns: {column_names}."
            )
        feature = features.get(label_column)
        if feature is not None and not _is_integer_label(feature):
            raise ValueError(
                f"label_column={label_column!r} has feature type {feature}, but class labels must be integers. "
                f"Encode the column first, for example with dataset.class_encode_column({label_column!r})."
            )
        return label_column

    class_label_typed = [name for name in column_names if isinstance(features.get(name), datasets.ClassLabel)]
    if len(class_label_typed) == 1:
        return class_label_typed[0]
    if len(class_label_typed) > 1:
        for name in LABEL_COLUMN_NAMES:
            if name in class_label_typed:
                return name
        raise ValueError(
            f"The dataset has several class label columns {class_label_typed}. Choose one with label_column "
            "(--label_column in the training script)."
        )

    for name in LABEL_COLUMN_NAMES:
        if name in column_names and (name not in features or _is_integer_label(features[name])):
            return name
    return None


def get_num_classes(dataset: datasets.Dataset, label_column: str) -> int:
    """
    Count the classes of a label column, for a model's `num_class_embeds`.

    Args:
        dataset (`datasets.Dataset`):
            The dataset that contains `label_column`.
        label_column (`str`):
            A column found by [`detect_label_column`].

    Returns:
        `int`: `num_classes` of a `ClassLabel` column, otherwise the largest label plus one.

    Raises:
        `ValueError`: If the column contains negative labels (a `ClassLabel` column uses -1 for missing labels).
    """
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes

    labels = dataset.unique(label_column)
    if min(labels) < 0:
        raise ValueError(
            f"label_column={label_column!r} contains the negative label {min(labels)}. Class labels must be "
            "0, 1, 2, ...; remove or relabel those rows."
        )
    return int(max(labels)) + 1


def infer_num_channels(dataset: datasets.Dataset, image_column: str, num_samples: int = 16) -> int:
    """
    Guess the channel count a model needs from the modes of the first images.

    Args:
        dataset (`datasets.Dataset`):
            The dataset to inspect.
        image_column (`str`):
            The column that contains PIL images.
        num_samples (`int`, *optional*, defaults to 16):
            How many images from the start of the dataset to inspect.

    Returns:
        `int`: 1 when every inspected image has a grayscale mode (`"1"`, `"L"`, `"LA"`, 16-bit `"I;16"` and
        similar), else 3.
    """
    for index in range(min(num_samples, len(dataset))):
        try:
            image = dataset[index][image_column]
        except (OSError, SyntaxError, ValueError) as error:
            # `datasets` decodes lazily, so a corrupt file fails on first access. The error names the file.
            raise ImageReadError(
                f"Failed to read training image {describe_image_source(dataset, image_column, index)!r} (dataset "
                f"index {index}): {error}. Remove or re-encode the file."
            ) from error
        if getattr(image, "mode", None) not in GRAYSCALE_MODES:
            return 3
    return 1


def describe_image_source(dataset: datasets.Dataset, image_column: str, index: int) -> str:
    """Return the file path of row `index`'s image without decoding it, or `row N` when there is none."""
    try:
        undecoded = dataset.cast_column(image_column, datasets.Image(decode=False))
        path = undecoded[int(index)][image_column].get("path")
    except (TypeError, ValueError, KeyError, AttributeError):
        path = None
    return path or f"row {index}"


def _column_names(dataset: AnyDataset, explicit_column: Optional[str]) -> list[str]:
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise TypeError(
            f"Expected a single split, got a {type(dataset).__name__} with splits {list(dataset.keys())}. "
            "Select one split first, for example dataset['train']."
        )
    column_names = dataset.column_names
    if column_names is None and explicit_column is not None:
        # A streamed dataset without features cannot be checked, so the user's column name is trusted.
        return [explicit_column]
    if column_names is None:
        raise ValueError(
            "The dataset does not report its column names (a streamed dataset without features). Pass the column "
            "name explicitly, or load it without streaming."
        )
    return list(column_names)


def _is_integer_label(feature: object) -> bool:
    if isinstance(feature, datasets.ClassLabel):
        return True
    return isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
