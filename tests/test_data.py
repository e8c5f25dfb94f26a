"""Tests for diffusers_cunet.data: the embedded MNIST subset, dataset loading and image transforms."""

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data

from diffusers_cunet.data import (
    EMBEDDED_MNIST_PATH,
    ImagePreprocessor,
    build_transforms,
    convert_image,
    detect_image_column,
    detect_label_column,
    get_num_classes,
    infer_num_channels,
    load_embedded_mnist,
    load_embedded_mnist_arrays,
    load_training_dataset,
    make_dataloader,
)


CROP = 16
PHOTOS = {"astronaut": skimage_data.astronaut, "coffee": skimage_data.coffee, "chelsea": skimage_data.chelsea}
CROPS_PER_PHOTO = 4


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """Undo the [-1, 1] normalisation of a transform output."""
    return np.rint((tensor.numpy() + 1.0) * 127.5).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: an image folder of real photo crops in several PNG flavours.
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """One subfolder per photo with 16x16 RGB crops, and a `special` subfolder with one file of each hard kind."""
    root = tmp_path_factory.mktemp("image_folder")

    for name, load_photo in PHOTOS.items():
        photo = load_photo()
        (root / name).mkdir()
        for index in range(CROPS_PER_PHOTO):
            top, left = 100 + 20 * index, 150 + 10 * index
            crop = photo[top : top + CROP, left : left + CROP]
            Image.fromarray(crop).save(root / name / f"{name}_{index}.png")

    special = root / "special"
    special.mkdir()
    # RGBA: an astronaut crop with the horse silhouette as its alpha mask, and one half-transparent row.
    alpha = np.where(skimage_data.horse()[24 : 24 + CROP, 288 : 288 + CROP], 255, 0).astype(np.uint8)
    alpha[0] = 128
    rgba = np.dstack([skimage_data.astronaut()[:CROP, :CROP], alpha])
    Image.fromarray(rgba, mode="RGBA").save(special / "rgba.png")
    # Palette image with one transparent palette entry.
    palette = Image.fromarray(skimage_data.coffee()[:CROP, :CROP]).quantize(colors=8)
    palette.info["transparency"] = 0
    palette.save(special / "palette.png", transparency=0)
    # 16-bit grayscale: the camera photo scaled to the full 16-bit range.
    camera_16 = skimage_data.camera()[200 : 200 + CROP, 200 : 200 + CROP].astype(np.uint16) * 257
    Image.fromarray(camera_16).save(special / "gray16.png")
    # Non-square: 16 pixels high, 24 wide.
    Image.fromarray(skimage_data.chelsea()[50 : 50 + CROP, 50 : 50 + 24]).save(special / "wide.png")
    return root


# ----------------------------------------------------------------------------------------------------------------
# Embedded MNIST.
# ----------------------------------------------------------------------------------------------------------------


def test_embedded_arrays_shape_and_labels():
    images, labels = load_embedded_mnist_arrays()

    assert images.shape == (5000, 28, 28)
    assert images.dtype == np.uint8
    assert labels.shape == (5000,)
    assert labels.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [500] * 10
    assert images.min() == 0
    assert images.max() == 255


def test_embedded_arrays_are_white_on_black():
    images, _ = load_embedded_mnist_arrays()

    # MNIST digits are centred in a 20x20 box, so the outer 2-pixel frame is almost always background.
    frame = np.concatenate([images[:, :2].reshape(5000, -1), images[:, -2:].reshape(5000, -1)], axis=1)
    assert (frame == 0).mean() > 0.99
    assert images[:, 10:18, 10:18].mean() > images.mean()


def test_embedded_file_is_compact():
    assert EMBEDDED_MNIST_PATH.stat().st_size < 2_000_000


def test_load_embedded_mnist_features():
    dataset = load_embedded_mnist()

    assert len(dataset) == 5000
    assert isinstance(dataset.features["image"], datasets.Image)
    assert isinstance(dataset.features["label"], datasets.ClassLabel)
    assert dataset.features["label"].names == [str(digit) for digit in range(10)]
    row = dataset[0]
    assert row["image"].mode == "L"
    assert row["image"].size == (28, 28)


def test_load_embedded_mnist_pixels_match_arrays():
    dataset = load_embedded_mnist()
    images, labels = load_embedded_mnist_arrays()

    for index in (0, 1234, 4999):
        row = dataset[index]
        np.testing.assert_array_equal(np.asarray(row["image"]), images[index])
        assert row["label"] == labels[index]


