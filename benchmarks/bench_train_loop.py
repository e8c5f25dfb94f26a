"""Time the main job's training loop with and without `--keep_freed_memory`, in fresh processes, interleaved.

The setting changes how glibc's malloc treats freed memory for the whole process. So each round starts the real
`examples/train_cunet.py` twice, once per setting. The loop's time per step comes from the run's
`training_results.json`, and the process's minor page faults and peak resident memory from `getrusage`.

    .venv/bin/python benchmarks/bench_train_loop.py --threads 2
    .venv/bin/python benchmarks/bench_train_loop.py --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO_ROOT,
    RunRecord,
    add_common_arguments,
    format_number,
    markdown_table,
    median,
    publish,
    setup_logging,
)

logger = logging.getLogger("benchmarks")

SECTION = "bench_train_loop"
SCRIPT = REPO_ROOT / "examples" / "train_cunet.py"
QUICK_ARGS = ["--block_out_channels", "8", "16", "--resolution", "16", "--train_batch_size", "8",
              "--max_train_samples", "32", "--ddpm_num_inference_steps", "4", "--eval_batch_size", "4"]
VARIANTS = {"kept for reuse (default)": "--keep_freed_memory", "glibc defaults": "--no-keep_freed_memory"}
BASELINE = "glibc defaults"

# Runs the training script in this process and prints the process's resource use as the last line.
RUNNER = """
import json, resource, runpy, sys
script, *arguments = sys.argv[1:]
sys.argv = [script, *arguments]
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as exit:
    if exit.code not in (0, None):
        raise
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"minor_faults": usage.ru_minflt, "max_rss_kib": usage.ru_maxrss}))
"""

METHOD_NOTES = """\
- Each run is `examples/train_cunet.py --max_train_steps {steps} --logger none --no-evaluate_digits{quick}`, the
  default MNIST recipe otherwise (bf16 autocast where the CPU has native bf16 kernels), in a fresh process. The two
  settings alternate within each round.
- Loop time: the run's `training_seconds` (first step to last, with checkpointing, without start-up and final
  samples) over its steps; the table shows medians over rounds. `vs glibc defaults` is that setting's median
  over the row's.
- Page faults and peak memory are the whole process's (`getrusage`: start-up, data, timing probe, loop and
  samples), medians over rounds. Faults are per training step.
"""


def run_once(flag: str, steps: int, threads: int | None, quick: bool, seed: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_train_loop_") as folder:
        output_dir = Path(folder) / "run"
        command = [sys.executable, "-c", RUNNER, str(SCRIPT), "--output_dir", str(output_dir),
                   "--max_train_steps", str(steps), "--logger", "none", "--no-evaluate_digits", "--seed", str(seed),
                   "--checkpointing_steps", str(max(steps, 1)), flag]
        if threads is not None:
            command += ["--num_cpu_threads", str(threads)]
        if quick:
            command += QUICK_ARGS
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
        if result.returncode != 0:
            raise RuntimeError(f"train_cunet.py {flag} failed ({result.returncode}):\n{result.stderr[-4000:]}")
        usage = json.loads(result.stdout.strip().splitlines()[-1])
        results = json.loads((output_dir / "training_results.json").read_text())
    return {
        "seconds_per_step": results["training_seconds"] / results["steps_this_run"],
        "images_per_second": results["images_per_second"],
        "faults_per_step": usage["minor_faults"] / results["steps_this_run"],
        "max_rss_mib": usage["max_rss_kib"] / 1024,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--steps", type=int, help="Training steps per run (default 600; --quick: 3).")
    parser.add_argument("--rounds", type=int, help="Runs of each setting, interleaved (default 3; --quick: 1).")
    args = parser.parse_args(argv)
    # 0 is a value to reject, not a request for the default.
    steps, rounds = args.steps, args.rounds
    if steps is None:
        steps = 3 if args.quick else 600
    if rounds is None:
        rounds = 1 if args.quick else 3
    for name, value in (("steps", steps), ("rounds", rounds), ("threads", args.threads)):
        if value is not None and value < 1:
            parser.error(f"--{name}={value} is invalid; pass a positive number.")

    setup_logging()
    record = RunRecord()
    measured = {name: [] for name in VARIANTS}
    for round_index in range(rounds):
        for name, flag in VARIANTS.items():
            logger.info("Round %d of %d: %s (%d steps)", round_index + 1, rounds, name, steps)
            measured[name].append(run_once(flag, steps, args.threads, args.quick, args.seed))

    baseline = median([run["seconds_per_step"] for run in measured[BASELINE]])
    rows = []
    for name, runs in measured.items():
        seconds = median([run["seconds_per_step"] for run in runs])
        rows.append([
            name, format_number(seconds * 1e3), format_number(median([run["images_per_second"] for run in runs])),
            f"{baseline / seconds:.2f}x", format_number(median([run["faults_per_step"] for run in runs])),
            format_number(median([run["max_rss_mib"] for run in runs])), len(runs),
        ])
    table = markdown_table(
        ["freed memory", "loop step (ms)", "images/s", "vs glibc defaults", "minor faults per step",
         "peak RSS (MiB)", "rounds"], rows,
    )
    notes = METHOD_NOTES.format(steps=steps, quick=" and tiny widths (--quick)" if args.quick else "")
    threads = f"--num_cpu_threads {args.threads}" if args.threads else "the script's default"
    body = "\n\n".join([notes, f"Threads: {threads}.", table])
    title = "Main job loop: freed memory kept for reuse"
    if args.quick:
        title += " (--quick: widths shrunk)"
    publish(args, SECTION, title, record, body)


if __name__ == "__main__":
    main()
