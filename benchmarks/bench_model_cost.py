"""Compare the cost of the thesis cU-Net preset with its UNet2DModel baseline on this machine.

For each resolution the script reports parameters, GFLOPs, weight memory, peak memory, forward and training-step
latency, and the achieved GFLOP/s against a plain 3x3 convolution shaped like each model's heaviest conv layer.
Every cost is also given as the ratio cU-Net / U-Net.

    .venv/bin/python benchmarks/bench_model_cost.py            # full: 32x32x1 and 64x64x3, batch 1, 16, 64
    .venv/bin/python benchmarks/bench_model_cost.py --quick    # 32x32x1, batch 1 and 2, seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

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
    module_weight_bytes,
    peak_rss_delta,
    publish,
    setup_logging,
    time_call,
)

from diffusers_cunet.presets import thesis_cunet, thesis_unet  # noqa: E402


logger = logging.getLogger("benchmarks.model_cost")

SECTION = "bench_model_cost"
MODEL_BUILDERS = {"cU-Net": thesis_cunet, "U-Net": thesis_unet}
TIMESTEP = 500
LEARNING_RATE = 1e-5

# Pairs of (sample size, channels). The quick mode keeps the smallest.
FULL_RESOLUTIONS = ((32, 1), (64, 3))
QUICK_RESOLUTIONS = ((32, 1),)
FULL_BATCHES = (1, 16, 64)
QUICK_BATCHES = (1, 2)
# (warm-up calls, timed calls) per batch size, and `--max-seconds` can stop the rounds earlier. Large batches skip
# the warm-up, because a 64x64 training step of the 35.7M-parameter U-Net at batch 16 takes tens of seconds on two
# cores and the one-off setup of a new shape costs little next to that.
FULL_REPEATS = {1: (2, 5), 16: (0, 3), 64: (0, 1)}
QUICK_REPEATS = {1: (1, 1), 2: (0, 1)}
CONV_CALL_SECONDS = 0.05
# The quick mode shrinks the widths of both presets, so a smoke test runs every code path in seconds.
QUICK_OVERRIDES = {
    "cU-Net": dict(block_out_channels=(8, 16, 16, 16), mid_block_channels=16, attention_head_dim=8, time_embedding_dim=32),
    "U-Net": dict(block_out_channels=(16, 16, 16, 16), norm_num_groups=8),
}


# --------------------------------------------------------------------------- FLOPs


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch 2.14's FlopCounterMode has formulas for the CUDA attention kernels only. On CPU, scaled dot-product
# attention runs as `_scaled_dot_product_flash_attention_for_cpu`, which it would count as zero.
ATTENTION_FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}


def flop_counter_mode() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOP_FORMULAS)


def count_flops(model: nn.Module, sample: torch.Tensor, training: bool) -> int:
    """Count matmul, convolution and attention FLOPs (2 per multiply-add) of one forward or forward+backward."""
    timesteps = torch.full((sample.shape[0],), TIMESTEP)
    counter = flop_counter_mode()
    if training:
        with counter:
            model(sample, timesteps).sample.square().mean().backward()
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad(), counter:
            model(sample, timesteps)
    return counter.get_total_flops()


def heaviest_conv_shape(model: nn.Module, sample: torch.Tensor) -> tuple[int, int, int, int]:
    """Return (in_channels, out_channels, height, width) of the 3x3 conv shape with the most forward FLOPs."""
    flops_by_shape: dict[tuple[int, int, int, int], int] = defaultdict(int)

    def record(module: nn.Conv2d, inputs, output) -> None:
        if module.kernel_size == (3, 3):
            height, width = output.shape[-2:]
            shape = (module.in_channels, module.out_channels, int(height), int(width))
            flops_by_shape[shape] += 2 * module.in_channels * module.out_channels * 9 * height * width

    handles = [module.register_forward_hook(record) for module in model.modules() if isinstance(module, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(sample, TIMESTEP)
    finally:
        for handle in handles:
            handle.remove()
    return max(flops_by_shape, key=flops_by_shape.get)


# --------------------------------------------------------------------------- workloads


def build_model(name: str, size: int, channels: int, seed: int, quick: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    overrides = QUICK_OVERRIDES[name] if quick else {}
    return MODEL_BUILDERS[name](sample_size=size, in_channels=channels, **overrides)


@dataclass
class Workload:
    """One model at one batch size, with the closures that run a forward pass and a training step."""

    model: nn.Module
    sample: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self):
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LEARNING_RATE)

    def forward(self) -> None:
        self.model.eval()
        with torch.no_grad():
            self.model(self.sample, self.timesteps)

    def training_step(self) -> None:
        self.model.train()
        prediction = self.model(self.sample, self.timesteps).sample
        F.mse_loss(prediction, self.target).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def make_workload(model: nn.Module, size: int, channels: int, batch: int, seed: int) -> Workload:
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, channels, size, size, generator=generator)
    target = torch.randn(batch, channels, size, size, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    return Workload(model, sample, timesteps, target)


# --------------------------------------------------------------------------- memory (one subprocess per model)


def measure_memory_in_subprocess(names: list[str], size: int, channels: int, args) -> dict[str, dict]:
    """Run `--memory-worker` in a fresh process, so no allocation of the parent process hides a peak."""
    command = [
        sys.executable, str(Path(__file__).resolve()), "--memory-worker", *names,
        "--memory-size", str(size), "--memory-channels", str(channels), "--seed", str(args.seed),
        "--threads", str(torch.get_num_threads()),
    ]
    if args.quick:
        command.append("--quick")
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"Memory worker for {names} at {size}x{size}x{channels} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_worker(names: list[str], size: int, channels: int, seed: int, quick: bool) -> None:
    """Print JSON with the peak RSS growth of a forward pass and of a training step of each model.

    The forward pass is measured at batch 1 and the training step at batch 1 and 2. The difference of the two
    training peaks is the memory per extra sample, from which the caller extrapolates larger batches.
    """
    results = {}
    for name in names:
        model = build_model(name, size, channels, seed, quick)
        workload = make_workload(model, size, channels, batch=1, seed=seed)
        # The first call of a process sets up thread pools and oneDNN primitives; that one-off cost is not the
        # forward pass's memory.
        workload.forward()
        forward_bytes = peak_rss_delta(workload.forward)
        # One step first, so the AdamW state is part of the baseline and the measured step is a steady-state step.
        workload.training_step()
        training_bytes = peak_rss_delta(workload.training_step)
        pair = make_workload(model, size, channels, batch=2, seed=seed)
        pair.optimizer = workload.optimizer
        pair.training_step()
        pair_training_bytes = peak_rss_delta(pair.training_step)
        results[name] = {
            "forward_bytes": forward_bytes,
            "training_bytes": training_bytes,
            "training_bytes_per_sample": max(0.0, pair_training_bytes - training_bytes),
        }
        del model, workload, pair
    print(json.dumps(results))


# --------------------------------------------------------------------------- reference convolution


def calibrate_loops(function, target_seconds: float) -> int:
    """Return how many back-to-back calls of `function` last about `target_seconds` (at least 1)."""
    function()  # The first call of a shape creates the oneDNN primitive.
    seconds = max(time_call(function), 1e-6)
    return max(1, round(target_seconds / seconds))


def reference_conv_candidates(shape: tuple[int, int, int, int], batch: int, seed: int) -> dict[str, tuple]:
    """Return {kind: (timed closure, FLOPs per closure call)} for a plain 3x3 conv with `shape` at `batch`.

    The kinds are `forward` and `forward+backward`. A single conv can take microseconds, where one preemption by
    another process would dominate the median, so each closure loops the conv for about CONV_CALL_SECONDS.
    """
    in_channels, out_channels, height, width = shape
    torch.manual_seed(seed)
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
    inputs = torch.randn(batch, in_channels, height, width)
    # Interior layers of a network compute the gradient of their input too, so the input needs one.
    inputs_with_grad = inputs.clone().requires_grad_(True)

    def forward() -> None:
        with torch.no_grad():
            conv(inputs)

    def forward_backward() -> None:
        conv(inputs_with_grad).sum().backward()
        conv.zero_grad(set_to_none=True)
        inputs_with_grad.grad = None

    forward_flops = 2 * in_channels * out_channels * 9 * height * width * batch
    # Backward computes the input gradient and the weight gradient, each as many FLOPs as the forward.
    forward_backward_flops = 3 * forward_flops
    forward_loops = calibrate_loops(forward, CONV_CALL_SECONDS)
    forward_backward_loops = calibrate_loops(forward_backward, CONV_CALL_SECONDS)
    return {
        "forward": (lambda: [forward() for _ in range(forward_loops)], forward_flops * forward_loops),
        "forward+backward": (
            lambda: [forward_backward() for _ in range(forward_backward_loops)],
            forward_backward_flops * forward_backward_loops,
        ),
    }


# --------------------------------------------------------------------------- one resolution


def benchmark_resolution(size: int, channels: int, batches, repeats, args) -> str:
    label = f"{size}x{size}x{channels}"
    logger.info("Resolution %s: building the models", label)
    models = {name: build_model(name, size, channels, args.seed, args.quick) for name in MODEL_BUILDERS}
    probe = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(args.seed))

    # The full mode measures each model in its own process, so every peak is a fresh high-water mark. The quick
    # mode shares one process to save an interpreter start.
    if args.quick:
        memory = measure_memory_in_subprocess(list(models), size, channels, args)
    else:
        memory = {}
        for name in models:
            logger.info("%s %s: measuring peak memory in a subprocess", name, label)
            memory.update(measure_memory_in_subprocess([name], size, channels, args))

    stats: dict[str, dict[str, float]] = {name: {} for name in models}
    for name, model in models.items():
        stats[name]["parameters"] = sum(parameter.numel() for parameter in model.parameters())
        stats[name]["weight_mb"] = module_weight_bytes(model) / 2**20
        stats[name]["forward_flops"] = count_flops(model, probe, training=False)
        stats[name]["training_flops"] = count_flops(model, probe, training=True)
        stats[name]["conv_shape"] = heaviest_conv_shape(model, probe)
        stats[name]["forward_peak_mb"] = memory[name]["forward_bytes"] / 2**20
        stats[name]["training_peak_mb"] = memory[name]["training_bytes"] / 2**20
        stats[name]["training_mb_per_sample"] = memory[name]["training_bytes_per_sample"] / 2**20

    latencies: dict[tuple[str, str, int], float] = {}
    counts: dict[tuple[str, int], int] = {}
    skipped: list[str] = []
    conv_shapes = sorted({stats[name]["conv_shape"] for name in models})
    conv_rates: dict[tuple, dict[int, list[float]]] = {shape: {} for shape in conv_shapes}
    for batch in batches:
        warmup, timed = repeats[batch]
        workloads = {name: make_workload(model, size, channels, batch, args.seed) for name, model in models.items()}
        candidates = {f"{name}|forward": workload.forward for name, workload in workloads.items()}
        available = psutil.virtual_memory().available
        for name, workload in workloads.items():
            estimated_mb = stats[name]["training_peak_mb"] + (batch - 1) * stats[name]["training_mb_per_sample"]
            if estimated_mb * 2**20 <= args.memory_fraction * available:
                candidates[f"{name}|training"] = workload.training_step
                continue
            skipped.append(
                f"{name} training step at batch {batch} skipped: its estimated peak memory ({estimated_mb / 1024:.1f} "
                f"GiB, extrapolated from batch 1 and 2) exceeds --memory-fraction={args.memory_fraction} of the "
                f"{available / 2**30:.1f} GiB available"
            )
            logger.warning(skipped[-1])
        # The reference convs run in the same rounds as the models, so load drift moves both sides of the
        # "% of plain conv" ratios alike.
        conv_flops = {}
        for shape in conv_shapes:
            for kind, (closure, flops) in reference_conv_candidates(shape, batch, args.seed).items():
                candidates[f"conv|{shape}|{kind}"] = closure
                conv_flops[(shape, kind)] = flops
        logger.info("%s batch %d: %d warm-up and %d timed rounds", label, batch, warmup, timed)
        timings = measure_interleaved(
            candidates, warmup, timed, max_seconds=args.max_seconds, description=f"{label} batch {batch}"
        )
        for shape in conv_shapes:
            conv_rates[shape][batch] = [
                conv_flops[(shape, kind)] / median(timings.pop(f"conv|{shape}|{kind}")) / 1e9
                for kind in ("forward", "forward+backward")
            ]
        for key, values in timings.items():
            name, kind = key.split("|")
            latencies[(name, kind, batch)] = median(values)
            counts[(kind, batch)] = len(values)

    return render_resolution(label, stats, latencies, counts, skipped, conv_rates, batches)


def render_resolution(label, stats, latencies, counts, skipped, conv_rates, batches) -> str:
    names = list(MODEL_BUILDERS)
    cunet, unet = names

    def row(metric: str, values: dict[str, float | None], digits: int = 3) -> list[str]:
        return [metric, *(format_number(values[name], digits) for name in names), format_ratio(values[cunet], values[unet])]

    rows = [
        row("parameters (M)", {name: stats[name]["parameters"] / 1e6 for name in names}),
        row("weight memory (MB)", {name: stats[name]["weight_mb"] for name in names}),
        row("GFLOPs per forward (batch 1)", {name: stats[name]["forward_flops"] / 1e9 for name in names}),
        row("GFLOPs per training step (batch 1)", {name: stats[name]["training_flops"] / 1e9 for name in names}),
        row("peak RSS growth, forward (MB, batch 1)", {name: stats[name]["forward_peak_mb"] for name in names}),
        row("peak RSS growth, training step (MB, batch 1)", {name: stats[name]["training_peak_mb"] for name in names}),
    ]
    for batch in batches:
        for kind, title in (("forward", "forward"), ("training", "training step")):
            values = {name: latencies.get((name, kind, batch)) for name in names}
            rows.append(row(f"{title} latency, batch {batch} (ms)", {
                name: None if value is None else value * 1e3 for name, value in values.items()
            }))
    for batch in batches:
        for kind, title, flop_key, conv_index in (
            ("forward", "forward", "forward_flops", 0),
            ("training", "training step", "training_flops", 1),
        ):
            rates = {}
            shares = {}
            for name in names:
                latency = latencies.get((name, kind, batch))
                if latency is None:
                    rates[name] = shares[name] = None
                    continue
                rates[name] = stats[name][flop_key] * batch / latency / 1e9
                reference = conv_rates[stats[name]["conv_shape"]][batch][conv_index]
                shares[name] = 100 * rates[name] / reference
            reference_kind = "forward" if conv_index == 0 else "forward+backward"
            rows.append(row(f"{title} GFLOP/s, batch {batch}", rates))
            rows.append(row(f"{title} % of plain conv {reference_kind}, batch {batch}", shares))

    table = markdown_table(["metric", cunet, unet, f"{cunet} / {unet}"], rows)

    conv_rows = []
    for name in names:
        shape = stats[name]["conv_shape"]
        for batch in batches:
            forward_rate, forward_backward_rate = conv_rates[shape][batch]
            conv_rows.append([
                name, f"{shape[0]}->{shape[1]} at {shape[2]}x{shape[3]}", batch,
                format_number(forward_rate), format_number(forward_backward_rate),
            ])
    conv_table = markdown_table(
        ["model", "plain 3x3 conv (heaviest conv shape of the model)", "batch", "forward GFLOP/s", "forward+backward GFLOP/s"],
        conv_rows,
    )

    repetition_notes = ", ".join(
        f"batch {batch}: {counts.get(('forward', batch), 0)} timed forward and "
        f"{counts.get(('training', batch), 0)} timed training rounds"
        for batch in batches
    )
    notes = [f"Timed calls per model (medians shown): {repetition_notes}."]
    notes += [f"{text}." for text in skipped]
    return f"### {label}\n\n{table}\n\n{conv_table}\n\n" + "\n".join(f"- {note}" for note in notes)


# --------------------------------------------------------------------------- main


METHOD_NOTES = """\
How the numbers are measured:

