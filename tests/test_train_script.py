"""End-to-end runs of examples/train_cunet.py through `accelerate launch`, on tiny real data."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import load_file

from diffusers_cunet.training import cpu_model_name

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "train_cunet.py"

# A tiny continuous U-Net and a short diffusion, so that one run takes seconds on a CPU.
TINY_ARGS = [
    "--max_train_samples", "32",
    "--train_batch_size", "8",
    "--block_out_channels", "8", "16",
    "--resolution", "16",
    "--ddpm_num_steps", "50",
    "--ddpm_num_inference_steps", "4",
    "--eval_batch_size", "4",
    "--lr_warmup_steps", "1",
    "--checkpointing_steps", "2",
    "--checkpoints_total_limit", "3",
]


def launch(output_dir: Path, *extra: str, num_processes: int = 1, env: dict | None = None, check: bool = True):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
               "--num_machines", "1", "--dynamo_backend", "no"]
    if num_processes > 1:
        command += ["--multi_gpu", "--main_process_port", "0"]
    else:
        command += ["--mixed_precision", "no"]
    command += [str(SCRIPT), "--output_dir", str(output_dir), *TINY_ARGS, *extra]
    run_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_TELEMETRY": "1"}
    for key, value in (env or {}).items():
        if value is None:
            run_env.pop(key, None)
        else:
            run_env[key] = value
    result = subprocess.run(command, capture_output=True, text=True, env=run_env, cwd=REPO_ROOT, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"train_cunet.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def load_script_module():
    spec = importlib.util.spec_from_file_location("train_cunet", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_cunet"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """One default-data run of 4 steps, shared by the checks on its output folder."""
    output_dir = tmp_path_factory.mktemp("mnist_run") / "out"
    result = launch(output_dir, "--max_train_steps", "4", "--save_images_steps", "2")
    return output_dir, result


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    """Sixteen 16x16 crops (and one non-square image) of scikit-image's RGB photos, as PNG files."""
    from skimage import data as skimage_data

    folder = tmp_path_factory.mktemp("rgb_images")
    photos = [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea(), skimage_data.rocket()]
    count = 0
    for photo_index, photo in enumerate(photos):
        for crop_index in range(4):
            top, left = 40 * crop_index, 50 * crop_index
            crop = photo[top : top + 16, left : left + 16]
            Image.fromarray(crop).save(folder / f"photo{photo_index}_{crop_index}.png")
            count += 1
    Image.fromarray(photos[0][:24, :40]).save(folder / "wide.png")
    return folder


