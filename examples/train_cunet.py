#!/usr/bin/env python
r"""Train a DDPM whose denoiser is a continuous U-Net (or the UNet2DModel baseline).

    accelerate launch examples/train_cunet.py                       # embedded MNIST digits, CPU minutes
    accelerate launch examples/train_cunet.py --dataset_name nielsr/CelebA-faces --resolution 64 \
        --preset thesis_cunet --max_train_steps 500000 --train_batch_size 128 --learning_rate 2e-4

The output folder is a complete diffusers pipeline (`DDPMPipeline.from_pretrained(output_dir)`
loads it after `import diffusers_cunet`), with a model card, sample grids, tensorboard logs and
`checkpoint-N/` folders for `--resume_from_checkpoint`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import inspect
import itertools
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import diffusers_cunet
from diffusers_cunet import ContinuousUNet2DModel, presets
from diffusers_cunet.ode import ODE_BACKENDS, ODE_SOLVERS
from diffusers_cunet.data import ImageReadError
from diffusers_cunet.models.blocks import INITIAL_VELOCITIES
from diffusers_cunet.training import (
    PREDICTION_TYPES,
    EpochSeededSampler,
    SeededImageTransform,
    SeededTrainingDataset,
    checkpoint_step,
    cpu_model_name,
    diffusion_loss,
    keep_freed_memory_for_reuse,
    check_run_settings,
    list_checkpoints,
    read_run_settings,
    resolve_checkpoint,
    save_checkpoint_atomically,
)

logger = get_logger(__name__, log_level="INFO")

CUNET_PRESETS = ("mnist_cunet", "thesis_cunet")
INITIAL_VELOCITY_CHOICES = tuple(INITIAL_VELOCITIES)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
SAMPLERS = ("sde-dpmsolver++", "ddpm", "ddim")
TIMESTEP_SAMPLING = ("stratified", "uniform", "logit-normal")
# Steps of the default run on the embedded digits (128 epochs at batch 64). On a 2-core CPU the time budget ends
# training first: 3,388 float32 steps on an AVX2 AMD EPYC, 6,773 bf16 steps on a Xeon with AMX.
DEFAULT_MNIST_STEPS = 10_000
# Whole-run budget of the default run, from the script's start. `accelerate launch` and the imports take
# about 10 s more before that, so the run ends within 15 minutes.
DEFAULT_MNIST_BUDGET_MINUTES = 14.5
# Time per optimizer step of the training loop relative to the step that time_training_step measures.
# Data loading, the EMA update and logging add time, but the short timing's steps ran slower than the
# loop's (0.424 s against 0.395 s per step on a 2-core AVX2 CPU, float32), so no extra factor is applied.
LOOP_OVERHEAD = 1.0
# Seconds kept for saving the pipeline, the card and the digit verdict after the final samples.
FINISH_RESERVE_SECONDS = 15.0
# A budget-capped run times its own loop between these marks and sets its step count again at each mark after the
# first, because the timing before training can be off by 10-20% on a shared machine. Step 100 ends the default
# warm-up, so the schedule does not jump there. Steps 10 to 100 ran slower than the rest of a run (0.147 s against
# 0.132 s on a 2-core Xeon), so step 1000 sets the count again. A 10% change there moves the rate by ~1% of the peak.
# The loop's speed drifts later too (by about 4% over a Xeon run), so steps 3000 and 5000 set the count again from
# the steps since the mark before. A slowdown after step 5000 can still make the deadline stop a run a few dozen
# steps early.
REPLAN_STEPS = (10, 100, 1000, 3000, 5000)
# The EMA state that EMAModel.save_pretrained stores in the config of a checkpoint's unet_ema folder.
EMA_STATE_KEYS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")
SCRIPT_START = time.perf_counter()


# ----------------------------------------------------------------------------- arguments


class UsageError(ValueError):
    """A setting or an input the user can fix. The script prints it as one error line, without a traceback."""


@contextlib.contextmanager
def user_input_errors():
    """Re-raise the package's errors about user input as UsageError; their messages name the value and the fix.

    They cover a missing folder or dataset, an unknown column, and a checkpoint that does not fit this run.
    """
    try:
        yield
    except UsageError:
        raise
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        raise UsageError(str(error)) from error


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the description's line breaks and show each option's default where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        # Unset options (None, False) take their value from the preset or the data, as their help states.
        # A help text that already names its default is printed unchanged.
        if action.default in (None, False) or "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)

    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", type=str, default=None,
                      help="Hub dataset id loaded with `datasets`. Without it and --train_data_dir, the embedded MNIST digits are used.")
    data.add_argument("--dataset_config_name", type=str, default=None, help="Config name of the Hub dataset.")
    data.add_argument("--train_data_dir", type=str, default=None, help="Folder of images loaded as an `imagefolder` dataset.")
    data.add_argument("--cache_dir", type=str, default=None, help="Where downloaded datasets are cached.")
    data.add_argument("--image_column", type=str, default=None, help="Image column; detected from the features when omitted.")
    data.add_argument("--label_column", type=str, default=None, help="Label column for class-conditional training; detected when omitted.")
    data.add_argument("--resolution", type=int, default=32, help="Training height and width in pixels. 28x28 digits are padded to 32.")
    data.add_argument("--num_channels", type=int, choices=(1, 3), default=None,
                      help="Image channels (1 grayscale, 3 RGB). When omitted, 3 if any of the first 16 images is in "
                           "colour, else 1.")
    data.add_argument("--center_crop", action="store_true", help="Center crop after resizing (default: random crop).")
    data.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Data loader worker processes.")
    data.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N training images.")

    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=("cunet", "unet"), default="cunet",
                       help="cunet: ContinuousUNet2DModel; unet: the UNet2DModel baseline preset.")
    model.add_argument("--preset", choices=CUNET_PRESETS, default="mnist_cunet",
                       help="Continuous U-Net preset: the CPU-sized MNIST model or the thesis-scale model.")
    model.add_argument("--model_config_name_or_path", type=str, default=None,
                       help="A continuous U-Net config (config.json, a folder that contains one, a checkpoint-N "
                            "folder, or a Hub repo id) to build instead of a preset. The model options below still "
                            "apply on top of it.")
    model.add_argument("--block_out_channels", type=int, nargs="+", default=None, help="Override the preset's level widths.")
    model.add_argument("--patch_size", type=int, default=None,
                       help="Override the preset's patch size: the first level runs at 1/N of the resolution.")
    model.add_argument("--ode_solver", choices=ODE_SOLVERS, default=None, help="ODE solver of the dynamic blocks.")
    model.add_argument("--ode_steps", type=int, default=None, help="Steps per dynamic block for fixed-step solvers.")
    model.add_argument("--ode_rtol", type=float, default=None, help="Relative tolerance of adaptive solvers.")
    model.add_argument("--ode_atol", type=float, default=None, help="Absolute tolerance of adaptive solvers.")
    model.add_argument("--ode_max_steps", type=int, default=None, help="Step limit of adaptive solvers.")
    model.add_argument("--ode_adjoint", action="store_true", help="Adjoint gradients (constant memory, slower).")
    model.add_argument("--ode_backend", choices=ODE_BACKENDS, default=None, help="ODE backend.")
    model.add_argument("--no_attention", action="store_true", help="Ablation: no self-attention.")
    model.add_argument("--no_residual", action="store_true", help="Ablation: no residual path in the acceleration field.")
    model.add_argument("--dropout", type=float, default=None, help="Dropout in the acceleration field and attention.")
    model.add_argument("--initial_velocity", choices=INITIAL_VELOCITY_CHOICES, default=None,
                       help="How each dynamic block sets v(0): network (the default; two convs), linear (one 1x1 conv) or zero.")
    model.add_argument("--num_class_embeds", type=int, default=None,
                       help="Train class-conditionally with this many classes (needs a label column).")
    model.add_argument("--class_conditional", action="store_true",
                       help="Train class-conditionally, with the class count read from the label column.")
    model.add_argument("--gradient_checkpointing", action="store_true", help="Recompute activations in backward to save memory.")

    diffusion = parser.add_argument_group("diffusion")
    diffusion.add_argument("--prediction_type", choices=PREDICTION_TYPES, default="v_prediction", help="What the model predicts.")
    diffusion.add_argument("--snr_gamma", type=float, default=5.0,
                           help="Min-SNR-gamma loss weighting; 0 disables it (uniform weights).")
    diffusion.add_argument("--ddpm_num_steps", type=int, default=1000, help="Diffusion timesteps of the noise scheduler.")
    diffusion.add_argument("--ddpm_num_inference_steps", type=int, default=None,
                           help="Sampling steps for the sample grids. Default: 250 for --sampler ddpm, 50 for the others.")
    diffusion.add_argument("--ddpm_beta_schedule", choices=BETA_SCHEDULES, default="squaredcos_cap_v2", help="Beta schedule.")
    diffusion.add_argument("--sampler", choices=SAMPLERS, default="sde-dpmsolver++",
                           help="Scheduler for the sample grids and the digit verdict. On a briefly trained MNIST model, "
                                "50 sde-dpmsolver++ steps gave confident digits more often than 250 ancestral DDPM "
                                "steps, in a fifth of the time, and DDIM least often.")
    diffusion.add_argument("--timestep_sampling", choices=TIMESTEP_SAMPLING, default="logit-normal",
                           help="How training draws timesteps. logit-normal: t/T follows a logit-normal law (mean 0, "
                                "scale 1), stratified over its quantiles, so middle noise levels come most often. "
                                "stratified: one timestep in each equal slice of [0, T), shuffled, which lowers the "
                                "variance of the loss. uniform: independent draws.")

    optimization = parser.add_argument_group("optimization")
    optimization.add_argument("--seed", type=int, default=0, help="Seed for weights, data order, noise and timesteps.")
    optimization.add_argument("--train_batch_size", type=int, default=64, help="Batch size per process.")
    optimization.add_argument("--eval_batch_size", type=int, default=64, help="Number of images in each sample grid.")
    optimization.add_argument("--num_epochs", type=int, default=100, help="Epochs, unless --max_train_steps is set.")
    optimization.add_argument("--max_train_steps", type=int, default=None,
                              help="Optimizer steps to train for; overrides --num_epochs. Default: 10000 on the embedded "
                                   "MNIST data, fewer where --time_budget_minutes requires it.")
    optimization.add_argument("--time_budget_minutes", type=float, default=None,
                              help="Wall-clock budget of the whole run. Before training, the script times a few steps "
                                   "and the sampling on a copy of the model and lowers the step count so that training "
                                   "and the final samples end within the budget, and stops training if time runs out "
                                   f"anyway. Default: {DEFAULT_MNIST_BUDGET_MINUTES:g} for the embedded MNIST data "
                                   "without --max_train_steps, none otherwise.")
    optimization.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimizer step.")
    optimization.add_argument("--learning_rate", type=float, default=2e-3, help="Peak learning rate.")
    optimization.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="cosine", help="Learning-rate schedule.")
    optimization.add_argument("--lr_warmup_steps", type=int, default=100, help="Warm-up optimizer steps.")
    optimization.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    optimization.add_argument("--adam_beta2", type=float, default=0.99, help="AdamW beta2.")
    optimization.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay.")
    optimization.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    optimization.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")
    optimization.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True,
                              help="Keep an exponential moving average of the weights (saved in the pipeline).")
    optimization.add_argument("--ema_inv_gamma", type=float, default=1.0, help="EMA warm-up inverse gamma.")
    optimization.add_argument("--ema_power", type=float, default=2 / 3, help="EMA warm-up power.")
    optimization.add_argument("--ema_max_decay", type=float, default=0.9999, help="Maximum EMA decay.")
    optimization.add_argument("--num_cpu_threads", type=int, default=None,
                              help="Intra-op threads per process on a CPU-only machine. Default: the CPU cores divided "
                                   "by the processes on this machine (accelerate launch would otherwise leave one).")
    optimization.add_argument("--keep_freed_memory", action=argparse.BooleanOptionalAction, default=True,
                              help="On a CPU-only Linux machine, keep freed tensor memory in the process for the next "
                                   "step instead of handing it back to the system (glibc's mallopt). The default run "
                                   "trained 1.13 times as fast with it, at the same peak memory.")
    optimization.add_argument("--mixed_precision", choices=MIXED_PRECISION, default="auto",
                              help="auto (default): accelerate's fp16/bf16 setting if it has one, else bf16 where the "
                                   "hardware has native bf16 kernels (a GPU with bf16, a CPU with AVX512-BF16 or AMX) "
                                   "and float32 elsewhere. no forces float32; fp16 needs a GPU.")

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", type=str, default="cunet-mnist", help="Pipeline, card, samples, logs and checkpoints.")
    output.add_argument("--overwrite_output_dir", action="store_true", help="Delete the output folder's content first.")
    output.add_argument("--logger", choices=("tensorboard", "wandb", "none"), default="tensorboard", help="Experiment tracker.")
    output.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    output.add_argument("--save_images_epochs", type=int, default=None, help="Save a sample grid every N epochs.")
    output.add_argument("--save_images_steps", type=int, default=None, help="Save a sample grid every N optimizer steps.")
    output.add_argument("--save_model_epochs", type=int, default=None, help="Save the pipeline every N epochs.")
    output.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N optimizer steps.")
    output.add_argument("--checkpoints_total_limit", type=int, default=2, help="Keep at most N checkpoints.")
    output.add_argument("--resume_from_checkpoint", type=str, default=None, help="A checkpoint-N folder, or 'latest'.")
    output.add_argument("--exit_after_steps", type=int, default=None,
                        help="Save a checkpoint and exit after N optimizer steps of this run (for time-limited job "
                             "queues); continue later with --resume_from_checkpoint latest.")
    output.add_argument("--evaluate_digits", action=argparse.BooleanOptionalAction, default=None,
                        help="Judge 64 final samples with the shipped digit classifier (default: on for MNIST data).")
    output.add_argument("--push_to_hub", action="store_true", help="Upload the pipeline folder to the Hub at the end.")
    output.add_argument("--hub_model_id", type=str, default=None, help="Hub repo id; defaults to the output folder's name.")
    output.add_argument("--hub_token", type=str, default=None, help="Hub token; defaults to HF_TOKEN or the stored login.")
    output.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repo as private.")
    output.add_argument("--local_rank", type=int, default=-1, help="Set by launchers; unused.")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Reject bad settings with a message that names the value and the fix, before any work starts."""
    positive = ("resolution", "train_batch_size", "eval_batch_size", "num_epochs", "gradient_accumulation_steps",
                "ddpm_num_steps", "ddpm_num_inference_steps", "checkpointing_steps")
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name}={value} is invalid; it must be at least 1.")
    for name in ("max_train_steps", "save_images_epochs", "save_images_steps", "save_model_epochs",
                 "checkpoints_total_limit", "max_train_samples", "num_class_embeds", "ode_steps", "ode_max_steps",
                 "exit_after_steps", "num_cpu_threads", "patch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name}={value} is invalid; use a positive number or leave it unset.")
    if args.dataloader_num_workers < 0:
        raise UsageError(f"--dataloader_num_workers={args.dataloader_num_workers} must be 0 or more.")
    if args.time_budget_minutes is not None and not 0 < args.time_budget_minutes < math.inf:
        raise UsageError(
            f"--time_budget_minutes={args.time_budget_minutes} must be a positive number of minutes, for example 14; "
            "leave it unset to train for --max_train_steps or --num_epochs."
        )
    for name in ("learning_rate", "adam_epsilon", "ema_inv_gamma", "ema_power"):
        value = getattr(args, name)
        if not 0 < value < math.inf:
            raise UsageError(f"--{name}={value} is invalid; it must be a positive, finite number.")
    if not 0 <= args.max_grad_norm < math.inf:
        raise UsageError(f"--max_grad_norm={args.max_grad_norm} is invalid; pass a positive norm such as 1.0, or 0 to "
                         "turn gradient clipping off.")
    if not 0 <= args.ema_max_decay <= 1:
        raise UsageError(f"--ema_max_decay={args.ema_max_decay} is invalid; pass a decay in [0, 1], such as 0.9999.")
    if not 0 <= args.adam_weight_decay < math.inf:
        raise UsageError(f"--adam_weight_decay={args.adam_weight_decay} is invalid; pass 0 or a positive, finite number.")
    if args.lr_warmup_steps < 0:
        raise UsageError(f"--lr_warmup_steps={args.lr_warmup_steps} must be 0 or more.")
    if not 0.0 <= args.adam_beta1 < 1.0 or not 0.0 <= args.adam_beta2 < 1.0:
        raise UsageError(f"--adam_beta1={args.adam_beta1} and --adam_beta2={args.adam_beta2} must be in [0, 1).")
    if not 0 <= args.snr_gamma < math.inf:
        raise UsageError(f"--snr_gamma={args.snr_gamma} must be 0 (off) or a positive, finite number such as 5.")
    for name in ("ode_rtol", "ode_atol"):
        value = getattr(args, name)
        if value is not None and not 0 < value < math.inf:
            raise UsageError(f"--{name}={value} must be a positive, finite number, for example 1e-3.")
    if args.dataset_name and args.train_data_dir:
        raise UsageError("Pass either --dataset_name or --train_data_dir, not both.")
    if args.train_data_dir is not None and not Path(args.train_data_dir).is_dir():
        raise UsageError(f"--train_data_dir {args.train_data_dir!r} is not a folder; pass a folder of images.")
    if args.model_config_name_or_path:
        check_model_config_option(args)
    if args.model == "unet" and args.preset != "mnist_cunet":
        raise UsageError("--preset selects a continuous U-Net preset; it does not apply to --model unet.")
    if args.model == "unet" and (args.ode_solver or args.ode_steps or args.ode_adjoint or args.no_attention or args.no_residual):
        raise UsageError("ODE options and ablation switches apply to --model cunet only.")
    if args.model == "unet" and args.resolution % 8:
        raise UsageError(
            f"--resolution={args.resolution} does not divide by 8, which the UNet2DModel baseline's three "
            "downsamplings need; pass --resolution 32 (digits are padded) or use --model cunet, which takes any size."
        )
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("--mixed_precision fp16 needs a CUDA GPU; on a CPU use --mixed_precision bf16 or no.")
    if args.push_to_hub and args.hub_model_id is None:
        args.hub_model_id = Path(args.output_dir).resolve().name
    if args.num_class_embeds is not None:
        args.class_conditional = True
    if args.ddpm_num_inference_steps is None:
        args.ddpm_num_inference_steps = 250 if args.sampler == "ddpm" else 50
    if args.sampler == "sde-dpmsolver++" and args.ddpm_num_inference_steps >= args.ddpm_num_steps:
        # diffusers 0.42's DPM-Solver++ gave non-finite samples at 1,000 of 1,000 timesteps (999 worked).
        raise UsageError(
            f"--ddpm_num_inference_steps {args.ddpm_num_inference_steps} with --sampler sde-dpmsolver++ must be below "
            f"the {args.ddpm_num_steps} diffusion timesteps (--ddpm_num_steps); about 50 steps suit this sampler."
        )
    if args.resume_from_checkpoint and args.overwrite_output_dir:
        raise UsageError(
            "--overwrite_output_dir deletes the checkpoints that --resume_from_checkpoint continues from; pass "
            "--resume_from_checkpoint to continue the run, or --overwrite_output_dir to start it again."
        )


