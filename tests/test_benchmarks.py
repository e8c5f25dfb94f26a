"""Smoke runs of the benchmark scripts in `--quick --no-write` mode, and the RESULTS.md section writer."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_cunet import ContinuousUNet2DModel, ContinuousUNetPipeline


REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from common import write_section  # noqa: E402


def run_benchmark(script: str, *extra: str) -> str:
    """Run a benchmark script with --quick --no-write, check that RESULTS.md is unchanged, and return stdout."""
    results = BENCHMARKS / "RESULTS.md"
    before = results.read_bytes() if results.exists() else None
    command = [sys.executable, str(BENCHMARKS / script), "--quick", "--no-write", *extra]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    after = results.read_bytes() if results.exists() else None
    assert after == before, f"{script} --no-write changed {results}"
    return result.stdout


def table_rows(output: str) -> list[list[str]]:
    """Return the cells of every markdown table row in `output`, header and separator rows excluded."""
    rows = []
    for line in output.splitlines():
        if not line.startswith("| ") or set(line.replace("|", "").strip()) <= {"-"}:
            continue
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def assert_provenance(output: str, script: str) -> None:
    assert "- Machine: " in output
    assert f"benchmarks/{script} --quick --no-write" in output
    assert re.search(r"- Commit: \S+", output)
    assert re.search(r"- Load average \(`uptime`, 1/5/15 min\): \d", output)


@pytest.mark.slow
def test_model_cost_quick_table():
    output = run_benchmark("bench_model_cost.py")
    metrics = {row[0]: row[1:] for row in table_rows(output)}

    assert_provenance(output, "bench_model_cost.py")
    assert "### 32x32x1" in output
    expected = [
        "parameters (M)",
        "weight memory (MB)",
        "GFLOPs per forward (batch 1)",
        "GFLOPs per training step (batch 1)",
        "peak RSS growth, forward (MB, batch 1)",
        "peak RSS growth, training step (MB, batch 1)",
    ]
    for batch in (1, 2):
        expected += [
            f"forward latency, batch {batch} (ms)",
            f"training step latency, batch {batch} (ms)",
            f"forward GFLOP/s, batch {batch}",
            f"forward % of plain conv forward, batch {batch}",
            f"training step GFLOP/s, batch {batch}",
            f"training step % of plain conv forward+backward, batch {batch}",
        ]
    for metric in expected:
        assert metric in metrics, f"missing row {metric!r}"
        cunet, unet, ratio = metrics[metric]
        assert cunet != "n/a", f"row {metric!r} has no cU-Net value: {metrics[metric]}"
        assert unet != "n/a", f"row {metric!r} has no U-Net value: {metrics[metric]}"
        assert re.fullmatch(r"\d+\.\d\dx", ratio), f"row {metric!r} has ratio {ratio!r}"
    assert float(metrics["GFLOPs per forward (batch 1)"][0]) > 0


@pytest.mark.slow
def test_engine_quick_table():
    output = run_benchmark("bench_engine.py")
    rows = table_rows(output)
    timings = {(row[0], row[2], row[3]): row for row in rows if len(row) == 13 and row[1] == "1"}
    targets = [row for row in rows if len(row) == 6 and row[0] != "preset"]

    assert_provenance(output, "bench_engine.py")
    for preset in ("mnist_cunet", "thesis_cunet"):
        for method, backend in [
            ("rk4", "native"), ("rk4", "torchdiffeq"), ("euler", "native"), ("euler", "torchdiffeq"),
            ("euler", "torchode"), ("heun", "native"), ("heun", "torchdiffeq"), ("heun", "torchode"),
            ("verlet", "native"), ("dopri5", "torchdiffeq"), ("dopri5", "torchode"),
        ]:
            assert (preset, method, backend) in timings, f"missing row {preset} {method} {backend}"
        assert timings[(preset, "rk4", "native")][6].endswith("x")
        assert timings[(preset, "dopri5", "torchode")][11] == "n/a"
    # NFE of one forward: 5 dynamic blocks (two levels) for the quick mnist_cunet, 9 for the quick thesis_cunet.
    assert timings[("mnist_cunet", "rk4", "native")][4] == "20"
    assert timings[("thesis_cunet", "verlet", "native")][4] == "18"
    assert len(targets) == 6
    assert all(row[5] in ("met", "missed") for row in targets)
    assert "torch.compile not measured" in output


@pytest.fixture
def tiny_pipeline(tmp_path):
    torch.manual_seed(0)
    unet = ContinuousUNet2DModel(
        sample_size=32, in_channels=1, out_channels=1, block_out_channels=(8, 16), attention_levels=(-1,),
        attention_head_dim=8, time_embedding_dim=32, ode_solver="semi_implicit_euler",
    )
    path = tmp_path / "pipeline"
    ContinuousUNetPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(path)
    return path


@pytest.mark.slow
def test_sampling_quick_table_with_pipeline(tiny_pipeline):
    output = run_benchmark("bench_sampling.py", "--pipeline", str(tiny_pipeline))
    rows = table_rows(output)
    scheduler_rows = {(row[0], row[1]): row for row in rows if len(row) == 5 and row[1].isdigit()}
    knob_rows = {row[0]: row for row in rows if len(row) == 5 and not row[1].isdigit() and row[0] not in ("scheduler", "ODE setting")}

    assert_provenance(output, "bench_sampling.py")
    for scheduler in ("DDPM", "DDIM", "DPM-Solver++", "UniPC"):
        for steps in ("2", "5"):
            assert (scheduler, steps) in scheduler_rows, f"missing row {scheduler} {steps}"
    # Above --measure-steps-up-to (2 in quick mode) only DDIM is measured, and the others are marked estimates.
    assert scheduler_rows[("DDIM", "5")][2][0].isdigit()
    assert scheduler_rows[("UniPC", "5")][2].startswith("~")
    assert set(knob_rows) == {
        "semi_implicit_euler x 1",
        "semi_implicit_euler x 2",
        "semi_implicit_euler, schedule [[0, 1], [500, 2]]",
        "euler x 1",
        "verlet x 1",
        "rk4 x 1",
    }
    # Quick mode runs 3 DDIM steps and the tiny pipeline has 5 dynamic blocks: 15 evaluations of one stage each.
    assert knob_rows["semi_implicit_euler x 1"][2] == "15"
    assert knob_rows["rk4 x 1"][2] == "60"
    assert re.fullmatch(r"\d+\.\d%", knob_rows["rk4 x 1"][3])
    assert "Quality skipped" not in output


@pytest.mark.slow
def test_sampling_without_pipeline_skips_quality(tmp_path):
    output = run_benchmark("bench_sampling.py", "--steps", "2", "--pipeline", str(tmp_path / "missing"))

    assert "Quality skipped: no `model_index.json` under" in output
    assert "| rk4 x 1 |" in output


@pytest.mark.slow
def test_digit_samplers_quick_table(tiny_pipeline):
    output = run_benchmark("bench_digit_samplers.py", "--pipeline", str(tiny_pipeline),
                           "--samplers", "sde-dpmsolver++:2", "ddim-eta1:3")
    rows = {(row[0], row[1]): row[2:] for row in table_rows(output) if row[0] != "sampler"}

    assert_provenance(output, "bench_digit_samplers.py")
    assert set(rows) == {("sde-dpmsolver++", "2"), ("ddim-eta1", "3")}
    for share, per_seed, classes, seconds in rows.values():
        assert re.fullmatch(r"\d+%", share)
        assert re.fullmatch(r"\d+%", per_seed)
        assert classes.isdigit()
        assert float(seconds) > 0
    assert f"the trained pipeline in `{tiny_pipeline}`" in output
    # --quick judges 1 x 4 samples: sqrt((2/3) * (1/3) / 4) = 23.6 points.
    assert "With 4 samples, a share near 67% has a standard error of about 23.6 points." in output


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--samplers", "ddpm:fifty"], "--samplers entry 'ddpm:fifty' is invalid"),
        (["--pipeline", "no-such-run"], "--pipeline 'no-such-run' has no model_index.json"),
    ],
)
def test_digit_samplers_bad_input_named(argv, message):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_digit_samplers.py"), "--no-write", *argv],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_train_step_quick_table():
    output = run_benchmark("bench_train_step.py")
    rows = {row[0]: row[1:] for row in table_rows(output) if row[0] != "variant"}

    assert_provenance(output, "bench_train_step.py")
    assert set(rows) == {"float32", "bf16"}
    assert rows["float32"][2] == "1.00x"
    for name, cells in rows.items():
        assert float(cells[0].replace(",", "")) > 0, name
        assert float(cells[1].replace(",", "")) > 0, name
        assert cells[2].endswith("x"), name
    assert "bf16 kernels (oneDNN): " in output


@pytest.mark.parametrize(
    "script, argv, message",
    [
        # 0 is falsy, so it must not fall back to the default and start a full run.
        ("bench_train_loop.py", ["--steps", "0"], "--steps=0 is invalid"),
        ("bench_train_loop.py", ["--rounds", "0"], "--rounds=0 is invalid"),
        ("bench_train_step.py", ["--repeats", "0"], "--repeats=0 is invalid"),
    ],
)
def test_zero_counts_rejected(script, argv, message):
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--no-write", *argv],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.slow
def test_train_loop_quick_table():
    output = run_benchmark("bench_train_loop.py")
    rows = {row[0]: row[1:] for row in table_rows(output) if row[0] != "freed memory"}

    assert_provenance(output, "bench_train_loop.py")
    assert set(rows) == {"kept for reuse (default)", "glibc defaults"}
    assert rows["glibc defaults"][2] == "1.00x"
    for name, cells in rows.items():
        assert float(cells[0].replace(",", "")) > 0, name
        assert float(cells[3].replace(",", "")) > 0, name
        assert float(cells[4].replace(",", "")) > 0, name


def test_write_section_replaces_only_its_section(tmp_path):
    results = tmp_path / "RESULTS.md"

    write_section(results, "bench_a", "## A\n\nfirst")
    write_section(results, "bench_b", "## B\n\nsecond")
    write_section(results, "bench_a", "## A\n\nthird")
    text = results.read_text()

    assert text.startswith("# Benchmark results")
    assert "third" in text
    assert "first" not in text
    assert "second" in text
    assert text.index("## A") < text.index("## B")
    assert text.count("<!-- bench_a:start -->") == 1
