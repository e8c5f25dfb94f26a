"""Exact denoiser for Gaussian data, a stand-in for a trained network in pipeline and scheduler tests.

If the data is x0 ~ N(mu, s^2) independently per pixel and a variance-preserving diffusion gives
x_t = sqrt(ab) * x0 + sqrt(1 - ab) * eps with ab = alphas_cumprod[t], then x_t is Gaussian and the minimum
mean squared error predictions have closed forms:

    E[eps | x_t] = sqrt(1 - ab) * (x_t - sqrt(ab) * mu) / (ab * s^2 + 1 - ab)
    E[x0 | x_t]  = mu + sqrt(ab) * s^2 * (x_t - sqrt(ab) * mu) / (ab * s^2 + 1 - ab)
    E[v | x_t]   = sqrt(ab) * E[eps | x_t] - sqrt(1 - ab) * E[x0 | x_t]

Here v = sqrt(ab) * eps - sqrt(1 - ab) * x0, as in diffusers. A correct sampler driven by these predictions returns
samples with mean mu and variance s^2, up to a discretization error that shrinks as the number of steps grows. A
test can therefore check a pipeline and scheduler pair statistically with no training.

Import it as `from exact_gaussian import ExactGaussianDenoiser`. Pytest puts `tests/` on `sys.path` because the
folder has no `__init__.py`, and `save_pretrained` records the module name `exact_gaussian` for loading.
NOTE: adding `tests/__init__.py` changes that module name to `tests.exact_gaussian`, and saved pipelines then record
it under that name.
"""

import math

import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput


PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


