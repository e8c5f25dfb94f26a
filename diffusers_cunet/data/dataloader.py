"""A PyTorch data loader over a 🤗 Datasets image dataset."""

import logging
from typing import Optional

import datasets
import torch
from torch.utils.data import DataLoader

from .loading import detect_image_column, detect_label_column
from .transforms import ImagePreprocessor, build_transforms


logger = logging.getLogger(__name__)


def make_dataloader(
    dataset: datasets.Dataset,
    resolution: int,
    channels: int,
    batch_size: int,
    image_column: Optional[str] = None,
    label_column: Optional[str] = None,
    with_labels: bool = False,
    center_crop: bool = False,
    random_flip: bool = False,
    pad_small: bool = True,
    alpha_background: int = 0,
    shuffle: bool = True,
    num_workers: int = 0,
    drop_last: bool = False,
    generator: Optional[torch.Generator] = None,
) -> DataLoader:
    """
    Build a PyTorch `DataLoader` that yields `{"input": (B, C, H, W) tensor, "class_labels": (B,) tensor}`.

    Args:
        dataset (`datasets.Dataset`):
            The training images, for example from [`load_training_dataset`].
        resolution (`int`):
            Side length of the square training images.
        channels (`int`):
            The model's `in_channels`, 1 or 3.
        batch_size (`int`):
            Images per batch.
        image_column (`str`, *optional*):
            The image column; found with [`detect_image_column`] when not given.
        label_column (`str`, *optional*):
            The label column; found with [`detect_label_column`] when not given. Only used with `with_labels`.
        with_labels (`bool`, *optional*, defaults to `False`):
            Add `class_labels` to each batch, for class-conditional models.
        center_crop, random_flip, pad_small, alpha_background:
            Passed to [`build_transforms`].
        shuffle (`bool`, *optional*, defaults to `True`):
            Reshuffle the rows every epoch.
        num_workers (`int`, *optional*, defaults to 0):
            Worker processes that decode and transform images; 0 works in the main process.
        drop_last (`bool`, *optional*, defaults to `False`):
            Drop the last incomplete batch.
        generator (`torch.Generator`, *optional*):
            Seeds the shuffling. Random crops and flips draw from torch's global generator, which
            `accelerate.utils.set_seed` or `torch.manual_seed` seeds.

    Returns:
        `torch.utils.data.DataLoader`: Batches of `"input"` (float32 in [-1, 1]) and, with `with_labels`,
        `"class_labels"` (int64).

    Raises:
        `ValueError`: If `label_column` is given without `with_labels`, or `with_labels` is set and the dataset has
            no label column.
    """
    if label_column is not None and not with_labels:
        raise ValueError(
            f"label_column={label_column!r} was given but with_labels is False, so labels would be ignored. Pass "
            "with_labels=True for class-conditional training, or drop label_column."
        )

    image_column = detect_image_column(dataset, image_column)
    if with_labels:
        label_column = detect_label_column(dataset, label_column)
        if label_column is None:
            raise ValueError(
                f"with_labels=True, but the dataset has no integer label column (columns: {dataset.column_names}). "
                "Name it with label_column, or train without class labels."
            )

    transform = build_transforms(
        resolution,
        channels,
        center_crop=center_crop,
        random_flip=random_flip,
        pad_small=pad_small,
        alpha_background=alpha_background,
    )
    preprocess = ImagePreprocessor(transform, image_column, label_column if with_labels else None)
    logger.info(
        "Data loader: %d images from column %r, labels %s, %s", len(dataset), image_column, label_column, transform
    )
    return DataLoader(
        dataset.with_transform(preprocess),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
    )
