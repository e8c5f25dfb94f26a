"""Tests of ContinuousUNetPipeline with every common diffusers scheduler, driven by an exact Gaussian denoiser.

The statistical tests replace the network with `ExactGaussianDenoiser`, the closed-form denoiser for per-pixel
Gaussian data. A correctly driven sampler then returns samples with the data mean and variance, up to its own
discretization error and sampling noise. The denoiser and the scheduler steps act elementwise on i.i.d. noise, so
the N sampled values are independent. The tolerances therefore follow from the standard errors 1 / sqrt(N) of the
standardized mean and sqrt(2 / N) of the standardized variance.
"""

import io
import json
import logging
import math

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DEISMultistepScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    SASolverScheduler,
    UniPCMultistepScheduler,
)
from exact_gaussian import ExactGaussianDenoiser

from diffusers_cunet.pipelines import ContinuousUNetPipeline


# KDPM2 schedulers pass torch tensors through numpy functions, and numpy 2 warns about that on every step.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"),
]

PIPELINE_LOGGER = "diffusers_cunet.pipelines.pipeline_cunet"

# Three channels with different means and standard deviations, plus a cosine pattern so the mean differs per pixel.
# The values exceed [-1, 1] in the tails, so the tests read the unclamped sample through `callback_on_step_end`.
DATA_MEAN = [0.3, -0.2, 0.0]
DATA_STD = [0.5, 0.6, 0.4]
PATTERN_AMPLITUDE = 0.2
GAUSSIAN_DATA = {
    "sample_size": 16,
    "in_channels": 3,
    "data_mean": DATA_MEAN,
    "data_std": DATA_STD,
    "mean_pattern_amplitude": PATTERN_AMPLITUDE,
}

# 24 images of 3 x 16 x 16 give N = 18432 values: standard error 0.0074 for the standardized mean and 0.0104 for the
# standardized variance. At the step counts of SCHEDULER_CASES the measured variance error is at most about 4 %
# (seeds 0 and 1), which leaves at least 5 standard errors to each tolerance, so a correct sampler passes for any seed.
BATCH_SIZE = 24
MEAN_TOLERANCE = 0.05  # in units of the data standard deviation
VARIANCE_TOLERANCE = 0.10  # relative
CHANNEL_MEAN_TOLERANCE = 0.05  # absolute, standard error <= 0.6 / sqrt(6144) = 0.0077
PATTERN_TOLERANCE = 0.04  # absolute on the amplitude 0.2, standard error about 0.0074

ALL_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
NO_SAMPLE_PREDICTION = ("epsilon", "v_prediction")

# Step counts keep each scheduler's own discretization error small on this data. First-order samplers lose
# variance at every large step, mostly in the last steps where the noise is comparable to the data variance.
# They need hundreds of steps: at 50 steps DDIM with eta=0 and Euler return about 0.90 of the variance, and DDIM
# with eta=1 and Euler ancestral about 0.79. DPM-Solver++ and UniPC at 20 linspace steps stop at t=50 and return
# E[x0 | x_50], which has about 0.91 of the variance.
SCHEDULER_CASES = [
    ("ddpm", DDPMScheduler, 1000, {}, ALL_PREDICTION_TYPES),
    ("ddim-eta0", DDIMScheduler, 200, {"eta": 0.0}, ALL_PREDICTION_TYPES),
    ("ddim-eta1", DDIMScheduler, 500, {"eta": 1.0}, ALL_PREDICTION_TYPES),
    ("dpmsolver++", DPMSolverMultistepScheduler, 50, {}, ALL_PREDICTION_TYPES),
    ("dpmsolver-singlestep", DPMSolverSinglestepScheduler, 200, {}, ALL_PREDICTION_TYPES),
    ("unipc", UniPCMultistepScheduler, 50, {}, ALL_PREDICTION_TYPES),
    ("deis", DEISMultistepScheduler, 50, {}, ALL_PREDICTION_TYPES),
    ("sa-solver", SASolverScheduler, 50, {}, ALL_PREDICTION_TYPES),
    ("pndm", PNDMScheduler, 50, {}, NO_SAMPLE_PREDICTION),
    ("euler", EulerDiscreteScheduler, 200, {}, ALL_PREDICTION_TYPES),
    ("euler-ancestral", EulerAncestralDiscreteScheduler, 500, {}, NO_SAMPLE_PREDICTION),
    ("heun", HeunDiscreteScheduler, 25, {}, ALL_PREDICTION_TYPES),
    ("lms", LMSDiscreteScheduler, 50, {}, ALL_PREDICTION_TYPES),
    ("kdpm2", KDPM2DiscreteScheduler, 50, {}, NO_SAMPLE_PREDICTION),
    ("kdpm2-ancestral", KDPM2AncestralDiscreteScheduler, 200, {}, NO_SAMPLE_PREDICTION),
]

