"""Image conversion and training transforms: PIL images of any mode to `(C, H, W)` tensors in [-1, 1]."""

from typing import Any, Optional, Union

import numpy as np
import torch
from PIL import Image
from torchvision import transforms


SUPPORTED_CHANNELS = (1, 3)

# PIL modes that convert to one channel without losing colour. Every other mode converts to RGB.
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# Integer modes with more than 8 bits per pixel. Pillow's own conversion to "L" clips them at 255.
WIDE_INTEGER_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})


def convert_image(
    image: Union[Image.Image, np.ndarray],
    channels: int,
    alpha_background: int = 0,
) -> Image.Image:
    """
    Convert an image of any common PIL mode to 8-bit grayscale (`"L"`) or RGB.

    Conversion rules by source mode:

    - `"L"`, `"RGB"`: unchanged when they already have the requested channel count. RGB to `"L"` uses Pillow's
      ITU-R 601-2 luma (`L = 0.299 R + 0.587 G + 0.114 B`), and `"L"` to RGB repeats the gray value.
    - `"1"` (bilevel): 0 and 255.
    - `"I;16"`, `"I;16B"`, `"I;16L"`, `"I;16N"` and `"I"` (16-bit data): rescaled from 0-65535 to 0-255 with
      `round(value / 257)`, so 65535 maps to 255 and 32896 to 128. Pillow's own conversion clips these values at
      255 instead, which turns most 16-bit images white.
    - `"F"` (32-bit float): values in [0, 1] are scaled by 255. Other values must lie in [0, 255] and are rounded.
    - Modes with alpha (`"LA"`, `"RGBA"`, `"PA"` and their premultiplied forms) and images with a `transparency`
      entry (palette `"P"` images with a transparent colour, and `"L"`/`"RGB"` with a tRNS chunk): composited
      onto a uniform `alpha_background` gray level.
    - `"P"` without transparency, `"CMYK"`, `"YCbCr"`, `"HSV"`, `"LAB"`: Pillow's conversion to RGB.

    Args:
        image (`PIL.Image.Image` or `np.ndarray`):
            The image. A NumPy array is read with `PIL.Image.fromarray` (2-D for grayscale, `(H, W, 3)` or
            `(H, W, 4)` uint8 for RGB or RGBA).
        channels (`int`):
            1 for a `"L"` result, 3 for an `"RGB"` result.
        alpha_background (`int`, *optional*, defaults to 0):
            The gray level (0-255) behind transparent pixels. The default, black, matches the zero padding of
            [`build_transforms`] and the black background of MNIST-like data, where light strokes on a transparent
            background should read as light strokes on black. Pass 255 for dark artwork such as logos and icons,
            which would vanish on black.

    Returns:
        `PIL.Image.Image`: An image of mode `"L"` (1 channel) or `"RGB"` (3 channels), same size as the input.

    Raises:
        `TypeError`: If `image` is neither a PIL image nor a NumPy array.
        `ValueError`: If `channels` is not 1 or 3, if `alpha_background` is outside [0, 255], if a 16-bit or float
            image has values outside the documented ranges, or if Pillow cannot convert the mode.
    """
    if channels not in SUPPORTED_CHANNELS:
        raise ValueError(f"channels={channels} is not supported; use 1 for grayscale or 3 for RGB images.")
    if not 0 <= alpha_background <= 255:
        raise ValueError(f"alpha_background={alpha_background} is outside [0, 255]; pass a gray level such as 0 or 255.")

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"Expected a PIL image or a NumPy array, got {type(image).__name__}.")

    image = _to_8_bit(image, alpha_background)

    target_mode = "L" if channels == 1 else "RGB"
    if image.mode != target_mode:
        image = image.convert(target_mode)
    return image