def test_default_run_writes_pipeline(mnist_run):
    output_dir, _ = mnist_run
    model_index = json.loads((output_dir / "model_index.json").read_text())
    assert model_index["unet"] == ["diffusers_cunet", "ContinuousUNet2DModel"]
    assert model_index["scheduler"][1] == "DDPMScheduler"
    assert (output_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (output_dir / "scheduler" / "scheduler_config.json").is_file()
    assert not list(output_dir.glob("unet/*.bin"))


def test_default_run_writes_samples_logs_checkpoints(mnist_run):
    output_dir, _ = mnist_run
    assert (output_dir / "samples" / "final.png").is_file()
    assert (output_dir / "samples" / "step-000002.png").is_file()
    assert list((output_dir / "logs").rglob("events.out.tfevents.*"))
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not list(output_dir.glob(".tmp-*"))


def test_default_run_grid_is_grayscale(mnist_run):
    output_dir, _ = mnist_run
    grid = Image.open(output_dir / "samples" / "final.png")
    array = np.asarray(grid.convert("RGB")).astype(int)
    # A 1-channel model's grid repeats the gray value in R, G and B.
    assert np.abs(array[..., 0] - array[..., 1]).max() == 0


def test_default_run_model_card(mnist_run):
    output_dir, _ = mnist_run
    card = (output_dir / "README.md").read_text()
    metadata = card.split("---")[1]
    assert "library_name: diffusers" in metadata
    for tag in ("diffusers", "unconditional-image-generation", "diffusers-cunet", "neural-ode"):
        assert f"- {tag}" in metadata
    assert "- mnist" in metadata
    assert "samples/final.png" in card
    assert "DDPMPipeline.from_pretrained" in card
    assert "parameters" in card
    assert "NFE" in card


def test_default_run_reports_figures(mnist_run):
    output_dir, result = mnist_run
    results = json.loads((output_dir / "training_results.json").read_text())
    assert results["global_step"] == 4
    assert results["nfe_per_denoising_step"] == 5  # semi-implicit Euler, 1 step: 1 evaluation x 5 dynamic blocks
    assert 0.0 <= results["digit_confident_share"] <= 1.0
    assert 0 <= results["digit_num_classes"] <= 10
    # The hardware names the CPU model, which differs between machines of the same core count.
    assert results["hardware"] == f"1 process on CPU ({cpu_model_name()}, {os.cpu_count()} cores)"
    assert "Digit classifier:" in result.stderr
    assert "Running training" in result.stderr


def test_default_run_checkpoint_has_safetensors_ema(mnist_run):
    output_dir, _ = mnist_run
    ema_folder = output_dir / "checkpoint-4" / "unet_ema"
    assert (ema_folder / "diffusion_pytorch_model.safetensors").is_file()
    config = json.loads((ema_folder / "config.json").read_text())
    assert config["optimization_step"] == 4
    assert config["power"] == pytest.approx(2 / 3)


def test_pipeline_loads_in_fresh_process(mnist_run):
    output_dir, _ = mnist_run
    code = (
        "import diffusers_cunet, torch\n"
        "from diffusers import DDPMPipeline, DDIMScheduler, DPMSolverMultistepScheduler\n"
        f"pipe = DDPMPipeline.from_pretrained({str(output_dir)!r})\n"
        "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)\n"
        "images = pipe(batch_size=2, num_inference_steps=3, output_type='pil', generator=torch.manual_seed(0)).images\n"
        "print(type(pipe.unet).__name__, images[0].mode, images[0].size)\n"
        "pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type='sde-dpmsolver++')\n"
        "images = pipe(batch_size=2, num_inference_steps=3, output_type='pil', generator=torch.manual_seed(0)).images\n"
        "print(type(pipe.unet).__name__, images[0].mode, images[0].size)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-2:] == ["ContinuousUNet2DModel L (16, 16)"] * 2


def test_resume_matches_uninterrupted_run(tmp_path):
    # 32 images at batch 8 are 4 steps per epoch: the run stops in the middle of the second epoch
    # and the resumed part crosses into the third.
    straight = tmp_path / "straight"
    interrupted = tmp_path / "interrupted"
    launch(straight, "--max_train_steps", "10", "--no-evaluate_digits")
    first = launch(interrupted, "--max_train_steps", "10", "--exit_after_steps", "7", "--no-evaluate_digits")
    assert "--exit_after_steps" in first.stderr
    assert (interrupted / "checkpoint-7").is_dir()
    assert not (interrupted / "model_index.json").exists()
    resumed = launch(interrupted, "--max_train_steps", "10", "--resume_from_checkpoint", "latest", "--no-evaluate_digits")
    # The EMA state loads without diffusers' warnings about unexpected config attributes or from_config.
    assert "are not expected and will be ignored" not in resumed.stderr
    assert "FutureWarning" not in resumed.stderr

    # Training weights at the last checkpoint and the exported EMA weights both match.
    for relative in ("checkpoint-10/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                     "checkpoint-10/unet_ema/diffusion_pytorch_model.safetensors"):
        expected = load_file(straight / relative)
        actual = load_file(interrupted / relative)
        for name, tensor in expected.items():
            difference = (actual[name] - tensor).abs().max().item()
            assert difference <= 1e-6, f"{relative}: {name} differs by {difference:.3g}"
    straight_ema = json.loads((straight / "checkpoint-10/unet_ema/config.json").read_text())
    resumed_ema = json.loads((interrupted / "checkpoint-10/unet_ema/config.json").read_text())
    assert resumed_ema["optimization_step"] == straight_ema["optimization_step"] == 10
    assert resumed_ema["decay"] == straight_ema["decay"]

    # The card's training time covers both parts of the interrupted run.
    earlier = json.loads((interrupted / "checkpoint-7" / "run_settings.json").read_text())["progress"]
    results = json.loads((interrupted / "training_results.json").read_text())
    assert results["training_seconds_this_run"] > 0
    assert results["training_seconds"] == pytest.approx(earlier["training_seconds"] + results["training_seconds_this_run"], abs=0.11)
    assert "training time of the last resumed run" in (interrupted / "README.md").read_text()


def test_resume_other_settings_rejected(tmp_path):
    output_dir = tmp_path / "changed"
    launch(output_dir, "--max_train_steps", "4", "--exit_after_steps", "2", "--no-evaluate_digits")
    settings = json.loads((output_dir / "checkpoint-2" / "run_settings.json").read_text())
    assert settings["must_match"]["model_config"]["ode_solver"] == "semi_implicit_euler"

    result = launch(output_dir, "--max_train_steps", "4", "--resume_from_checkpoint", "latest", "--no-evaluate_digits",
                    "--ode_solver", "rk4", "--prediction_type", "epsilon", check=False)
    assert result.returncode != 0
    assert "model_config.ode_solver: checkpoint 'semi_implicit_euler', this run 'rk4'" in result.stderr
    assert "prediction_type: checkpoint 'v_prediction', this run 'epsilon'" in result.stderr
    assert "To build the checkpoint's own model, add --model_config_name_or_path" in result.stderr
    assert "Running training" not in result.stderr
    assert not (output_dir / "checkpoint-4").exists()

    # A checkpoint of an older version lacks config options added since; they count as their defaults.
    settings_path = output_dir / "checkpoint-2" / "run_settings.json"
    settings = json.loads(settings_path.read_text())
    del settings["must_match"]["model_config"]["initial_velocity"]
    settings_path.write_text(json.dumps(settings))

    # A new seed only changes the path of the run: it resumes, with a warning.
    resumed = launch(output_dir, "--max_train_steps", "4", "--resume_from_checkpoint", "latest", "--no-evaluate_digits",
                     "--seed", "7")
    assert "seed was 0 in checkpoint-2 and is 7 now" in resumed.stderr
    assert (output_dir / "checkpoint-4").is_dir()

    # A checkpoint already past the requested steps trains nothing, logs why, and leaves the output unchanged.
    before = {name: (output_dir / name).read_bytes()
              for name in ("unet/diffusion_pytorch_model.safetensors", "training_results.json")}
    past = launch(output_dir, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", "--no-evaluate_digits",
                  "--seed", "7")
    assert "checkpoint-4 is at step 4, which already reaches the run's 3 steps" in past.stderr
    for name, content in before.items():
        assert (output_dir / name).read_bytes() == content, name


def test_output_folder_with_other_files_rejected(tmp_path, monkeypatch):
    train_cunet = load_script_module()
    folder = tmp_path / "project"
    (folder / "src").mkdir(parents=True)
    (folder / "README.md").write_text("the user's own readme")
    (folder / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite_output_dir"]):
        args = train_cunet.parse_args(["--output_dir", str(folder), "--max_train_steps", "2", *extra])
        with pytest.raises(ValueError) as error:
            train_cunet.check_output_dir(args)
        assert "notes.txt, src" in str(error.value)
    assert (folder / "notes.txt").read_text() == "keep me"

    # A user's own README.md alone is enough to reject the folder, because the model card would replace it.
    readme_only = tmp_path / "readme_only"
    readme_only.mkdir()
    (readme_only / "README.md").write_text("the user's own readme")
    args = train_cunet.parse_args(["--output_dir", str(readme_only), "--max_train_steps", "2"])
    with pytest.raises(ValueError) as error:
        train_cunet.check_output_dir(args)
    assert "(README.md)" in str(error.value)

    # The current folder and the folders above it are never an output folder.
    monkeypatch.chdir(folder / "src")
    for path in (".", str(folder)):
        args = train_cunet.parse_args(["--output_dir", path, "--overwrite_output_dir", "--max_train_steps", "2"])
        with pytest.raises(ValueError) as error:
            train_cunet.check_output_dir(args)
        assert "current folder, a folder above it" in str(error.value)


def test_new_run_in_a_folder_with_checkpoints_rejected(tmp_path):
    train_cunet = load_script_module()
    (tmp_path / "out" / "checkpoint-5").mkdir(parents=True)
    args = train_cunet.parse_args(["--output_dir", str(tmp_path / "out"), "--max_train_steps", "2"])
    with pytest.raises(ValueError) as error:
        train_cunet.check_output_dir(args)
    assert "checkpoint-5" in str(error.value)
    assert "--resume_from_checkpoint latest" in str(error.value)
    for flag in ("--overwrite_output_dir", "--resume_from_checkpoint=latest"):
        train_cunet.check_output_dir(train_cunet.parse_args(["--output_dir", str(tmp_path / "out"), flag]))


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    output_dir = tmp_path / "accumulate"
    launch(output_dir, "--max_train_steps", "2", "--gradient_accumulation_steps", "2", "--no-evaluate_digits")
    results = json.loads((output_dir / "training_results.json").read_text())
    assert results["global_step"] == 2
    assert (output_dir / "checkpoint-2").is_dir()


def test_bf16_run_on_cpu(tmp_path):
    output_dir = tmp_path / "bf16"
    result = launch(output_dir, "--max_train_steps", "2", "--mixed_precision", "bf16", "--no-evaluate_digits",
                    "--no-keep_freed_memory")
    assert "Mixed precision = bf16" in result.stderr
    assert "CPU allocator = the C library's default" in result.stderr
    results = json.loads((output_dir / "training_results.json").read_text())
    assert np.isfinite(results["final_loss"])
    weights = load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())


def test_mixed_precision_auto(monkeypatch):
    train_cunet = load_script_module()
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    native_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    expected = "bf16" if native_bf16 and not torch.cuda.is_available() else None
    if expected is not None:
        assert train_cunet.resolve_mixed_precision("auto") == expected
    # An explicit choice wins, and accelerate's own fp16/bf16 setting is kept.
    assert train_cunet.resolve_mixed_precision("no") == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert train_cunet.resolve_mixed_precision("auto") == "fp16"
    assert train_cunet.resolve_mixed_precision("bf16") == "bf16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_accelerate_fp16_on_cpu_rejected(monkeypatch, tmp_path):
    train_cunet = load_script_module()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    args = train_cunet.parse_args(["--output_dir", str(tmp_path / "fp16"), "--logger", "none"])

    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        train_cunet.create_accelerator(args)


def test_default_run_mixed_precision_is_logged(mnist_run):
    _, result = mnist_run
    native_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    expected = "bf16" if native_bf16 else "no"
    assert f"Mixed precision = {expected}" in result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux") or torch.cuda.is_available(), reason="glibc on a CPU-only machine")
def test_default_run_keeps_freed_memory(mnist_run):
    _, result = mnist_run
    assert "CPU allocator = freed memory kept for reuse" in result.stderr


def test_rgb_image_folder_run(tmp_path, rgb_folder):
    output_dir = tmp_path / "rgb"
    launch(output_dir, "--train_data_dir", str(rgb_folder), "--max_train_steps", "2", "--random_flip")
    config = json.loads((output_dir / "unet" / "config.json").read_text())
    assert config["in_channels"] == 3
    assert config["out_channels"] == 3
    results = json.loads((output_dir / "training_results.json").read_text())
    assert "digit_confident_share" not in results
    assert Image.open(output_dir / "samples" / "final.png").mode == "RGB"


def test_class_conditional_run(tmp_path):
    output_dir = tmp_path / "conditional"
    launch(output_dir, "--max_train_steps", "2", "--class_conditional", "--no-evaluate_digits")
    config = json.loads((output_dir / "unet" / "config.json").read_text())
    assert config["num_class_embeds"] == 10
    assert "class_labels=" in (output_dir / "README.md").read_text()


def _checksums(log: str) -> dict[int, str]:
    return {int(rank): value for rank, value in re.findall(r"Rank (\d+) weights checksum (\S+)", log)}


def test_two_process_gloo_run(tmp_path):
    two = tmp_path / "two"
    one = tmp_path / "one"
    # The budget makes both ranks time their steps and agree on the slowest rank's figures.
    result = launch(two, "--max_train_steps", "3", "--time_budget_minutes", "10", "--no-evaluate_digits",
                    num_processes=2)
    log = result.stderr + result.stdout
    assert "Num processes = 2" in log
    assert "Time budget = 3 steps fit in the 10-minute budget" in log
    # Step 3 is off the 2-step checkpoint grid: the finished run still ends with a checkpoint.
    assert (two / "checkpoint-3").is_dir()
    results = json.loads((two / "training_results.json").read_text())
    assert results["num_processes"] == 2
    assert results["process_group_backend"] == "gloo"
    checksums = _checksums(log)
    assert sorted(checksums) == [0, 1]
    assert checksums[0] == checksums[1]
    # Every gradient keeps the layout of DistributedDataParallel's buckets.
    assert "Grad strides do not match bucket view strides" not in log

    single = launch(one, "--max_train_steps", "3", "--no-evaluate_digits")
    assert _checksums(single.stderr + single.stdout)[0] != checksums[0]


def test_push_to_hub_uploads_pipeline(tmp_path, hub_server):
    output_dir = tmp_path / "push"
    repo_id = f"{hub_server.username}/cunet-mnist-test"
    # The token reaches the script only through --hub_token.
    env = {"HF_ENDPOINT": hub_server.url, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": None}
    result = launch(output_dir, "--max_train_steps", "2", "--no-evaluate_digits", "--push_to_hub",
                    "--hub_model_id", repo_id, "--hub_token", hub_server.token, env=env)
    files = set(hub_server.list_files(repo_id))
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "unet/config.json",
            "scheduler/scheduler_config.json", "README.md", "samples/final.png"} <= files
    assert not [name for name in files if name.endswith(".bin") or name.startswith("checkpoint-")]
    assert hub_server.token not in result.stdout + result.stderr
    for path in output_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 2_000_000:
            assert hub_server.token.encode() not in path.read_bytes(), path
    commits = hub_server.find_requests("POST", "/commit/")
    assert commits
    assert all(request.authorization == f"Bearer {hub_server.token}" for request in commits)


def test_sampling_restores_training_weights(tmp_path):
    train_cunet = load_script_module()
    args = train_cunet.parse_args(["--output_dir", str(tmp_path / "swap"), *TINY_ARGS, "--max_train_steps", "1", "--logger", "none"])
    accelerator = train_cunet.create_accelerator(args)
    state = train_cunet.setup(args, accelerator)
    model = accelerator.unwrap_model(state.model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)  # make the training weights differ from the EMA shadow weights
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    with_ema = train_cunet.generate_samples(args, state, 2, seed=0)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    state.ema = None
    without_ema = train_cunet.generate_samples(args, state, 2, seed=0)
    assert not torch.allclose(with_ema, without_ema)


def test_inference_steps_capped_by_ddpm_steps(tmp_path, caplog):
    train_cunet = load_script_module()
    args = train_cunet.parse_args(["--output_dir", str(tmp_path / "cap"), *TINY_ARGS, "--logger", "none",
                                   "--ddpm_num_steps", "10", "--ddpm_num_inference_steps", "50", "--sampler", "ddpm"])
    accelerator = train_cunet.create_accelerator(args)
    state = train_cunet.setup(args, accelerator)
    with caplog.at_level(logging.WARNING, logger="train_cunet"):
        train_cunet.log_banner(args, state)
    assert "--ddpm_num_inference_steps 50 is more than the 10 diffusion timesteps" in caplog.text
    images = train_cunet.generate_samples(args, state, 1, seed=0)
    assert images.shape == (1, 1, 16, 16)


@pytest.mark.parametrize("method", ["stratified", "logit-normal"])
def test_stratified_timesteps_span_the_law(method):
    train_cunet = load_script_module()
    generator = torch.Generator().manual_seed(0)
    timesteps = train_cunet.sample_timesteps(method, 1000, 64, generator)
    assert timesteps.dtype == torch.long
    assert timesteps.shape == (64,)
    assert timesteps.min() >= 0
    assert timesteps.max() < 1000
    # Sorted draws sit one in each of 64 equal-probability slices of the law: uniform, or a logistic of a
    # standard normal. Timesteps are whole numbers, hence the 1/1000 of slack below each slice.
    edges = torch.linspace(0, 1, 65, dtype=torch.float64)
    if method == "logit-normal":
        edges = torch.sigmoid(torch.special.ndtri(edges))
    fractions = timesteps.sort().values.double() / 1000
    assert torch.all(fractions >= edges[:-1] - 1e-3)
    assert torch.all(fractions <= edges[1:])
    if method == "logit-normal":
        middle = ((timesteps >= 250) & (timesteps < 750)).float().mean()
        assert middle > 0.65  # a uniform draw puts half of them there
    assert not torch.equal(timesteps, timesteps.sort().values)  # shuffled


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset_name", "x/y", "--train_data_dir", "."], "not both"),
        (["--train_data_dir", "/nonexistent/folder"], "/nonexistent/folder"),
        (["--max_train_steps", "0"], "--max_train_steps=0"),
        (["--learning_rate", "-1"], "--learning_rate=-1"),
        (["--ode_rtol", "0"], "--ode_rtol=0"),
        (["--mixed_precision", "fp16"], "bf16"),
        (["--model", "unet", "--ode_solver", "rk4"], "--model cunet"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps=0"),
        (["--model", "unet", "--resolution", "28"], "--resolution=28"),
        (["--time_budget_minutes", "0"], "--time_budget_minutes=0"),
        (["--time_budget_minutes", "nan"], "--time_budget_minutes=nan"),
        (["--max_grad_norm", "-1"], "--max_grad_norm=-1.0"),
        (["--learning_rate", "nan"], "--learning_rate=nan"),
        (["--learning_rate", "inf"], "--learning_rate=inf"),
        (["--snr_gamma", "nan"], "--snr_gamma=nan"),
        (["--ode_rtol", "nan"], "--ode_rtol=nan"),
        (["--ema_inv_gamma", "0"], "--ema_inv_gamma=0.0"),
        (["--ddpm_num_inference_steps", "1000"], "must be below the 1000 diffusion timesteps"),
        (["--resume_from_checkpoint", "latest", "--overwrite_output_dir"], "--overwrite_output_dir deletes the checkpoints"),
        (["--model_config_name_or_path", "/nonexistent/config.json"], "'/nonexistent/config.json' is not found"),
        (["--model_config_name_or_path", "./missing"], "'./missing' is not found"),
        (["--model", "unet", "--model_config_name_or_path", "."], "does not apply to --model unet"),
    ],
)
def test_bad_arguments_rejected(argv, message):
    train_cunet = load_script_module()
    if "fp16" in argv and torch.cuda.is_available():
        pytest.skip("fp16 is valid on a CUDA machine")
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        train_cunet.parse_args(argv)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "argv, scheduler_class, steps",
    [
        ([], "DPMSolverMultistepScheduler", 50),
        (["--sampler", "ddpm"], "DDPMScheduler", 250),
        (["--sampler", "ddim"], "DDIMScheduler", 50),
        (["--sampler", "ddpm", "--ddpm_num_inference_steps", "30"], "DDPMScheduler", 30),
    ],
)
def test_sampler_and_default_steps(argv, scheduler_class, steps):
    train_cunet = load_script_module()
    args = train_cunet.parse_args(argv)
    scheduler = train_cunet.sampling_scheduler(args, DDPMScheduler(prediction_type="v_prediction"))
    assert type(scheduler).__name__ == scheduler_class
    assert args.ddpm_num_inference_steps == steps
    assert scheduler.config.prediction_type == "v_prediction"
    if scheduler_class == "DPMSolverMultistepScheduler":
        assert scheduler.config.algorithm_type == "sde-dpmsolver++"


@pytest.mark.parametrize("num_processes", [1, 2])
def test_bad_argument_prints_one_error_line(tmp_path, num_processes):
    result = launch(tmp_path / "bad", "--learning_rate", "-1", num_processes=num_processes, check=False)
    assert result.returncode != 0
    # accelerate 1.16 repeats the child's last stderr line in its own error; the script prints it once.
    errors = re.findall(r"^train_cunet\.py: error: (.*)$", result.stderr, flags=re.MULTILINE)
    assert errors == ["--learning_rate=-1.0 is invalid; it must be a positive, finite number."]
    assert "UsageError" not in result.stderr
    assert "ValueError" not in result.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--block_out_channels", "7", "12"],
         "--block_out_channels 7 12 does not fit the mnist_cunet preset, whose group norms split channels into 8 "
         "groups: every width must be a multiple of 8, for example --block_out_channels 8 16."),
        (["--block_out_channels", "30", "60"],
         "--block_out_channels 30 60 does not fit the mnist_cunet preset, whose group norms split channels into 8 "
         "groups: every width must be a multiple of 8, for example --block_out_channels 32 64."),
        (["--resolution", "6"],
         "--resolution 6 is too small for the model's 2 levels, which halve the image 2 times; pass --resolution 10 "
         "or more, or fewer --block_out_channels."),
        (["--resolution", "30", "--patch_size", "4"],
         "--resolution 30 is not a multiple of the model's patch size 4; pass a --resolution that is, "
         "or --patch_size 1."),
    ],
)
def test_model_errors_name_script_options(argv, message):
    train_cunet = load_script_module()
    args = train_cunet.parse_args(argv)
    with pytest.raises(train_cunet.UsageError) as error:
        train_cunet.build_model(args, channels=1, num_classes=None)
    assert str(error.value) == message


