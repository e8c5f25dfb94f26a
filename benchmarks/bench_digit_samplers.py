"""Compare diffusers samplers on a trained MNIST pipeline by the digit classifier's verdict.

Each sampler draws `--seeds` batches of `--images` samples from the same weights (seeds 0, 1, ...), and the shipped
digit classifier judges them: the share called a digit with probability >= 0.9 and the classes among those. The
README's sampler figures come from this script on the default run's output folder.

    .venv/bin/python benchmarks/bench_digit_samplers.py --pipeline cunet-mnist --threads 2
    .venv/bin/python benchmarks/bench_digit_samplers.py --pipeline cunet-mnist --samplers sde-dpmsolver++:50 ddpm:250
    .venv/bin/python benchmarks/bench_digit_samplers.py --quick

Sampler names: sde-dpmsolver++, dpmsolver++, ddpm, ddpm-fixed-large, ddim (eta 0), ddim-eta1, euler-ancestral and unipc,
each followed by `:STEPS`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    UniPCMultistepScheduler,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RunRecord,
    add_common_arguments,
    apply_thread_setting,
    markdown_table,
    publish,
    setup_logging,
)

from diffusers_cunet import ContinuousUNet2DModel, ContinuousUNetPipeline  # noqa: E402
from diffusers_cunet.evaluation import judge_digits, load_digit_classifier  # noqa: E402

SECTION = "bench_digit_samplers"
DEFAULT_SAMPLERS = (
    "sde-dpmsolver++:25", "sde-dpmsolver++:50", "sde-dpmsolver++:100", "ddpm:250", "ddpm:1000",
    "ddpm-fixed-large:250", "ddim:100", "ddim-eta1:250", "dpmsolver++:50",
)
QUICK_SAMPLERS = ("sde-dpmsolver++:2", "ddpm:2", "ddim:2")

# name -> (scheduler class, config overrides, keyword arguments of the pipeline call)
SAMPLERS = {
    "sde-dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}, {}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}, {}),
    "ddpm": (DDPMScheduler, {}, {}),
    "ddpm-fixed-large": (DDPMScheduler, {"variance_type": "fixed_large"}, {}),
    "ddim": (DDIMScheduler, {}, {"eta": 0.0}),
    "ddim-eta1": (DDIMScheduler, {}, {"eta": 1.0}),
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}, {}),
    "unipc": (UniPCMultistepScheduler, {}, {}),
}


def parse_sampler(spec: str) -> tuple[str, int]:
    """Split `NAME:STEPS` into the name and the steps, or raise a ValueError that names the accepted forms."""
    name, _, steps = spec.partition(":")
    if name not in SAMPLERS or not steps.isdigit() or int(steps) < 1:
        raise ValueError(
            f"--samplers entry {spec!r} is invalid; use NAME:STEPS with NAME one of {', '.join(SAMPLERS)} "
            "and STEPS a positive number, for example sde-dpmsolver++:50."
        )
    return name, int(steps)


def load_pipeline(args: argparse.Namespace) -> tuple[ContinuousUNetPipeline, str]:
    """Return the pipeline to judge and a line that describes its weights."""
    if args.pipeline:
        folder = Path(args.pipeline)
        pipeline = ContinuousUNetPipeline.from_pretrained(folder)
        return pipeline, f"Weights: the trained pipeline in `{folder}`."
    # Random weights only check that every sampler runs, so their verdict is near 0%.
    torch.manual_seed(args.seed)
    unet = ContinuousUNet2DModel(
        sample_size=32, in_channels=1, out_channels=1, block_out_channels=(8, 16), attention_levels=(),
        time_embedding_dim=32, norm_num_groups=4, ode_solver="semi_implicit_euler",
    )
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    return ContinuousUNetPipeline(unet=unet, scheduler=scheduler), "Weights: random (no `--pipeline` given)."


def judge_sampler(pipeline, classifier, spec: str, args: argparse.Namespace) -> list[object]:
    """Draw and judge the samples of one sampler, and return its table row."""
    name, steps = parse_sampler(spec)
    scheduler_class, overrides, call_kwargs = SAMPLERS[name]
    pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config, **overrides)
    shares, classes, seconds = [], [], 0.0
    for seed in range(args.seeds):
        start = time.perf_counter()
        images = pipeline(
            batch_size=args.images, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
            output_type="pt", **call_kwargs,
        ).images
        seconds += time.perf_counter() - start
        verdict = judge_digits(images * 2 - 1, classifier=classifier)
        shares.append(float(verdict["confident_share"]))
        classes.append(int(verdict["num_classes"]))
    mean = sum(shares) / len(shares)
    return [
        name, steps, f"{100 * mean:.0f}%", ", ".join(f"{100 * share:.0f}%" for share in shares),
        f"{min(classes)} to {max(classes)}" if min(classes) != max(classes) else str(classes[0]),
        f"{seconds / (args.seeds * args.images):.3f}",
    ]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--pipeline", help="Output folder of an MNIST training run (with model_index.json).")
    parser.add_argument("--samplers", nargs="+", help=f"NAME:STEPS entries (default: {' '.join(DEFAULT_SAMPLERS)}).")
    parser.add_argument("--seeds", type=int, default=4, help="Batches per sampler, with seeds 0, 1, ...")
    parser.add_argument("--images", type=int, default=64, help="Samples per batch.")
    args = parser.parse_args(argv)
    if args.samplers is None:
        args.samplers = list(QUICK_SAMPLERS if args.quick else DEFAULT_SAMPLERS)
    if args.quick:
        args.seeds, args.images = min(args.seeds, 1), min(args.images, 4)
    for name in ("seeds", "images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} is invalid; pass a positive number.")
    if args.pipeline and not (Path(args.pipeline) / "model_index.json").is_file():
        parser.error(
            f"--pipeline {args.pipeline!r} has no model_index.json; pass the output folder of a training run, "
            "such as cunet-mnist."
        )
    for spec in args.samplers:
        try:
            parse_sampler(spec)
        except ValueError as error:
            parser.error(str(error))
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging()
    apply_thread_setting(args)
    record = RunRecord()
    pipeline, weights = load_pipeline(args)
    pipeline.set_progress_bar_config(disable=True)
    classifier = load_digit_classifier()
    rows = [judge_sampler(pipeline, classifier, spec, args) for spec in args.samplers]
    table = markdown_table(
        ["sampler", "steps", "confident share (mean)", "per seed", "classes", "seconds per image"], rows
    )
    samples = args.seeds * args.images
    # Binomial standard error at a share near 2/3, the default run's figure.
    standard_error = 100 * math.sqrt((2 / 3) * (1 / 3) / samples)
    notes = [
        weights,
        f"Each sampler: {args.seeds} x {args.images} samples, seeds 0 to {args.seeds - 1}, the same for every sampler.",
        "Confident share: samples that `diffusers_cunet.evaluation.judge_digits` calls a digit with probability "
        f">= 0.9; classes: distinct digits among them. With {samples} samples, a share near 67% has a standard "
        f"error of about {standard_error:.1f} points.",
        "Seconds per image include the classifier's few milliseconds.",
    ]
    body = table + "\n\n" + "\n".join(f"- {note}" for note in notes)
    title = "Samplers judged by the digit classifier"
    if args.quick:
        title += " (--quick: random weights, tiny batches)"
    publish(args, SECTION, title, record, body)


if __name__ == "__main__":
    main()