# ----------------------------------------------------------------------------- setup


@dataclass
class TrainingSetup:
    accelerator: Accelerator
    model: torch.nn.Module
    ema: EMAModel | None
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    noise_scheduler: DDPMScheduler
    dataloader: torch.utils.data.DataLoader
    dataset: SeededTrainingDataset
    sampler: EpochSeededSampler
    channels: int
    num_classes: int | None
    dataset_label: str
    max_train_steps: int
    num_update_steps_per_epoch: int
    num_epochs: int
    budget_note: str | None = None
    deadline: float | None = None
    target_steps: int | None = None
    sampling_seconds_per_step: float = 0.0
    cpu_allocator: str | None = None  # how CPU memory is allocated (--keep_freed_memory); None on a GPU


@dataclass
class StepPlan:
    """The run's optimizer steps and, under a time budget, how they were chosen and when training must stop."""

    steps: int
    note: str | None = None
    # A `time.perf_counter()` value: a run that is still training then stops, saves a checkpoint and samples.
    deadline: float | None = None
    # The maximum step count (set only when the budget chose the steps of a new run). The run sets its step
    # count again, up to this maximum, from the timing of its own first steps.
    target_steps: int | None = None
    # Seconds per optimizer step that in-training sample grids add.
    sampling_seconds_per_step: float = 0.0