def write_model_config(folder: Path, **overrides) -> Path:
    """Save the config of a small 16x16 continuous U-Net with SiLU into `folder`, and return the folder."""
    from diffusers_cunet import presets

    config = dict(sample_size=16, block_out_channels=(8, 16), mid_block_channels=16, patch_size=1, nonlinearity="silu")
    presets.mnist_cunet(**{**config, **overrides}).save_config(folder)
    return folder


@pytest.mark.parametrize(
    "overrides, argv, message",
    [
        ({"sample_size": 32}, [],
         "has sample_size=32, but --resolution is 16; pass --resolution 32 or set sample_size to 16 in the config."),
        ({"in_channels": 3, "out_channels": 3}, [],
         "has in_channels=3, but the training images have 1 channel(s); pass a config with in_channels=1"),
        ({}, ["--block_out_channels", "7", "14"], "with these model options is invalid: norm_num_groups=8"),
    ],
)
def test_model_config_mismatch_rejected(tmp_path, overrides, argv, message):
    train_cunet = load_script_module()
    folder = write_model_config(tmp_path / "config", **overrides)
    args = train_cunet.parse_args(["--model_config_name_or_path", str(folder), "--resolution", "16", *argv])
    with pytest.raises(train_cunet.UsageError) as error:
        train_cunet.build_model(args, channels=1, num_classes=None)
    assert message in str(error.value)


