"""Time image sampling with diffusers schedulers, and the cU-Net's inference-time depth knob.

Part 1 times seconds per image for DDPM, DDIM, DPM-Solver++ and UniPC at several step counts, for the thesis
cU-Net and its UNet2DModel baseline, both through `ContinuousUNetPipeline`. Part 2 changes the cU-Net's ODE
solver and steps at sampling time (`set_ode_solver`, `set_ode_step_schedule`) and reports time and NFE per image.
Given a trained MNIST pipeline (`--pipeline`), it also judges 64 samples per setting with the digit classifier.

    .venv/bin/python benchmarks/bench_sampling.py --pipeline /tmp/exp1/out
    .venv/bin/python benchmarks/bench_sampling.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from diffusers.models.unets.unet_2d import UNet2DOutput

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RunRecord,
    add_common_arguments,
    apply_thread_setting,
    format_number,
    format_ratio,
    markdown_table,
    measure_interleaved,
    median,
    publish,
    setup_logging,
    time_call,
)

from diffusers_cunet import ContinuousUNetPipeline  # noqa: E402
from diffusers_cunet.presets import mnist_cunet, thesis_cunet, thesis_unet  # noqa: E402


logger = logging.getLogger("benchmarks.sampling")

SECTION = "bench_sampling"
SCHEDULERS = {
    "DDPM": DDPMScheduler,
    "DDIM": DDIMScheduler,
    "DPM-Solver++": DPMSolverMultistepScheduler,
    "UniPC": UniPCMultistepScheduler,
}
# Scheduler timed end to end at every step count. Above --measure-steps-up-to, the others are estimated.
REFERENCE_SCHEDULER = "DDIM"
FULL_STEPS = (5, 10, 20, 50, 100)
QUICK_STEPS = (2, 5)
MODEL_BUILDERS = {"cU-Net": thesis_cunet, "U-Net": thesis_unet}
QUICK_OVERRIDES = {
    "cU-Net": dict(block_out_channels=(8, 16, 16, 16), mid_block_channels=16, attention_head_dim=8, time_embedding_dim=32),
    "U-Net": dict(block_out_channels=(16, 16, 16, 16), norm_num_groups=8),
    "mnist_cunet": dict(block_out_channels=(8, 16), time_embedding_dim=32, attention_head_dim=8),
}
KNOB_STEPS = 50
STEP_SCHEDULE = [[0, 1], [500, 2]]


@dataclass(frozen=True)
class DepthSetting:
    """One inference-time depth of the cU-Net: a fixed-step solver, its steps, and an optional step schedule."""

    solver: str
    steps: int = 1
    schedule: tuple | None = None

    @property
    def label(self) -> str:
        text = f"{self.solver} x {self.steps}"
        if self.schedule:
            text = f"{self.solver}, schedule {[list(entry) for entry in self.schedule]}"
        return text

    def apply(self, model) -> None:
        model.set_ode_step_schedule(None)
        model.set_ode_solver(solver=self.solver, steps=self.steps)
        if self.schedule:
            model.set_ode_step_schedule([list(entry) for entry in self.schedule])


def depth_settings(default_solver: str) -> list[DepthSetting]:
    settings = [
        DepthSetting(default_solver, 1),
        DepthSetting(default_solver, 2),
        DepthSetting(default_solver, 1, tuple(tuple(entry) for entry in STEP_SCHEDULE)),
        DepthSetting("euler", 1),
        DepthSetting("verlet", 1),
        DepthSetting("rk4", 1),
    ]
    # Keep the order but drop a duplicate when the model's own solver is one of the fixed entries.
    unique = []
    for setting in settings:
        if setting not in unique:
            unique.append(setting)
    return unique


# --------------------------------------------------------------------------- helpers


def make_pipeline(model, scheduler_name: str, scheduler_config=None) -> ContinuousUNetPipeline:
    scheduler_class = SCHEDULERS[scheduler_name]
    scheduler = scheduler_class.from_config(scheduler_config) if scheduler_config else scheduler_class()
    pipeline = ContinuousUNetPipeline(unet=model, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample_images(pipeline, steps: int, batch: int, seed: int) -> torch.Tensor:
    return pipeline(
        batch_size=batch, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pt"
    ).images


@contextlib.contextmanager
def free_model_calls(model):
    """Make `model(...)` return zeros at no cost, so a pipeline run times the scheduler and the loop alone."""

    def forward(sample, timestep, *args, **kwargs):
        return UNet2DOutput(sample=torch.zeros_like(sample))

    model.forward = forward
    try:
        yield
    finally:
        del model.forward


class NFECounter:
    """Sum `model.nfe.total` over the forward passes of a cU-Net while it is installed as a forward hook."""

    def __init__(self, model):
        self.model = model
        self.total = 0
        self.handle = None

    def __enter__(self):
        self.total = 0
        self.handle = self.model.register_forward_hook(self._record)
        return self

    def _record(self, module, args, output) -> None:
        self.total += module.nfe.total

    def __exit__(self, *exc_info):
        self.handle.remove()


# --------------------------------------------------------------------------- part 1: schedulers


def benchmark_schedulers(args) -> str:
    size = args.sample_size
    models = {}
    for name, build in MODEL_BUILDERS.items():
        torch.manual_seed(args.seed)
        overrides = QUICK_OVERRIDES[name] if args.quick else {}
        models[name] = build(sample_size=size, in_channels=1, **overrides).eval()

    # The model's own cost per call, interleaved across models, for the estimates above --measure-steps-up-to.
    probe = torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(args.seed))

    def model_call(model):
        def call():
            with torch.no_grad():
                model(probe, torch.tensor([500]))
        return call

    call_timings = measure_interleaved(
        {name: model_call(model) for name, model in models.items()}, warmup=1, repeats=args.call_repeats,
        description="model calls",
    )
    call_seconds = {name: median(values) for name, values in call_timings.items()}

    rows = []
    estimated_any = False
    for steps in args.steps:
        for scheduler_name in SCHEDULERS:
            measured = steps <= args.measure_steps_up_to or scheduler_name == REFERENCE_SCHEDULER
            per_image = {}
            if measured:
                pipelines = {name: make_pipeline(model, scheduler_name) for name, model in models.items()}
                candidates = {
                    name: (lambda pipeline=pipeline: sample_images(pipeline, steps, 1, args.seed))
                    for name, pipeline in pipelines.items()
                }
                logger.info("%s, %d steps: timing both models", scheduler_name, steps)
                timings = measure_interleaved(candidates, warmup=0, repeats=1, description=f"{scheduler_name} {steps}")
                per_image = {name: median(values) for name, values in timings.items()}
            else:
                estimated_any = True
                for name, model in models.items():
                    pipeline = make_pipeline(model, scheduler_name)
                    with free_model_calls(model):
                        loop_seconds = time_call(lambda: sample_images(pipeline, steps, 1, args.seed))
                    per_image[name] = steps * call_seconds[name] + loop_seconds
            marker = "" if measured else "~"
            rows.append([
                scheduler_name, steps,
                *(marker + format_number(per_image[name]) for name in models),
                format_ratio(per_image["cU-Net"], per_image["U-Net"]),
            ])

    table = markdown_table(["scheduler", "steps", "cU-Net s/image", "U-Net s/image", "cU-Net / U-Net"], rows)
    notes = [
        f"Models: `thesis_cunet` (rk4, one step per block) and `thesis_unet` at {size}x{size}x1, random weights "
        "(sampling time does not depend on the weights of fixed-step solvers), batch 1, float32, "
        "`output_type=\"pt\"`. Each cell is one end-to-end pipeline call; the two models alternate.",
        f"Median model call at batch 1: cU-Net {call_seconds['cU-Net'] * 1e3:.1f} ms, "
        f"U-Net {call_seconds['U-Net'] * 1e3:.1f} ms ({len(call_timings['cU-Net'])} interleaved calls each).",
    ]
    if estimated_any:
        notes.append(
            f"`~` marks an estimate, used above {args.measure_steps_up_to} steps (`--measure-steps-up-to`) for every "
            f"scheduler but {REFERENCE_SCHEDULER}: steps x the median model call + the pipeline's own time with a "
            "model that returns zeros at no cost (scheduler, noise and output conversion). Compare the estimate "
            f"with the measured {REFERENCE_SCHEDULER} row of the same step count."
        )
    return table + "\n\n" + "\n".join(f"- {note}" for note in notes)


# --------------------------------------------------------------------------- part 2: depth knob


def load_knob_model(args):
    """Return (model, scheduler config or None, description) for the depth-knob part."""
    pipeline_path = Path(args.pipeline) if args.pipeline else None
    if pipeline_path is not None and (pipeline_path / "model_index.json").is_file():
        pipeline = ContinuousUNetPipeline.from_pretrained(pipeline_path)
        return pipeline.unet.eval(), pipeline.scheduler.config, f"saved pipeline at `{pipeline_path}`"
    torch.manual_seed(args.seed)
    overrides = QUICK_OVERRIDES["mnist_cunet"] if args.quick else {}
    model = mnist_cunet(**overrides).eval()
    return model, None, "`mnist_cunet` preset with random weights"


def benchmark_depth_knob(args) -> str:
    model, scheduler_config, description = load_knob_model(args)
    trained = scheduler_config is not None
    settings = depth_settings(model.solver_settings.solver)
    original_solver = model.solver_settings
    pipeline = make_pipeline(model, "DDIM", scheduler_config)
    knob_steps = args.knob_steps
    batch = args.quality_images if trained else args.knob_batch

    judge = None
    if trained:
        from diffusers_cunet.evaluation import judge_digits

        judge = judge_digits

    rows = []
    for setting in settings:
        setting.apply(model)
        with NFECounter(model) as counter:
            images = None

            def run():
                nonlocal images
                images = sample_images(pipeline, knob_steps, batch, args.seed)

            seconds = time_call(run)
        nfe_per_image = counter.total
        row = [setting.label, format_number(seconds / batch), nfe_per_image]
        if judge is not None:
            # The pipeline maps samples to [0, 1], but the classifier reads [-1, 1] tensors.
            verdict = judge(images * 2 - 1)
            row += [f"{100 * verdict['confident_share']:.1f}%", verdict["num_classes"]]
        else:
            row += ["skipped", "skipped"]
        rows.append(row)
        logger.info("Depth setting %s: %.3f s/image, NFE %d", setting.label, seconds / batch, nfe_per_image)

    model.set_ode_step_schedule(None)
    model.set_ode_solver(solver=original_solver.solver, steps=original_solver.steps)

    table = markdown_table(
        ["ODE setting", "s/image", "NFE/image", "confident digits", "digit classes"], rows
    )
    notes = [
        f"Model: {description}; DDIM, {knob_steps} steps, batch {batch} (time per image = run time / batch), one "
        "run per setting. NFE/image sums the acceleration evaluations of every dynamic block over all model calls.",
        f"The schedule {STEP_SCHEDULE} runs 2 ODE steps per block at timesteps >= 500 and 1 below.",
        f"The first row is the solver setting saved with the model ({original_solver.solver} x "
        f"{original_solver.steps}), which is the one it was trained with unless it was changed after training.",
    ]
    if trained:
        notes.append(
            f"Quality: {batch} samples per setting (same seed, so the same initial noise) judged by "
            "`diffusers_cunet.evaluation.judge_digits`: share of samples read as a digit with probability >= 0.9, "
            "and the number of distinct digits among them."
        )
    else:
        reason = f"no `model_index.json` under `{args.pipeline}`" if args.pipeline else "no `--pipeline` given"
        notes.append(f"Quality skipped: {reason}; the timings use random weights.")
    return table + "\n\n" + "\n".join(f"- {note}" for note in notes)


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--pipeline", help="Folder of a trained MNIST ContinuousUNetPipeline (with model_index.json).")
    parser.add_argument("--sample-size", type=int, default=32, help="Resolution of the scheduler timing (one channel).")
    parser.add_argument("--steps", type=int, nargs="+", help="Scheduler step counts (default: 5 10 20 50 100).")
    parser.add_argument(
        "--measure-steps-up-to", type=int,
        help=f"Time every scheduler end to end up to this many steps; above it only {REFERENCE_SCHEDULER} is timed "
        "and the others are estimated, which saves minutes on a slow machine (default: the largest step count; "
        "--quick: 2).",
    )
    parser.add_argument("--call-repeats", type=int, default=5, help="Timed model calls per model for the estimates.")
    parser.add_argument("--knob-steps", type=int, default=KNOB_STEPS, help="DDIM steps of the depth-knob part.")
    parser.add_argument("--knob-batch", type=int, default=1, help="Batch of the depth-knob timing without a trained pipeline.")
    parser.add_argument("--quality-images", type=int, default=64, help="Samples judged per depth setting.")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = list(QUICK_STEPS if args.quick else FULL_STEPS)
    if args.measure_steps_up_to is None:
        args.measure_steps_up_to = 2 if args.quick else max(args.steps)
    if args.quick:
        args.call_repeats = 1
        args.knob_steps = 3
        args.quality_images = min(args.quality_images, 4)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging()
    apply_thread_setting(args)
    record = RunRecord()
    scheduler_part = benchmark_schedulers(args)
    knob_part = benchmark_depth_knob(args)
    body = "\n\n".join([
        "### Seconds per image by scheduler and steps",
        scheduler_part,
        "### Inference-time depth: ODE solver and steps of the cU-Net",
        knob_part,
    ])
    title = "Sampling: schedulers and the ODE depth knob"
    if args.quick:
        title += " (--quick: widths shrunk, not the presets)"
    publish(args, SECTION, title, record, body)


if __name__ == "__main__":
    main()
