"""Tests for the shipped MNIST digit classifier and judge_digits."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusers_cunet.data import load_embedded_mnist_arrays
from diffusers_cunet.evaluation import (
    DIGIT_CLASSIFIER_WEIGHTS_PATH,
    REJECT_CLASS,
    DigitClassifier,
    judge_digits,
    load_digit_classifier,
    read_digit_classifier_metadata,
    save_digit_classifier,
    split_embedded_mnist,
)


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def classifier():
    return load_digit_classifier()


@pytest.fixture(scope="module")
def held_out():
    """The 1,000 held-out embedded digits as (N, 1, 28, 28) tensors in [-1, 1], and their labels."""
    images, labels = load_embedded_mnist_arrays()
    _, held_out_indices = split_embedded_mnist()
    digits = torch.from_numpy(images[held_out_indices].astype(np.float32) / 127.5 - 1.0)[:, None]
    return digits, torch.from_numpy(labels[held_out_indices]).long()


@pytest.fixture(scope="module")
def held_out_predictions(classifier, held_out):
    digits, _ = held_out
    with torch.no_grad():
        return classifier(digits).argmax(dim=-1)


def make_gaussian_blobs(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Sums of 1-4 soft Gaussian spots of random position and width, scaled to [-1, 1]: blurry blobs."""
    coordinates = torch.arange(size, dtype=torch.float32)
    rows, columns = coordinates[:, None], coordinates[None, :]
    images = torch.zeros(n, 1, size, size)
    for index in range(n):
        for _ in range(int(torch.randint(1, 5, (1,), generator=generator))):
            centre_row, centre_column = (torch.rand(2, generator=generator) * size * 0.8 + size * 0.1).tolist()
            width = 1.5 + 4.0 * torch.rand(1, generator=generator).item()
            spot = torch.exp(-((rows - centre_row) ** 2 + (columns - centre_column) ** 2) / (2 * width**2))
            images[index, 0] += spot
    peaks = images.amax(dim=(1, 2, 3), keepdim=True)
    return images / peaks * 2.0 - 1.0


# ----------------------------------------------------------------------------------------------------------------
# Shipped weights: accuracy and rejection of non-digits.
# ----------------------------------------------------------------------------------------------------------------


def test_shipped_weights_load(classifier):
    metadata = read_digit_classifier_metadata()

    assert DIGIT_CLASSIFIER_WEIGHTS_PATH.is_file()
    assert not classifier.training
    assert classifier.num_classes == 11
    assert classifier.has_reject_class
    assert metadata["split_seed"] == "0"
    assert metadata["num_held_out_digits"] == "1000"


def test_held_out_accuracy(held_out, held_out_predictions):
    _, labels = held_out

    # A held-out digit sent to the "not a digit" class counts as an error.
    accuracy = (held_out_predictions == labels).float().mean().item()

    assert accuracy >= 0.97


def test_held_out_accuracy_matches_metadata(held_out, held_out_predictions):
    _, labels = held_out

    accuracy = (held_out_predictions == labels).float().mean().item()

    # Another CPU's floating point kernels may flip one borderline image, which is 0.001 of the 1,000.
    recorded = float(read_digit_classifier_metadata()["held_out_accuracy"])
    assert accuracy == pytest.approx(recorded, abs=1.5e-3)


def test_held_out_digits_judged_confident(classifier, held_out):
    digits, labels = held_out

    result = judge_digits(digits, classifier=classifier)

    assert result["confident_share"] > 0.9
    assert result["num_classes"] == 10
    assert min(result["class_histogram"]) > 80


@pytest.mark.parametrize("size", [28, 32])
def test_gaussian_noise_not_confident(classifier, size):
    generator = torch.Generator().manual_seed(2024)
    noise = torch.randn(500, 1, size, size, generator=generator).clamp(-1.0, 1.0)

    result = judge_digits(noise, classifier=classifier)

    assert result["confident_share"] < 0.1


@pytest.mark.parametrize("size", [28, 32])
def test_blurry_blobs_not_confident(classifier, size):
    blobs = make_gaussian_blobs(300, size, torch.Generator().manual_seed(7))

    result = judge_digits(blobs, classifier=classifier)

    assert result["confident_share"] < 0.1


def test_blank_images_not_confident(classifier):
    blank = torch.full((4, 1, 28, 28), -1.0)

    result = judge_digits(blank, classifier=classifier)

    assert result["confident_share"] == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Input handling.
# ----------------------------------------------------------------------------------------------------------------


def test_padded_32_matches_28(classifier, held_out):
    digits, _ = held_out
    padded = F.pad(digits[:64], (2, 2, 2, 2), value=-1.0)

    with torch.no_grad():
        torch.testing.assert_close(classifier(padded), classifier(digits[:64]))


def test_upscaled_64_still_classified(classifier, held_out):
    digits, labels = held_out
    upscaled = F.interpolate(digits[:200], size=(64, 64), mode="bilinear", align_corners=False)

    result = judge_digits(upscaled, classifier=classifier)

    assert (result["predictions"] == labels[:200]).float().mean().item() > 0.9