def test_model_config_from_checkpoint_folder(tmp_path):
    train_cunet = load_script_module()
    config = json.loads((write_model_config(tmp_path / "config") / "config.json").read_text())
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    model_config = {key: value for key, value in config.items() if not key.startswith("_")}
    settings = {"must_match": {"model_config": model_config}, "may_differ": {}}
    (checkpoint / "run_settings.json").write_text(json.dumps(settings))

    args = train_cunet.parse_args(["--model_config_name_or_path", str(checkpoint), "--resolution", "16"])
    model = train_cunet.build_model(args, channels=1, num_classes=None)
    assert model.config.nonlinearity == "silu"
    assert list(model.config.block_out_channels) == [8, 16]

    (checkpoint / "run_settings.json").write_text(json.dumps({"must_match": {}, "may_differ": {}}))
    with pytest.raises(train_cunet.UsageError) as error:
        train_cunet.build_model(args, channels=1, num_classes=None)
    assert "is a checkpoint whose run settings contain no model config" in str(error.value)


def test_model_config_run_applies_options(tmp_path):
    folder = write_model_config(tmp_path / "config")
    output_dir = tmp_path / "out"
    launch(output_dir, "--model_config_name_or_path", str(folder / "config.json"), "--ode_solver", "rk4",
           "--initial_velocity", "linear", "--max_train_steps", "2", "--no-evaluate_digits")

    config = json.loads((output_dir / "unet" / "config.json").read_text())
    assert config["nonlinearity"] == "silu"
    assert config["ode_solver"] == "rk4"
    assert config["block_out_channels"] == [8, 16]
    assert config["initial_velocity"] == "linear"
    card = (output_dir / "README.md").read_text()
    assert "3x3 convolutions, silu and FiLM" in card
    assert "v(0) = g(h) (a 1x1 conv)" in card
    assert "It was trained with rk4, 1 step(s) per block" in card