- Models: `diffusers_cunet.presets.thesis_cunet` (cU-Net, rk4 with one step per dynamic block) and
  `thesis_unet` (diffusers `UNet2DModel`, DDPM CIFAR-10 layout), random weights, float32.
- GFLOPs: `torch.utils.flop_counter.FlopCounterMode` at batch 1, 2 FLOPs per multiply-add. It counts
  convolutions, matrix products and attention (a formula for the CPU attention kernel is added). Norms,
  nonlinearities and the ODE solver's vector updates are not counted. A training step's FLOPs are forward plus
  backward. The AdamW update is not counted but is part of the timed step.
- Peak memory: growth of the resident set (RSS) during one call at batch 1, measured with `psutil` and
  `getrusage` (torch's CPU allocations are invisible to `tracemalloc`) in a fresh subprocess per model. The RSS
  right before the call, after `malloc_trim`, is subtracted from the process's `ru_maxrss` high-water mark, or
  from the largest RSS that a 1 ms sampler saw when the call did not raise that mark. Each call is measured
  after one warm call of the same kind, so one-off setup and the AdamW state are part of the baseline. Weight
  memory is the size of the parameters and buffers.
- Latency: median wall time of interleaved calls (cU-Net and U-Net alternate within each round). A forward pass
  runs in eval mode under `torch.no_grad()`. A training step is forward, MSE loss, backward, AdamW step.
- Plain conv: one `nn.Conv2d` 3x3 with the input/output channels and resolution of the 3x3 conv shape that has
  the largest FLOP share in each model, timed at each batch size in the same interleaved rounds as the models
  (each call a loop of about 50 ms). Forward+backward computes the input and weight gradients (3x the forward
  FLOPs). "% of plain conv" is the model's achieved GFLOP/s over that conv's GFLOP/s at the same batch.
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument(
        "--max-seconds", type=float, default=60.0,
        help="Stop adding timed rounds of a batch size once its rounds have run this many seconds (at least one runs).",
    )
    parser.add_argument(
        "--memory-fraction", type=float, default=0.5,
        help="Skip a model's training step whose estimated peak memory (extrapolated from batch 1 and 2) exceeds "
        "this share of the memory available when its batch size starts.",
    )
    # Internal: the per-model memory measurement runs in a fresh subprocess of this script.
    parser.add_argument("--memory-worker", nargs="+", choices=list(MODEL_BUILDERS), help=argparse.SUPPRESS)
    parser.add_argument("--memory-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--memory-channels", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    apply_thread_setting(args)
    if args.memory_worker:
        memory_worker(args.memory_worker, args.memory_size, args.memory_channels, args.seed, args.quick)
        return

    setup_logging()
    record = RunRecord()
    resolutions = QUICK_RESOLUTIONS if args.quick else FULL_RESOLUTIONS
    batches = QUICK_BATCHES if args.quick else FULL_BATCHES
    repeats = QUICK_REPEATS if args.quick else FULL_REPEATS

    sections = [benchmark_resolution(size, channels, batches, repeats, args) for size, channels in resolutions]
    body = METHOD_NOTES + "\n" + "\n\n".join(sections)
    title = "Model cost: thesis cU-Net vs UNet2DModel baseline"
    if args.quick:
        title += " (--quick: widths shrunk, not the presets)"
    publish(args, SECTION, title, record, body)


if __name__ == "__main__":
    main()
