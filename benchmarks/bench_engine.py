"""Compare the ODE backends of the cU-Net per forward pass: native vs torchdiffeq vs torchode, same weights.

For each preset and batch size the script times one forward pass per (method, backend) and counts the
acceleration evaluations (NFE). It splits the forward time into acceleration evaluations, the layers outside the
ODE solves and the solver loop's own overhead, and measures what `torch.compile` gains on the native backend.

    .venv/bin/python benchmarks/bench_engine.py            # full: mnist_cunet and thesis_cunet, batch 1 and 64
    .venv/bin/python benchmarks/bench_engine.py --quick    # shrunk widths, batch 1, no compile, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RunRecord,
    add_common_arguments,
    apply_thread_setting,
    format_number,
    markdown_table,
    measure_interleaved,
    median,
    publish,
    setup_logging,
    time_call,
)

from diffusers_cunet.models import blocks  # noqa: E402
from diffusers_cunet.models.blocks import AccelerationField, DynamicBlock  # noqa: E402
from diffusers_cunet.presets import mnist_cunet, thesis_cunet  # noqa: E402


logger = logging.getLogger("benchmarks.engine")

SECTION = "bench_engine"
TIMESTEP = 500

# (method, backend). torchdiffeq has no Verlet method, and torchode ships euler, heun and dopri5 only.
CONFIGS = (
    ("rk4", "native"),
    ("rk4", "torchdiffeq"),
    ("euler", "native"),
    ("euler", "torchdiffeq"),
    ("euler", "torchode"),
    ("heun", "native"),
    ("heun", "torchdiffeq"),
    ("heun", "torchode"),
    ("verlet", "native"),
    ("dopri5", "torchdiffeq"),
    ("dopri5", "torchode"),
)
# Targets of the native backend, checked in the summary table.
TARGET_SPEEDUP = {1: 2.0, 64: 1.5}
TARGET_OVERHEAD_PERCENT = 10.0
LARGE_BATCH = 16

QUICK_OVERRIDES = {
    "mnist_cunet": dict(block_out_channels=(8, 16), time_embedding_dim=32, attention_head_dim=8),
    "thesis_cunet": dict(
        block_out_channels=(8, 16, 16, 16), mid_block_channels=16, attention_head_dim=8, time_embedding_dim=32
    ),
}


@dataclass
class Preset:
    name: str
    build: callable
    sample_size: int
    channels: int


# --------------------------------------------------------------------------- timing helpers


@contextlib.contextmanager
def ode_solves_skipped():
    """Make every dynamic block return its input: the initial velocity and FiLM still run, the ODE solve does not."""
    original = blocks.solve_second_order

    def skip_solve(acceleration, x, v, settings, **kwargs):
        return x, v, 0

    blocks.solve_second_order = skip_solve
    try:
        yield
    finally:
        blocks.solve_second_order = original


@contextlib.contextmanager
def free_acceleration():
    """Make every acceleration evaluation return its position input: the solver loop runs, the field costs nothing."""
    original = AccelerationField.forward

    def stub(self, x, v, scale, shift):
        return x

    AccelerationField.forward = stub
    try:
        yield
    finally:
        AccelerationField.forward = original


def calibrate_loops(function, target_seconds: float) -> int:
    """Return how many back-to-back calls of `function` last about `target_seconds` (at least 1)."""
    function()
    seconds = max(time_call(function), 1e-6)
    return max(1, round(target_seconds / seconds))


def capture_block_inputs(model, sample, timesteps) -> dict[str, tuple[torch.Size, torch.Tensor]]:
    """Run one forward pass and return each dynamic block's input shape and timestep embedding."""
    captured = {}

    def record(block: DynamicBlock, args, kwargs):
        hidden_states, emb = args[0], args[1]
        captured[block.name] = (hidden_states.shape, emb.detach())

    handles = [block.register_forward_pre_hook(record, with_kwargs=True) for block in model.dynamic_blocks]
    try:
        with torch.no_grad():
            model(sample, timesteps)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def acceleration_calls(model, sample, timesteps, seed: int) -> dict[str, callable]:
    """Build one closure per dynamic block that evaluates its acceleration field once at the block's real shape."""
    generator = torch.Generator().manual_seed(seed)
    calls = {}
    for block_name, (shape, emb) in capture_block_inputs(model, sample, timesteps).items():
        block = dict((block.name, block) for block in model.dynamic_blocks)[block_name]
        x = torch.randn(shape, generator=generator)
        v = torch.randn(shape, generator=generator)
        with torch.no_grad():
            scale, shift = block.acceleration.film_parameters(emb)

        def evaluate(field=block.acceleration, x=x, v=v, scale=scale, shift=shift):
            with torch.no_grad():
                field(x, v, scale, shift)

        calls[block_name] = evaluate
    return calls