def test_overwrite_keeps_user_files_in_subfolders(tmp_path):
    train_cunet = load_script_module()
    output_dir = tmp_path / "out"
    (output_dir / "samples").mkdir(parents=True)
    (output_dir / "logs" / "train_cunet").mkdir(parents=True)
    (output_dir / "model_index.json").write_text("{}")
    (output_dir / "samples" / "final.png").write_bytes(b"png")
    (output_dir / "logs" / "train_cunet" / "events.out.tfevents.1.host").write_bytes(b"events")
    args = train_cunet.parse_args(["--output_dir", str(output_dir), "--overwrite_output_dir"])
    train_cunet.check_output_dir(args)  # only the script's own files: accepted

    (output_dir / "samples" / "notes.txt").write_text("mine")
    with pytest.raises(train_cunet.UsageError, match=r"did not write \(samples\)"):
        train_cunet.check_output_dir(args)


def test_resume_from_older_checkpoint_rejected(tmp_path):
    train_cunet = load_script_module()
    output_dir = tmp_path / "out"
    for step in (3, 6):
        (output_dir / f"checkpoint-{step}").mkdir(parents=True)
    args = train_cunet.parse_args(["--output_dir", str(output_dir), "--resume_from_checkpoint", "checkpoint-3"])
    with pytest.raises(train_cunet.UsageError) as error:
        train_cunet.find_resume_checkpoint(args, state=None)
    assert "checkpoint-3 is older than checkpoint-6" in str(error.value)
    assert "--resume_from_checkpoint latest" in str(error.value)


