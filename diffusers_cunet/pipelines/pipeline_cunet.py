# Copyright 2026 The diffusers-cunet developers. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

import inspect
import numbers
from typing import Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor


logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt")

# Channel counts that `PIL.Image.fromarray` maps to an image mode (L, LA, RGB, RGBA).
PIL_CHANNELS = (1, 2, 3, 4)


class ContinuousUNetPipeline(DiffusionPipeline):
    r"""
    Pipeline for unconditional or class-conditional image generation with any diffusers scheduler.

    Unlike [`~diffusers.DDPMPipeline`], this pipeline scales the initial noise by `scheduler.init_noise_sigma`, calls
    `scheduler.scale_model_input` before every model call and passes `generator` and `eta` to `scheduler.step` only
    when the scheduler accepts them. Sigma-space schedulers such as [`~diffusers.EulerDiscreteScheduler`],
    [`~diffusers.HeunDiscreteScheduler`] and [`~diffusers.LMSDiscreteScheduler`] therefore sample correctly, and
    [`~diffusers.PNDMScheduler`] and [`~diffusers.UniPCMultistepScheduler`] run instead of raising a `TypeError`.

    Saving, loading, device placement and the other generic methods come from [`~diffusers.DiffusionPipeline`].
    Load a saved pipeline with `ContinuousUNetPipeline.from_pretrained(path)`.
    `DiffusionPipeline.from_pretrained(path)` raises an `AttributeError` (diffusers 0.42), because it looks up the
    `_class_name` of `model_index.json` in the `diffusers` package, which does not contain this class. It loads with
    `custom_pipeline` set to the path of this file and `trust_remote_code=True`, which copies the file into the
    Hugging Face modules cache.

    Parameters:
        unet ([`~diffusers.ModelMixin`]):
            The denoising model, usually a `ContinuousUNet2DModel`. Any model with the call signature of
            [`~diffusers.UNet2DModel`] works: `unet(sample, timestep, class_labels=None)` returns an object with a
            `sample` attribute, and its config has `sample_size`, `in_channels` and, for class-conditional models,
            `num_class_embeds`.
        scheduler ([`~diffusers.SchedulerMixin`]):
            The scheduler that turns the predictions of `unet` into denoising steps, for example
            [`~diffusers.DDPMScheduler`], [`~diffusers.DDIMScheduler`], [`~diffusers.DPMSolverMultistepScheduler`],
            [`~diffusers.UniPCMultistepScheduler`], [`~diffusers.PNDMScheduler`],
            [`~diffusers.EulerDiscreteScheduler`], [`~diffusers.EulerAncestralDiscreteScheduler`] or
            [`~diffusers.HeunDiscreteScheduler`]. Its `prediction_type` must match what `unet` predicts
            (`"epsilon"`, `"sample"` or `"v_prediction"`).
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: ModelMixin, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def num_class_embeds(self) -> int | None:
        r"""
        Number of classes of a class-conditional `unet`, or `None` for an unconditional one.
        """
        return getattr(self.unet.config, "num_class_embeds", None)

    def check_inputs(
        self,
        batch_size: int,
        generator: torch.Generator | list[torch.Generator] | None,
        num_inference_steps: int,
        class_labels: int | list[int] | torch.Tensor | None,
        eta: float | None,
        output_type: str,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> None:
        r"""
        Validates the arguments of `__call__` so that a mistake raises before any denoising step runs.

        `prepare_class_labels` checks the values of `class_labels`. This method checks only that they are given
        exactly when `unet` is class-conditional.

        Raises:
            `ValueError`: If an argument has an invalid value or does not match `unet` or `scheduler`.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"`batch_size` has to be a positive integer, but is {batch_size!r}. Pass an int >= 1.")

        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"`generator` is a list of {len(generator)} generators, but `batch_size` is {batch_size}."
                " Pass one generator per image or a single generator."
            )

        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, numbers.Integral)
            or num_inference_steps < 1
        ):
            raise ValueError(
                f"`num_inference_steps` has to be a positive integer, but is {num_inference_steps!r}."
                " Pass an int >= 1."
            )

        # DDPMScheduler and DDIMScheduler raise in `set_timesteps` for more steps than `num_train_timesteps`, while
        # DPMSolverMultistepScheduler, PNDMScheduler and the Euler family accept them (diffusers 0.42). One limit
        # for all schedulers keeps swapping schedulers from changing which calls are valid.
        num_train_timesteps = getattr(self.scheduler.config, "num_train_timesteps", None)
        if num_train_timesteps is not None and num_inference_steps > num_train_timesteps:
            raise ValueError(
                f"`num_inference_steps` ({num_inference_steps}) is larger than the scheduler's"
                f" `num_train_timesteps` ({num_train_timesteps}). Pass at most {num_train_timesteps} steps."
            )

        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` has to be one of {OUTPUT_TYPES}, but is {output_type!r}.")

        in_channels = self.unet.config.in_channels
        if output_type == "pil" and in_channels not in PIL_CHANNELS:
            raise ValueError(
                f"`output_type='pil'` supports images with {PIL_CHANNELS} channels, but `unet.config.in_channels` is"
                f" {in_channels}. Use `output_type='np'` or `output_type='pt'`."
            )

        if class_labels is None and self.num_class_embeds is not None:
            raise ValueError(
                f"`unet` is class-conditional with `num_class_embeds={self.num_class_embeds}`, but `class_labels` is"
                " None. Pass an integer label for the whole batch or one label per image."
            )
        if class_labels is not None and self.num_class_embeds is None:
            raise ValueError(
                f"`class_labels` was given ({class_labels!r}), but `unet` is unconditional"
                " (`unet.config.num_class_embeds` is None). Remove `class_labels`."
            )

        if callback_on_step_end_tensor_inputs is not None:
            unknown = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(
                    f"`callback_on_step_end_tensor_inputs` has to be in {self._callback_tensor_inputs}, but contains"
                    f" {unknown}. Remove those names."
                )

        if eta is not None and not 0.0 <= eta <= 1.0:
            logger.warning(
                f"`eta` is {eta}, outside [0, 1]. eta=0 gives deterministic DDIM sampling and eta=1 adds as much"
                " noise per step as DDPM. Other values are outside the range that DDIM was defined for."
            )

    def prepare_class_labels(
        self,
        class_labels: int | list[int] | torch.Tensor | None,
        batch_size: int,
        device: torch.device,
    ) -> torch.Tensor | None:
        r"""
        Converts `class_labels` into a `torch.long` tensor of shape `(batch_size,)` and checks its values.

        Args:
            class_labels (`int`, `list[int]` or `torch.Tensor`, *optional*):
                One label for the whole batch, or one label per image. `None` for an unconditional `unet`.
            batch_size (`int`):
                The number of images to generate.
            device (`torch.device`):
                The device of the returned tensor.

        Returns:
            `torch.Tensor` or `None`: The labels, or `None` if `class_labels` is `None`.

        Raises:
            `ValueError`: If a label is not an integer, the number of labels differs from `batch_size`, or a label is
            outside `[0, unet.config.num_class_embeds)`.
        """
        if class_labels is None:
            return None

        if isinstance(class_labels, torch.Tensor):
            labels = class_labels
        elif isinstance(class_labels, numbers.Integral) and not isinstance(class_labels, bool):
            labels = torch.tensor(class_labels)
        elif isinstance(class_labels, (list, tuple)):
            if not all(isinstance(label, numbers.Integral) and not isinstance(label, bool) for label in class_labels):
                raise ValueError(f"`class_labels` has to contain integers, but is {class_labels!r}.")
            labels = torch.tensor(class_labels, dtype=torch.long)
        else:
            raise ValueError(
                f"`class_labels` has to be an int, a list of ints or an integer tensor, but is {type(class_labels)}."
            )

        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"`class_labels` has to be an integer tensor, but has dtype {labels.dtype}.")

        # A single label conditions every image of the batch on the same class.
        if labels.ndim == 0:
            labels = labels.expand(batch_size)
        if labels.ndim != 1 or labels.shape[0] != batch_size:
            raise ValueError(
                f"`class_labels` has {labels.numel()} labels with shape {tuple(labels.shape)}, but `batch_size` is"
                f" {batch_size}. Pass one label per image or a single label for the whole batch."
            )

        out_of_range = (labels < 0) | (labels >= self.num_class_embeds)
        if out_of_range.any():
            raise ValueError(
                f"`class_labels` contains {labels[out_of_range].tolist()}, which is outside the valid range"
                f" [0, {self.num_class_embeds - 1}] of `unet.config.num_class_embeds={self.num_class_embeds}`."
            )

        return labels.to(device=device, dtype=torch.long)

    def prepare_latents(
        self,
        batch_size: int,
        generator: torch.Generator | list[torch.Generator] | None,
        device: torch.device,
    ) -> torch.Tensor:
        r"""
        Samples the initial noise, scaled to the standard deviation that the scheduler starts from.

        Call it after `scheduler.set_timesteps`, because some schedulers (for example
        [`~diffusers.EulerDiscreteScheduler`]) compute `init_noise_sigma` from the current sigmas.
        """
        sample_size = self.unet.config.sample_size
        if isinstance(sample_size, int):
            height = width = sample_size
        else:
            height, width = sample_size
        shape = (batch_size, self.unet.config.in_channels, height, width)

        # DDPMPipeline (diffusers 0.42) draws the noise on the CPU for MPS devices because seeded randn on MPS is
        # not reproducible. This pipeline does the same.
        noise_device = torch.device("cpu") if device.type == "mps" else device
        latents = randn_tensor(shape, generator=generator, device=noise_device, dtype=self.unet.dtype).to(device)

        return latents * self.scheduler.init_noise_sigma

    def prepare_extra_step_kwargs(
        self,
        generator: torch.Generator | list[torch.Generator] | None,
        eta: float | None,
    ) -> dict:
        r"""
        Selects the keyword arguments of `scheduler.step` that the scheduler accepts.

        Deterministic schedulers such as [`~diffusers.PNDMScheduler`] and [`~diffusers.UniPCMultistepScheduler`] have
        no `generator` argument, and only DDIM-like schedulers take `eta`.
        """
        accepted = set(inspect.signature(self.scheduler.step).parameters.keys())

        extra_step_kwargs = {}
        if "generator" in accepted:
            extra_step_kwargs["generator"] = generator

        if eta is not None:
            if "eta" in accepted:
                extra_step_kwargs["eta"] = eta
            else:
                logger.warning(
                    f"`eta={eta}` is ignored because {self.scheduler.__class__.__name__}.step has no `eta` argument."
                    " Only DDIM-like schedulers use it."
                )

        return extra_step_kwargs

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        class_labels: int | list[int] | torch.Tensor | None = None,
        eta: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[["DiffusionPipeline", int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generates images by denoising Gaussian noise with `unet` and `scheduler`.

        Args:
            batch_size (`int`, *optional*, defaults to 1):
                Number of images to generate.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                A [`torch.Generator`](https://pytorch.org/docs/stable/generated/torch.Generator.html), or a list with
                one generator per image, that seeds the initial noise and the noise of stochastic schedulers.
            num_inference_steps (`int`, *optional*, defaults to 50):
                Number of scheduler steps, between 1 and `scheduler.config.num_train_timesteps`. Each step calls
                `unet` once, except that second-order schedulers such as [`~diffusers.HeunDiscreteScheduler`] call it
                about twice per step and [`~diffusers.PNDMScheduler`] adds 9 Runge-Kutta warmup calls (default
                config), for which it needs at least 4 steps.
            class_labels (`int`, `list[int]` or `torch.Tensor`, *optional*):
                Class labels for a class-conditional `unet` (`unet.config.num_class_embeds` is set): a single label
                for the whole batch or one label per image, each in `[0, num_class_embeds)`. Must be `None` for an
                unconditional `unet`.
            eta (`float`, *optional*):
                The η of [DDIM](https://huggingface.co/papers/2010.02502), which scales the noise added at each step:
                `0` gives deterministic DDIM sampling and `1` adds as much noise as DDPM. Passed only to schedulers
                whose `step` has an `eta` argument, such as [`~diffusers.DDIMScheduler`]. If `None`, the scheduler's
                default applies.
            output_type (`str`, *optional*, defaults to `"pil"`):
                Format of the images: `"pil"` (list of `PIL.Image.Image`, mode `"L"` for one channel and `"RGB"` for
                three), `"np"` (`np.ndarray` of shape `(batch, height, width, channels)`) or `"pt"` (`torch.Tensor`
                of shape `(batch, channels, height, width)`).
            return_dict (`bool`, *optional*, defaults to `True`):
                If `False`, returns the tuple `(images,)` in place of an [`~pipelines.ImagePipelineOutput`].
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called after every `scheduler.step` as `callback_on_step_end(pipeline, step_index, timestep,
                callback_kwargs)`. `callback_kwargs` maps the names in `callback_on_step_end_tensor_inputs` to
                tensors. `latents` is the current sample on the model's [-1, 1] scale, before clamping. If the
                returned dict contains `"latents"`, that tensor replaces the sample.
            callback_on_step_end_tensor_inputs (`list[str]`, *optional*, defaults to `["latents"]`):
                Names of the tensors that `callback_on_step_end` receives. Only `"latents"` is available.

        Example:

        ```py
        >>> import torch
        >>> from diffusers import EulerDiscreteScheduler
        >>> from diffusers_cunet.pipelines import ContinuousUNetPipeline

        >>> # load a saved pipeline and swap in another scheduler
        >>> pipe = ContinuousUNetPipeline.from_pretrained("path/to/saved/pipeline")
        >>> pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)

        >>> # denoise random noise into an image
        >>> image = pipe(num_inference_steps=50, generator=torch.manual_seed(0)).images[0]
        >>> image.save("cunet_generated_image.png")
        ```

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`:
                The generated images with pixel values in `[0, 1]`, as an [`~pipelines.ImagePipelineOutput`] or, if
                `return_dict` is `False`, as the only element of a tuple.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Validate all arguments before any compute
        self.check_inputs(
            batch_size,
            generator,
            num_inference_steps,
            class_labels,
            eta,
            output_type,
            callback_on_step_end_tensor_inputs,
        )

        device = self._execution_device
        class_labels = self.prepare_class_labels(class_labels, batch_size, device)

        # The keyword is left out for unconditional models, so models without a `class_labels` argument work too.
        unet_kwargs = {} if class_labels is None else {"class_labels": class_labels}

        # 2. Set timesteps before sampling noise, because `init_noise_sigma` can depend on them
        try:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        except ValueError as error:
            # PNDMScheduler with its default Runge-Kutta warmup fails with a numpy broadcasting message for fewer
            # than 4 steps (diffusers 0.42), which does not name the cause.
            raise ValueError(
                f"{self.scheduler.__class__.__name__}.set_timesteps failed for `num_inference_steps`="
                f"{num_inference_steps}: {error}. Pass more steps or use another scheduler."
            ) from error
        timesteps = self.scheduler.timesteps

        # 3. Sample the initial noise
        latents = self.prepare_latents(batch_size, generator, device)

        # 4. Select the optional arguments of `scheduler.step`
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 5. Denoising loop. PNDM prepends warmup entries to `timesteps`, and second-order schedulers use about
        # `scheduler.order` entries per step. The progress bar advances once per completed step and on the last entry.
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                # Sigma-space schedulers (Euler, Heun, LMS) keep `latents` as x0 + sigma * noise and divide it by
                # sqrt(sigma**2 + 1) here. `t` goes to the model unchanged because those timesteps can be fractional.
                model_input = self.scheduler.scale_model_input(latents, t)
                model_output = self.unet(model_input, t, **unet_kwargs).sample

                # Step from the noisy sample at `t` to the less noisy sample at the next timestep
                latents = self.scheduler.step(model_output, t, latents, **extra_step_kwargs).prev_sample

                if callback_on_step_end is not None:
                    available_tensors = {"latents": latents}
                    callback_kwargs = {name: available_tensors[name] for name in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)

                is_last = i == len(timesteps) - 1
                completes_step = i + 1 > num_warmup_steps and (i + 1) % self.scheduler.order == 0
                if is_last or completes_step:
                    progress_bar.update()

        # NaN survives the clamp below but turns into an arbitrary pixel value (usually 0) in PIL output, where a
        # diverged run could pass for a valid image.
        if not torch.isfinite(latents).all():
            logger.warning(
                "The generated sample contains NaN or infinite values. Check that `unet` returns finite values. In"
                " diffusers 0.42, DPMSolverMultistepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler and"
                " SASolverScheduler repeat a timestep and return NaN when `num_inference_steps` equals"
                " `num_train_timesteps`, so pass fewer steps with those schedulers."
            )

        # 6. Map from the model's [-1, 1] range to [0, 1] and convert to `output_type`
        image = (latents / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            # numpy has no bfloat16, so convert before leaving torch
            image = image.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)

        # Offload the components again if `enable_model_cpu_offload` was called
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)

        return ImagePipelineOutput(images=image)