def test_default_training_dataset_is_embedded():
    dataset = load_training_dataset()

    assert len(dataset) == 5000
    assert detect_image_column(dataset) == "image"
    assert detect_label_column(dataset) == "label"
    assert get_num_classes(dataset, "label") == 10
    assert infer_num_channels(dataset, "image") == 1


def test_embedded_mnist_padded_to_32():
    dataset = load_embedded_mnist()
    transform = build_transforms(32, channels=1, center_crop=True)
    original = np.asarray(dataset[7]["image"])

    tensor = transform(dataset[7]["image"])

    assert tensor.shape == (1, 32, 32)
    assert tensor.dtype == torch.float32
    # A 2-pixel black border, and the digit unchanged in the middle.
    assert torch.all(tensor[:, :2] == -1.0)
    assert torch.all(tensor[:, -2:] == -1.0)
    assert torch.all(tensor[:, :, :2] == -1.0)
    assert torch.all(tensor[:, :, -2:] == -1.0)
    np.testing.assert_array_equal(to_uint8(tensor[0, 2:30, 2:30]), original)


def test_embedded_mnist_upscaled_without_pad_small():
    dataset = load_embedded_mnist()
    transform = build_transforms(32, channels=1, center_crop=True, pad_small=False)

    tensor = transform(dataset[7]["image"])

    assert tensor.shape == (1, 32, 32)
    assert tensor.min() >= -1.0
    assert tensor.max() <= 1.0
    # Upscaling moves strokes outward, so the digit is no longer an exact copy in the middle.
    assert not np.array_equal(to_uint8(tensor[0, 2:30, 2:30]), np.asarray(dataset[7]["image"]))


def test_dataloader_on_embedded_mnist():
    dataset = load_training_dataset()
    loader = make_dataloader(dataset, resolution=32, channels=1, batch_size=16, with_labels=True)

    batch = next(iter(loader))

    assert batch["input"].shape == (16, 1, 32, 32)
    assert batch["input"].dtype == torch.float32
    assert batch["input"].min() >= -1.0
    assert batch["input"].max() <= 1.0
    assert batch["class_labels"].shape == (16,)
    assert batch["class_labels"].dtype == torch.int64
    assert batch["class_labels"].min() >= 0
    assert batch["class_labels"].max() <= 9


def test_dataloader_without_labels_has_no_class_labels():
    dataset = load_training_dataset()
    loader = make_dataloader(dataset, resolution=28, channels=1, batch_size=4)

    batch = next(iter(loader))

    assert set(batch) == {"input"}
    assert batch["input"].shape == (4, 1, 28, 28)


# ----------------------------------------------------------------------------------------------------------------
# Image folders of real photos.
# ----------------------------------------------------------------------------------------------------------------


def test_image_folder_loads_all_files(image_folder):
    dataset = load_training_dataset(train_data_dir=image_folder)

    assert len(dataset) == len(PHOTOS) * CROPS_PER_PHOTO + 4
    assert detect_image_column(dataset) == "image"
    assert detect_label_column(dataset) == "label"
    assert sorted(dataset.features["label"].names) == sorted([*PHOTOS, "special"])
    assert get_num_classes(dataset, "label") == 4
    assert infer_num_channels(dataset, "image", num_samples=len(dataset)) == 3


def test_channel_inference_names_a_corrupt_file(tmp_path):
    # A PNG cut inside its header fails when Pillow opens it, which `datasets` does on first access.
    Image.fromarray(skimage_data.astronaut()[:16, :16]).save(tmp_path / "b_good.png")
    (tmp_path / "a_cut.png").write_bytes((tmp_path / "b_good.png").read_bytes()[:20])
    dataset = load_training_dataset(train_data_dir=str(tmp_path))
    with pytest.raises(RuntimeError) as error:
        infer_num_channels(dataset, "image")
    assert "a_cut.png" in str(error.value)
    assert "Remove or re-encode the file" in str(error.value)


@pytest.mark.parametrize("channels", [1, 3])
def test_image_folder_transforms_every_mode(image_folder, channels):
    dataset = load_training_dataset(train_data_dir=image_folder)
    transform = build_transforms(CROP, channels=channels, center_crop=True)

    modes = set()
    for row in dataset:
        modes.add(row["image"].mode)
        tensor = transform(row["image"])
        assert tensor.shape == (channels, CROP, CROP)
        assert tensor.min() >= -1.0
        assert tensor.max() <= 1.0

    assert {"RGB", "RGBA", "P", "I;16"} <= modes