def test_unreachable_hub_fails_in_one_line(tmp_path):
    import socket

    with socket.socket() as probe:  # a loopback port that nothing listens on once the socket closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = launch(tmp_path / "hub", "--max_train_steps", "2", "--push_to_hub", "--hub_model_id", "user/cunet",
                    env={"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_TOKEN": "hf_unused"}, check=False)
    assert result.returncode != 0
    # accelerate repeats the tail of the child's stderr in its own error, so the same line may come twice.
    errors = set(re.findall(r"^train_cunet\.py: error: (.*)$", result.stderr, flags=re.MULTILINE))
    assert len(errors) == 1
    errors = sorted(errors)
    assert f"Failed to create the Hub repo 'user/cunet' at http://127.0.0.1:{port} for --push_to_hub" in errors[0]
    assert "Running training" in result.stderr  # the banner comes first; no step trains
    # The run created the output folder and wrote only its logs there, so it removes the folder again.
    assert not (tmp_path / "hub").exists()


def test_checkpoint_errors_are_usage_errors(tmp_path):
    train_cunet = load_script_module()
    for name in ("missing", "not-a-checkpoint"):
        args = train_cunet.parse_args(["--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint",
                                       str(tmp_path / name)])
        with pytest.raises(train_cunet.UsageError, match=name):
            train_cunet.find_resume_checkpoint(args, state=None)
        (tmp_path / "not-a-checkpoint").mkdir(exist_ok=True)


def budget_plan(train_cunet, tmp_path, argv, step_seconds=1.0, sampling_seconds=0.01):
    """Plan a run's steps with the step timing replaced by fixed figures; return (steps, note)."""
    args = train_cunet.parse_args(["--output_dir", str(tmp_path / "budget"), *TINY_ARGS, "--logger", "none", *argv])
    accelerator = train_cunet.create_accelerator(args)
    train_cunet.time_training_step = lambda *unused, **unused_keywords: (step_seconds, sampling_seconds)
    train_cunet.SCRIPT_START = time.perf_counter()
    model = train_cunet.build_model(args, 1, None)
    noise_scheduler = DDPMScheduler(num_train_timesteps=args.ddpm_num_steps)
    plan = train_cunet.plan_max_train_steps(args, accelerator, model, noise_scheduler, 1, None, 4)
    return plan.steps, plan.note


def test_time_budget_caps_the_default_run(tmp_path):
    train_cunet = load_script_module()
    # 60 s budget, 15 s kept for saving, 4 sampling steps of 0.01 s: about 45 steps of 1 s fit.
    steps, note = budget_plan(train_cunet, tmp_path, ["--time_budget_minutes", "1"])
    assert 43 <= steps <= 45
    assert f"{steps} of {train_cunet.DEFAULT_MNIST_STEPS} steps" in note
    assert "1-minute budget" in note

    # Without a budget option, the embedded data gets the default budget; explicit steps get none.
    steps, note = budget_plan(train_cunet, tmp_path, [], step_seconds=0.01)
    assert steps == train_cunet.DEFAULT_MNIST_STEPS
    assert "fit in the 14.5-minute budget" in note
    steps, note = budget_plan(train_cunet, tmp_path, ["--max_train_steps", "7"], step_seconds=1e6)
    assert (steps, note) == (7, None)

    # In-training sample grids count against the budget too.
    steps, _ = budget_plan(train_cunet, tmp_path, ["--time_budget_minutes", "1", "--save_images_steps", "1"],
                           sampling_seconds=0.25)
    assert 20 <= steps <= 22