def _to_8_bit(image: Image.Image, alpha_background: int) -> Image.Image:
    """Convert `image` to one of the modes `"L"` or `"RGB"` without alpha."""
    mode = image.mode
    if mode in ("L", "RGB") and "transparency" not in image.info:
        return image
    if mode in WIDE_INTEGER_MODES:
        return _rescale_16_bit(image)
    if mode == "F":
        return _rescale_float(image)
    if mode in ALPHA_MODES or "transparency" in image.info:
        return _composite_on_background(image, alpha_background)
    if mode == "1":
        return image.convert("L")

    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(
            f"Pillow cannot convert an image of mode {mode!r} to RGB. Convert the images to RGB or grayscale "
            "before training."
        ) from error


def _rescale_16_bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.int64)
    # NOTE: mode "I" is 32-bit and carries no bit depth. It is read as 16-bit data because Pillow (13.0) opens PGM
    # files with a maxval above 255 as "I", scaled to 0-65535. An "I" image holding 8-bit values would come out dark.
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(
            f"A {image.mode!r} image has values in [{values.min()}, {values.max()}], outside the 16-bit range "
            "[0, 65535]. Rescale it to 16 or 8 bits before training."
        )
    # 65535 / 255 = 257 exactly. No integer value lies halfway between two results, so rounding has no ties.
    return Image.fromarray(np.rint(values / 257.0).astype(np.uint8), mode="L")


def _rescale_float(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    if values.size == 0:
        return image.convert("L")
    low, high = values.min(), values.max()
    if not np.isfinite(values).all() or low < 0 or high > 255:
        raise ValueError(
            f"A float ('F') image has values in [{low}, {high}], but [0, 1] or [0, 255] is required. Rescale it "
            "before training."
        )
    # Float images in [0, 1] are the common scientific convention. An 8-bit-scale image that happens to stay
    # inside [0, 1] would be almost black anyway, so reading it as [0, 1] loses nothing useful.
    if high <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.rint(values).astype(np.uint8), mode="L")


def _composite_on_background(image: Image.Image, alpha_background: int) -> Image.Image:
    # Gray sources stay gray, so a 1-channel model gets the exact gray values. Palette colours may be anything.
    if image.mode in ("L", "LA", "La"):
        with_alpha = image.convert("LA")
        output_mode = "L"
    else:
        with_alpha = image.convert("RGBA")
        output_mode = "RGB"

    values = np.asarray(with_alpha, dtype=np.float32)  # (H, W, colour channels + 1)
    colour, alpha = values[..., :-1], values[..., -1:] / 255.0
    blended = colour * alpha + float(alpha_background) * (1.0 - alpha)
    blended = np.rint(blended).astype(np.uint8)
    if output_mode == "L":
        blended = blended[..., 0]
    return Image.fromarray(blended, mode=output_mode)


class ConvertImage:
    """
    Transform that applies [`convert_image`]. A class rather than a lambda so data loader workers can pickle it.

    Args:
        channels (`int`): 1 for grayscale output, 3 for RGB.
        alpha_background (`int`, *optional*, defaults to 0): Gray level behind transparent pixels.
    """

    def __init__(self, channels: int, alpha_background: int = 0):
        self.channels = channels
        self.alpha_background = alpha_background

    def __call__(self, image: Union[Image.Image, np.ndarray]) -> Image.Image:
        return convert_image(image, self.channels, self.alpha_background)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(channels={self.channels}, alpha_background={self.alpha_background})"