def resolve_mixed_precision(requested: str) -> str:
    """Return the mixed precision mode for `--mixed_precision` (see its help for what `auto` picks)."""
    if requested != "auto":
        return requested
    configured = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if configured in ("fp16", "bf16"):
        return configured
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "no"
    # Without native kernels, oneDNN leaves bf16 convolutions to ATen's slow fallback: on a 2-core AVX2 CPU
    # (no AVX512-BF16), a bf16 training step of the default model took 4.7 s against 0.40 s in float32.
    native_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bf16" if native_bf16 else "no"


def create_accelerator(args: argparse.Namespace) -> Accelerator:
    args.mixed_precision = resolve_mixed_precision(args.mixed_precision)
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        # accelerate on a CPU would silently train in float32 while the card records fp16.
        raise UsageError(
            "accelerate's setting requests fp16 mixed precision, which needs a CUDA GPU; on a CPU pass "
            "--mixed_precision bf16 or no to the script, or change `accelerate config`."
        )
    output_dir = Path(args.output_dir)
    project_config = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir))
    # On a machine without CUDA, accelerate 1.16 forms one gloo process group across the launched
    # processes only when `cpu=True`. Without it, each process silently trains alone.
    cpu_only = not torch.cuda.is_available()
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.logger == "none" else args.logger,
        project_config=project_config,
        cpu=cpu_only,
    )


def load_data(args: argparse.Namespace):
    """Load the dataset and return (dataset, image column, label column, channels, dataset label)."""
    from diffusers_cunet import data as cunet_data

    with user_input_errors():
        dataset = cunet_data.load_training_dataset(
            dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
            train_data_dir=args.train_data_dir, cache_dir=args.cache_dir,
        )
        if args.max_train_samples is not None:
            dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
        if len(dataset) == 0:
            raise UsageError("The training dataset is empty; check --dataset_name or --train_data_dir.")
        image_column = cunet_data.detect_image_column(dataset, args.image_column)
        label_column = None
        if args.class_conditional:
            label_column = cunet_data.detect_label_column(dataset, args.label_column)
        channels = args.num_channels or cunet_data.infer_num_channels(dataset, image_column)
    if args.dataset_name:
        label = args.dataset_name
    elif args.train_data_dir:
        label = f"image folder {Path(args.train_data_dir).name}"
    else:
        label = "mnist (embedded 5,000-digit subset)"
    return dataset, image_column, label_column, channels, label


def build_model(args: argparse.Namespace, channels: int, num_classes: int | None):
    if args.model == "unet":
        overrides = {"num_class_embeds": num_classes} if num_classes else {}
        return presets.thesis_unet(args.resolution, channels, **overrides)

    overrides = model_overrides(args, num_classes)
    if args.model_config_name_or_path:
        return model_from_config(args, channels, overrides)
    try:
        return presets.PRESETS[args.preset](args.resolution, channels, **overrides)
    except ValueError as error:
        raise UsageError(restate_model_error(args, str(error))) from error


def check_model_config_option(args: argparse.Namespace) -> None:
    """Reject a --model_config_name_or_path that cannot apply, before any data or Hub access."""
    value = args.model_config_name_or_path
    if args.model == "unet":
        raise UsageError(
            f"--model_config_name_or_path {value!r} loads a continuous U-Net config; it does not apply to --model unet."
        )
    path = Path(value).expanduser()
    # A value that can only be a local path is checked here, so that it is never looked up on the Hub.
    looks_local = path.suffix == ".json" or path.is_absolute() or value.startswith((".", "~"))
    if looks_local and not path.exists():
        raise UsageError(
            f"--model_config_name_or_path {value!r} is not found; pass a config.json file, a folder that contains "
            "one, or a Hub repo id."
        )


def unreachable_hub_cause(error: BaseException) -> str | None:
    """Return the connection error behind a failed Hub download, or None when the Hub responded.

    diffusers reports an unreachable Hub as a repo without the file, so the chain of causes is searched.
    """
    from huggingface_hub.errors import LocalEntryNotFoundError

    seen = set()
    cause = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ConnectionError) or type(cause).__name__ in ("ConnectError", "ConnectTimeout"):
            return f"{type(cause).__name__}: {cause}"
        if isinstance(cause, LocalEntryNotFoundError) and cause.__cause__ is None and cause.__context__ is None:
            return "no connection"
        cause = cause.__cause__ or cause.__context__
    return None