# --------------------------------------------------------------------------- one preset at one batch size


def benchmark_batch(preset: Preset, batch: int, args) -> tuple[list[list[str]], list[str], dict]:
    torch.manual_seed(args.seed)
    overrides = QUICK_OVERRIDES[preset.name] if args.quick else {}
    reference = preset.build(sample_size=preset.sample_size, in_channels=preset.channels, **overrides).eval()
    generator = torch.Generator().manual_seed(args.seed)
    sample = torch.randn(batch, preset.channels, preset.sample_size, preset.sample_size, generator=generator)
    timesteps = torch.full((batch,), TIMESTEP)

    models = {}
    for method, backend in CONFIGS:
        # Copies share nothing, but start from the same weights, so every backend solves the same ODE.
        model = copy.deepcopy(reference)
        model.set_ode_solver(solver=method, steps=1, backend=backend)
        models[(method, backend)] = model

    def run(model):
        def forward():
            with torch.no_grad():
                model(sample, timesteps)
        return forward

    def run_stubbed(model):
        def forward():
            with torch.no_grad(), free_acceleration():
                model(sample, timesteps)
        return forward

    def run_without_solves():
        with torch.no_grad(), ode_solves_skipped():
            reference(sample, timesteps)

    candidates = {f"forward|{method}|{backend}": run(model) for (method, backend), model in models.items()}
    # The free-acceleration run changes the trajectory, so it only measures fixed-step loops, whose work does not
    # depend on the values.
    candidates.update({
        f"stub|{method}|{backend}": run_stubbed(model)
        for (method, backend), model in models.items() if not model.solver_settings.is_adaptive
    })
    candidates["rest"] = run_without_solves
    block_calls = acceleration_calls(reference, sample, timesteps, args.seed)
    loops = {name: calibrate_loops(call, args.min_call_seconds) for name, call in block_calls.items()}
    for name, call in block_calls.items():
        candidates[f"acceleration|{name}"] = lambda call=call, count=loops[name]: [call() for _ in range(count)]

    warmup, repeats = args.repeats_for(batch, preset)
    logger.info("%s batch %d: %d candidates, %d warm-up and %d timed rounds", preset.name, batch, len(candidates), warmup, repeats)
    timings = measure_interleaved(
        candidates, warmup, repeats, max_seconds=args.max_seconds, description=f"{preset.name} batch {batch}"
    )
    medians = {key: median(values) for key, values in timings.items()}
    rounds = len(timings["rest"])
    acceleration_seconds = {name: medians[f"acceleration|{name}"] / loops[name] for name in block_calls}
    rest = medians["rest"]

    rows = []
    summary = {}
    for (method, backend), model in models.items():
        # One more forward pass records the NFE per block, because adaptive counts depend on the input.
        with torch.no_grad():
            model(sample, timesteps)
        per_block = model.nfe.per_block
        nfe = sum(per_block.values())
        total = medians[f"forward|{method}|{backend}"]
        evaluations = sum(count * acceleration_seconds[name] for name, count in per_block.items())
        overhead = total - rest - evaluations
        stub_key = f"stub|{method}|{backend}"
        stub_overhead = medians[stub_key] - rest if stub_key in medians else None
        torchdiffeq_total = medians.get(f"forward|{method}|torchdiffeq")
        speedup = (
            f"{torchdiffeq_total / total:.2f}x" if torchdiffeq_total is not None and backend != "torchdiffeq" else "n/a"
        )
        summary[(method, backend)] = {"total": total, "overhead": overhead, "stub_overhead": stub_overhead}
        rows.append([
            preset.name, batch, method, backend, nfe,
            format_number(total * 1e3), speedup,
            format_number(evaluations * 1e3), format_number(rest * 1e3),
            format_number(overhead * 1e3), format_number(100 * overhead / total),
            "n/a" if stub_overhead is None else format_number(stub_overhead * 1e3),
            "n/a" if stub_overhead is None else format_number(100 * stub_overhead / total),
        ])
    notes = [f"{preset.name} batch {batch}: {warmup} warm-up and {rounds} timed rounds"]
    return rows, notes, summary