def test_budget_warning_names_remedy(tmp_path, caplog):
    train_cunet = load_script_module()
    with caplog.at_level(logging.WARNING):
        budget_plan(train_cunet, tmp_path, ["--time_budget_minutes", "1"])
    assert f"Pass --max_train_steps {train_cunet.DEFAULT_MNIST_STEPS} to train them all" in caplog.text

    # Requested steps are capped only by an explicit budget, so the warning names that option.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        steps, _ = budget_plan(train_cunet, tmp_path, ["--max_train_steps", "500", "--time_budget_minutes", "1"])
    assert 43 <= steps <= 45
    assert "Leave --time_budget_minutes unset to train them all" in caplog.text
    assert "Pass --max_train_steps" not in caplog.text


def test_time_budget_too_small_rejected(tmp_path):
    train_cunet = load_script_module()
    with pytest.raises(ValueError) as error:
        budget_plan(train_cunet, tmp_path, ["--time_budget_minutes", "0.2"])
    assert "--time_budget_minutes=0.2" in str(error.value)
    assert "--max_train_steps" in str(error.value)


def test_time_budget_resume_keeps_the_planned_steps(tmp_path):
    train_cunet = load_script_module()
    checkpoint = tmp_path / "budget" / "checkpoint-100"
    checkpoint.mkdir(parents=True)
    settings = {"must_match": {}, "may_differ": {"max_train_steps": 123}}
    (checkpoint / "run_settings.json").write_text(json.dumps(settings))
    steps, note = budget_plan(train_cunet, tmp_path, ["--resume_from_checkpoint", "latest"], step_seconds=1e6)
    assert steps == 123
    assert "checkpoint-100" in note


def test_time_budget_resume_path_checked_before_timing(tmp_path):
    train_cunet = load_script_module()
    timed = []

    def timing(*unused, **unused_keywords):
        timed.append(True)
        return 1.0, 0.01

    args = train_cunet.parse_args(["--output_dir", str(tmp_path / "budget"), *TINY_ARGS, "--logger", "none",
                                   "--resume_from_checkpoint", str(tmp_path / "checkpoint-7")])
    accelerator = train_cunet.create_accelerator(args)
    train_cunet.time_training_step = timing
    model = train_cunet.build_model(args, 1, None)
    with pytest.raises(train_cunet.UsageError) as error:
        train_cunet.plan_max_train_steps(args, accelerator, model, DDPMScheduler(), 1, None, 4)
    assert "checkpoint-7" in str(error.value)
    assert not timed


def test_time_budget_stops_a_run_that_runs_late(tmp_path):
    train_cunet = load_script_module()

    def timing_then_late(*unused, **unused_keywords):
        # The fake timing makes steps nearly free, and the budget ends 2 s from now: the plan keeps all
        # 100,000 steps, and the deadline has to stop the run.
        train_cunet.SCRIPT_START = time.perf_counter() - (60 - train_cunet.FINISH_RESERVE_SECONDS - 2.0)
        return 1e-6, 1e-6

    train_cunet.time_training_step = timing_then_late
    train_cunet.REPLAN_STEPS = None  # the loop's own timing would lower the step count before the deadline
    output_dir = tmp_path / "late"
    args = train_cunet.parse_args(["--output_dir", str(output_dir), *TINY_ARGS, "--logger", "none",
                                   "--no-evaluate_digits", "--max_train_steps", "100000", "--time_budget_minutes", "1"])
    results = train_cunet.main(args)
    assert 0 < results["global_step"] < 100000
    assert f"stopped at step {results['global_step']} when the time ran out" in results["time_budget"]
    assert (output_dir / f"checkpoint-{results['global_step']}").is_dir()
    assert (output_dir / "model_index.json").is_file()


@pytest.mark.parametrize("timed_step_seconds", [1.0, 1e-4])
def test_time_budget_replans_from_loop_timing(tmp_path, timed_step_seconds):
    """A timing 30x too slow caps the run at about 100 of 200 steps, which the loop's timing raises to 200.

    A timing far too fast keeps all 200 steps for a 3-second budget, which the loop's timing lowers. On a busy
    machine the deadline may still stop that run a few steps early, so only the lowered count is checked there.
    """
    train_cunet = load_script_module()

    def fake_timing(*unused, **unused_keywords):
        train_cunet.SCRIPT_START = time.perf_counter()
        return timed_step_seconds, 1e-4

    train_cunet.time_training_step = fake_timing
    train_cunet.REPLAN_STEPS = (2, 6, 12)  # a third mark times steps 6 to 12 and may set the count once more
    budget = "2" if timed_step_seconds == 1.0 else "0.3"  # 105 s or 3 s of training after the 15-s reserve
    output_dir = tmp_path / f"replan{budget}"
    args = train_cunet.parse_args(["--output_dir", str(output_dir), *TINY_ARGS, "--logger", "none", "--no-evaluate_digits",
                                   "--max_train_steps", "200", "--time_budget_minutes", budget])
    results = train_cunet.main(args)
    note = results["time_budget"]
    replanned = re.search(r"; set to (\d+) steps after step 6, at 0\.\d+ s per step in the training loop", note)
    assert replanned
    # Each later mark appends its count when it changes the count. The checkpoint records the last one.
    counts = re.findall(r"; set to (\d+) steps after step (?:6|12), at", note)
    settings = json.loads((output_dir / f"checkpoint-{results['global_step']}" / "run_settings.json").read_text())
    assert settings["may_differ"]["max_train_steps"] == int(counts[-1])
    if timed_step_seconds == 1.0:
        assert "of 200 steps, capped by the 2-minute budget" in note
        assert results["global_step"] == 200
        assert "when the time ran out" not in note
    else:
        assert "200 steps fit in the 0.3-minute budget" in note
        assert 6 < int(replanned[1]) < 200


