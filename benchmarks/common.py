"""Shared helpers of the benchmark scripts: interleaved timing, peak memory, tables and RESULTS.md sections.

Every script prints its tables to stdout and, unless `--no-write` is given, replaces its own section of
`benchmarks/RESULTS.md` with the tables and the run's provenance (machine, command, date, commit, load average).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import psutil
import torch
from tqdm.auto import tqdm

from diffusers_cunet.training import cpu_model_name


REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"

RESULTS_HEADER = """# Benchmark results

Measured numbers of the scripts in `benchmarks/`. Each section is rewritten by its script (run it without
`--no-write`) and records the machine, the exact command, the date, the git commit and the load average, because
timings on a shared machine move with the load. Compare ratios measured within one section: both sides of a ratio
were timed in the same run with interleaved repetitions, and the tables show medians.
"""

logger = logging.getLogger("benchmarks")


def setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quick", action="store_true", help="Run tiny sizes with one or two repetitions (seconds; used by the tests)."
    )
    parser.add_argument(
        "--no-write", action="store_true", help="Print the tables only and leave benchmarks/RESULTS.md unchanged."
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS_PATH, help="Markdown page whose section this script rewrites."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights and inputs.")
    parser.add_argument(
        "--threads", type=int,
        help="torch intra-op threads (default: torch's default, all cores; --quick: 1). With more threads than "
        "idle cores, every small op waits at an OpenMP barrier for a descheduled thread, which can make a tiny "
        "model many times slower.",
    )


def apply_thread_setting(args: argparse.Namespace) -> None:
    """Set torch's intra-op threads from `--threads`, defaulting to 1 in quick mode."""
    threads = args.threads
    if threads is None and args.quick:
        threads = 1
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads={threads} is invalid; pass a positive number of threads.")
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- provenance


def load_average() -> str:
    """Return the load average as `uptime` prints it (1, 5 and 15 minutes)."""
    try:
        output = subprocess.run(["uptime"], capture_output=True, text=True, check=True, timeout=10).stdout
        match = re.search(r"load average[s]?:\s*(.+)$", output.strip())
        if match:
            return match.group(1)
    except (OSError, subprocess.SubprocessError):
        pass
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def git_commit() -> str:
    """Return the short commit hash, marked when tracked files differ from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{commit} (with uncommitted changes)" if changed else commit


def run_date() -> str:
    try:
        return subprocess.run(["date"], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return time.strftime("%a %b %d %H:%M:%S %Z %Y")


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO_ROOT)
    except ValueError:
        pass
    return shlex.join([".venv/bin/python", str(script), *sys.argv[1:]])


@dataclass
class RunRecord:
    """Provenance of one benchmark run, rendered at the top of its RESULTS.md section."""

    command: str = field(default_factory=command_line)
    date: str = field(default_factory=run_date)
    commit: str = field(default_factory=git_commit)
    load_at_start: str = field(default_factory=load_average)
    load_at_end: str = ""
    started: float = field(default_factory=time.perf_counter)

    def finish(self) -> None:
        self.load_at_end = load_average()

    def markdown(self) -> str:
        diffusers_version = _package_version("diffusers")
        elapsed = time.perf_counter() - self.started
        return "\n".join(
            [
                f"- Machine: {cpu_model_name()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads, "
                f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM; torch {torch.__version__}, "
                f"diffusers {diffusers_version}, Python {platform.python_version()}",
                f"- Command: `{self.command}`",
                f"- Date: {self.date}; run time {elapsed / 60:.1f} min",
                f"- Commit: {self.commit}",
                f"- Load average (`uptime`, 1/5/15 min): {self.load_at_start} at the start, {self.load_at_end} at the end",
            ]
        )


def _package_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - a missing version must not stop a benchmark
        return "unknown"


# --------------------------------------------------------------------------- timing


def time_call(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure_interleaved(
    candidates: dict[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    max_seconds: float | None = None,
    description: str = "timing",
) -> dict[str, list[float]]:
    """Time each candidate `repeats` times, one call of each per round, and return the seconds of every call.

    Interleaving puts every candidate under the same load drift, so the ratio of two medians is fairer than
    that of two back-to-back blocks. The order flips every round so that no candidate always runs right after
    the same neighbour. Once `max_seconds` of timed rounds have passed, the loop stops after the current round.
    At least one timed round always runs. The returned lists can be shorter than `repeats`.
    """
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()

    timings: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for round_index in tqdm(range(repeats), desc=description, leave=False, disable=repeats < 3):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            timings[name].append(time_call(candidates[name]))
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    return timings


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --------------------------------------------------------------------------- memory


def _release_free_heap() -> None:
    # glibc keeps freed blocks in the process, so the RSS before a call can include memory that the call
    # would reuse. Trimming first makes the RSS growth count what the call needs.
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_delta(function: Callable[[], object], poll_interval: float = 0.001) -> float:
    """Return the peak resident-set growth in bytes while `function` runs.

    The baseline is the RSS right before the call, after freeing cached heap memory. When the call raises the
    process's `ru_maxrss`, that exact high-water mark is the peak. When an earlier call had a higher peak, the
    peak is the largest RSS seen by a thread that samples `psutil` every `poll_interval` seconds, which can
    miss a peak shorter than that.
    """
    process = psutil.Process()
    _release_free_heap()
    baseline = process.memory_info().rss
    sampled_peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal sampled_peak
        while not stop.is_set():
            sampled_peak = max(sampled_peak, process.memory_info().rss)
            time.sleep(poll_interval)

    lifetime_peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        function()
    finally:
        stop.set()
        sampler.join()
    # ru_maxrss is in KiB on Linux.
    lifetime_peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = lifetime_peak_after if lifetime_peak_after > lifetime_peak_before else sampled_peak
    return max(0.0, float(peak - baseline))


def module_weight_bytes(module: torch.nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


# --------------------------------------------------------------------------- tables and RESULTS.md


def format_number(value: float | int | str | None, digits: int = 3) -> str:
    """Format a table cell: `n/a` for missing values, integers with separators, floats to `digits` significant digits."""
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return f"{value:,}"
    if value != value:  # NaN
        return "n/a"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}" if magnitude >= 1e-3 else f"{value:.2e}"


def format_ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator == 0 or numerator != numerator or denominator != denominator:
        return "n/a"
    return f"{numerator / denominator:.2f}x"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(cell) for cell in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def section_markers(section: str) -> tuple[str, str]:
    return f"<!-- {section}:start -->", f"<!-- {section}:end -->"


def write_section(results_path: Path, section: str, body: str) -> None:
    """Replace the text between this section's markers in `results_path`, or append the section if it is missing."""
    start_marker, end_marker = section_markers(section)
    block = f"{start_marker}\n{body.rstrip()}\n{end_marker}"
    text = results_path.read_text(encoding="utf-8") if results_path.exists() else RESULTS_HEADER
    if start_marker in text and end_marker in text:
        before = text[: text.index(start_marker)]
        after = text[text.index(end_marker) + len(end_marker):]
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    results_path.write_text(text, encoding="utf-8")
    logger.info("Wrote the %s section of %s", section, results_path)


def publish(args: argparse.Namespace, section: str, title: str, record: RunRecord, body: str) -> None:
    """Print the section and, unless `--no-write`, store it in RESULTS.md."""
    record.finish()
    text = f"## {title}\n\n{record.markdown()}\n\n{body.strip()}\n"
    print(text)
    if args.no_write:
        logger.info("--no-write: %s left unchanged", args.results)
    else:
        write_section(args.results, section, text)
