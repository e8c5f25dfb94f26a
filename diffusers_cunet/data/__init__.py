"""Training data: the embedded MNIST subset, Hub and image-folder loading, and image transforms."""

from .dataloader import make_dataloader
from .embedded import (
    EMBEDDED_MNIST_PATH,
    MNIST_CLASS_NAMES,
    load_embedded_mnist,
    load_embedded_mnist_arrays,
)
from .loading import (
    ImageReadError,
    detect_image_column,
    detect_label_column,
    get_num_classes,
    infer_num_channels,
    load_training_dataset,
)
from .transforms import (
    ConvertImage,
    ImagePreprocessor,
    ResizeOrPad,
    build_transforms,
    convert_image,
)


__all__ = [
    "EMBEDDED_MNIST_PATH",
    "MNIST_CLASS_NAMES",
    "ConvertImage",
    "ImageReadError",
    "ImagePreprocessor",
    "ResizeOrPad",
    "build_transforms",
    "convert_image",
    "detect_image_column",
    "detect_label_column",
    "get_num_classes",
    "infer_num_channels",
    "load_embedded_mnist",
    "load_embedded_mnist_arrays",
    "load_training_dataset",
    "make_dataloader",
]