def target_rows(preset_name: str, batch: int, summary: dict) -> list[list[str]]:
    native = summary[("rk4", "native")]
    torchdiffeq = summary[("rk4", "torchdiffeq")]
    speedup = torchdiffeq["total"] / native["total"]
    target = TARGET_SPEEDUP[1] if batch < LARGE_BATCH else TARGET_SPEEDUP[64]
    overhead_percent = 100 * native["overhead"] / native["total"]
    stub_percent = 100 * native["stub_overhead"] / native["total"]
    return [
        [preset_name, batch, "native rk4 speed-up over torchdiffeq rk4", f">= {target:g}x", f"{speedup:.2f}x",
         "met" if speedup >= target else "missed"],
        [preset_name, batch, "native rk4 loop overhead, % of forward", f"< {TARGET_OVERHEAD_PERCENT:g}%",
         f"{overhead_percent:.1f}%", "met" if overhead_percent < TARGET_OVERHEAD_PERCENT else "missed"],
        [preset_name, batch, "native rk4 stub overhead, % of forward", f"< {TARGET_OVERHEAD_PERCENT:g}%",
         f"{stub_percent:.1f}%", "met" if stub_percent < TARGET_OVERHEAD_PERCENT else "missed"],
    ]


# --------------------------------------------------------------------------- torch.compile


def fresh_compile_cache():
    """Return a context manager with an empty inductor cache, so the compile time is that of a first compile.

    Without it, a second run of this script reuses the kernels that the first one wrote under /tmp and reports a
    compile time of seconds instead of a minute. `fresh_cache` is a private helper of torch's own tests.
    """
    from torch._inductor import utils as inductor_utils

    fresh_cache = getattr(inductor_utils, "fresh_cache", None)
    if fresh_cache is None:
        # NOTE: a torch without `fresh_cache` may reuse cached kernels, which shortens the compile time.
        logger.warning("torch._inductor.utils.fresh_cache not found; the compile time may come from a warm cache")
        return contextlib.nullcontext()
    return fresh_cache()


def benchmark_compile(preset: Preset, batches, args) -> list[list[str]]:
    """Time eager vs `torch.compile` (inductor, static shapes) for the native backend, with compile time apart."""
    torch.manual_seed(args.seed)
    overrides = QUICK_OVERRIDES[preset.name] if args.quick else {}
    eager = preset.build(sample_size=preset.sample_size, in_channels=preset.channels, **overrides).eval()
    eager.set_ode_solver(solver=args.compile_solver, steps=1, backend="native")
    rows = []
    for batch in batches:
        generator = torch.Generator().manual_seed(args.seed)
        sample = torch.randn(batch, preset.channels, preset.sample_size, preset.sample_size, generator=generator)
        timesteps = torch.full((batch,), TIMESTEP)
        compiled = torch.compile(eager, dynamic=False)
        logger.info("Compiling %s (%s, native) for batch %d; inductor on CPU can take minutes", preset.name, args.compile_solver, batch)

        def run(model):
            def forward():
                with torch.no_grad():
                    model(sample, timesteps)
            return forward

        with fresh_compile_cache():
            with torch.no_grad():
                start = time.perf_counter()
                compiled(sample, timesteps)
                compile_seconds = time.perf_counter() - start

            warmup, repeats = args.repeats_for(batch, preset)
            timings = measure_interleaved(
                {"eager": run(eager), "compiled": run(compiled)}, max(1, warmup), repeats,
                max_seconds=args.max_seconds, description=f"compile {preset.name} batch {batch}",
            )
        eager_seconds, compiled_seconds = median(timings["eager"]), median(timings["compiled"])
        rows.append([
            preset.name, batch, args.compile_solver, format_number(compile_seconds),
            format_number(eager_seconds * 1e3), format_number(compiled_seconds * 1e3),
            f"{eager_seconds / compiled_seconds:.2f}x", len(timings["eager"]),
        ])
        torch._dynamo.reset()
    return rows


# --------------------------------------------------------------------------- main


