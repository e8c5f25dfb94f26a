"""Seeded training data: same batches for the same (seed, epoch, index), with or without the item cache."""

from __future__ import annotations

import datasets
import numpy as np
import torch
from PIL import Image
from skimage import data as skimage_data

from diffusers_cunet.data import convert_image, load_training_dataset
from diffusers_cunet.training import EpochSeededSampler, SeededImageTransform, SeededTrainingDataset


def photo_dataset() -> datasets.Dataset:
    """Six non-square RGB crops of scikit-image photos, so random crops and flips have room to act."""
    photos = [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea()]
    images = [Image.fromarray(photo[top : top + 20, 30 : 30 + 28]) for photo in photos for top in (0, 40)]
    return datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))


def make_dataset(dataset, channels: int, random: bool, cache_bytes: int, label_column=None) -> SeededTrainingDataset:
    transform = SeededImageTransform(
        resolution=16, channels=channels, center_crop=not random, random_flip=random, pad_small=True, convert=convert_image
    )
    return SeededTrainingDataset(dataset, "image", transform, seed=3, label_column=label_column, cache_bytes=cache_bytes)


def items(dataset: SeededTrainingDataset, epoch: int) -> list[dict]:
    dataset.set_epoch(epoch)
    return [dataset[index] for index in range(len(dataset))]


def test_cached_items_equal_uncached_items():
    photos = photo_dataset()
    cached = make_dataset(photos, channels=3, random=True, cache_bytes=2**20)
    uncached = make_dataset(photos, channels=3, random=True, cache_bytes=0)

    for epoch in (0, 1, 0):
        for with_cache, without_cache in zip(items(cached, epoch), items(uncached, epoch)):
            assert torch.equal(with_cache["input"], without_cache["input"])
    assert len(cached._cache) == len(photos)
    assert uncached._cache is None


def test_epochs_draw_other_crops_and_flips():
    dataset = make_dataset(photo_dataset(), channels=3, random=True, cache_bytes=2**20)

    first = torch.stack([item["input"] for item in items(dataset, 0)])
    second = torch.stack([item["input"] for item in items(dataset, 1)])

    assert first.shape == (6, 3, 16, 16)
    assert not torch.equal(first, second)
    assert first.min() >= -1
    assert first.max() <= 1


def test_cache_keeps_labels_and_tensors():
    mnist = load_training_dataset().select(range(64))
    dataset = make_dataset(mnist, channels=1, random=True, cache_bytes=2**20, label_column="label")

    first = items(dataset, 0)
    snapshot = {index: prepared.clone() for index, (prepared, _) in dataset._cache.items()}
    items(dataset, 1)  # flips on the second epoch must not write into the cached tensors

    assert [item["class_labels"].item() for item in first] == [int(label) for label in mnist["label"]]
    for index, (prepared, _) in dataset._cache.items():
        assert torch.equal(prepared, snapshot[index])
    # The 28x28 digits are larger than 16x16, so they are resized by the shorter side.
    assert first[0]["input"].shape == (1, 16, 16)


def test_sampler_order_seed_and_epoch():
    sampler = EpochSeededSampler(50, seed=1)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)

    assert sorted(first) == list(range(50))
    assert first != second
    assert list(sampler) == first
    assert list(EpochSeededSampler(50, seed=2)) != first
    assert np.unique(second).size == 50