class ExactGaussianDenoiser(ModelMixin, ConfigMixin):
    r"""
    Exact denoiser for per-pixel Gaussian data, with the call signature of [`~diffusers.UNet2DModel`].

    The data mean of pixel `(c, h, w)` is `data_mean[c] + mean_pattern_amplitude * cos(2 pi h / H) * cos(2 pi w / W)`,
    plus `class_mean_offsets[k]` for class `k` of a class-conditional model. The data standard deviation is
    `data_std[c]`. [`~ExactGaussianDenoiser.mean_tensor`] and [`~ExactGaussianDenoiser.std_tensor`] return them as
    tensors.

    Parameters:
        sample_size (`int` or `tuple[int, int]`, defaults to 16):
            Height and width of the images, as in [`~diffusers.UNet2DModel`].
        in_channels (`int`, defaults to 1):
            Number of image channels.
        out_channels (`int`, *optional*):
            Must equal `in_channels`. Defaults to `in_channels`.
        num_class_embeds (`int`, *optional*):
            Number of classes. If set, `forward` requires `class_labels`.
        data_mean (`list[float]`, defaults to `[0.0]`):
            Mean of each channel, or a single value for all channels, in the model's [-1, 1] pixel range.
        data_std (`list[float]`, defaults to `[0.5]`):
            Standard deviation of each channel, or a single value for all channels.
        mean_pattern_amplitude (`float`, defaults to 0.0):
            Amplitude of the cosine pattern added to the mean, so that the mean differs between pixels.
        class_mean_offsets (`list[float]`, *optional*):
            Offset added to the mean of every pixel for each class. Defaults to zeros.
        prediction_type (`str`, defaults to `"epsilon"`):
            One of `"epsilon"`, `"sample"` or `"v_prediction"`. Must match the scheduler's `prediction_type`.
        num_train_timesteps (`int`, defaults to 1000):
            Number of diffusion steps of the noise schedule.
        beta_start (`float`, defaults to 0.0001):
            First beta of the noise schedule.
        beta_end (`float`, defaults to 0.02):
            Last beta of the noise schedule.
        beta_schedule (`str`, defaults to `"linear"`):
            Beta schedule name, as in [`~diffusers.DDPMScheduler`].
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] = 16,
        in_channels: int = 1,
        out_channels: int | None = None,
        num_class_embeds: int | None = None,
        data_mean: list[float] = (0.0,),
        data_std: list[float] = (0.5,),
        mean_pattern_amplitude: float = 0.0,
        class_mean_offsets: list[float] | None = None,
        prediction_type: str = "epsilon",
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
    ):
        super().__init__()

        if out_channels is not None and out_channels != in_channels:
            raise ValueError(
                f"`out_channels` ({out_channels}) has to equal `in_channels` ({in_channels}) for a denoiser."
                " Leave `out_channels` as None."
            )
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` has to be one of {PREDICTION_TYPES}, but is {prediction_type!r}.")
        if num_class_embeds is not None and class_mean_offsets is not None:
            if len(class_mean_offsets) != num_class_embeds:
                raise ValueError(
                    f"`class_mean_offsets` has {len(class_mean_offsets)} entries, but `num_class_embeds` is"
                    f" {num_class_embeds}. Pass one offset per class."
                )
        if num_class_embeds is None and class_mean_offsets is not None:
            raise ValueError("`class_mean_offsets` needs `num_class_embeds`. Set both or neither.")

        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        base_mean = self._build_mean(data_mean, mean_pattern_amplitude, in_channels, height, width)
        self.register_buffer("base_mean", base_mean)
        self.register_buffer("std", self._per_channel(data_std, in_channels, "data_std").view(-1, 1, 1))
        offsets = class_mean_offsets if class_mean_offsets is not None else [0.0] * (num_class_embeds or 0)
        self.register_buffer("class_offsets", torch.tensor(offsets, dtype=torch.float32))

        # Schedulers that work in sigma space (Euler, Heun, LMS) pass fractional timesteps and, with their default
        # `interpolation_type="linear"`, interpolate sigma = sqrt((1 - ab) / ab) linearly in t. The same
        # interpolation here gives them the exact ab. Karras sigmas map back to t through log-sigma, so with
        # `use_karras_sigmas=True` the ab here is only close.
        alphas_cumprod = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
        ).alphas_cumprod
        self.register_buffer("train_sigmas", ((1 - alphas_cumprod) / alphas_cumprod).sqrt())

    @classmethod
    def from_scheduler(cls, scheduler, **kwargs) -> "ExactGaussianDenoiser":
        r"""
        Creates a denoiser with the noise schedule and `prediction_type` of `scheduler`.

        Args:
            scheduler ([`~diffusers.SchedulerMixin`]):
                A scheduler whose config has `num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule` and
                `prediction_type`.
            kwargs:
                The remaining constructor arguments, such as `data_mean` and `sample_size`.
        """
        config = scheduler.config
        return cls(
            num_train_timesteps=config.num_train_timesteps,
            beta_start=config.beta_start,
            beta_end=config.beta_end,
            beta_schedule=config.beta_schedule,
            prediction_type=config.prediction_type,
            **kwargs,
        )

    @staticmethod
    def _per_channel(values, in_channels: int, name: str) -> torch.Tensor:
        values = [values] if isinstance(values, (int, float)) else list(values)
        if len(values) == 1:
            values = values * in_channels
        if len(values) != in_channels:
            raise ValueError(
                f"`{name}` has {len(values)} entries, but `in_channels` is {in_channels}."
                " Pass one value per channel or a single value."
            )
        return torch.tensor(values, dtype=torch.float32)

    @classmethod
    def _build_mean(cls, data_mean, amplitude: float, in_channels: int, height: int, width: int) -> torch.Tensor:
        channel_mean = cls._per_channel(data_mean, in_channels, "data_mean").view(-1, 1, 1)
        rows = torch.cos(2 * math.pi * torch.arange(height, dtype=torch.float32) / height)
        columns = torch.cos(2 * math.pi * torch.arange(width, dtype=torch.float32) / width)
        return channel_mean + amplitude * rows[:, None] * columns[None, :]

    def mean_tensor(self, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        r"""
        Returns the data mean with shape `(1, C, H, W)`, or `(B, C, H, W)` for `B` class labels.
        """
        mean = self.base_mean.unsqueeze(0)
        if class_labels is None:
            return mean
        offsets = self.class_offsets[class_labels.to(self.class_offsets.device).long()]
        return mean + offsets.view(-1, 1, 1, 1)

    def std_tensor(self) -> torch.Tensor:
        r"""
        Returns the data standard deviation with shape `(1, C, 1, 1)`.
        """
        return self.std.unsqueeze(0)

    def alphas_cumprod_at(self, timestep: torch.Tensor | float | int) -> torch.Tensor:
        r"""
        Computes `alphas_cumprod` at `timestep`, interpolating sigma linearly for fractional timesteps.

        Timesteps outside `[0, num_train_timesteps - 1]` are clamped to that range.
        """
        t = torch.as_tensor(timestep, dtype=torch.float64, device=self.train_sigmas.device).reshape(-1)
        t = t.clamp(0, len(self.train_sigmas) - 1)
        lower = t.floor().long()
        upper = t.ceil().long()
        fraction = t - lower
        sigmas = self.train_sigmas.double()
        sigma = sigmas[lower] + fraction * (sigmas[upper] - sigmas[lower])
        return 1 / (1 + sigma**2)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple:
        r"""
        Computes the exact prediction of type `config.prediction_type` for the noisy `sample` at `timestep`.

        Args:
            sample (`torch.Tensor`):
                Noisy images of shape `(batch, channel, height, width)` on the variance-preserving scale.
            timestep (`torch.Tensor`, `float` or `int`):
                A single timestep (0-d tensor or number) or one per image. Fractional values are allowed.
            class_labels (`torch.Tensor`, *optional*):
                Integer labels of shape `(batch,)`. Required exactly when `num_class_embeds` is set.
            return_dict (`bool`, defaults to `True`):
                Whether to return a [`~diffusers.models.unets.unet_2d.UNet2DOutput`] instead of a tuple.
        """
        if self.config.num_class_embeds is not None and class_labels is None:
            raise ValueError("`class_labels` is missing, but `num_class_embeds` is set. Pass one label per image.")
        if self.config.num_class_embeds is None and class_labels is not None:
            raise ValueError(
                "`class_labels` was given, but the model is unconditional (`num_class_embeds` is None)."
                " Remove `class_labels` or set `num_class_embeds`."
            )

        # float64 keeps rounding error far below the sampling error that the tests measure
        x_t = sample.double()
        alpha_bar = self.alphas_cumprod_at(timestep).view(-1, 1, 1, 1)
        alpha = alpha_bar.sqrt()
        sigma = (1 - alpha_bar).sqrt()
        mean = self.mean_tensor(class_labels).double()
        variance = self.std_tensor().double() ** 2

        residual = (x_t - alpha * mean) / (alpha_bar * variance + 1 - alpha_bar)
        epsilon = sigma * residual
        original_sample = mean + alpha * variance * residual

        if self.config.prediction_type == "epsilon":
            prediction = epsilon
        elif self.config.prediction_type == "sample":
            prediction = original_sample
        else:
            prediction = alpha * epsilon - sigma * original_sample

        prediction = prediction.to(sample.dtype)
        if not return_dict:
            return (prediction,)
        return UNet2DOutput(sample=prediction)