def test_image_folder_dataloader_with_labels(image_folder):
    dataset = load_training_dataset(train_data_dir=image_folder)
    loader = make_dataloader(dataset, resolution=8, channels=3, batch_size=len(dataset), with_labels=True)

    batch = next(iter(loader))

    assert batch["input"].shape == (len(dataset), 3, 8, 8)
    assert sorted(batch["class_labels"].unique().tolist()) == [0, 1, 2, 3]


def test_hub_path_loads_local_dataset_directory(tmp_path):
    # dataset_name goes through datasets.load_dataset, which also accepts a local directory of data files.
    source = load_embedded_mnist().select(range(20))
    data_dir = tmp_path / "parquet_dataset"
    data_dir.mkdir()
    source.to_parquet(str(data_dir / "train.parquet"))

    dataset = load_training_dataset(dataset_name=str(data_dir), cache_dir=tmp_path / "cache")

    assert len(dataset) == 20
    assert detect_image_column(dataset) == "image"
    assert np.array_equal(np.asarray(dataset[3]["image"]), np.asarray(source[3]["image"]))


# ----------------------------------------------------------------------------------------------------------------
# convert_image: one test per source mode.
# ----------------------------------------------------------------------------------------------------------------


def test_16_bit_png_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 19789, 32896], [40000, 65278, 65535, 128]], dtype=np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)

    with Image.open(path) as image:
        assert image.mode in ("I;16", "I")
        converted = convert_image(image, channels=1)

    # round(value / 257): 1000 -> 3.89 -> 4, 19789 = 77 * 257, 32896 = 128 * 257, 40000 -> 155.6 -> 156.
    expected = np.array([[0, 4, 77, 128], [156, 254, 255, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(converted), expected)


def test_16_bit_scaling_reaches_tensor():
    image = Image.fromarray(np.full((4, 4), 128 * 257, dtype=np.uint16))

    tensor = build_transforms(4, channels=1, center_crop=True)(image)

    torch.testing.assert_close(tensor, torch.full((1, 4, 4), 128 / 255 * 2 - 1))


def test_16_bit_big_endian_and_int_modes():
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    big_endian = Image.frombytes("I;16B", (3, 1), values.astype(">u2").tobytes())
    int32 = Image.fromarray(values.astype(np.int32))
    assert int32.mode == "I"

    for image in (big_endian, int32):
        np.testing.assert_array_equal(np.asarray(convert_image(image, 1)), [[0, 128, 255]])


def test_16_bit_pgm_opened_as_int_mode(tmp_path):
    # A PGM with maxval 1023 (10-bit data): Pillow opens it as mode "I", scaled to 0-65535.
    path = tmp_path / "gray10.pgm"
    path.write_bytes(b"P5\n3 1\n1023\n" + np.array([0, 512, 1023], dtype=">u2").tobytes())

    with Image.open(path) as image:
        assert image.mode == "I"
        converted = np.asarray(convert_image(image, 1))

    np.testing.assert_array_equal(converted, [[0, 128, 255]])


def test_int_mode_out_of_16_bit_range_raises():
    image = Image.fromarray(np.array([[0, 70000]], dtype=np.int32))

    with pytest.raises(ValueError, match=r"outside the 16-bit range"):
        convert_image(image, 1)


def test_rgba_composited_on_background():
    pixels = np.array(
        [[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]],
        dtype=np.uint8,
    )
    image = Image.fromarray(pixels, mode="RGBA")

    on_black = np.asarray(convert_image(image, 3))
    on_white = np.asarray(convert_image(image, 3, alpha_background=255))

    np.testing.assert_array_equal(on_black[0, 0], [200, 100, 50])
    np.testing.assert_array_equal(on_black[0, 1], [0, 0, 0])
    np.testing.assert_array_equal(on_black[0, 2], np.rint(np.array([200, 100, 50]) * 128 / 255))
    np.testing.assert_array_equal(on_white[0, 1], [255, 255, 255])


def test_rgba_photo_file_to_one_channel(image_folder):
    with Image.open(image_folder / "special" / "rgba.png") as image:
        assert image.mode == "RGBA"
        pixels = np.asarray(image)
        converted = np.asarray(convert_image(image, 1))
    alpha = pixels[..., 3]
    luma = np.rint(pixels[..., :3].astype(np.float64) @ [0.299, 0.587, 0.114])

    assert converted.shape == (CROP, CROP)
    # Transparent pixels come out black on the default background, opaque ones keep their gray value.
    assert (alpha == 0).any()
    assert np.all(converted[alpha == 0] == 0)
    assert np.abs(converted[alpha == 255] - luma[alpha == 255]).max() <= 1
    # The half-transparent row is about half as bright.
    assert np.abs(converted[0] - luma[0] * 128 / 255).max() <= 1


def test_gray_with_alpha_stays_exact():
    gray_alpha = np.array([[[90, 255], [90, 0], [200, 51]]], dtype=np.uint8)
    image = Image.fromarray(gray_alpha, mode="LA")

    np.testing.assert_array_equal(np.asarray(convert_image(image, 1)), [[90, 0, 40]])


def test_palette_transparency_uses_background(image_folder):
    with Image.open(image_folder / "special" / "palette.png") as image:
        assert image.mode == "P"
        assert "transparency" in image.info
        transparent = np.asarray(image) == 0
        rgb = np.asarray(convert_image(image, 3, alpha_background=255))

    assert transparent.any()
    assert np.all(rgb[transparent] == 255)


def test_palette_without_transparency_matches_pillow():
    image = Image.fromarray(skimage_data.chelsea()[:CROP, :CROP]).quantize(colors=16)

    np.testing.assert_array_equal(np.asarray(convert_image(image, 3)), np.asarray(image.convert("RGB")))


def test_bilevel_and_cmyk_and_float():
    bilevel = Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1")
    np.testing.assert_array_equal(np.asarray(convert_image(bilevel, 1)), [[0, 255]])

    cmyk = Image.fromarray(skimage_data.coffee()[:CROP, :CROP]).convert("CMYK")
    converted = convert_image(cmyk, 3)
    assert converted.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(converted), np.asarray(cmyk.convert("RGB")))

    unit_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert unit_float.mode == "F"
    np.testing.assert_array_equal(np.asarray(convert_image(unit_float, 1)), [[0, 128, 255]])


def test_rgb_to_one_channel_uses_luma():
    image = Image.fromarray(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8))

    # ITU-R 601-2: 0.299 R + 0.587 G + 0.114 B.
    np.testing.assert_array_equal(np.asarray(convert_image(image, 1)), [[76, 150, 29]])