EXACT_CASES = [
    pytest.param(scheduler_class, num_inference_steps, call_kwargs, prediction_type, id=f"{name}-{prediction_type}")
    for name, scheduler_class, num_inference_steps, call_kwargs, prediction_types in SCHEDULER_CASES
    for prediction_type in prediction_types
]


class RecordingGaussianDenoiser(ExactGaussianDenoiser):
    """ExactGaussianDenoiser that records the arguments of every call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        self.calls.append(
            {
                "sample_std": sample.std().item(),
                "timestep": timestep,
                "class_labels": None if class_labels is None else class_labels.clone(),
            }
        )
        return super().forward(sample, timestep, class_labels=class_labels, return_dict=return_dict)


class NaNDenoiser(ExactGaussianDenoiser):
    """ExactGaussianDenoiser whose predictions are all NaN, as from a diverged network."""

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        output = super().forward(sample, timestep, class_labels=class_labels, return_dict=return_dict)
        output.sample.fill_(float("nan"))
        return output


def make_scheduler(scheduler_class, prediction_type="epsilon"):
    """Create `scheduler_class` with its defaults, `prediction_type` and sample clipping turned off.

    DDPMScheduler and DDIMScheduler clip the x0 prediction to [-1, 1] by default, which would cut the Gaussian tails.
    """
    defaults = scheduler_class().config
    overrides = {"prediction_type": prediction_type}
    if "clip_sample" in defaults:
        overrides["clip_sample"] = False
    return scheduler_class.from_config(defaults, **overrides)


def make_pipeline(unet, scheduler):
    pipe = ContinuousUNetPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_unclamped(pipe, **call_kwargs):
    """Run `pipe` and return the final sample on the [-1, 1] scale before clamping, and the `"pt"` images."""
    final = {}

    def keep_latents(pipeline, step, timestep, callback_kwargs):
        final["latents"] = callback_kwargs["latents"]
        return {}

    images = pipe(output_type="pt", callback_on_step_end=keep_latents, **call_kwargs).images
    return final["latents"], images


@pytest.mark.parametrize("scheduler_class, num_inference_steps, call_kwargs, prediction_type", EXACT_CASES)
def test_samples_match_gaussian_data(scheduler_class, num_inference_steps, call_kwargs, prediction_type):
    scheduler = make_scheduler(scheduler_class, prediction_type)
    unet = ExactGaussianDenoiser.from_scheduler(scheduler, **GAUSSIAN_DATA)
    pipe = make_pipeline(unet, scheduler)

    latents, _ = sample_unclamped(
        pipe,
        batch_size=BATCH_SIZE,
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=num_inference_steps,
        **call_kwargs,
    )
    standardized = (latents - unet.mean_tensor()) / unet.std_tensor()

    assert torch.isfinite(latents).all()
    assert abs(standardized.mean().item()) < MEAN_TOLERANCE
    assert abs(standardized.var().item() - 1) < VARIANCE_TOLERANCE

    channel_means = latents.mean(dim=(0, 2, 3))
    for channel, expected in enumerate(DATA_MEAN):
        assert abs(channel_means[channel].item() - expected) < CHANNEL_MEAN_TOLERANCE, f"channel {channel}"

    # Least-squares amplitude of the cosine pattern in the sample, which is 0 if the sampler loses per-pixel means.
    pattern = (unet.mean_tensor() - torch.tensor(DATA_MEAN).view(1, -1, 1, 1)) / PATTERN_AMPLITUDE
    centered = latents - torch.tensor(DATA_MEAN).view(1, -1, 1, 1)
    amplitude = (centered * pattern).mean() / (pattern**2).mean()
    assert abs(amplitude.item() - PATTERN_AMPLITUDE) < PATTERN_TOLERANCE


def test_class_conditional_samples_follow_labels():
    scheduler = make_scheduler(DPMSolverMultistepScheduler)
    unet = ExactGaussianDenoiser.from_scheduler(
        scheduler, num_class_embeds=2, class_mean_offsets=[-0.3, 0.3], **GAUSSIAN_DATA
    )
    pipe = make_pipeline(unet, scheduler)
    class_labels = torch.tensor([0, 1] * (BATCH_SIZE // 2))

    latents, _ = sample_unclamped(
        pipe,
        batch_size=BATCH_SIZE,
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=50,
        class_labels=class_labels,
    )
    standardized = (latents - unet.mean_tensor(class_labels)) / unet.std_tensor()

    assert abs(standardized.mean().item()) < MEAN_TOLERANCE
    assert abs(standardized.var().item() - 1) < VARIANCE_TOLERANCE
    # The class offsets differ by 0.6, so swapped or ignored labels move each class mean by 0.3 or more.
    class_gap = latents[class_labels == 1].mean() - latents[class_labels == 0].mean()
    assert abs(class_gap.item() - 0.6) < 2 * CHANNEL_MEAN_TOLERANCE


@pytest.mark.parametrize(
    "scheduler_class",
    [PNDMScheduler, UniPCMultistepScheduler, HeunDiscreteScheduler, LMSDiscreteScheduler],
)
def test_ddpm_pipeline_fails_without_generator_argument(scheduler_class):
    """DDPMPipeline passes `generator=` to every `scheduler.step`, which deterministic schedulers do not accept."""
    scheduler = make_scheduler(scheduler_class)
    unet = ExactGaussianDenoiser.from_scheduler(scheduler, data_std=[0.25])
    ddpm_pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    ddpm_pipe.set_progress_bar_config(disable=True)

    with pytest.raises(TypeError, match="generator"):
        ddpm_pipe(batch_size=2, generator=torch.manual_seed(0), num_inference_steps=10, output_type="np")

    images = make_pipeline(unet, scheduler)(
        batch_size=2, generator=torch.manual_seed(0), num_inference_steps=10, output_type="np"
    ).images
    assert np.isfinite(images).all()


@pytest.mark.parametrize("scheduler_class", [EulerDiscreteScheduler, EulerAncestralDiscreteScheduler])
def test_ddpm_pipeline_saturates_with_euler(scheduler_class):
    """DDPMPipeline skips `init_noise_sigma` and `scale_model_input`, so Euler returns saturated noise."""
    scheduler = make_scheduler(scheduler_class)
    # N(0, 0.25^2) stays inside [-1, 1] up to 4 standard deviations, so a correct sample is almost never clamped.
    unet = ExactGaussianDenoiser.from_scheduler(scheduler, data_std=[0.25])
    ddpm_pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    ddpm_pipe.set_progress_bar_config(disable=True)
    call_kwargs = {"batch_size": 16, "num_inference_steps": 50, "output_type": "np"}

    wrong = ddpm_pipe(generator=torch.manual_seed(0), **call_kwargs).images
    right = make_pipeline(unet, scheduler)(generator=torch.manual_seed(0), **call_kwargs).images

    wrong_saturated = np.mean((wrong == 0) | (wrong == 1))
    right_saturated = np.mean((right == 0) | (right == 1))
    assert wrong_saturated > 0.99
    assert right_saturated < 0.01


def test_matches_ddpm_pipeline_with_ddpm_scheduler():
    scheduler = DDPMScheduler()
    unet = ExactGaussianDenoiser.from_scheduler(scheduler, data_mean=[0.1], data_std=[0.3])
    ddpm_pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    ddpm_pipe.set_progress_bar_config(disable=True)
    call_kwargs = {"batch_size": 2, "num_inference_steps": 50, "output_type": "np"}

    expected = ddpm_pipe(generator=torch.manual_seed(0), **call_kwargs).images
    images = make_pipeline(unet, scheduler)(generator=torch.manual_seed(0), **call_kwargs).images

    np.testing.assert_array_equal(images, expected)


def test_matches_ddim_pipeline_with_eta():
    scheduler = DDIMScheduler()
    unet = ExactGaussianDenoiser.from_scheduler(scheduler, data_mean=[0.1], data_std=[0.3])
    ddim_pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    ddim_pipe.set_progress_bar_config(disable=True)
    call_kwargs = {"batch_size": 2, "num_inference_steps": 20, "eta": 0.5, "output_type": "np"}

    expected = ddim_pipe(generator=torch.manual_seed(0), **call_kwargs).images
    images = make_pipeline(unet, scheduler)(generator=torch.manual_seed(0), **call_kwargs).images

    np.testing.assert_array_equal(images, expected)


def test_eta_reaches_ddim_step():
    scheduler = make_scheduler(DDIMScheduler)
    pipe = make_pipeline(ExactGaussianDenoiser.from_scheduler(scheduler), scheduler)

    def run(eta):
        return pipe(generator=torch.manual_seed(0), num_inference_steps=10, eta=eta, output_type="np").images

    np.testing.assert_array_equal(run(None), run(0.0))
    assert not np.array_equal(run(0.0), run(1.0))


def test_eta_warns_for_scheduler_without_eta(caplog):
    scheduler = make_scheduler(EulerDiscreteScheduler)
    pipe = make_pipeline(ExactGaussianDenoiser.from_scheduler(scheduler), scheduler)

    with caplog.at_level(logging.WARNING, logger=PIPELINE_LOGGER):
        pipe(num_inference_steps=2, eta=0.5, output_type="np")

    assert "`eta=0.5` is ignored" in caplog.text


def test_euler_model_input_and_timesteps():
    scheduler = make_scheduler(EulerDiscreteScheduler)
    unet = RecordingGaussianDenoiser.from_scheduler(scheduler)
    pipe = make_pipeline(unet, scheduler)

    # 7 linspace steps over [0, 999] are 166.5 apart, so most timesteps are fractional.
    pipe(batch_size=4, generator=torch.manual_seed(0), num_inference_steps=7, output_type="np")

    received = [call["timestep"] for call in unet.calls]
    assert len(received) == 7
    assert all(torch.is_tensor(t) and t.ndim == 0 for t in received)
    assert torch.equal(torch.stack(received), scheduler.timesteps)
    assert any(t.item() != round(t.item()) for t in received), "expected fractional Euler timesteps"
    # The initial sample has standard deviation init_noise_sigma (about 157); scale_model_input brings it to about 1.
    assert scheduler.init_noise_sigma > 100
    assert 0.8 < unet.calls[0]["sample_std"] < 1.2


@pytest.mark.parametrize(
    "class_labels, expected",
    [
        pytest.param(2, [2, 2, 2], id="int"),
        pytest.param([0, 3, 1], [0, 3, 1], id="list"),
        pytest.param(torch.tensor([3, 2, 1]), [3, 2, 1], id="tensor"),
        pytest.param(torch.tensor(1), [1, 1, 1], id="0-d-tensor"),
    ],
)
def test_class_labels_reach_model(class_labels, expected):
    scheduler = make_scheduler(DDIMScheduler)
    unet = RecordingGaussianDenoiser.from_scheduler(scheduler, num_class_embeds=4)
    pipe = make_pipeline(unet, scheduler)

    pipe(batch_size=3, num_inference_steps=5, class_labels=class_labels, output_type="np")

    assert len(unet.calls) == 5
    for call in unet.calls:
        assert call["class_labels"].dtype == torch.long
        assert call["class_labels"].tolist() == expected


def test_unconditional_model_gets_no_class_labels():
    scheduler = make_scheduler(DDIMScheduler)
    unet = RecordingGaussianDenoiser.from_scheduler(scheduler)

    make_pipeline(unet, scheduler)(num_inference_steps=3, output_type="np")

    assert [call["class_labels"] for call in unet.calls] == [None, None, None]


UNCONDITIONAL_ERRORS = [
    pytest.param({"batch_size": 0}, "`batch_size` has to be a positive integer", id="batch-size-0"),
    pytest.param({"batch_size": 2.0}, "`batch_size` has to be a positive integer", id="batch-size-float"),
    pytest.param({"batch_size": True}, "`batch_size` has to be a positive integer", id="batch-size-bool"),
    pytest.param({"num_inference_steps": 0}, "`num_inference_steps` has to be a positive integer", id="steps-0"),
    pytest.param({"num_inference_steps": 2.5}, "`num_inference_steps` has to be a positive integer", id="steps-float"),
    pytest.param(
        {"num_inference_steps": 1001}, r"larger than the scheduler's `num_train_timesteps` \(1000\)", id="steps-1001"
    ),
    pytest.param({"output_type": "latent"}, "`output_type` has to be one of", id="output-type"),
    pytest.param(
        {"batch_size": 2, "generator": [torch.Generator()]},
        "list of 1 generators, but `batch_size` is 2",
        id="generator-list",
    ),
    pytest.param({"class_labels": 0}, "`unet` is unconditional", id="labels-unconditional"),
    pytest.param(
        {"callback_on_step_end_tensor_inputs": ["model_output"]},
        "`callback_on_step_end_tensor_inputs` has to be in",
        id="callback-inputs",
    ),
]

CONDITIONAL_ERRORS = [
    pytest.param({}, "`class_labels` is None", id="labels-missing"),
    pytest.param({"class_labels": [0, 1, 2]}, "has 3 labels .* but `batch_size` is 2", id="labels-length"),
    pytest.param(
        {"class_labels": [0, 4]}, r"contains \[4\], which is outside the valid range \[0, 3\]", id="labels-high"
    ),
    pytest.param({"class_labels": -1}, r"contains \[-1, -1\]", id="labels-negative"),
    pytest.param(
        {"class_labels": torch.tensor([0.0, 1.0])}, "integer tensor, but has dtype torch.float32", id="labels-float"
    ),
    pytest.param({"class_labels": [0, 1.5]}, "has to contain integers", id="labels-list-float"),
    pytest.param({"class_labels": "cat"}, "has to be an int, a list of ints or an integer tensor", id="labels-str"),
]


@pytest.mark.parametrize("call_kwargs, message", UNCONDITIONAL_ERRORS)
def test_invalid_arguments_raise_before_denoising(call_kwargs, message):
    scheduler = make_scheduler(DDPMScheduler)
    unet = RecordingGaussianDenoiser.from_scheduler(scheduler)
    pipe = make_pipeline(unet, scheduler)
    call_kwargs = {"batch_size": 1, "num_inference_steps": 2, **call_kwargs}

    with pytest.raises(ValueError, match=message):
        pipe(**call_kwargs)

    assert unet.calls == []


@pytest.mark.parametrize("call_kwargs, message", CONDITIONAL_ERRORS)
def test_invalid_class_labels_raise_before_denoising(call_kwargs, message):
    scheduler = make_scheduler(DDPMScheduler)
    unet = RecordingGaussianDenoiser.from_scheduler(scheduler, num_class_embeds=4)
    pipe = make_pipeline(unet, scheduler)

    with pytest.raises(ValueError, match=message):
        pipe(batch_size=2, num_inference_steps=2, **call_kwargs)

    assert unet.calls == []


def test_pndm_too_few_steps_names_scheduler():
    scheduler = make_scheduler(PNDMScheduler)
    unet = RecordingGaussianDenoiser.from_scheduler(scheduler)
    pipe = make_pipeline(unet, scheduler)

    with pytest.raises(ValueError, match="PNDMScheduler.set_timesteps failed for `num_inference_steps`=3"):
        pipe(num_inference_steps=3, output_type="np")

    assert unet.calls == []


def test_pil_output_rejects_unsupported_channel_count():
    scheduler = make_scheduler(DDIMScheduler)
    unet = RecordingGaussianDenoiser.from_scheduler(scheduler, in_channels=5)
    pipe = make_pipeline(unet, scheduler)

    with pytest.raises(ValueError, match="`unet.config.in_channels` is 5"):
        pipe(num_inference_steps=2, output_type="pil")

    assert unet.calls == []
    assert pipe(num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 5)


@pytest.mark.parametrize("in_channels, mode", [(1, "L"), (3, "RGB")])
def test_rectangular_output_formats(in_channels, mode):
    scheduler = make_scheduler(DDIMScheduler)
    unet = ExactGaussianDenoiser.from_scheduler(scheduler, sample_size=(16, 24), in_channels=in_channels)
    pipe = make_pipeline(unet, scheduler)
    call_kwargs = {"batch_size": 2, "num_inference_steps": 5}

    latents, pt_images = sample_unclamped(pipe, generator=torch.manual_seed(0), **call_kwargs)
    np_images = pipe(generator=torch.manual_seed(0), output_type="np", **call_kwargs).images
    pil_images = pipe(generator=torch.manual_seed(0), output_type="pil", **call_kwargs).images

    assert pt_images.shape == (2, in_channels, 16, 24)
    assert torch.equal(pt_images, (latents / 2 + 0.5).clamp(0, 1))
    assert np_images.shape == (2, 16, 24, in_channels)
    np.testing.assert_array_equal(np_images, pt_images.permute(0, 2, 3, 1).numpy())
    assert len(pil_images) == 2
    assert all(isinstance(image, PIL.Image.Image) for image in pil_images)
    assert all(image.mode == mode for image in pil_images)
    assert pil_images[0].size == (24, 16)


def test_return_dict_false_returns_tuple():
    scheduler = make_scheduler(DDIMScheduler)
    pipe = make_pipeline(ExactGaussianDenoiser.from_scheduler(scheduler), scheduler)

    output = pipe(num_inference_steps=2, output_type="np", return_dict=False)

    assert isinstance(output, tuple)
    assert output[0].shape == (1, 16, 16, 1)


def test_generator_list_seeds_each_image():
    scheduler = make_scheduler(DDPMScheduler)  # stochastic, so the step noise must follow the generators too
    pipe = make_pipeline(ExactGaussianDenoiser.from_scheduler(scheduler), scheduler)

    pair = pipe(
        batch_size=2,
        generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)],
        num_inference_steps=10,
        output_type="np",
    ).images
    second = pipe(
        batch_size=1, generator=[torch.Generator().manual_seed(1)], num_inference_steps=10, output_type="np"
    ).images

    np.testing.assert_allclose(pair[1], second[0], atol=1e-6)
    assert not np.allclose(pair[0], pair[1])


@pytest.mark.parametrize(
    "scheduler_class, num_inference_steps",
    [(HeunDiscreteScheduler, 5), (KDPM2DiscreteScheduler, 5), (PNDMScheduler, 10), (DDIMScheduler, 7)],
)
def test_progress_bar_counts_inference_steps(scheduler_class, num_inference_steps):
    scheduler = make_scheduler(scheduler_class)
    pipe = ContinuousUNetPipeline(unet=ExactGaussianDenoiser.from_scheduler(scheduler), scheduler=scheduler)
    stream = io.StringIO()
    pipe.set_progress_bar_config(file=stream, disable=False, ascii=True)

    pipe(num_inference_steps=num_inference_steps, output_type="np")

    final_status = stream.getvalue().split("\r")[-1]
    assert f"{num_inference_steps}/{num_inference_steps}" in final_status


def test_non_finite_sample_warns(caplog):
    scheduler = make_scheduler(DDIMScheduler)
    pipe = make_pipeline(NaNDenoiser.from_scheduler(scheduler), scheduler)

    with caplog.at_level(logging.WARNING, logger=PIPELINE_LOGGER):
        pipe(num_inference_steps=2, output_type="np")

    assert "contains NaN or infinite values" in caplog.text


def test_save_load_round_trip(tmp_path):
    scheduler = make_scheduler(DPMSolverMultistepScheduler, "v_prediction")
    unet = ExactGaussianDenoiser.from_scheduler(
        scheduler, num_class_embeds=2, class_mean_offsets=[-0.2, 0.2], **GAUSSIAN_DATA
    )
    pipe = make_pipeline(unet, scheduler)
    call_kwargs = {"batch_size": 2, "num_inference_steps": 10, "class_labels": [0, 1], "output_type": "np"}

    pipe.save_pretrained(tmp_path)
    loaded = ContinuousUNetPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)

    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index["_class_name"] == "ContinuousUNetPipeline"
    assert model_index["unet"] == ["exact_gaussian", "ExactGaussianDenoiser"]
    assert model_index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    assert isinstance(loaded.unet, ExactGaussianDenoiser)
    assert isinstance(loaded.scheduler, DPMSolverMultistepScheduler)
    public_config = {key: value for key, value in unet.config.items() if not key.startswith("_")}
    assert {key: loaded.unet.config[key] for key in public_config} == public_config
    assert loaded.scheduler.config.prediction_type == "v_prediction"

    expected = pipe(generator=torch.manual_seed(0), **call_kwargs).images
    images = loaded(generator=torch.manual_seed(0), **call_kwargs).images
    np.testing.assert_array_equal(images, expected)


def test_generic_loader_raises_attribute_error(tmp_path):
    """`DiffusionPipeline.from_pretrained` resolves `_class_name` in the diffusers package only (diffusers 0.42)."""
    scheduler = make_scheduler(DDIMScheduler)
    make_pipeline(ExactGaussianDenoiser.from_scheduler(scheduler), scheduler).save_pretrained(tmp_path)

    with pytest.raises(AttributeError, match="ContinuousUNetPipeline"):
        DiffusionPipeline.from_pretrained(tmp_path)


def test_exact_denoiser_matches_forward_process():
    """Check the helper itself: its epsilon prediction is E[noise | x_t] for samples of the forward process.

    The residual noise - E[noise | x_t] then has mean 0, is uncorrelated with x_t and has the conditional variance
    ab s^2 / (ab s^2 + 1 - ab). With 65536 values per channel the standard errors are below 0.005.
    """
    scheduler = DDPMScheduler()
    unet = ExactGaussianDenoiser.from_scheduler(scheduler, **GAUSSIAN_DATA)
    generator = torch.Generator().manual_seed(0)
    x0 = unet.mean_tensor() + unet.std_tensor() * torch.randn(256, 3, 16, 16, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)

    for t in (10, 300, 900):
        x_t = scheduler.add_noise(x0, noise, torch.tensor([t]))
        residual = noise - unet(x_t, torch.tensor(t)).sample
        alpha_bar = scheduler.alphas_cumprod[t].item()

        for channel, std in enumerate(DATA_STD):
            channel_residual = residual[:, channel].flatten()
            channel_x_t = x_t[:, channel].flatten()
            signal = alpha_bar * std**2
            expected_std = math.sqrt(signal / (signal + 1 - alpha_bar))
            correlation = torch.corrcoef(torch.stack([channel_residual, channel_x_t]))[0, 1]

            assert abs(channel_residual.mean().item()) < 0.02, f"t={t}, channel {channel}"
            assert abs(channel_residual.std().item() / expected_std - 1) < 0.02, f"t={t}, channel {channel}"
            assert abs(correlation.item()) < 0.02, f"t={t}, channel {channel}"
