"""Training helpers shared by `examples/train_cunet.py` and the tests."""

from .augment import EpochSeededSampler, SeededImageTransform, SeededTrainingDataset
from .checkpoints import (
    check_run_settings,
    checkpoint_step,
    list_checkpoints,
    read_run_settings,
    resolve_checkpoint,
    save_checkpoint_atomically,
)
from .hardware import cpu_model_name, keep_freed_memory_for_reuse
from .objectives import PREDICTION_TYPES, diffusion_loss, signal_to_noise_ratio

__all__ = [
    "EpochSeededSampler",
    "PREDICTION_TYPES",
    "SeededImageTransform",
    "SeededTrainingDataset",
    "check_run_settings",
    "checkpoint_step",
    "cpu_model_name",
    "diffusion_loss",
    "keep_freed_memory_for_reuse",
    "list_checkpoints",
    "read_run_settings",
    "resolve_checkpoint",
    "save_checkpoint_atomically",
    "signal_to_noise_ratio",
]