def test_grayscale_to_three_channels_repeats():
    image = Image.fromarray(np.array([[10, 200]], dtype=np.uint8))

    np.testing.assert_array_equal(np.asarray(convert_image(image, 3)), [[[10, 10, 10], [200, 200, 200]]])


def test_numpy_input_accepted():
    array = skimage_data.astronaut()[:CROP, :CROP]

    assert convert_image(array, 3).size == (CROP, CROP)


# ----------------------------------------------------------------------------------------------------------------
# Geometry: padding, resizing and cropping.
# ----------------------------------------------------------------------------------------------------------------


def test_non_square_center_crop(image_folder):
    with Image.open(image_folder / "special" / "wide.png") as image:
        image.load()
    pixels = np.asarray(image)

    tensor = build_transforms(CROP, channels=3, center_crop=True)(image)

    # The shorter side already equals the resolution, so only the 4 columns on each side are cropped.
    assert tensor.shape == (3, CROP, CROP)
    np.testing.assert_array_equal(to_uint8(tensor).transpose(1, 2, 0), pixels[:, 4:20])


def test_non_square_resized_by_shorter_side(image_folder):
    with Image.open(image_folder / "special" / "wide.png") as image:
        tensor = build_transforms(8, channels=3, center_crop=False)(image)

    assert tensor.shape == (3, 8, 8)


def test_random_crop_stays_inside_image(image_folder):
    torch.manual_seed(0)
    with Image.open(image_folder / "special" / "wide.png") as image:
        image.load()
    pixels = np.asarray(image)
    windows = [pixels[:, offset : offset + CROP] for offset in range(24 - CROP + 1)]

    transform = build_transforms(CROP, channels=3, center_crop=False)
    for _ in range(5):
        crop = to_uint8(transform(image)).transpose(1, 2, 0)
        assert any(np.array_equal(crop, window) for window in windows)


def test_small_non_square_image_padded_centred():
    image = Image.fromarray(np.full((10, 6), 255, dtype=np.uint8))

    tensor = build_transforms(16, channels=1, center_crop=True)(image)

    assert tensor.shape == (1, 16, 16)
    assert torch.all(tensor[0, 3:13, 5:11] == 1.0)
    assert tensor.sum() == 60 - (256 - 60)


def test_random_flip_mirrors_image():
    pixels = np.zeros((4, 4), dtype=np.uint8)
    pixels[:, 0] = 255
    image = Image.fromarray(pixels)
    transform = build_transforms(4, channels=1, center_crop=True, random_flip=True)

    torch.manual_seed(0)
    left_column_bright = {bool(transform(image)[0, 0, 0] == 1.0) for _ in range(20)}

    assert left_column_bright == {True, False}


