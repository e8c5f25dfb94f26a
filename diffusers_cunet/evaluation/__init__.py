"""Evaluation of generated samples."""

from .digit_classifier import (
    DIGIT_CLASSIFIER_WEIGHTS_PATH,
    REJECT_CLASS,
    DigitClassifier,
    classify_digits,
    images_to_tensor,
    judge_digits,
    load_digit_classifier,
    read_digit_classifier_metadata,
    save_digit_classifier,
    split_embedded_mnist,
)


__all__ = [
    "DIGIT_CLASSIFIER_WEIGHTS_PATH",
    "REJECT_CLASS",
    "DigitClassifier",
    "classify_digits",
    "images_to_tensor",
    "judge_digits",
    "load_digit_classifier",
    "read_digit_classifier_metadata",
    "save_digit_classifier",
    "split_embedded_mnist",
]