METHOD_NOTES = """\
How the numbers are measured:

- Models: `mnist_cunet` and `thesis_cunet` presets at {resolution}, random weights, one ODE step per dynamic
  block, float32, eval mode, `torch.no_grad()`. Every (method, backend) runs a copy of the same weights.
- Forward: median wall time of one forward pass; all candidates of a table block (forward passes, stubbed runs,
  single acceleration evaluations) are interleaved in the same rounds.
- NFE: acceleration evaluations of one forward pass summed over the dynamic blocks, as `model.nfe` counts them
  (adaptive methods: the count of the last run).
- Loop overhead = T_forward - T_rest - sum over blocks b of NFE_b x t_b, where T_rest is a forward pass with
  every ODE solve skipped (each dynamic block still computes its initial velocity g(h) and FiLM parameters and
  returns h, so stem, attention, transitions, resampling, head and embedding run as usual), NFE_b is block b's
  evaluation count in that forward pass, and t_b is the median time of one `AccelerationField` forward at block
  b's real input shape. What remains is the solver's own work: the state updates of each stage, Python and
  dispatch costs, and a backend's bookkeeping (torchdiffeq's tuple and grid handling, torchode's flattening,
  step-size controller and status check). Because it is a difference of medians, it can come out slightly
  negative when the loop costs almost nothing.
- Stub overhead (fixed-step methods only) measures the loop directly: T_stub - T_rest, where T_stub is a forward
  pass whose acceleration fields return their position input at no cost, so only the loop runs. The two differ
  when an evaluation costs more inside a forward pass than alone in a loop (for example because its inputs are
  no longer in cache), which the subtraction formula counts as loop overhead.
- vs torchdiffeq: torchdiffeq's forward time for the same method divided by this row's forward time.
- torch.compile: `torch.compile(model, dynamic=False)` with the inductor backend, one compile per batch size.
  The compile time is the first call, with an empty inductor cache.
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--batches", type=int, nargs="+", help="Batch sizes (default: 1 64; --quick: 1).")
    parser.add_argument(
        "--thesis-sample-size", type=int, default=32,
        help="Resolution of the thesis_cunet preset, with one input channel (default 32; 64 is the preset's own).",
    )
    parser.add_argument(
        "--repeats", type=int, help=f"Timed rounds per table block (default: 15, or 3 at batch >= {LARGE_BATCH})."
    )
    parser.add_argument("--max-seconds", type=float, default=240.0, help="Stop adding timed rounds after this many seconds.")
    parser.add_argument(
        "--min-call-seconds", type=float, default=0.02,
        help="A single acceleration evaluation shorter than this is timed in a loop of calls lasting about this long.",
    )
    parser.add_argument("--compile", dest="compile", action="store_true", default=None, help="Measure torch.compile (default in full mode).")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="Skip the torch.compile measurement.")
    parser.add_argument("--compile-solver", default="euler", help="Native method of the compiled model (default euler).")
    args = parser.parse_args(argv)
    if args.batches is None:
        args.batches = [1] if args.quick else [1, 64]
    if args.compile is None:
        args.compile = not args.quick

    def repeats_for(batch: int, preset: Preset) -> tuple[int, int]:
        if args.quick:
            return 0, 1
        if args.repeats is not None:
            return 1, args.repeats
        # Batch-1 rounds take about a second, and under load their medians need many rounds to settle.
        return 1, 3 if batch >= LARGE_BATCH else 15

    args.repeats_for = repeats_for
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging()
    apply_thread_setting(args)
    record = RunRecord()
    presets = [
        Preset("mnist_cunet", mnist_cunet, 32, 1),
        Preset("thesis_cunet", thesis_cunet, args.thesis_sample_size, 1),
    ]

    rows, notes, targets = [], [], []
    for preset in presets:
        for batch in args.batches:
            batch_rows, batch_notes, summary = benchmark_batch(preset, batch, args)
            rows += batch_rows
            notes += batch_notes
            targets += target_rows(preset.name, batch, summary)
    table = markdown_table(
        ["preset", "batch", "method", "backend", "NFE", "forward (ms)", "vs torchdiffeq", "evaluations (ms)",
         "rest (ms)", "loop overhead (ms)", "overhead %", "stub overhead (ms)", "stub overhead %"],
        rows,
    )

    if args.compile:
        compile_rows = benchmark_compile(presets[0], args.batches, args)
        compile_table = markdown_table(
            ["preset", "batch", "method", "compile time (s)", "eager (ms)", "compiled (ms)", "gain", "timed rounds"],
            compile_rows,
        )
    else:
        compile_table = "torch.compile not measured (`--quick` or `--no-compile`)."

    resolution = f"32x32x1 (mnist_cunet) and {args.thesis_sample_size}x{args.thesis_sample_size}x1 (thesis_cunet)"
    target_table = markdown_table(["preset", "batch", "target", "goal", "measured", "verdict"], targets)
    body = "\n\n".join([
        METHOD_NOTES.format(resolution=resolution),
        "Targets (batch sizes below 16 are held to the batch-1 goal, larger ones to the batch-64 goal):",
        target_table,
        table,
        "\n".join(f"- {note}." for note in notes),
        "torch.compile on the native backend (inductor compiles C++ on the CPU, which takes minutes on two cores):",
        compile_table,
    ])
    title = "ODE engine: native vs torchdiffeq vs torchode"
    if args.quick:
        title += " (--quick: widths shrunk, not the presets)"
    publish(args, SECTION, title, record, body)


if __name__ == "__main__":
    main()
