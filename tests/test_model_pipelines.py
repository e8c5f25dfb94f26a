"""Tests of a real ContinuousUNet2DModel inside diffusers' DDPMPipeline and DDIMPipeline."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler

from diffusers_cunet import ContinuousUNet2DModel


NUM_TRAIN_TIMESTEPS = 50
NUM_INFERENCE_STEPS = 3
PIPELINES = [
    pytest.param(DDPMPipeline, DDPMScheduler, id="ddpm-ddpm"),
    pytest.param(DDPMPipeline, DDIMScheduler, id="ddpm-ddim"),
    pytest.param(DDIMPipeline, DDIMScheduler, id="ddim-ddim"),
]
SAMPLE_SIZES = [pytest.param(16, id="square"), pytest.param((16, 24), id="rectangular")]


def build_pipeline(pipeline_class, scheduler_class, channels, sample_size):
    torch.manual_seed(0)
    unet = ContinuousUNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(4, 8),
        norm_num_groups=4,
        attention_levels=(1,),
        attention_head_dim=4,
        time_embedding_dim=8,
    )
    scheduler = scheduler_class(num_train_timesteps=NUM_TRAIN_TIMESTEPS)
    pipeline = pipeline_class(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(pipeline, output_type):
    return pipeline(
        batch_size=2,
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=NUM_INFERENCE_STEPS,
        output_type=output_type,
    ).images


def expected_height_width(sample_size):
    return (sample_size, sample_size) if isinstance(sample_size, int) else sample_size


@pytest.mark.parametrize("sample_size", SAMPLE_SIZES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("pipeline_class, scheduler_class", PIPELINES)
def test_pipeline_numpy_images(pipeline_class, scheduler_class, channels, sample_size):
    pipeline = build_pipeline(pipeline_class, scheduler_class, channels, sample_size)
    height, width = expected_height_width(sample_size)

    images = generate(pipeline, "np")

    assert images.shape == (2, height, width, channels)
    assert np.isfinite(images).all()
    assert images.min() >= 0.0
    assert images.max() <= 1.0
    assert pipeline.unet.nfe.total == 4 * len(pipeline.unet.dynamic_blocks)


@pytest.mark.parametrize("sample_size", SAMPLE_SIZES)
@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
@pytest.mark.parametrize("pipeline_class, scheduler_class", [PIPELINES[0], PIPELINES[2]])
def test_pipeline_pil_images(pipeline_class, scheduler_class, channels, mode, sample_size):
    pipeline = build_pipeline(pipeline_class, scheduler_class, channels, sample_size)
    height, width = expected_height_width(sample_size)

    images = generate(pipeline, "pil")

    assert len(images) == 2
    assert {image.mode for image in images} == {mode}
    # PIL reports (width, height).
    assert {image.size for image in images} == {(width, height)}


@pytest.mark.parametrize("pipeline_class, scheduler_class", [PIPELINES[0], PIPELINES[2]])
def test_pipeline_fixed_generator_repeats(pipeline_class, scheduler_class):
    pipeline = build_pipeline(pipeline_class, scheduler_class, 1, 16)

    first = generate(pipeline, "np")
    second = generate(pipeline, "np")

    np.testing.assert_array_equal(first, second)


RELOAD_SCRIPT = textwrap.dedent(
    """
    import sys

    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    import diffusers_cunet

    pipeline_dir, output_path = sys.argv[1:]
    pipeline = DiffusionPipeline.from_pretrained(pipeline_dir)
    pipeline.set_progress_bar_config(disable=True)
    assert isinstance(pipeline.unet, diffusers_cunet.ContinuousUNet2DModel), type(pipeline.unet)
    images = pipeline(
        batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps={steps}, output_type="np"
    ).images
    np.save(output_path, images)
    print(type(pipeline).__name__, type(pipeline.scheduler).__name__)
    """
).format(steps=NUM_INFERENCE_STEPS)


@pytest.mark.parametrize(
    "pipeline_class, scheduler_class, channels, sample_size",
    [(DDPMPipeline, DDPMScheduler, 1, (16, 24)), (DDIMPipeline, DDIMScheduler, 3, 16)],
    ids=["ddpm-1ch-rectangular", "ddim-3ch-square"],
)
def test_pipeline_reload_fresh_process(tmp_path, pipeline_class, scheduler_class, channels, sample_size):
    pipeline = build_pipeline(pipeline_class, scheduler_class, channels, sample_size)
    expected = generate(pipeline, "np")
    pipeline.save_pretrained(tmp_path / "pipeline")

    result = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(tmp_path / "pipeline"), str(tmp_path / "images.npy")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [pipeline_class.__name__, scheduler_class.__name__]
    np.testing.assert_allclose(np.load(tmp_path / "images.npy"), expected, rtol=0, atol=1e-6)