def model_init_defaults(model_class) -> dict:
    """Return the config defaults of a diffusers model class: its __init__ keyword arguments and their values."""
    return {
        name: parameter.default
        for name, parameter in inspect.signature(model_class.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }


def model_from_config(args: argparse.Namespace, channels: int, overrides: dict):
    """Build the continuous U-Net of a config file, folder or Hub repo, with the command line's model options on top."""
    value = args.model_config_name_or_path
    settings = read_run_settings(value) if Path(value).expanduser().is_dir() else None
    try:
        if settings is not None:
            # A checkpoint folder: its run settings record the model config it was trained with.
            loaded = settings.get("must_match", {}).get("model_config")
            if not isinstance(loaded, dict):
                raise UsageError(
                    f"--model_config_name_or_path {value!r} is a checkpoint whose run settings contain no model "
                    "config; pass a config.json, such as a trained pipeline's unet/config.json."
                )
        else:
            loaded = ContinuousUNet2DModel.load_config(value)
    except OSError as error:
        unreachable = unreachable_hub_cause(error)
        if unreachable is not None:
            from huggingface_hub import constants

            raise UsageError(
                f"--model_config_name_or_path {value!r} was looked up on the Hub at {constants.ENDPOINT}, which did "
                f"not answer ({unreachable}). Check the network or HF_ENDPOINT, set HF_HUB_OFFLINE=1 to use the local "
                "cache, or pass a local config.json."
            ) from error
        raise UsageError(f"--model_config_name_or_path {value!r} could not be loaded: {error}") from error
    if not isinstance(loaded, dict):
        raise UsageError(
            f"--model_config_name_or_path {value!r} contains a JSON {type(loaded).__name__}, not an object; pass a "
            "config.json as save_pretrained writes it, such as a trained pipeline's unet/config.json."
        )
    class_name = loaded.get("_class_name")
    if class_name not in (None, ContinuousUNet2DModel.__name__):
        raise UsageError(
            f"--model_config_name_or_path {value!r} is a config of {class_name}, not of ContinuousUNet2DModel; pass a "
            "continuous U-Net config, or --model unet (without a config) for the UNet2DModel baseline."
        )
    # Keys that the config leaves out take the model's defaults, as from_config does.
    config = {**model_init_defaults(ContinuousUNet2DModel), **loaded}
    if config["sample_size"] != args.resolution:
        raise UsageError(
            f"--model_config_name_or_path {value!r} has sample_size={config['sample_size']}, but --resolution is "
            f"{args.resolution}; pass --resolution {config['sample_size']} or set sample_size to {args.resolution} "
            "in the config. Pipelines generate images of the config's sample_size."
        )
    if config["in_channels"] != channels:
        raise UsageError(
            f"--model_config_name_or_path {value!r} has in_channels={config['in_channels']}, but the training "
            f"images have {channels} channel(s); pass a config with in_channels={channels} and "
            f"out_channels={channels}, or --num_channels {config['in_channels']} to convert the images."
        )
    try:
        return ContinuousUNet2DModel.from_config({**config, **overrides})
    except ValueError as error:
        raise UsageError(f"--model_config_name_or_path {value!r} with these model options is invalid: {error}") from error


def model_overrides(args: argparse.Namespace, num_classes: int | None) -> dict:
    """Collect the model options given on the command line as config overrides."""
    overrides = {}
    if args.block_out_channels:
        # New widths also move the bottleneck to the last width (the preset's own rule).
        overrides["block_out_channels"] = tuple(args.block_out_channels)
        overrides["mid_block_channels"] = args.block_out_channels[-1]
    for option, key in (("patch_size", "patch_size"), ("ode_solver", "ode_solver"), ("ode_steps", "ode_steps"),
                        ("ode_rtol", "ode_rtol"), ("ode_atol", "ode_atol"), ("ode_max_steps", "ode_max_steps"), ("ode_backend", "ode_backend"),
                        ("dropout", "dropout"), ("initial_velocity", "initial_velocity")):
        value = getattr(args, option)
        if value is not None:
            overrides[key] = value
    if args.ode_adjoint:
        overrides["ode_adjoint"] = True
    if args.no_attention:
        overrides["use_attention"] = False
    if args.no_residual:
        overrides["use_residual"] = False
    if num_classes:
        overrides["num_class_embeds"] = num_classes
    return overrides


def restate_model_error(args: argparse.Namespace, message: str) -> str:
    """Restate a model-config error in the script's options (--block_out_channels, --resolution)."""
    groups = re.match(r"norm_num_groups=(\d+) does not divide", message)
    if groups and args.block_out_channels:
        count = int(groups[1])
        # Each width rounded up to the next multiple of the group count.
        example = " ".join(str(-(-max(width, 1) // count) * count) for width in args.block_out_channels)
        return (
            f"--block_out_channels {' '.join(map(str, args.block_out_channels))} does not fit the {args.preset} "
            f"preset, whose group norms split channels into {count} groups: every width must be a multiple of "
            f"{count}, for example --block_out_channels {example}."
        )
    patch = re.match(r"sample_size=.*? is not a multiple of patch_size=(\d+)", message)
    if patch:
        return (
            f"--resolution {args.resolution} is not a multiple of the model's patch size {patch[1]}; pass a "
            f"--resolution that is, or --patch_size 1."
        )
    size = re.match(r"sample_size=.*? is too small for (\d+) levels.*at least (\d+)\.", message, re.DOTALL)
    if size:
        return (
            f"--resolution {args.resolution} is too small for the model's {size[1]} levels, which halve the image "
            f"{size[1]} times; pass --resolution {size[2]} or more, or fewer --block_out_channels."
        )
    return f"The {args.preset} preset rejects these options: {message}"


def setup(args: argparse.Namespace, accelerator: Accelerator) -> TrainingSetup:
    dataset, image_column, label_column, channels, dataset_label = load_data(args)
    from diffusers_cunet import data as cunet_data

    num_classes = None
    if args.class_conditional:
        if label_column is None:
            raise UsageError(
                f"Class-conditional training needs a label column, but the dataset has only {dataset.column_names}; "
                "pass --label_column or drop --class_conditional/--num_class_embeds."
            )
        dataset_classes = cunet_data.get_num_classes(dataset, label_column)
        if args.num_class_embeds is not None and args.num_class_embeds < dataset_classes:
            raise UsageError(
                f"--num_class_embeds={args.num_class_embeds} is smaller than the {dataset_classes} classes in column "
                f"{label_column!r}; pass --num_class_embeds {dataset_classes} or leave it unset."
            )
        num_classes = args.num_class_embeds or dataset_classes

    transform = SeededImageTransform(
        resolution=args.resolution, channels=channels, center_crop=args.center_crop,
        random_flip=args.random_flip, pad_small=True, convert=cunet_data.convert_image,
    )
    training_dataset = SeededTrainingDataset(dataset, image_column, transform, args.seed, label_column)
    sampler = EpochSeededSampler(len(training_dataset), args.seed)
    dataloader = torch.utils.data.DataLoader(
        training_dataset, batch_size=args.train_batch_size, sampler=sampler,
        num_workers=args.dataloader_num_workers, drop_last=len(training_dataset) >= args.train_batch_size * accelerator.num_processes,
    )

    model = build_model(args, channels, num_classes)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    ema = None
    if args.use_ema:
        ema = EMAModel(
            model.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma,
            power=args.ema_power, model_cls=type(model), model_config=model.config, foreach=True,
        )

    noise_scheduler = DDPMScheduler(
        num_train_timesteps=args.ddpm_num_steps, beta_schedule=args.ddpm_beta_schedule,
        prediction_type=args.prediction_type,
    )
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
        # One fused kernel updates all parameters (CPU and CUDA). The default per-parameter loop took about
        # 4 ms more per step for the 172 tensors of the default model, measured on 2 cores.
        fused=True,
    )

    # Steps are optimizer steps: one per `gradient_accumulation_steps` batches on every process.
    batches_per_process = math.ceil(len(dataloader) / accelerator.num_processes)
    num_update_steps_per_epoch = max(1, math.ceil(batches_per_process / args.gradient_accumulation_steps))
    plan = plan_max_train_steps(args, accelerator, model, noise_scheduler, channels, num_classes, num_update_steps_per_epoch)
    max_train_steps = plan.steps
    num_epochs = math.ceil(max_train_steps / num_update_steps_per_epoch)

    lr_scheduler = make_lr_scheduler(args, optimizer, max_train_steps, accelerator.num_processes)
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
        register_ema_checkpoint_hooks(accelerator, ema, type(accelerator.unwrap_model(model)))

    return TrainingSetup(
        accelerator=accelerator, model=model, ema=ema, optimizer=optimizer, lr_scheduler=lr_scheduler,
        noise_scheduler=noise_scheduler, dataloader=dataloader, dataset=training_dataset, sampler=sampler,
        channels=channels, num_classes=num_classes, dataset_label=dataset_label, max_train_steps=max_train_steps,
        num_update_steps_per_epoch=num_update_steps_per_epoch, num_epochs=num_epochs, budget_note=plan.note,
        deadline=plan.deadline, target_steps=plan.target_steps, sampling_seconds_per_step=plan.sampling_seconds_per_step,
    )


def make_lr_scheduler(args, optimizer: torch.optim.Optimizer, max_train_steps: int, num_processes: int):
    # accelerate steps a prepared scheduler once per process for each optimizer step, hence the factor.
    return get_scheduler(
        args.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=max_train_steps * num_processes,
    )


def replan_max_train_steps(args, state: TrainingSetup, global_step: int, loop_seconds: float) -> int | None:
    """Set the step count of a budget-capped run again from its own loop timing; return the new count.

    All ranks get the same count: the slowest rank's step time and the least time left. The learning-rate
    schedule keeps its position and continues towards the new count. Returns None when nothing changed.
    """
    accelerator = state.accelerator
    remaining = state.deadline - time.perf_counter()
    figures = accelerator.gather(torch.tensor([[loop_seconds, remaining]], device=accelerator.device)).reshape(-1, 2)
    loop_seconds = figures[:, 0].max().item()
    remaining = figures[:, 1].min().item()
    # NOTE: grids sampled between the two timed steps count twice here, which lowers the count slightly.
    per_step = loop_seconds + state.sampling_seconds_per_step
    steps = min(state.target_steps, global_step + max(1, int(remaining // per_step)))
    if steps == state.max_train_steps:
        return None
    logger.info(
        "The training loop ran %.3f s per step, so the budget fits %d steps (planned: %d).",
        loop_seconds, steps, state.max_train_steps,
    )
    state.budget_note = (f"{state.budget_note}; set to {steps} steps after step {global_step}, at {loop_seconds:.3f} s "
                         "per step in the training loop")
    state.max_train_steps = steps
    state.num_epochs = math.ceil(steps / state.num_update_steps_per_epoch)
    # Only the schedule's function of the step changes: the scheduler keeps its step counter and the optimizer.
    placeholder = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    replacement = make_lr_scheduler(args, placeholder, steps, accelerator.num_processes)
    scheduler = getattr(state.lr_scheduler, "scheduler", state.lr_scheduler)
    scheduler.lr_lambdas = [replacement.lr_lambdas[0]] * len(scheduler.optimizer.param_groups)
    return steps


def time_budget_minutes(args) -> float | None:
    """Return the run's time budget: the option's value, or the default run's budget."""
    if args.time_budget_minutes is not None:
        return args.time_budget_minutes
    if args.max_train_steps is None and not (args.dataset_name or args.train_data_dir):
        return DEFAULT_MNIST_BUDGET_MINUTES
    return None


def plan_max_train_steps(
    args, accelerator: Accelerator, model, noise_scheduler, channels: int, num_classes: int | None,
    num_update_steps_per_epoch: int,
) -> StepPlan:
    """Choose the run's optimizer steps and, under a time budget, the time by which training must stop.

    The steps come from --max_train_steps, else 10,000 on the embedded data, else --num_epochs. A time
    budget then caps them: the steps that fit after the time spent so far, the final sampling and the
    saving. A run resumed without --max_train_steps keeps the step count its checkpoint recorded, so it
    ends where the interrupted run would have ended. Since a machine can slow down after the timing,
    the plan also has a deadline that stops training early.
    """
    if args.max_train_steps is not None:
        steps = args.max_train_steps
    elif not (args.dataset_name or args.train_data_dir):
        steps = DEFAULT_MNIST_STEPS
    else:
        steps = args.num_epochs * num_update_steps_per_epoch
    budget = time_budget_minutes(args)
    if budget is None:
        return StepPlan(steps)

    # A resumed run's checkpoint is read before the timing, so a wrong path fails at once.
    checkpoint, recorded = None, None
    if args.resume_from_checkpoint and args.max_train_steps is None:
        with user_input_errors():
            checkpoint = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
            settings = read_run_settings(checkpoint) if checkpoint is not None else None
        recorded = (settings or {}).get("may_differ", {}).get("max_train_steps")

    step_seconds, sampling_seconds = time_training_step(args, accelerator, model, noise_scheduler, channels, num_classes)
    final_sampling = sampling_seconds * min(args.ddpm_num_inference_steps, args.ddpm_num_steps)
    # In-training sample grids add their sampling time, spread over the steps between them.
    grid_share = final_sampling / args.save_images_steps if args.save_images_steps else 0.0
    per_step = step_seconds * LOOP_OVERHEAD + grid_share
    deadline = SCRIPT_START + budget * 60 - final_sampling - FINISH_RESERVE_SECONDS
    spent = time.perf_counter() - SCRIPT_START
    measured = (f"{step_seconds:.3f} s per training step and {final_sampling:.0f} s for the final samples "
                f"measured, {spent:.0f} s spent on start-up")

    if isinstance(recorded, int) and recorded > 0:
        return StepPlan(recorded, f"{recorded} steps, as planned by the run that wrote {checkpoint.name}", deadline)

    fitting = int((deadline - time.perf_counter()) // per_step)
    # Each rank reads its own clock, so the ranks take the smallest count to train the same steps.
    fitting = int(accelerator.gather(torch.tensor([fitting], device=accelerator.device)).min().item())
    if fitting < 1:
        raise UsageError(
            f"--time_budget_minutes={budget:g} leaves no time to train ({measured}, and {FINISH_RESERVE_SECONDS:.0f} s "
            "kept for saving). Raise the budget, or leave --time_budget_minutes unset"
            + (" and pass --max_train_steps N" if args.max_train_steps is None else "") + " to train without a budget."
        )
    if fitting >= steps:
        return StepPlan(steps, f"{steps} steps fit in the {budget:g}-minute budget ({measured})", deadline,
                        target_steps=steps, sampling_seconds_per_step=grid_share)
    # With --max_train_steps given, only an explicit --time_budget_minutes sets a budget.
    remedy = ("Leave --time_budget_minutes unset" if args.max_train_steps is not None
              else f"Pass --max_train_steps {steps}")
    logger.warning(
        "Training %d of %d steps to stay within the %g-minute budget (%s). %s to train them all.",
        fitting, steps, budget, measured, remedy,
    )
    return StepPlan(fitting, f"{fitting} of {steps} steps, capped by the {budget:g}-minute budget ({measured})", deadline,
                    target_steps=steps, sampling_seconds_per_step=grid_share)


def time_training_step(
    args, accelerator: Accelerator, model, noise_scheduler, channels: int, num_classes: int | None,
    rounds: int = 6,
) -> tuple[float, float]:
    """Time one optimizer step and one sampling forward pass on a copy of the model, in seconds.

    The copy trains on random images with its own optimizer, so the run's weights, optimizer and random
    streams are untouched. With several processes, every rank gets the slowest rank's times.
    """
    device = accelerator.device
    probe = copy.deepcopy(model).to(device)
    if getattr(probe.config, "ode_check_finite", False):
        # fp16 steps without the run's gradient scaler may overflow; the copy's weights are thrown away anyway.
        probe.register_to_config(ode_check_finite=False)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=args.learning_rate, fused=True)
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.train_batch_size, channels, args.resolution, args.resolution)
    clean_images = (torch.rand(shape, generator=generator) * 2 - 1).to(device)
    class_labels = torch.randint(0, num_classes, (shape[0],), generator=generator).to(device) if num_classes else None

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def training_step():
        for _ in range(args.gradient_accumulation_steps):
            noise = torch.randn(shape, generator=generator).to(device)
            timesteps = sample_timesteps(args.timestep_sampling, args.ddpm_num_steps, shape[0], generator).to(device)
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
            with accelerator.autocast():
                output = probe(noisy_images, timesteps, class_labels=class_labels).sample
            loss = diffusion_loss(output, clean_images, noise, timesteps, noise_scheduler, args.prediction_type,
                                  snr_gamma=args.snr_gamma or None)
            loss.backward()
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(probe.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def sampling_forward():
        images = torch.randn((args.eval_batch_size, channels, args.resolution, args.resolution), generator=generator)
        labels = torch.arange(args.eval_batch_size) % num_classes if num_classes else None
        probe(images.to(device), torch.full((args.eval_batch_size,), args.ddpm_num_steps // 2, device=device),
              class_labels=None if labels is None else labels.to(device))

    def median_seconds(function, repeats: int) -> float:
        timings = []
        for _ in range(repeats):
            synchronize()
            start = time.perf_counter()
            function()
            synchronize()
            timings.append(time.perf_counter() - start)
        return sorted(timings)[len(timings) // 2]

    probe.train()
    training_step()  # the first steps pay for allocation and kernel selection
    training_step()
    step_seconds = median_seconds(training_step, rounds)
    probe.eval()
    sampling_forward()
    sampling_seconds = median_seconds(sampling_forward, 3)
    del probe, optimizer
    timings = accelerator.gather(torch.tensor([[step_seconds, sampling_seconds]], device=device))
    step_seconds, sampling_seconds = timings.reshape(-1, 2).max(dim=0).values.tolist()
    return step_seconds, sampling_seconds


def register_ema_checkpoint_hooks(accelerator: Accelerator, ema: EMAModel, model_cls) -> None:
    """Save the EMA shadow weights as safetensors in `checkpoint-N/unet_ema`, with its step count and decay settings."""

    def save_ema(models, weights, output_dir):
        if accelerator.is_main_process:
            ema.save_pretrained(os.path.join(output_dir, "unet_ema"))

    def load_ema(models, input_dir):
        path = os.path.join(input_dir, "unet_ema")
        if not os.path.isdir(path):
            raise UsageError(
                f"{input_dir!r} has no unet_ema folder, but this run uses EMA; resume with --use_ema as the "
                "checkpoint was written, or pass --no-use_ema."
            )
        # Read the folder directly. EMAModel.from_pretrained passes the EMA settings to the model's config, so
        # diffusers warns about unexpected config attributes and about a deprecated from_config call.
        settings = model_cls.load_config(path)
        weights_file = os.path.join(path, SAFETENSORS_WEIGHTS_NAME)
        if not os.path.isfile(weights_file):
            raise UsageError(
                f"{path!r} is missing {SAFETENSORS_WEIGHTS_NAME}, so the checkpoint is incomplete; resume from an earlier one."
            )
        shadow = load_file(weights_file)
        model = accelerator.unwrap_model(models[0])
        missing = [name for name, _ in model.named_parameters() if name not in shadow]
        if missing:
            raise UsageError(
                f"The EMA weights in {path!r} do not match the model (missing {missing[0]} and {len(missing) - 1} more); "
                "resume with the model settings the checkpoint was written with."
            )
        state = {key: settings[key] for key in EMA_STATE_KEYS if key in settings}
        state["shadow_params"] = [
            shadow[name].to(device=parameter.device, dtype=parameter.dtype) for name, parameter in model.named_parameters()
        ]
        ema.load_state_dict(state)
        ema.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save_ema)
    accelerator.register_load_state_pre_hook(load_ema)


# ----------------------------------------------------------------------------- training step


def step_generator(seed: int, step: int, process_index: int, micro_step: int) -> torch.Generator:
    """A generator for one batch's noise and timesteps, independent of what ran before (so resume is exact)."""
    return torch.Generator().manual_seed(hash((seed, step, process_index, micro_step)) & 0x7FFF_FFFF_FFFF)


def sample_timesteps(method: str, num_train_timesteps: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Draw one diffusion timestep per sample over [0, num_train_timesteps): see --timestep_sampling."""
    if method == "uniform":
        return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
    # One draw in each of `batch_size` equal slices of [0, 1): every batch covers all noise levels.
    offsets = (torch.rand((), generator=generator) + torch.arange(batch_size)) / batch_size
    if method == "logit-normal":
        # The slices are taken of the logit-normal law's quantiles, so each batch still spans it evenly.
        offsets = torch.sigmoid(torch.special.ndtri(offsets.clamp(1e-6, 1 - 1e-6)))
    timesteps = (offsets * num_train_timesteps).long().clamp_(max=num_train_timesteps - 1)
    return timesteps[torch.randperm(batch_size, generator=generator)]


def train_step(args, state: TrainingSetup, batch: dict, generator: torch.Generator) -> torch.Tensor:
    """Run one forward/backward on a batch (an optimizer step once gradients are synchronised)."""
    accelerator = state.accelerator
    clean_images = batch["input"]
    batch_size = clean_images.shape[0]

    # Noise and timesteps are drawn on the CPU from the step's own generator, then moved.
    noise = torch.randn(clean_images.shape, generator=generator).to(clean_images.device, clean_images.dtype)
    timesteps = sample_timesteps(args.timestep_sampling, state.noise_scheduler.config.num_train_timesteps, batch_size, generator)
    timesteps = timesteps.to(clean_images.device)
    noisy_images = state.noise_scheduler.add_noise(clean_images, noise, timesteps)

    with accelerator.accumulate(state.model):
        with accelerator.autocast():
            model_output = state.model(noisy_images, timesteps, class_labels=batch.get("class_labels")).sample
        loss = diffusion_loss(
            model_output, clean_images, noise, timesteps, state.noise_scheduler, args.prediction_type,
            snr_gamma=args.snr_gamma or None,
        )
        accelerator.backward(loss)
        if accelerator.sync_gradients and args.max_grad_norm:
            accelerator.clip_grad_norm_(state.model.parameters(), args.max_grad_norm)
        state.optimizer.step()
        state.lr_scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
    return loss.detach()


# ----------------------------------------------------------------------------- sampling and evaluation


def sampling_scheduler(args, noise_scheduler: DDPMScheduler):
    """Build the --sampler scheduler from the training noise schedule (betas and prediction type)."""
    if args.sampler == "sde-dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(noise_scheduler.config, algorithm_type="sde-dpmsolver++")
    if args.sampler == "ddim":
        return DDIMScheduler.from_config(noise_scheduler.config)
    return DDPMScheduler.from_config(noise_scheduler.config)


@torch.no_grad()
def generate_samples(args, state: TrainingSetup, num_images: int, seed: int) -> torch.Tensor:
    """Generate `num_images` samples in [-1, 1] with the EMA weights swapped in (and back out)."""
    from diffusers_cunet.pipelines import ContinuousUNetPipeline

    model = state.accelerator.unwrap_model(state.model)
    if state.ema is not None:
        # EMA weights go in for sampling and the training weights come back bit for bit after it.
        state.ema.store(model.parameters())
        state.ema.copy_to(model.parameters())
    was_training = model.training
    model.eval()
    try:
        pipeline = ContinuousUNetPipeline(unet=model, scheduler=sampling_scheduler(args, state.noise_scheduler))
        pipeline.set_progress_bar_config(disable=True)
        # In-training sampling never requests more steps than the noise scheduler has.
        steps = min(args.ddpm_num_inference_steps, args.ddpm_num_steps)
        class_labels = None
        if state.num_classes:
            class_labels = torch.arange(num_images) % state.num_classes
        generator = torch.Generator(device="cpu").manual_seed(seed)
        images = pipeline(
            batch_size=num_images, generator=generator, num_inference_steps=steps,
            class_labels=class_labels, output_type="pt",
        ).images
    finally:
        if was_training:
            model.train()
        if state.ema is not None:
            state.ema.restore(model.parameters())
    return images


def save_image_grid(images: torch.Tensor, path: Path) -> None:
    """Save images in [0, 1], (N, C, H, W) or (N, H, W, C), as one PNG grid."""
    import torchvision

    if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.permute(0, 3, 1, 2)
    nrow = int(math.ceil(math.sqrt(images.shape[0])))
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp.png")
    torchvision.utils.save_image(images.float().clamp(0, 1), temporary, nrow=nrow, padding=2, pad_value=1.0)
    os.replace(temporary, path)


# ----------------------------------------------------------------------------- saving


def export_model(args, state: TrainingSetup):
    """Copy the model into a standalone one with the EMA weights (or the training weights without EMA)."""
    model = state.accelerator.unwrap_model(state.model)
    exported = type(model).from_config(model.config)
    exported.load_state_dict(model.state_dict())
    if state.ema is not None:
        state.ema.copy_to(exported.parameters())
    if hasattr(exported, "disable_gradient_checkpointing") and getattr(exported, "is_gradient_checkpointing", False):
        exported.disable_gradient_checkpointing()
    # `.float()`, not `.to(dtype=...)`: diffusers 0.42's `ModelMixin.to` warns about float32 modules on every
    # dtype cast, even for models that list none.
    return exported.cpu().float()


def save_pipeline(args, state: TrainingSetup, output_dir: Path) -> None:
    """Write model_index.json, unet/ (safetensors) and scheduler/ through a temporary folder."""
    pipeline = DDPMPipeline(unet=export_model(args, state), scheduler=DDPMScheduler.from_config(state.noise_scheduler.config))
    temporary = output_dir / ".tmp-pipeline"
    shutil.rmtree(temporary, ignore_errors=True)
    pipeline.save_pretrained(temporary, safe_serialization=True)
    for entry in temporary.iterdir():
        target = output_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    temporary.rmdir()


def push_folder_to_hub(args, output_dir: Path) -> str:
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(args.hub_model_id, exist_ok=True, private=args.hub_private_repo, token=args.hub_token).repo_id
    upload_folder(
        repo_id=repo_id, folder_path=str(output_dir), token=args.hub_token,
        commit_message="Upload continuous U-Net DDPM pipeline",
        ignore_patterns=["checkpoint-*", ".tmp-*", "*.bin", "*.pt", "*.pth", "logs/*", "step_*", "epoch_*"],
    )
    return repo_id


# ----------------------------------------------------------------------------- main


def log_banner(args, state: TrainingSetup) -> None:
    model = state.accelerator.unwrap_model(state.model)
    total_batch = args.train_batch_size * state.accelerator.num_processes * args.gradient_accumulation_steps
    lines = [
        "***** Running training *****",
        f"  Model = {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} parameters)",
        f"  Dataset = {state.dataset_label}: {len(state.dataset)} images, {state.channels} channel(s), {args.resolution}x{args.resolution}",
        f"  Num processes = {state.accelerator.num_processes} ({state.accelerator.distributed_type.value}, "
        f"backend={getattr(state.accelerator.state, 'backend', None)}), device = {state.accelerator.device}",
        f"  Num epochs = {state.num_epochs}",
        f"  Instantaneous batch size per device = {args.train_batch_size}",
        f"  Total train batch size (w. parallel, distributed & accumulation) = {total_batch}",
        f"  Gradient accumulation steps = {args.gradient_accumulation_steps}",
        f"  Total optimization steps = {state.max_train_steps}",
        *([f"  Time budget = {state.budget_note}"] if state.budget_note else []),
        f"  Mixed precision = {state.accelerator.mixed_precision}, CPU threads per process = {torch.get_num_threads()}",
        *([f"  CPU allocator = {state.cpu_allocator}"] if state.cpu_allocator else []),
    ]
    if isinstance(model, ContinuousUNet2DModel):
        settings = model.solver_settings
        lines.append(f"  ODE solver = {settings.solver} x {settings.steps} step(s), backend = {settings.resolved_backend}")
    for line in lines:
        logger.info(line)
    if args.ddpm_num_inference_steps > args.ddpm_num_steps:
        logger.warning(
            "--ddpm_num_inference_steps %d is more than the %d diffusion timesteps (--ddpm_num_steps); the sample "
            "grids use %d steps.", args.ddpm_num_inference_steps, args.ddpm_num_steps, args.ddpm_num_steps,
        )


def find_resume_checkpoint(args, state: TrainingSetup) -> Path | None:
    """Find the checkpoint to resume from (None for a fresh run) and check that its settings fit this run."""
    if not args.resume_from_checkpoint:
        return None
    with user_input_errors():
        path = resolve_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if path is None:
        logger.info("No checkpoint in %s; starting a new run.", args.output_dir)
        return None
    # A checkpoint trained with another model or objective would otherwise resume silently into a mixed run.
    with user_input_errors():
        step = checkpoint_step(path)  # a folder not named checkpoint-N fails here, before any work
    newer = [other.name for other in list_checkpoints(args.output_dir) if checkpoint_step(other) > step]
    if newer and path.resolve().parent == Path(args.output_dir).resolve():
        raise UsageError(
            f"{path.name} is older than {', '.join(newer)} in --output_dir {args.output_dir!r}, which a run resumed "
            f"from it would overwrite, with the saved pipeline. Resume with --resume_from_checkpoint latest, move the "
            f"newer checkpoints out of the folder first, or copy {path.name} into a new --output_dir and resume there."
        )
    with user_input_errors():
        model = state.accelerator.unwrap_model(state.model)
        messages = check_run_settings(path, run_settings(args, state), model_init_defaults(type(model)))
    for message in messages:
        logger.warning(message)
    return path


def resume(state: TrainingSetup, checkpoint: Path | None) -> int:
    """Load the checkpoint's state, if any, and return the optimizer step it reached (0 for a fresh run)."""
    if checkpoint is None:
        return 0
    logger.info("Resuming from %s", checkpoint)
    state.accelerator.load_state(str(checkpoint))
    return checkpoint_step(checkpoint)


def run_settings(args, state: TrainingSetup) -> dict:
    """Collect what a checkpoint records about its run, checked when a later run resumes from it."""
    model = state.accelerator.unwrap_model(state.model)
    model_config = {key: value for key, value in dict(model.config).items() if not key.startswith("_")}
    return {
        "must_match": {
            "model_class": type(model).__name__,
            "model_config": model_config,
            "ddpm_num_steps": args.ddpm_num_steps,
            "ddpm_beta_schedule": args.ddpm_beta_schedule,
            "prediction_type": args.prediction_type,
            "use_ema": args.use_ema,
        },
        "may_differ": {
            "seed": args.seed,
            "train_batch_size": args.train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "num_processes": state.accelerator.num_processes,
            "timestep_sampling": args.timestep_sampling,
            "snr_gamma": args.snr_gamma,
            "dataset": state.dataset_label,
            # The optimizer and learning-rate schedule come back from the checkpoint, so new values of
            # these have no effect on a resumed run.
            "learning_rate": args.learning_rate,
            "lr_scheduler": args.lr_scheduler,
            "lr_warmup_steps": args.lr_warmup_steps,
            "max_train_steps": state.max_train_steps,
        },
    }


def model_nfe_per_step(model) -> int | None:
    if isinstance(model, ContinuousUNet2DModel):
        return model.nfe.total
    return None


def written_by_this_script(entry: Path, args) -> bool:
    """Return whether a file or folder in the output folder is one that this script writes."""
    if entry.name == "README.md":
        # The model card carries the package's tag, and a user's own README.md does not.
        return entry.is_file() and "diffusers-cunet" in entry.read_text(encoding="utf-8", errors="replace")
    logs = Path(args.logging_dir).parts[0] if args.logging_dir else "logs"
    # The files the script writes inside its subfolders, so that --overwrite_output_dir deletes no others.
    folder_contents = {
        "unet": ("config.json", "diffusion_pytorch_model.safetensors"),
        "scheduler": ("scheduler_config.json",),
        "samples": ("final.png", "step-*.png", "epoch-*.png", "*.tmp.png"),
        # The trackers write their own files below a folder named after the run's project (or wandb's).
        logs: ("train_cunet/*", "wandb/*"),
    }
    if entry.name in folder_contents:
        if not entry.is_dir():
            return False
        patterns = folder_contents[entry.name]
        return all(path.is_dir() or any(fnmatch.fnmatch(path.relative_to(entry).as_posix(), pattern) for pattern in patterns)
                   for path in entry.rglob("*"))
    return entry.name in ("model_index.json", "training_results.json") or entry.name.startswith((".tmp-", "checkpoint-"))


def check_output_dir(args) -> None:
    """Check, before any work, that the output folder is safe to write (and with --overwrite_output_dir, to delete).

    The folder must be new, empty or an earlier output of this script: other files there would be replaced
    (its README.md by the model card) or deleted. A new run is refused where another run left checkpoints,
    which it would prune and mix with its own.
    """
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"--output_dir {args.output_dir!r} is a file; pass a folder path.")
    for parent in output_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise UsageError(
                f"--output_dir {args.output_dir!r} lies inside {str(parent)!r}, which is a file; pass a folder path."
            )
    if not output_dir.is_dir():
        return
    resolved = output_dir.resolve()
    if resolved == Path.cwd().resolve() or resolved in Path.cwd().resolve().parents or resolved == Path.home().resolve():
        raise UsageError(
            f"--output_dir {args.output_dir!r} is the current folder, a folder above it or the home folder; the "
            "script writes (and with --overwrite_output_dir deletes) a whole folder, so pass a folder of its own, "
            "such as the default cunet-mnist."
        )
    foreign = sorted(entry.name for entry in output_dir.iterdir() if not written_by_this_script(entry, args))
    if foreign:
        listed = ", ".join(foreign[:3])
        if len(foreign) > 3:
            listed += f" and {len(foreign) - 3} more"
        consequence = "deletes them" if args.overwrite_output_dir else "would mix its output with them"
        raise UsageError(
            f"--output_dir {args.output_dir!r} contains files that this script did not write ({listed}), and the "
            f"run {consequence}. Pass an empty or new folder."
        )
    if args.resume_from_checkpoint or args.overwrite_output_dir:
        return
    existing = list_checkpoints(args.output_dir)
    if existing:
        raise UsageError(
            f"--output_dir {args.output_dir!r} already has checkpoints of an earlier run ({existing[0].name} to "
            f"{existing[-1].name}); a new run there would prune them and mix its checkpoints with theirs. Pass "
            "--resume_from_checkpoint latest to continue that run, --overwrite_output_dir to delete it, or another "
            "--output_dir."
        )


def main(args: argparse.Namespace) -> dict:
    check_output_dir(args)
    output_dir = Path(args.output_dir)
    accelerator = create_accelerator(args)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if accelerator.is_main_process:
        if args.overwrite_output_dir and output_dir.exists():
            logger.info("Deleting the earlier output in %s (--overwrite_output_dir): %s", output_dir,
                        ", ".join(sorted(entry.name for entry in output_dir.iterdir())) or "nothing")
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(args.seed)
    if accelerator.device.type == "cpu":
        # `accelerate launch` sets OMP_NUM_THREADS=1 by default, which leaves all but one core idle.
        threads = args.num_cpu_threads or max(1, (os.cpu_count() or 1) // accelerator.state.num_processes)
        torch.set_num_threads(threads)
        # Each training step frees its activations and allocates them again. By default glibc returns that memory to
        # the system in between, and page-faulting it back cost 13% of a step of the default run.
        allocator_tuned = args.keep_freed_memory and keep_freed_memory_for_reuse()
        cpu_allocator = "freed memory kept for reuse" if allocator_tuned else "the C library's default"
    else:
        cpu_allocator = None

    state = setup(args, accelerator)
    state.cpu_allocator = cpu_allocator
    checkpoint = find_resume_checkpoint(args, state)
    if accelerator.is_main_process and args.logger != "none":
        # The Hub token never reaches the tracker's files.
        tracker_config = {
            key: value for key, value in vars(args).items()
            if isinstance(value, (int, float, str, bool)) and key != "hub_token"
        }
        accelerator.init_trackers("train_cunet", config=tracker_config)
    log_banner(args, state)

    if args.push_to_hub and accelerator.is_main_process:
        # Create the repo before training, so a bad token or an unreachable Hub fails in seconds.
        from huggingface_hub import constants, create_repo

        try:
            args.hub_model_id = create_repo(
                args.hub_model_id, exist_ok=True, private=args.hub_private_repo, token=args.hub_token
            ).repo_id
        except Exception as error:  # network, authentication and permission errors all end the run here
            raise UsageError(
                f"Failed to create the Hub repo {args.hub_model_id!r} at {constants.ENDPOINT} for --push_to_hub "
                f"({type(error).__name__}: {error}). Check the network, HF_ENDPOINT and --hub_token, or drop "
                "--push_to_hub and upload the output folder later."
            ) from error

    global_step = resume(state, checkpoint)
    if checkpoint is not None and global_step >= state.max_train_steps:
        # A finished run, resumed again (a restarted queue job, say), changes nothing in its output folder.
        logger.warning(
            "%s is at step %d, which already reaches the run's %d steps: nothing to train, and the output folder "
            "stays as it is. Pass a larger --max_train_steps to train on.",
            checkpoint.name, global_step, state.max_train_steps,
        )
        accelerator.end_training()
        return {"global_step": global_step, "already_trained": True}
    first_epoch = global_step // state.num_update_steps_per_epoch
    resume_batches = (global_step % state.num_update_steps_per_epoch) * args.gradient_accumulation_steps

    progress = tqdm(total=state.max_train_steps, initial=global_step, disable=not accelerator.is_local_main_process, desc="Steps")
    model = state.model
    start_time = time.perf_counter()
    # Training time of the runs before a resume, so the card reports the whole run's time.
    earlier_seconds = earlier_training_seconds(checkpoint)

    def checkpoint_settings() -> dict:
        return {**run_settings(args, state),
                "progress": {"training_seconds": earlier_seconds + time.perf_counter() - start_time}}
    start_step = global_step
    images_seen = 0
    last_loss = float("nan")
    micro_step = 0
    out_of_time = False
    # The step count may change after the first steps (replan_max_train_steps), so the epoch count is read anew.
    replan = state.target_steps is not None and checkpoint is None and REPLAN_STEPS is not None
    last_mark = None  # (step, time) of the latest re-timing mark
    # Log lines during training go through tqdm.write, so they do not break the progress bar's line. The bar is
    # closed on errors too, so that an error message starts on a line of its own.
    with logging_redirect_tqdm(), contextlib.closing(progress):
        for epoch in itertools.count(first_epoch):
            if epoch >= state.num_epochs or global_step >= state.max_train_steps:
                break
            model.train()
            loader = state.dataloader
            if epoch == first_epoch and resume_batches:
                loader = accelerator.skip_first_batches(loader, resume_batches)
            # accelerate's loaders set the sampler's and dataset's epoch from their own iteration counter
            # when iterated, which restarts at 0 in a resumed run, so the epoch is set on the loader itself.
            loader.set_epoch(epoch)
            state.dataset.set_epoch(epoch)
            state.sampler.set_epoch(epoch)
            for batch in loader:
                generator = step_generator(args.seed, global_step, accelerator.process_index, micro_step)
                micro_step = (micro_step + 1) % args.gradient_accumulation_steps
                loss = train_step(args, state, batch, generator)
                images_seen += batch["input"].shape[0] * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue

                if state.ema is not None:
                    state.ema.step(accelerator.unwrap_model(model).parameters())
                global_step += 1
                progress.update(1)
                if replan and global_step in REPLAN_STEPS:
                    if last_mark is not None:
                        mark_step, mark_time = last_mark
                        loop_seconds = (time.perf_counter() - mark_time) / (global_step - mark_step)
                        if replan_max_train_steps(args, state, global_step, loop_seconds) is not None:
                            progress.total = state.max_train_steps
                            progress.refresh()
                    last_mark = (global_step, time.perf_counter())
                elapsed = time.perf_counter() - start_time
                # Each rank's loss and whether its clock passed the deadline travel in one gather, so that all
                # ranks stop at the same step.
                late = state.deadline is not None and time.perf_counter() > state.deadline
                gathered = accelerator.gather(torch.stack([loss.float(), loss.new_tensor(float(late), dtype=torch.float32)])[None])
                last_loss = gathered[:, 0].mean().item()
                out_of_time = bool(gathered[:, 1].max().item())
                logs = {
                    "loss": last_loss,
                    "lr": state.lr_scheduler.get_last_lr()[0],
                    "step": global_step,
                    "images_per_second": images_seen / max(elapsed, 1e-9),
                }
                if state.ema is not None:
                    logs["ema_decay"] = state.ema.cur_decay_value
                nfe = model_nfe_per_step(accelerator.unwrap_model(model))
                if nfe is not None:
                    logs["nfe"] = nfe
                progress.set_postfix(**{key: f"{value:.4g}" for key, value in logs.items() if key != "step"})
                accelerator.log(logs, step=global_step)

                if global_step % args.checkpointing_steps == 0:
                    path = save_checkpoint_atomically(
                        accelerator, output_dir, global_step, args.checkpoints_total_limit, checkpoint_settings()
                    )
                    logger.info("Saved checkpoint %s", path)
                if args.save_images_steps and global_step % args.save_images_steps == 0:
                    images = generate_samples(args, state, args.eval_batch_size, seed=args.seed)
                    if accelerator.is_main_process:
                        save_image_grid(images, output_dir / "samples" / f"step-{global_step:06d}.png")
                if args.exit_after_steps and global_step - start_step >= args.exit_after_steps:
                    break
                if global_step >= state.max_train_steps:
                    out_of_time = False
                    break
                if out_of_time:
                    break
            if out_of_time:
                break

            if args.exit_after_steps and global_step - start_step >= args.exit_after_steps and global_step < state.max_train_steps:
                if global_step % args.checkpointing_steps:
                    save_checkpoint_atomically(
                        accelerator, output_dir, global_step, args.checkpoints_total_limit, checkpoint_settings()
                    )
                logger.info("Stopping after %d steps of this run at step %d (--exit_after_steps); resume with "
                            "--resume_from_checkpoint latest.", args.exit_after_steps, global_step)
                progress.close()
                accelerator.end_training()
                return {"global_step": global_step, "interrupted": True}
            if args.save_images_epochs and (epoch + 1) % args.save_images_epochs == 0:
                images = generate_samples(args, state, args.eval_batch_size, seed=args.seed)
                if accelerator.is_main_process:
                    save_image_grid(images, output_dir / "samples" / f"epoch-{epoch + 1:04d}.png")
            if args.save_model_epochs and (epoch + 1) % args.save_model_epochs == 0 and accelerator.is_main_process:
                save_pipeline(args, state, output_dir)
        progress.close()
    training_seconds = time.perf_counter() - start_time
    if not out_of_time and global_step > start_step and global_step % args.checkpointing_steps:
        # The last step's checkpoint marks the run as finished for a later --resume_from_checkpoint latest.
        save_checkpoint_atomically(accelerator, output_dir, global_step, args.checkpoints_total_limit, checkpoint_settings())
    if out_of_time:
        # The machine ran slower than when it was timed. The skipped steps are the end of the learning-rate
        # schedule, and the checkpoint lets a later run train them.
        logger.warning(
            "The time budget ran out at step %d of %d (the machine ran slower than when the steps were timed); "
            "sampling now. `--resume_from_checkpoint latest` trains the remaining steps later.",
            global_step, state.max_train_steps,
        )
        state.budget_note = f"{state.budget_note}; stopped at step {global_step} when the time ran out"
        if global_step % args.checkpointing_steps:
            save_checkpoint_atomically(
                accelerator, output_dir, global_step, args.checkpoints_total_limit, checkpoint_settings()
            )
    accelerator.wait_for_everyone()

    return finish(args, state, global_step, start_step, training_seconds, images_seen, last_loss, earlier_seconds)


def earlier_training_seconds(checkpoint: Path | None) -> float:
    """Return the training seconds that a checkpoint's run (and the runs it resumed) recorded, 0 for none."""
    if checkpoint is None:
        return 0.0
    seconds = ((read_run_settings(checkpoint) or {}).get("progress") or {}).get("training_seconds", 0.0)
    return float(seconds) if isinstance(seconds, (int, float)) and seconds >= 0 else 0.0


def finish(args, state: TrainingSetup, global_step, start_step, training_seconds, images_seen, last_loss,
           earlier_seconds: float = 0.0) -> dict:
    """Sample the final grid, judge digits, save the pipeline and card, and push when asked."""
    from diffusers_cunet.hub import render_model_card

    accelerator = state.accelerator
    output_dir = Path(args.output_dir)
    model = accelerator.unwrap_model(state.model)
    # Every rank logs a checksum of its weights, so a multi-process run shows that the ranks agree.
    checksum = sum(float(parameter.detach().double().sum()) for parameter in model.parameters())
    logger.info("Rank %d weights checksum %.10e", accelerator.process_index, checksum, main_process_only=False)

    sampling_start = time.perf_counter()
    images = generate_samples(args, state, args.eval_batch_size, seed=args.seed)
    sampling_seconds = time.perf_counter() - sampling_start
    nfe_per_denoising_step = model_nfe_per_step(model)

    results = {
        "global_step": global_step,
        "steps_this_run": global_step - start_step,
        "training_seconds": round(earlier_seconds + training_seconds, 1),
        "training_seconds_this_run": round(training_seconds, 1) if earlier_seconds else None,
        "images_per_second": round(images_seen / max(training_seconds, 1e-9), 2),
        "final_loss": last_loss if math.isfinite(last_loss) else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "nfe_per_denoising_step": nfe_per_denoising_step,
        "sampling_seconds_per_image": round(sampling_seconds / images.shape[0], 4),
        "sampler": f"{args.sampler} x {min(args.ddpm_num_inference_steps, args.ddpm_num_steps)} steps",
        "num_processes": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "process_group_backend": getattr(accelerator.state, "backend", None),
        "hardware": describe_hardware(accelerator),
        "dataset": state.dataset_label,
        "time_budget": state.budget_note,
    }

    evaluate_digits = args.evaluate_digits
    if evaluate_digits is None:
        evaluate_digits = not (args.dataset_name or args.train_data_dir) and state.channels == 1
    if evaluate_digits and accelerator.is_main_process:
        from diffusers_cunet.evaluation import judge_digits, load_digit_classifier

        verdict = judge_digits(images * 2.0 - 1.0, classifier=load_digit_classifier())
        results["digit_confident_share"] = round(float(verdict["confident_share"]), 4)
        results["digit_num_classes"] = int(verdict["num_classes"])
        logger.info(
            "Digit classifier: %.0f%% of %d samples called with p >= 0.9, %d classes among them",
            100 * results["digit_confident_share"], images.shape[0], results["digit_num_classes"],
        )

    if accelerator.is_main_process:
        save_image_grid(images, output_dir / "samples" / "final.png")
        save_pipeline(args, state, output_dir)
        card = render_model_card(args=vars(args), results=results, sample_grid="samples/final.png",
                                 repo_id=args.hub_model_id, model_config=dict(model.config))
        card.save(str(output_dir / "README.md"))
        (output_dir / "training_results.json").write_text(json.dumps(results, indent=2) + "\n")
        for key, value in results.items():
            logger.info("  %s = %s", key, value)
        if args.push_to_hub:
            repo_id = push_folder_to_hub(args, output_dir)
            logger.info("Uploaded %s to the Hub repo %s", output_dir, repo_id)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def describe_hardware(accelerator: Accelerator) -> str:
    """Name the devices the run trained on, for the results and the model card."""
    if accelerator.device.type == "cuda":
        return f"{accelerator.num_processes} x {torch.cuda.get_device_name(accelerator.device)}"
    processes = f"{accelerator.num_processes} process" + ("es" if accelerator.num_processes > 1 else "")
    return f"{processes} on CPU ({cpu_model_name()}, {os.cpu_count()} cores)"


def run_from_command_line(argv: list[str] | None = None) -> int:
    """Run the script; print a UsageError as one `error:` line (once, from the main process) and return 2."""
    created_output_dir = None
    try:
        args = parse_args(argv)
        if not Path(args.output_dir).exists():
            created_output_dir = Path(args.output_dir)
        main(args)
    except (UsageError, ImageReadError) as error:
        # A corrupt image found during training is bad input too, so it gets one line that names the file and the fix.
        if os.environ.get("RANK", "0") == "0":
            print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
            if created_output_dir is not None:
                remove_unused_output_dir(created_output_dir)
        return 2
    return 0


def remove_unused_output_dir(output_dir: Path) -> None:
    """Delete an output folder that a failed run created, if it contains no weights, only the run's own logs."""
    if not output_dir.is_dir():
        return
    # Any checkpoint-like folder counts, half-written ones too, so nothing resumable is deleted.
    has_checkpoint = any(output_dir.glob("checkpoint-*"))
    has_pipeline = (output_dir / "unet").exists() or (output_dir / "model_index.json").exists()
    if has_checkpoint or has_pipeline:
        return
    shutil.rmtree(output_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(run_from_command_line())