def test_replan_lr_schedule_new_total():
    train_cunet = load_script_module()
    args = train_cunet.parse_args(["--lr_warmup_steps", "5"])
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=args.learning_rate)
    state = types.SimpleNamespace(
        accelerator=train_cunet.Accelerator(cpu=True), deadline=time.perf_counter() + 1000.0, target_steps=100,
        max_train_steps=40, sampling_seconds_per_step=0.0, budget_note="planned", num_update_steps_per_epoch=8,
        lr_scheduler=train_cunet.make_lr_scheduler(args, optimizer, 40, 1),
    )
    for _ in range(10):
        optimizer.step()
        state.lr_scheduler.step()
    assert train_cunet.replan_max_train_steps(args, state, 10, loop_seconds=0.01) == 100
    assert state.num_epochs == 13

    # From here on the learning rate equals that of a schedule planned for 100 steps from the start.
    reference_optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
    reference = train_cunet.make_lr_scheduler(args, reference_optimizer, 100, 1)
    for _ in range(10):
        reference_optimizer.step()
        reference.step()
    for _ in range(90):
        for scheduler in (state.lr_scheduler, reference):
            scheduler.optimizer.step()
            scheduler.step()
        assert state.lr_scheduler.get_last_lr() == pytest.approx(reference.get_last_lr(), abs=1e-12)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_time_budget_run_records_the_plan(tmp_path):
    output_dir = tmp_path / "budget_run"
    result = launch(output_dir, "--max_train_steps", "3", "--time_budget_minutes", "10", "--no-evaluate_digits")
    assert "Time budget = 3 steps fit in the 10-minute budget" in result.stderr + result.stdout
    card = (output_dir / "README.md").read_text()
    assert "step count and time budget" in card
    assert "s per training step" in card


def test_resume_from_missing_checkpoint_rejected(tmp_path):
    result = launch(tmp_path / "missing", "--max_train_steps", "2", "--resume_from_checkpoint",
                    str(tmp_path / "checkpoint-99"), check=False)
    assert result.returncode != 0
    assert "checkpoint-99" in result.stderr


def test_class_conditional_without_labels_rejected(tmp_path, rgb_folder):
    result = launch(tmp_path / "no_labels", "--train_data_dir", str(rgb_folder), "--max_train_steps", "2",
                    "--class_conditional", check=False)
    assert result.returncode != 0
    assert "needs a label column" in result.stderr
    assert "Running training" not in result.stderr


def test_corrupt_image_named_in_error(tmp_path, rgb_folder):
    folder = tmp_path / "with_corrupt"
    folder.mkdir()
    for path in sorted(rgb_folder.glob("*.png"))[:8]:
        (folder / path.name).write_bytes(path.read_bytes())
    good = (folder / "photo0_0.png").read_bytes()
    (folder / "zz_truncated.png").write_bytes(good[: len(good) // 2])
    result = launch(tmp_path / "corrupt", "--train_data_dir", str(folder), "--max_train_steps", "4", check=False)
    assert result.returncode != 0
    # The script prints one error line and no traceback. accelerate 1.16 then repeats the child's stderr in its
    # own error, so the line can appear twice.
    errors = set(re.findall(r"^train_cunet\.py: error: (.*)$", result.stderr, flags=re.MULTILINE))
    assert len(errors) == 1
    assert "zz_truncated.png" in errors.pop()
    assert "Remove or re-encode the file" in result.stderr
    assert "ImageReadError" not in result.stderr
    assert not (tmp_path / "corrupt").exists()  # the failed run leaves no empty output folder


def test_hub_connection_error_detected():
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    train_cunet = load_script_module()

    def chained(*errors):
        # Link the errors as `raise outer from inner` does, outermost first.
        for outer, inner in zip(errors, errors[1:]):
            outer.__cause__ = inner
        return errors[0]

    unreachable = chained(OSError("user/x does not appear to have a file named config.json."),
                      LocalEntryNotFoundError("cannot find the requested files in the local cache"),
                      ConnectionRefusedError(111, "Connection refused"))
    assert "Connection refused" in train_cunet.unreachable_hub_cause(unreachable)
    missing = chained(OSError("user/x does not appear to have a file named config.json."),
                      EntryNotFoundError("404 Client Error"))
    assert train_cunet.unreachable_hub_cause(missing) is None


def test_output_dir_inside_a_file_rejected(tmp_path):
    train_cunet = load_script_module()
    (tmp_path / "notes.txt").write_text("mine")
    args = train_cunet.parse_args(["--output_dir", str(tmp_path / "notes.txt" / "run")])
    with pytest.raises(train_cunet.UsageError, match="which is a file; pass a folder path"):
        train_cunet.check_output_dir(args)


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2, 3]", "contains a JSON list, not an object"),
        ('{"_class_name": "UNet2DModel", "sample_size": 16}', "is a config of UNet2DModel, not of ContinuousUNet2DModel"),
        # Left-out keys take the model's defaults: 32x32 samples with 3 channels.
        ("{}", "has sample_size=32, but --resolution is 16"),
    ],
)
def test_unusable_model_config_file_rejected(tmp_path, content, message):
    train_cunet = load_script_module()
    path = tmp_path / "config.json"
    path.write_text(content)
    args = train_cunet.parse_args(["--model_config_name_or_path", str(path), "--resolution", "16"])
    with pytest.raises(train_cunet.UsageError, match=re.escape(message)):
        train_cunet.build_model(args, channels=1, num_classes=None)
