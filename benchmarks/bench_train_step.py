"""Main job throughput: training images per second of the default MNIST recipe, per execution variant.

The script times the default run of `examples/train_cunet.py`: the `mnist_cunet` preset at 32x32x1, batch 64,
v-prediction with min-SNR weighting, AdamW and gradient clipping. It times one optimizer step at a time under
each variant, all variants interleaved in the same rounds, so the ratios compare like with like:

    .venv/bin/python benchmarks/bench_train_step.py --threads 2     # the 2-core default run, a few minutes
    .venv/bin/python benchmarks/bench_train_step.py --quick         # shrunk widths, batch 4, no compile, seconds

Variants: float32 (the main job's path before bf16 autocast became its default on CPUs with native bf16), bf16
autocast as accelerate applies it, each also with `torch.compile`, and bf16 with channels-last tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (  # noqa: E402
    RunRecord,
    add_common_arguments,
    apply_thread_setting,
    format_number,
    logger,
    markdown_table,
    measure_interleaved,
    median,
    publish,
    setup_logging,
)

from diffusers_cunet import presets  # noqa: E402
from diffusers_cunet.training import diffusion_loss  # noqa: E402


SECTION = "bench_train_step"
QUICK_OVERRIDES = {"block_out_channels": (8, 16), "mid_block_channels": 16, "attention_head_dim": 8,
                   "time_embedding_dim": 32, "norm_num_groups": 4}
BASELINE = "float32"


class TrainingStep:
    """Run one optimizer step of the main job's recipe on its own copy of the weights and optimizer."""

    def __init__(self, model: torch.nn.Module, precision: str, compile_model: bool, channels_last: bool, args):
        self.model = model
        self.channels_last = channels_last
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model, dynamic=False) if compile_model else self.model
        self.precision = precision
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=2e-3, betas=(0.9, 0.99), weight_decay=0.0, fused=True
        )
        self.scheduler = DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"
        )
        generator = torch.Generator().manual_seed(args.seed)
        self.clean = torch.rand((args.batch, 1, args.resolution, args.resolution), generator=generator) * 2 - 1
        self.noise = torch.randn(self.clean.shape, generator=generator)
        self.timesteps = torch.randint(0, 1000, (args.batch,), generator=generator)
        self.noisy = self.scheduler.add_noise(self.clean, self.noise, self.timesteps)
        if channels_last:
            self.noisy = self.noisy.contiguous(memory_format=torch.channels_last)

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self) -> float:
        with self.autocast():
            output = self.forward(self.noisy, self.timesteps).sample
        loss = diffusion_loss(output, self.clean, self.noise, self.timesteps, self.scheduler, "v_prediction", snr_gamma=5.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def variants(args) -> list[tuple[str, str, bool, bool]]:
    """List (name, precision, compile, channels_last) for each variant to measure."""
    chosen = [(BASELINE, "no", False, False), ("bf16", "bf16", False, False)]
    if not args.quick:
        chosen.append(("bf16, channels-last", "bf16", False, True))
    if args.compile:
        chosen += [("float32, compiled", "no", True, False), ("bf16, compiled", "bf16", True, False)]
    return chosen


METHOD_NOTES = """\
- Model: `mnist_cunet` preset{quick}, {parameters:,} parameters, semi-implicit Euler with one step per dynamic
  block (the default run's settings), random weights, training mode.
- Step: forward at batch {batch} ({resolution}x{resolution}x1), v-prediction loss with min-SNR-5 weighting in
  float32, backward, gradient clipping at 1.0, fused AdamW step (as the script). Inputs are fixed tensors, so
  data loading is not timed.
- bf16: `torch.autocast("cpu", dtype=torch.bfloat16)` around the forward pass, as `accelerate` applies
  `--mixed_precision bf16`; weights, optimizer state and loss stay float32. On a CPU it pays off only where
  oneDNN has native bf16 kernels (AVX512-BF16 or AMX); `bf16 kernels` below says whether this one has them.
- Compiled: `torch.compile(model, dynamic=False)` (inductor), forward and backward; the first-call time is
  listed apart and comes from whatever inductor cache the machine has.
- Each variant owns a copy of the same initial weights. All variants run once per round, interleaved, and the
  table shows medians; `vs float32` is the float32 median divided by the variant's median.
"""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--batch", type=int, help="Training batch size (default 64; --quick: 4).")
    parser.add_argument("--resolution", type=int, default=32, help="Image side in pixels (default 32).")
    parser.add_argument("--repeats", type=int, help="Timed rounds (default 12; --quick: 1).")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="Stop adding timed rounds after this many seconds.")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None, help="Measure torch.compile (default in full mode).")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="Skip the torch.compile variants.")
    parser.add_argument("--section", default=SECTION,
                        help=f"Section of the results page to rewrite (default {SECTION}); another name keeps the "
                             "default section, for example for a second machine.")
    args = parser.parse_args(argv)
    if args.batch is None:
        args.batch = 4 if args.quick else 64
    if args.compile is None:
        args.compile = not args.quick
    repeats = args.repeats
    if repeats is None:
        repeats = 1 if args.quick else 12
    for name in ("batch", "resolution", "repeats"):
        value = getattr(args, name) if name != "repeats" else repeats
        if value < 1:
            parser.error(f"--{name}={value} is invalid; pass a positive number.")

    setup_logging()
    apply_thread_setting(args)
    record = RunRecord()
    overrides = QUICK_OVERRIDES if args.quick else {}
    torch.manual_seed(args.seed)
    reference = presets.mnist_cunet(args.resolution, 1, **overrides).train()
    parameters = sum(parameter.numel() for parameter in reference.parameters())

    steps, first_call = {}, {}
    for name, precision, compile_model, channels_last in variants(args):
        step = TrainingStep(copy.deepcopy(reference), precision, compile_model, channels_last, args)
        logger.info("First step of %s%s", name, " (compiling; minutes on a cold cache)" if compile_model else "")
        start = time.perf_counter()
        step()
        first_call[name] = time.perf_counter() - start
        steps[name] = step

    timings = measure_interleaved(steps, warmup=0 if args.quick else 1, repeats=repeats,
                                  max_seconds=args.max_seconds, description="training steps")
    baseline = median(timings[BASELINE])
    rows = []
    for name, precision, compile_model, channels_last in variants(args):
        seconds = median(timings[name])
        rows.append([
            name, format_number(seconds * 1e3), format_number(args.batch / seconds),
            f"{baseline / seconds:.2f}x", format_number(first_call[name]), len(timings[name]),
        ])
    table = markdown_table(
        ["variant", "step (ms)", "images/s", "vs float32", "first step (s)", "timed rounds"], rows
    )
    bf16_kernels = "yes" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "no"
    notes = METHOD_NOTES.format(
        quick=" with shrunk widths (--quick)" if args.quick else "", parameters=parameters,
        batch=args.batch, resolution=args.resolution,
    )
    body = "\n\n".join([
        notes,
        f"Threads: {torch.get_num_threads()}. bf16 kernels (oneDNN): {bf16_kernels}.",
        table,
    ])
    title = "Main job throughput: training step of the default MNIST recipe"
    if args.quick:
        title += " (--quick: widths shrunk)"
    if args.section != SECTION:
        title += f" ({args.section})"
    publish(args, args.section, title, record, body)


if __name__ == "__main__":
    main()