def test_pil_numpy_and_rgb_inputs_agree(classifier, held_out):
    digits, _ = held_out
    digits = digits[:32]
    expected = judge_digits(digits, classifier=classifier)["predictions"]

    pil_images = [Image.fromarray(np.rint((image[0].numpy() + 1) * 127.5).astype(np.uint8)) for image in digits]
    numpy_nhwc = ((digits + 1) / 2).permute(0, 2, 3, 1).numpy()
    rgb = digits.repeat(1, 3, 1, 1)

    for images in (pil_images, numpy_nhwc, rgb, list(digits)):
        torch.testing.assert_close(judge_digits(images, classifier=classifier)["predictions"], expected)


def test_judge_digits_result_fields(classifier, held_out):
    digits, _ = held_out
    images = torch.cat([digits[:20], torch.full((5, 1, 28, 28), -1.0)])

    result = judge_digits(images, classifier=classifier)

    assert result["predictions"].shape == (25,)
    assert result["predictions"].dtype == torch.int64
    assert result["confidences"].shape == (25,)
    assert result["predictions"].min() >= -1
    assert result["predictions"].max() <= 9
    assert len(result["class_histogram"]) == 10
    confident = (result["predictions"] >= 0) & (result["confidences"] >= 0.9)
    assert sum(result["class_histogram"]) == confident.sum().item()
    assert result["confident_share"] == pytest.approx(confident.float().mean().item())
    assert result["reject_share"] == pytest.approx((result["predictions"] == -1).float().mean().item())


def test_forward_features_shape(classifier, held_out):
    digits, _ = held_out

    with torch.no_grad():
        features = classifier.forward_features(digits[:8])

    assert features.shape == (8, classifier.block_out_channels[-1])


def test_wrong_range_raises(classifier, held_out):
    digits, _ = held_out
    as_bytes = (digits[:4] + 1) * 127.5

    with pytest.raises(ValueError, match=r"x / 127.5 - 1"):
        judge_digits(as_bytes, classifier=classifier)


def test_wrong_shapes_raise(classifier, held_out):
    digits, _ = held_out

    with pytest.raises(ValueError, match=r"images\[None\]"):
        judge_digits(digits[0], classifier=classifier)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        classifier(digits[:2].repeat(1, 3, 1, 1))
    with pytest.raises(ValueError, match="threshold=1.5"):
        judge_digits(digits[:2], threshold=1.5, classifier=classifier)
    with pytest.raises(TypeError, match="str"):
        judge_digits("digits.png", classifier=classifier)
    with pytest.raises(ValueError, match="images is empty"):
        judge_digits(digits[:0], classifier=classifier)
    with pytest.raises(ValueError, match="same size"):
        judge_digits([Image.new("L", (28, 28)), Image.new("L", (32, 32))], classifier=classifier)


def test_numpy_in_bytes_range_raises(classifier, held_out):
    digits, _ = held_out
    as_bytes = ((digits[:2] + 1) * 127.5).permute(0, 2, 3, 1).numpy()

    with pytest.raises(ValueError, match="Divide"):
        judge_digits(as_bytes, classifier=classifier)


# ----------------------------------------------------------------------------------------------------------------
# Split, saving and loading.
# ----------------------------------------------------------------------------------------------------------------


def test_split_is_stratified_and_disjoint():
    _, labels = load_embedded_mnist_arrays()

    train_indices, held_out_indices = split_embedded_mnist()

    assert len(train_indices) == 4000
    assert len(held_out_indices) == 1000
    assert np.intersect1d(train_indices, held_out_indices).size == 0
    assert np.bincount(labels[held_out_indices], minlength=10).tolist() == [100] * 10
    np.testing.assert_array_equal(split_embedded_mnist()[1], held_out_indices)
    assert not np.array_equal(split_embedded_mnist(seed=1)[1], held_out_indices)
    with pytest.raises(ValueError, match="num_held_out=15"):
        split_embedded_mnist(15)


def test_save_and_load_round_trip(tmp_path, held_out):
    digits, _ = held_out
    model = DigitClassifier(num_classes=10, block_out_channels=(8, 16, 32)).eval()
    path = tmp_path / "classifier.safetensors"

    save_digit_classifier(model, path, metadata={"note": "test"})
    loaded = load_digit_classifier(path)

    assert loaded.num_classes == 10
    assert loaded.block_out_channels == (8, 16, 32)
    assert read_digit_classifier_metadata(path)["note"] == "test"
    with torch.no_grad():
        torch.testing.assert_close(loaded(digits[:4]), model(digits[:4]))


def test_digit_only_model_never_rejects(held_out):
    digits, _ = held_out
    model = DigitClassifier(num_classes=10).eval()

    result = judge_digits(digits[:8], classifier=model)

    assert (result["predictions"] >= 0).all()
    assert result["reject_share"] == 0.0
    assert REJECT_CLASS == 10


def test_missing_weights_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_digit_classifier.py"):
        load_digit_classifier(tmp_path / "missing.safetensors")


@pytest.mark.slow
def test_training_script_one_epoch(tmp_path):
    output = tmp_path / "classifier.safetensors"
    command = [
        sys.executable,
        str(REPO_ROOT / "examples" / "train_digit_classifier.py"),
        "--epochs",
        "1",
        "--output",
        str(output),
        "--report",
        str(tmp_path / "report.json"),
    ]

    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)

    assert completed.returncode == 0, completed.stderr[-2000:]
    metadata = read_digit_classifier_metadata(output)
    assert 0.0 <= float(metadata["held_out_accuracy"]) <= 1.0
    assert not math.isnan(float(metadata["standard_gaussian_noise_confident_share"]))
    assert load_digit_classifier(output).num_classes == 11