class ResizeOrPad:
    """
    Transform that brings an image's shorter side to `resolution`, by padding small images or by resizing.

    The rule: when `pad_small` is true and both sides are at most `resolution`, the image is centred on a black
    (zero) canvas of `resolution x resolution` and no pixel is resampled. A 28x28 MNIST digit at resolution 32
    gets a 2-pixel black border, as in the original DDPM MNIST setups, instead of being blurred by upscaling.
    Otherwise the shorter side is resized to `resolution` with antialiased bilinear interpolation, keeping the
    aspect ratio, and a crop that follows brings the longer side to `resolution`.

    Args:
        resolution (`int`): Target side length in pixels.
        pad_small (`bool`, *optional*, defaults to `True`): Pad instead of upscaling images no larger than
            `resolution`.
    """

    def __init__(self, resolution: int, pad_small: bool = True):
        self.resolution = resolution
        self.pad_small = pad_small
        self.resize = transforms.Resize(
            resolution, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True
        )

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if self.pad_small and width <= self.resolution and height <= self.resolution:
            if width == height == self.resolution:
                return image
            canvas = Image.new(image.mode, (self.resolution, self.resolution), 0)
            canvas.paste(image, ((self.resolution - width) // 2, (self.resolution - height) // 2))
            return canvas
        return self.resize(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resolution={self.resolution}, pad_small={self.pad_small})"


def build_transforms(
    resolution: int,
    channels: int,
    center_crop: bool = False,
    random_flip: bool = False,
    pad_small: bool = True,
    alpha_background: int = 0,
) -> transforms.Compose:
    """
    Build the transform from a PIL image (any mode, any size) to a training tensor.

    Steps: [`convert_image`] to `channels` channels, [`ResizeOrPad`] (pad images no larger than `resolution`,
    otherwise resize the shorter side), a square crop of side `resolution` (centre or random), an optional
    horizontal flip, and scaling from [0, 255] to [-1, 1].

    Args:
        resolution (`int`):
            Side length of the square output, in pixels.
        channels (`int`):
            1 or 3. This is the model's `in_channels`: a 1-channel model gets 1-channel tensors, whatever mode the
            source images have.
        center_crop (`bool`, *optional*, defaults to `False`):
            Crop the centre. Otherwise crop at a random position, which augments non-square and large images.
        random_flip (`bool`, *optional*, defaults to `False`):
            Flip half of the images horizontally. Leave it off for digits and text, where a flip changes the class.
        pad_small (`bool`, *optional*, defaults to `True`):
            Pad images whose sides are both at most `resolution` with black instead of upscaling them.
        alpha_background (`int`, *optional*, defaults to 0):
            Gray level behind transparent pixels (see [`convert_image`]).

    Returns:
        `torchvision.transforms.Compose`: Maps a PIL image or a NumPy array to a float32 tensor of shape
        `(channels, resolution, resolution)` with values in [-1, 1].
    """
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution={resolution!r} must be a positive integer number of pixels, such as 32.")
    if channels not in SUPPORTED_CHANNELS:
        raise ValueError(f"channels={channels} is not supported; use 1 for grayscale or 3 for RGB images.")

    steps = [
        ConvertImage(channels, alpha_background),
        ResizeOrPad(resolution, pad_small=pad_small),
        transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
    ]
    if random_flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [
        transforms.ToTensor(),  # (channels, height, width) in [0, 1]
        transforms.Normalize([0.5] * channels, [0.5] * channels),
    ]
    return transforms.Compose(steps)


class ImagePreprocessor:
    """
    Batch function for `datasets.Dataset.with_transform` that turns rows into model inputs.

    Args:
        transform (`Callable`):
            Applied to each image, usually the result of [`build_transforms`].
        image_column (`str`):
            The column that contains the images.
        label_column (`str`, *optional*):
            The column that contains integer class labels. When given, the output has `class_labels`.

    Returns from a call:
        `dict`: `"input"`, a list of `(C, H, W)` tensors, and when `label_column` is set, `"class_labels"`, a list of
        0-d int64 tensors. The default PyTorch collate function stacks them to `(batch, C, H, W)` and `(batch,)`.
    """

    def __init__(self, transform: Any, image_column: str, label_column: Optional[str] = None):
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column

    def __call__(self, examples: dict[str, list]) -> dict[str, list[torch.Tensor]]:
        outputs = {"input": [self.transform(image) for image in examples[self.image_column]]}
        if self.label_column is not None:
            labels = examples[self.label_column]
            for label in labels:
                if label is None or label < 0:
                    raise ValueError(
                        f"Column {self.label_column!r} contains the missing or negative label {label!r}. Remove "
                        "those rows, or train without class labels."
                    )
            outputs["class_labels"] = [torch.tensor(label, dtype=torch.long) for label in labels]
        return outputs
