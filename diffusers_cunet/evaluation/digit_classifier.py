"""A small MNIST digit classifier that judges generated digit samples offline."""

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, safe_open, save_file

from ..data import convert_image, load_embedded_mnist_arrays


DIGIT_CLASSIFIER_WEIGHTS_PATH = Path(__file__).resolve().parent / "digit_classifier.safetensors"
NUM_DIGITS = 10
# Index of the extra "not a digit" class. It is trained on noise, speckle, blobs, scribbles, overlaid digit pairs
# and flat images, so that garbage samples land there instead of on a confident digit.
REJECT_CLASS = 10
CLASSIFIER_IMAGE_SIZE = 28
# The package pads 28x28 MNIST digits to 32x32 (see `diffusers_cunet.data.ResizeOrPad`), so a centre crop undoes it.
PADDED_IMAGE_SIZE = 32

ImageInput = Union[torch.Tensor, np.ndarray, Sequence[Union[Image.Image, torch.Tensor]]]


class DigitClassifier(nn.Module):
    r"""
    A small CNN that classifies 28x28 MNIST-style digits, with an extra "not a digit" class.

    The shipped weights (`digit_classifier.safetensors`, loaded by [`load_digit_classifier`]) were trained by
    `examples/train_digit_classifier.py` on 4,000 of the 5,000 embedded MNIST digits with small random affine
    augmentation, plus synthetic non-digits for the reject class. On the 1,000 held-out embedded digits (100 per
    class, [`split_embedded_mnist`] with seed 0) they reach 98.2% accuracy, counting a digit sent to the reject
    class as an error. None of 1,000 standard Gaussian noise images and none of 1,000 blurred-noise blobs gets a
    digit with probability >= 0.9. `DIGIT_CLASSIFIER.md` beside this file records how these figures were measured.

    Inputs of shape `(N, 1, 28, 28)` pass unchanged. `(N, 1, 32, 32)` inputs are centre-cropped to 28, which
    removes the 2-pixel black border that the package adds to MNIST at resolution 32. Any other size is
    centre-cropped to a square and resized to 28x28 with antialiasing.

    Parameters:
        num_classes (`int`, *optional*, defaults to 11):
            10 digits, plus 1 for the "not a digit" class at index 10.
        block_out_channels (`tuple[int, ...]`, *optional*, defaults to `(32, 64, 128)`):
            Channels of the three convolution stages (one, two and one 3x3 convolutions). The first two stages end
            with 2x2 max pooling, and the last with global average pooling.
        dropout (`float`, *optional*, defaults to 0.2):
            Dropout before the final linear layer.
    """

    def __init__(
        self,
        num_classes: int = NUM_DIGITS + 1,
        block_out_channels: tuple[int, ...] = (32, 64, 128),
        dropout: float = 0.2,
    ):
        super().__init__()
        if num_classes not in (NUM_DIGITS, NUM_DIGITS + 1):
            raise ValueError(
                f"num_classes={num_classes} is not supported; use 10 (digits only) or 11 (digits and a "
                "'not a digit' class)."
            )
        if len(block_out_channels) != 3:
            raise ValueError(
                f"block_out_channels={block_out_channels} must give 3 stage widths, for example (32, 64, 128)."
            )
        self.num_classes = num_classes
        self.block_out_channels = tuple(block_out_channels)

        first, second, third = block_out_channels
        self.features = nn.Sequential(
            # 28x28 -> 14x14. Only one convolution at full resolution, because convolutions there dominate CPU training time.
            _conv_bn_relu(1, first),
            nn.MaxPool2d(2),
            # 14x14 -> 7x7
            _conv_bn_relu(first, second),
            _conv_bn_relu(second, second),
            nn.MaxPool2d(2),
            # 7x7 -> one vector per image
            _conv_bn_relu(second, third),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(third, num_classes)

    @property
    def has_reject_class(self) -> bool:
        """Whether the last class is "not a digit"."""
        return self.num_classes == NUM_DIGITS + 1

    def prepare_inputs(self, images: torch.Tensor) -> torch.Tensor:
        """
        Check a batch and bring it to `(N, 1, 28, 28)` by centre cropping or resizing.

        Args:
            images (`torch.Tensor`): Floating point images of shape `(N, 1, H, W)` with values in [-1, 1].

        Returns:
            `torch.Tensor`: Images of shape `(N, 1, 28, 28)`.
        """
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(
                f"Expected grayscale images of shape (N, 1, H, W), got {tuple(images.shape)}. Convert RGB samples "
                "to grayscale first, or pass them to judge_digits, which does that."
            )
        if not images.is_floating_point():
            raise TypeError(f"Expected a floating point tensor in [-1, 1], got dtype {images.dtype}.")

        height, width = images.shape[-2:]
        if height == width == CLASSIFIER_IMAGE_SIZE:
            return images
        if height == width == PADDED_IMAGE_SIZE:
            border = (PADDED_IMAGE_SIZE - CLASSIFIER_IMAGE_SIZE) // 2
            return images[..., border : border + CLASSIFIER_IMAGE_SIZE, border : border + CLASSIFIER_IMAGE_SIZE]

        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        square = images[..., top : top + side, left : left + side]
        return F.interpolate(
            square, size=(CLASSIFIER_IMAGE_SIZE, CLASSIFIER_IMAGE_SIZE), mode="bilinear", antialias=True
        )

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """
        Compute the pooled feature vector of each image, for feature-based distances such as an offline FID.

        Args:
            images (`torch.Tensor`): Images of shape `(N, 1, H, W)` in [-1, 1].

        Returns:
            `torch.Tensor`: Features of shape `(N, block_out_channels[-1])`.
        """
        return self.features(self.prepare_inputs(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """
        Classify a batch of digits.

        Args:
            images (`torch.Tensor`): Images of shape `(N, 1, H, W)` in [-1, 1], white digits on black.

        Returns:
            `torch.Tensor`: Logits of shape `(N, num_classes)`.
        """
        return self.classifier(self.dropout(self.forward_features(images)))


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def save_digit_classifier(
    classifier: DigitClassifier,
    path: Union[str, os.PathLike],
    metadata: Optional[dict[str, str]] = None,
) -> None:
    """
    Save a classifier's weights and architecture to a safetensors file.

    Args:
        classifier (`DigitClassifier`): The model to save.
        path (`str` or `os.PathLike`): Destination file.
        metadata (`dict[str, str]`, *optional*): Extra string entries for the file header, such as the held-out
            accuracy and the training command.
    """
    header = dict(metadata or {})
    header["format"] = "pt"
    header["architecture"] = json.dumps(
        {"num_classes": classifier.num_classes, "block_out_channels": list(classifier.block_out_channels)}
    )
    state_dict = {name: tensor.detach().cpu().contiguous() for name, tensor in classifier.state_dict().items()}
    save_file(state_dict, os.fspath(path), metadata=header)


def read_digit_classifier_metadata(path: Union[str, os.PathLike] = DIGIT_CLASSIFIER_WEIGHTS_PATH) -> dict[str, str]:
    """
    Read the header metadata of a classifier weights file (architecture, training split, measured accuracy).

    Args:
        path (`str` or `os.PathLike`, *optional*): Weights file. Defaults to the shipped one.

    Returns:
        `dict[str, str]`: The metadata entries.
    """
    with safe_open(os.fspath(path), framework="pt") as weights_file:
        return dict(weights_file.metadata() or {})


def load_digit_classifier(
    path: Optional[Union[str, os.PathLike]] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> DigitClassifier:
    """
    Load a [`DigitClassifier`] in evaluation mode.

    Args:
        path (`str` or `os.PathLike`, *optional*):
            A weights file written by [`save_digit_classifier`]. Defaults to the weights shipped with the package.
        device (`str` or `torch.device`, *optional*):
            Where to put the model. Defaults to the CPU.

    Returns:
        `DigitClassifier`: The model, with `eval()` already called.

    Raises:
        `FileNotFoundError`: If the weights file does not exist.
    """
    path = Path(path) if path is not None else DIGIT_CLASSIFIER_WEIGHTS_PATH
    if not path.is_file():
        raise FileNotFoundError(
            f"Digit classifier weights {path} not found. Reinstall diffusers-cunet, or train new weights with "
            "`python examples/train_digit_classifier.py`."
        )

    metadata = read_digit_classifier_metadata(path)
    architecture = json.loads(metadata.get("architecture", "{}"))
    classifier = DigitClassifier(**architecture)
    classifier.load_state_dict(load_file(os.fspath(path)))
    return classifier.to(device or "cpu").eval()


def split_embedded_mnist(num_held_out: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """
    Split the embedded MNIST subset into training and held-out indices, stratified by class.

    The shipped classifier was trained on the training indices of `split_embedded_mnist()` and evaluated on its
    held-out indices. The diffusion model trains on all 5,000 digits, so the held-out set only measures the
    classifier.

    Args:
        num_held_out (`int`, *optional*, defaults to 1000):
            Held-out images in total, an equal share from each of the 10 classes. Must be a multiple of 10.
        seed (`int`, *optional*, defaults to 0):
            Seed of the NumPy generator that picks the held-out images.

    Returns:
        `tuple[np.ndarray, np.ndarray]`: Sorted training indices and sorted held-out indices into the arrays of
        `diffusers_cunet.data.load_embedded_mnist_arrays()`.
    """
    _, labels = load_embedded_mnist_arrays()
    if num_held_out % NUM_DIGITS != 0 or not 0 < num_held_out < len(labels):
        raise ValueError(
            f"num_held_out={num_held_out} must be a positive multiple of 10 below {len(labels)}, so that each "
            "class gives the same number of held-out images."
        )

    generator = np.random.default_rng(seed)
    per_class = num_held_out // NUM_DIGITS
    held_out = []
    for digit in range(NUM_DIGITS):
        class_indices = np.flatnonzero(labels == digit)
        held_out.append(generator.permutation(class_indices)[:per_class])
    held_out = np.sort(np.concatenate(held_out))
    train = np.setdiff1d(np.arange(len(labels)), held_out)
    return train, held_out


def images_to_tensor(images: ImageInput) -> torch.Tensor:
    """
    Convert generated samples to a grayscale batch of shape `(N, 1, H, W)` in [-1, 1].

    Args:
        images:
            One of:
            - a `torch.Tensor` of shape `(N, C, H, W)` in [-1, 1], the range of the training inputs and of the
              denoising loop's samples before a pipeline rescales them;
            - a `np.ndarray` of shape `(N, H, W, C)` in [0, 1], the diffusers `output_type="np"` layout;
            - a list of PIL images (any mode; converted to `"L"`) or of `(C, H, W)` tensors in [-1, 1].
            RGB inputs (`C == 3`) are converted to gray with ITU-R 601-2 luma weights.

    Returns:
        `torch.Tensor`: float32 tensor of shape `(N, 1, H, W)` in [-1, 1].
    """
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(
                f"Expected a NumPy array of shape (N, H, W, C) in [0, 1], as diffusers' output_type='np' returns, "
                f"got shape {images.shape}."
            )
        if images.size and images.max() > 1.5:
            raise ValueError(
                f"The NumPy images reach {images.max():.3g}, but [0, 1] is expected for arrays. Divide [0, 255] "
                "images by 255."
            )
        tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2) * 2.0 - 1.0
    elif isinstance(images, torch.Tensor):
        tensor = images.detach().float().cpu()
    elif isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("images is empty. Pass at least one image.")
        tensors = [_single_image_to_tensor(image) for image in images]
        shapes = sorted({tuple(single.shape) for single in tensors})
        if len(shapes) > 1:
            raise ValueError(f"All images must have the same size and channel count, got shapes {shapes}.")
        tensor = torch.stack(tensors)
    else:
        raise TypeError(
            f"images has type {type(images).__name__}. Pass a tensor (N, C, H, W) in [-1, 1], a NumPy array "
            "(N, H, W, C) in [0, 1], or a list of PIL images."
        )

    if tensor.ndim != 4 or tensor.shape[1] not in (1, 3):
        raise ValueError(
            f"Expected images of shape (N, 1, H, W) or (N, 3, H, W), got {tuple(tensor.shape)}. A single image "
            "needs a batch dimension: images[None]."
        )
    if tensor.shape[0] == 0:
        raise ValueError("images is empty. Pass at least one image.")
    if tensor.shape[1] == 3:
        luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        tensor = (tensor * luma).sum(dim=1, keepdim=True)

    # Samples straight from a model overshoot [-1, 1] slightly, while values far outside it mean another scale.
    low, high = tensor.min().item(), tensor.max().item()
    if low < -1.5 or high > 1.5:
        raise ValueError(
            f"Image values span [{low:.3g}, {high:.3g}], but [-1, 1] is expected. Rescale [0, 1] images with "
            "x * 2 - 1 and [0, 255] images with x / 127.5 - 1."
        )
    return tensor.clamp(-1.0, 1.0)


def _single_image_to_tensor(image: Union[Image.Image, torch.Tensor]) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        if image.ndim != 3:
            raise ValueError(f"Expected each image tensor to have shape (C, H, W), got {tuple(image.shape)}.")
        return image.detach().float().cpu()
    if isinstance(image, Image.Image):
        gray = np.asarray(convert_image(image, channels=1), dtype=np.float32)
        return torch.from_numpy(gray / 127.5 - 1.0)[None]
    raise TypeError(f"Expected PIL images or (C, H, W) tensors in the list, got {type(image).__name__}.")


@torch.no_grad()
def classify_digits(
    images: ImageInput,
    classifier: Optional[DigitClassifier] = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """
    Compute class probabilities for a batch of digit images.

    Args:
        images: See [`images_to_tensor`].
        classifier (`DigitClassifier`, *optional*): Defaults to the shipped weights.
        batch_size (`int`, *optional*, defaults to 256): Images per forward pass.

    Returns:
        `torch.Tensor`: Softmax probabilities of shape `(N, num_classes)` on the CPU.
    """
    classifier = classifier if classifier is not None else load_digit_classifier()
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device

    batch = images_to_tensor(images)
    probabilities = []
    for start in range(0, len(batch), batch_size):
        logits = classifier(batch[start : start + batch_size].to(device))
        probabilities.append(logits.float().softmax(dim=-1).cpu())

    classifier.train(was_training)
    return torch.cat(probabilities)


def judge_digits(
    images: ImageInput,
    threshold: float = 0.9,
    classifier: Optional[DigitClassifier] = None,
    batch_size: int = 256,
) -> dict:
    """
    Judge generated digit samples: how many read as a clear digit, and how many different digits appear.

    An image counts as a confident digit when the classifier's most likely class is a digit 0-9 (not the "not a
    digit" class) and its probability is at least `threshold`. A generator that only makes a few digit shapes
    (mode collapse) shows a low `num_classes`; one that makes smudges shows a low `confident_share`.

    Args:
        images:
            Samples as a tensor `(N, C, H, W)` in [-1, 1], a NumPy array `(N, H, W, C)` in [0, 1], or a list of PIL
            images (see [`images_to_tensor`]). Sizes 28 and 32 are used directly; others are resized.
        threshold (`float`, *optional*, defaults to 0.9):
            Minimum probability of the predicted digit.
        classifier (`DigitClassifier`, *optional*):
            Defaults to the shipped weights.
        batch_size (`int`, *optional*, defaults to 256):
            Images per forward pass.

    Returns:
        `dict` with:
            - `confident_share` (`float`): Share of images that are confident digits.
            - `num_classes` (`int`): Number of distinct digits among the confident digits, 0-10.
            - `predictions` (`torch.Tensor`): int64 of shape `(N,)`, the most likely class: 0-9, or -1 when the
              "not a digit" class is the most likely.
            - `confidences` (`torch.Tensor`): float32 of shape `(N,)`, the probability of the most likely class.
            - `class_histogram` (`list[int]`): Count of confident digits for each digit 0-9.
            - `reject_share` (`float`): Share of images whose most likely class is "not a digit".
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold={threshold} must lie in (0, 1], for example 0.9.")

    probabilities = classify_digits(images, classifier=classifier, batch_size=batch_size)
    confidences, predictions = probabilities.max(dim=-1)
    rejected = predictions == REJECT_CLASS
    predictions = torch.where(rejected, torch.full_like(predictions, -1), predictions)

    confident = (~rejected) & (confidences >= threshold)
    class_histogram = torch.bincount(predictions[confident], minlength=NUM_DIGITS).tolist()
    return {
        "confident_share": confident.float().mean().item(),
        "num_classes": sum(count > 0 for count in class_histogram),
        "predictions": predictions,
        "confidences": confidences,
        "class_histogram": class_histogram,
        "reject_share": rejected.float().mean().item(),
    }