# ----------------------------------------------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------------------------------------------


def test_missing_folder_raises(tmp_path):
    missing = tmp_path / "no_such_folder"

    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        load_training_dataset(train_data_dir=missing)


def test_file_instead_of_folder_raises(tmp_path):
    path = tmp_path / "image.png"
    Image.new("L", (4, 4)).save(path)

    with pytest.raises(NotADirectoryError, match="is a file"):
        load_training_dataset(train_data_dir=path)


def test_empty_folder_raises(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")

    with pytest.raises(ValueError, match="contains no image files"):
        load_training_dataset(train_data_dir=tmp_path)


def test_both_sources_raise(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        load_training_dataset(dataset_name="user/dataset", train_data_dir=tmp_path)


def test_config_without_name_raises():
    with pytest.raises(ValueError, match="without dataset_name"):
        load_training_dataset(dataset_config_name="default")


def test_embedded_test_split_raises():
    with pytest.raises(ValueError, match="only the 'train' split"):
        load_training_dataset(split="test")


def test_missing_image_column_lists_columns():
    dataset = datasets.Dataset.from_dict({"text": ["a"], "score": [1]})

    with pytest.raises(ValueError, match=r"No image column found.*\['text', 'score'\]"):
        detect_image_column(dataset)
    with pytest.raises(ValueError, match=r"image_column='photo' is not a column.*\['text', 'score'\]"):
        detect_image_column(dataset, "photo")


def test_image_column_found_by_feature_type():
    features = datasets.Features({"caption": datasets.Value("string"), "picture": datasets.Image()})
    dataset = datasets.Dataset.from_dict({"caption": ["x"], "picture": [np.zeros((2, 2), np.uint8)]}, features=features)

    assert detect_image_column(dataset) == "picture"


def test_several_image_columns_need_a_choice():
    features = datasets.Features({"before": datasets.Image(), "after": datasets.Image()})
    blank = np.zeros((2, 2), np.uint8)
    dataset = datasets.Dataset.from_dict({"before": [blank], "after": [blank]}, features=features)

    with pytest.raises(ValueError, match="several image columns"):
        detect_image_column(dataset)
    assert detect_image_column(dataset, "after") == "after"


def test_label_column_detection_and_errors():
    dataset = datasets.Dataset.from_dict({"image": [np.zeros((2, 2), np.uint8)], "label": ["cat"]})

    # A string label column is not usable as class labels, so it is not picked automatically.
    assert detect_label_column(dataset) is None
    with pytest.raises(ValueError, match=r"class_encode_column\('label'\)"):
        detect_label_column(dataset, "label")
    with pytest.raises(ValueError, match=r"label_column='digit' is not a column"):
        detect_label_column(dataset, "digit")

    integer_labels = datasets.Dataset.from_dict({"image": [np.zeros((2, 2), np.uint8)], "target": [3]})
    assert detect_label_column(integer_labels) == "target"
    assert get_num_classes(integer_labels, "target") == 4


def test_dataset_dict_rejected():
    dataset_dict = datasets.DatasetDict({"train": load_embedded_mnist().select(range(2))})

    with pytest.raises(TypeError, match=r"dataset\['train'\]"):
        detect_image_column(dataset_dict)


def test_invalid_channels_and_resolution():
    with pytest.raises(ValueError, match="channels=2"):
        build_transforms(32, channels=2)
    with pytest.raises(ValueError, match="resolution=0"):
        build_transforms(0, channels=1)
    with pytest.raises(ValueError, match="alpha_background=300"):
        convert_image(Image.new("RGBA", (2, 2)), 3, alpha_background=300)
    with pytest.raises(TypeError, match="list"):
        convert_image([[0, 1]], 1)


def test_dataloader_label_options_raise():
    features = datasets.Features({"image": datasets.Image()})
    dataset = datasets.Dataset.from_dict({"image": [np.zeros((2, 2), np.uint8)]}, features=features)

    with pytest.raises(ValueError, match="no integer label column"):
        make_dataloader(dataset, resolution=2, channels=1, batch_size=1, with_labels=True)
    with pytest.raises(ValueError, match="with_labels=True"):
        make_dataloader(dataset, resolution=2, channels=1, batch_size=1, label_column="label")


def test_preprocessor_rejects_missing_labels():
    preprocess = ImagePreprocessor(build_transforms(2, 1), image_column="image", label_column="label")

    with pytest.raises(ValueError, match="missing or negative label -1"):
        preprocess({"image": [Image.new("L", (2, 2))], "label": [-1]})
