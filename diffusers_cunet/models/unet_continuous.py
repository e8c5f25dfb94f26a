"""ContinuousUNet2DModel: a U-Net whose blocks are second-order neural ODEs, for diffusers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from ..ode import NonFiniteStateError, ODESolverSettings
from .blocks import NONLINEARITIES, DynamicBlock, SpatialSelfAttention, check_initial_velocity, get_nonlinearity


@dataclass
class NFEStats:
    """Acceleration-field evaluations (NFE) of the last forward pass.

    Attributes:
        total (`int`): Sum over all dynamic blocks.
        per_block (`dict[str, int]`): Evaluations of each dynamic block, by block name.
    """

    total: int = 0
    per_block: dict[str, int] = field(default_factory=dict)


def _as_hw(sample_size) -> tuple[int, int]:
    if isinstance(sample_size, int) and not isinstance(sample_size, bool):
        return sample_size, sample_size
    if isinstance(sample_size, (tuple, list)) and len(sample_size) == 2 and all(
        isinstance(size, int) and not isinstance(size, bool) for size in sample_size
    ):
        return int(sample_size[0]), int(sample_size[1])
    raise TypeError(
        f"sample_size must be an int or a (height, width) pair of ints, got {sample_size!r}."
    )


def _downsampled(size: int, times: int) -> int:
    for _ in range(times):
        size = math.ceil(size / 2)
    return size


class ContinuousUNet2DModel(ModelMixin, ConfigMixin):
    r"""
    A continuous U-Net: a U-Net whose convolutional blocks are replaced by dynamic blocks, each the
    solution of a second-order neural ODE over an ODE time s in [0, 1]. A drop-in replacement for
    `UNet2DModel` in diffusers pipelines; it takes a noisy sample and a diffusion timestep and
    returns a sample-shaped output.

    Layout: optional patching (`patch_size`); stem conv; per level a dynamic block (then self-attention
    at the attention levels), a 1x1 conv to the next width and bilinear downsampling by 2 (ceiling
    division, so odd sizes work); a dynamic block as bottleneck; per level bilinear upsampling to the
    skip's size, concatenation, 1x1 conv, dynamic block (then self-attention at the attention levels);
    a norm, nonlinearity and 3x3 conv to `out_channels`; the inverse of the patching.

    Parameters:
        sample_size (`int` or `Tuple[int, int]`, *optional*, defaults to 32):
            Height and width of the input/output sample.
        in_channels (`int`, *optional*, defaults to 3): Number of channels of the input sample.
        patch_size (`int`, *optional*, defaults to 1): Side of the pixel patches that the stem folds into
            channels (`pixel_unshuffle`), so the first level runs at `1 / patch_size` of the sample's
            resolution; the head unfolds them again (`pixel_shuffle`). Height and width must be multiples
            of it. A patch size of 2 makes every level 4 times cheaper in pixels.
        out_channels (`int`, *optional*, defaults to 3): Number of channels of the output.
        block_out_channels (`Tuple[int]`, *optional*, defaults to `(32, 64, 128, 256)`):
            Width of each level's dynamic block; one level per entry.
        mid_block_channels (`int`, *optional*): Width x of the bottleneck dynamic block. Defaults to the
            last level's width, so the bottleneck's second-order state (x, v) has twice that many channels.
        attention_levels (`Tuple[int]`, *optional*, defaults to `(2,)`): Level indices (0 is the
            full-resolution level) that get self-attention after the encoder's and the decoder's
            dynamic block. Negative indices count from the deepest level.
        attention_head_dim (`int`, *optional*, defaults to 32): Channels per attention head.
        time_embedding_dim (`int`, *optional*, defaults to 256): Dimension of the sinusoidal
            timestep embedding and of the conditioning vector after its MLP.
        norm_num_groups (`int`, *optional*, defaults to 8): Groups of every GroupNorm; must divide
            every width.
        nonlinearity (`str`, *optional*, defaults to `"softplus"`): Nonlinearity of the acceleration
            field. Softplus is smooth, so the ODE has a unique solution.
        dropout (`float`, *optional*, defaults to 0.0): Dropout in the acceleration field and attention.
        ode_solver (`str`, *optional*, defaults to `"rk4"`): `euler`, `semi_implicit_euler`,
            `midpoint`, `heun`, `rk4` (Kutta's 3/8 rule, as torchdiffeq's `rk4`), `rk4_classic`,
            `verlet`, or adaptive `dopri5`/`bosh3`.
        ode_steps (`int`, *optional*, defaults to 1): Steps per dynamic block for fixed-step solvers.
        ode_rtol (`float`, *optional*, defaults to 1e-3), ode_atol (`float`, *optional*, defaults to 1e-3):
            Tolerances of adaptive solvers.
        ode_max_steps (`int`, *optional*, defaults to 1000): Step limit of adaptive solvers.
        ode_adjoint (`bool`, *optional*, defaults to `False`): Adjoint gradients (torchdiffeq).
        ode_backend (`str`, *optional*, defaults to `"auto"`): `auto`, `native`, `torchdiffeq` or `torchode`.
        ode_check_finite (`bool`, *optional*, defaults to `True`): Raise `NonFiniteStateError` naming
            the block when the output holds NaN or inf. Costs one reduction and one host
            synchronisation per forward; skipped under `torch.compile`.
        ode_step_schedule (`List[List[float]]`, *optional*): Fixed-step ODE steps as a function of the
            diffusion timestep, as `[[min_timestep, steps], ...]`: a forward at timestep t uses the
            steps of the largest `min_timestep <= t` (and `ode_steps` below all of them). For example
            `[[0, 1], [500, 2]]` spends two steps per block at high noise and one near the data. Set it
            with `set_ode_step_schedule`.
        use_attention (`bool`, *optional*, defaults to `True`): Ablation switch for self-attention.
        use_residual (`bool`, *optional*, defaults to `True`): Ablation switch for the residual path
            of the acceleration field.
        num_class_embeds (`int`, *optional*): Number of classes for class-conditional models.
        initial_velocity (`str`, *optional*, defaults to `"network"`): How each dynamic block sets its
            initial velocity v(0) = g(h). `network`: instance norm, 3x3 conv, ReLU, instance norm, 1x1 conv,
            ReLU (a quarter of a block's multiply-adds). `linear`: one 1x1 conv. `zero`: v(0) = 0, so the
            block starts at rest.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DynamicBlock", "SpatialSelfAttention"]
    _skip_layerwise_casting_patterns = ["norm"]

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] = 32,
        in_channels: int = 3,
        out_channels: int = 3,
        patch_size: int = 1,
        block_out_channels: tuple[int, ...] = (32, 64, 128, 256),
        mid_block_channels: int | None = None,
        attention_levels: tuple[int, ...] = (2,),
        attention_head_dim: int = 32,
        time_embedding_dim: int = 256,
        norm_num_groups: int = 8,
        nonlinearity: str = "softplus",
        dropout: float = 0.0,
        ode_solver: str = "rk4",
        ode_steps: int = 1,
        ode_rtol: float = 1e-3,
        ode_atol: float = 1e-3,
        ode_max_steps: int = 1000,
        ode_adjoint: bool = False,
        ode_backend: str = "auto",
        ode_check_finite: bool = True,
        ode_step_schedule: list[list[float]] | None = None,
        use_attention: bool = True,
        use_residual: bool = True,
        num_class_embeds: int | None = None,
        initial_velocity: str = "network",
    ):
        super().__init__()

        # 0. Validate the config before building anything
        widths = list(block_out_channels)
        mid_width = mid_block_channels
        if mid_width is None:
            mid_width = widths[-1] if widths else 0
        resolved_attention_levels = self._validate_config(
            sample_size, in_channels, out_channels, patch_size, widths, mid_width, attention_levels, attention_head_dim,
            time_embedding_dim, norm_num_groups, nonlinearity, dropout, num_class_embeds, use_attention,
        )
        check_initial_velocity(initial_velocity)
        self.solver_settings = ODESolverSettings(
            solver=ode_solver, steps=ode_steps, rtol=ode_rtol, atol=ode_atol,
            max_steps=ode_max_steps, adjoint=ode_adjoint, backend=ode_backend,
        )
        self.step_schedule = self._validate_step_schedule(ode_step_schedule)
        self.gradient_checkpointing = False
        block_kwargs = dict(
            embedding_dim=time_embedding_dim, norm_num_groups=norm_num_groups,
            nonlinearity=nonlinearity, dropout=dropout, use_residual=use_residual,
            initial_velocity=initial_velocity,
        )

        # 1. Timestep (and class) embedding
        self.time_proj = Timesteps(time_embedding_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_embedding_dim, time_embedding_dim)
        self.class_embedding = (
            nn.Embedding(num_class_embeds, time_embedding_dim) if num_class_embeds is not None else None
        )

        # 2. Stem
        self.conv_in = nn.Conv2d(in_channels * patch_size**2, widths[0], kernel_size=3, padding=1)

        # 3. Encoder: dynamic block, optional attention, 1x1 conv to the next width, downsampling
        self.down_blocks = nn.ModuleList()
        self.down_attentions = nn.ModuleList()
        self.down_transitions = nn.ModuleList()
        next_widths = widths[1:] + [mid_width]
        for level, (width, next_width) in enumerate(zip(widths, next_widths)):
            self.down_blocks.append(DynamicBlock(width, name=f"down_blocks.{level}", **block_kwargs))
            self.down_attentions.append(
                SpatialSelfAttention(width, attention_head_dim, dropout)
                if level in resolved_attention_levels else nn.Identity()
            )
            self.down_transitions.append(nn.Conv2d(width, next_width, kernel_size=1))

        # 4. Bottleneck
        self.mid_block = DynamicBlock(mid_width, name="mid_block", **block_kwargs)

        # 5. Decoder (deepest level first): upsample, concatenate the skip, 1x1 conv, dynamic block
        self.up_transitions = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        self.up_attentions = nn.ModuleList()
        incoming = mid_width
        for level in reversed(range(len(widths))):
            width = widths[level]
            self.up_transitions.append(nn.Conv2d(incoming + width, width, kernel_size=1))
            self.up_blocks.append(DynamicBlock(width, name=f"up_blocks.{level}", **block_kwargs))
            self.up_attentions.append(
                SpatialSelfAttention(width, attention_head_dim, dropout)
                if level in resolved_attention_levels else nn.Identity()
            )
            incoming = width

        # 6. Head
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, widths[0])
        self.conv_act = get_nonlinearity("silu")
        self.conv_out = nn.Conv2d(widths[0], out_channels * patch_size**2, kernel_size=3, padding=1)

        self._assign_solver_settings()
        self._last_nfe: NFEStats | None = None

    # ------------------------------------------------------------------ configuration

    @staticmethod
    def _validate_config(
        sample_size, in_channels, out_channels, patch_size, widths, mid_width, attention_levels, attention_head_dim,
        time_embedding_dim, norm_num_groups, nonlinearity, dropout, num_class_embeds, use_attention,
    ) -> set[int]:
        height, width = _as_hw(sample_size)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("patch_size", patch_size),
                            ("time_embedding_dim", time_embedding_dim), ("norm_num_groups", norm_num_groups)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid; it must be a positive int.")
        if time_embedding_dim % 2:
            raise ValueError(f"time_embedding_dim={time_embedding_dim} must be even for the sinusoidal embedding.")
        if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"block_out_channels={tuple(widths)!r} must be a non-empty sequence of positive ints.")
        if not isinstance(mid_width, int) or mid_width < 1:
            raise ValueError(f"mid_block_channels={mid_width!r} must be a positive int.")
        for index, channels in enumerate(widths):
            if channels % norm_num_groups:
                raise ValueError(
                    f"norm_num_groups={norm_num_groups} does not divide block_out_channels[{index}]={channels}; "
                    "choose a group count that divides every width."
                )
        if mid_width % norm_num_groups:
            raise ValueError(
                f"norm_num_groups={norm_num_groups} does not divide mid_block_channels={mid_width}; "
                "choose a group count that divides every width."
            )
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"sample_size={sample_size!r} is not a multiple of patch_size={patch_size}; choose a patch size "
                "that divides the height and the width."
            )
        levels = len(widths)
        # The bottleneck sits after `levels` halvings of the patched size and needs at least 2x2 pixels
        # (instance norm over a single pixel would erase the features).
        bottleneck = (_downsampled(height // patch_size, levels), _downsampled(width // patch_size, levels))
        if min(bottleneck) < 2:
            raise ValueError(
                f"sample_size={sample_size!r} is too small for {levels} levels: the bottleneck would be "
                f"{bottleneck[0]}x{bottleneck[1]}, but it needs at least 2x2. Use fewer block_out_channels "
                f"or a sample_size of at least {(2 ** levels + 1) * patch_size}."
            )
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"Unknown nonlinearity {nonlinearity!r}; choose one of {sorted(NONLINEARITIES)}.")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1).")
        if num_class_embeds is not None and (isinstance(num_class_embeds, bool) or not isinstance(num_class_embeds, int) or num_class_embeds < 1):
            raise ValueError(f"num_class_embeds={num_class_embeds!r} must be None or a positive int.")

        if not use_attention:
            return set()
        resolved = set()
        for level in attention_levels or ():
            if isinstance(level, bool) or not isinstance(level, int) or not -levels <= level < levels:
                raise ValueError(
                    f"attention_levels contains {level!r}, but the model has {levels} levels; "
                    f"use level indices in [{-levels}, {levels - 1}]."
                )
            resolved.add(level % levels)
        for level in resolved:
            channels = widths[level]
            if isinstance(attention_head_dim, bool) or not isinstance(attention_head_dim, int) or attention_head_dim < 1:
                raise ValueError(f"attention_head_dim={attention_head_dim!r} must be a positive int.")
            if channels > attention_head_dim and channels % attention_head_dim:
                raise ValueError(
                    f"attention_head_dim={attention_head_dim} does not divide block_out_channels[{level}]={channels} "
                    "at an attention level; choose a head size that divides it."
                )
        return resolved

    @property
    def dynamic_blocks(self) -> list[DynamicBlock]:
        """Every dynamic block in forward order."""
        return [*self.down_blocks, self.mid_block, *self.up_blocks]

    def _assign_solver_settings(self) -> None:
        for block in self.dynamic_blocks:
            block.solver_settings = self.solver_settings

    def set_ode_solver(
        self,
        solver: str | None = None,
        steps: int | None = None,
        backend: str | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        max_steps: int | None = None,
        adjoint: bool | None = None,
    ) -> None:
        """Change how every dynamic block is solved.

        The solver is part of what a trained model learned: under another solver or step count it computes a
        different function, and a model trained with one step per block can stop producing recognizable
        samples. Judge the samples before relying on a change.

        The config is updated too, so `save_pretrained` keeps the new settings. Arguments left as
        `None` keep their current value.
        """
        current = self.solver_settings
        settings = ODESolverSettings(
            solver=current.solver if solver is None else solver,
            steps=current.steps if steps is None else steps,
            rtol=current.rtol if rtol is None else rtol,
            atol=current.atol if atol is None else atol,
            max_steps=current.max_steps if max_steps is None else max_steps,
            adjoint=current.adjoint if adjoint is None else adjoint,
            backend=current.backend if backend is None else backend,
        )
        self.solver_settings = settings
        self._assign_solver_settings()
        # The last count describes the old settings. Until the next eager forward pass, and always under
        # `torch.compile` (which records no counts), `nfe` derives the count from the new settings.
        self._last_nfe = None
        self.register_to_config(
            ode_solver=settings.solver, ode_steps=settings.steps, ode_rtol=settings.rtol,
            ode_atol=settings.atol, ode_max_steps=settings.max_steps, ode_adjoint=settings.adjoint,
            ode_backend=settings.backend,
        )

    @staticmethod
    def _validate_step_schedule(schedule) -> list[tuple[float, int]] | None:
        if schedule is None:
            return None
        parsed = []
        for entry in schedule:
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise ValueError(
                    f"ode_step_schedule entry {entry!r} is invalid; use [min_timestep, steps] pairs such as [[0, 1], [500, 2]]."
                )
            min_timestep, steps = entry
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"ode_step_schedule entry {entry!r} has steps={steps!r}; steps must be an int >= 1.")
            if isinstance(min_timestep, bool) or not isinstance(min_timestep, (int, float)):
                raise ValueError(f"ode_step_schedule entry {entry!r} has a non-numeric min_timestep.")
            parsed.append((float(min_timestep), steps))
        return sorted(parsed)

    def set_ode_step_schedule(self, schedule: list[list[float]] | None) -> None:
        """Make the fixed-step ODE step count depend on the diffusion timestep (`None` switches it off).

        The schedule is stored in the config, so a saved pipeline keeps it. Reading the timestep costs
        one host synchronisation per forward on a GPU.
        """
        if schedule is not None and self.solver_settings.is_adaptive:
            raise ValueError(
                f"ode_step_schedule needs a fixed-step solver, but ode_solver={self.solver_settings.solver!r}; "
                "call set_ode_solver with a fixed-step solver first."
            )
        parsed = self._validate_step_schedule(schedule)
        self.step_schedule = parsed
        self.register_to_config(ode_step_schedule=None if parsed is None else [[t, n] for t, n in parsed])

    def _scheduled_steps(self, timesteps: torch.Tensor) -> int | None:
        if self.step_schedule is None:
            return None
        # The batch's noisiest sample decides, so no sample gets fewer steps than its timestep requests.
        largest = float(timesteps.max())
        steps = None
        for min_timestep, scheduled in self.step_schedule:
            if largest >= min_timestep:
                steps = scheduled
        return steps

    @property
    def nfe(self) -> NFEStats:
        """Acceleration-field evaluations of the last forward pass, in total and per dynamic block.

        Under `torch.compile` the count comes from the solver settings (stages x steps), which is
        exact for fixed-step solvers.
        """
        if self._last_nfe is not None:
            return self._last_nfe
        per_block = {block.name: block.solver_settings.fixed_nfe() or 0 for block in self.dynamic_blocks}
        return NFEStats(total=sum(per_block.values()), per_block=per_block)

    # ------------------------------------------------------------------ forward

    def _prepare_timesteps(self, timestep, batch: int, device: torch.device) -> torch.Tensor:
        if torch.is_tensor(timestep):
            if timestep.dtype == torch.bool or timestep.is_complex():
                raise TypeError(f"timestep must be a real number tensor, got dtype {timestep.dtype}.")
            timesteps = timestep.to(device=device)
            if timesteps.ndim > 1:
                raise ValueError(
                    f"timestep has shape {tuple(timestep.shape)}; pass a scalar, a (1,) tensor or a (batch,) tensor."
                )
            timesteps = timesteps.reshape(-1)
        elif isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
            timesteps = torch.tensor([timestep], device=device)
        else:
            raise TypeError(
                f"timestep must be an int, a float or a tensor, got {timestep!r} of type {type(timestep).__name__}."
            )
        if timesteps.shape[0] not in (1, batch):
            raise ValueError(
                f"timestep has {timesteps.shape[0]} values for a batch of {batch}; pass one timestep or one per sample."
            )
        # Float timesteps (Euler, Heun, DPM-Solver with interpolated sigmas) are kept as they are.
        timesteps = timesteps.to(torch.float64 if timesteps.dtype == torch.float64 else torch.float32)
        return timesteps.expand(batch)

    def _embed(self, timesteps: torch.Tensor, class_labels, dtype: torch.dtype) -> torch.Tensor:
        t_emb = self.time_proj(timesteps)
        # The sinusoid is computed in float32; the MLP may run in bf16/fp16 weights.
        emb = self.time_embedding(t_emb.to(dtype=dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError(
                    f"class_labels are required: this model was built with num_class_embeds={self.config.num_class_embeds}."
                )
            class_labels = torch.as_tensor(class_labels, device=emb.device).reshape(-1)
            if class_labels.shape[0] not in (1, emb.shape[0]):
                raise ValueError(
                    f"class_labels has {class_labels.shape[0]} values for a batch of {emb.shape[0]}."
                )
            emb = emb + self.class_embedding(class_labels.long()).to(dtype=emb.dtype)
        elif class_labels is not None:
            raise ValueError(
                "class_labels were given, but this model is unconditional (num_class_embeds=None); "
                "drop class_labels or build the model with num_class_embeds."
            )
        return emb

    def _run_block(
        self, block: DynamicBlock, hidden_states: torch.Tensor, emb: torch.Tensor, block_outputs: list | None,
        steps: int | None = None,
    ) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            output = self._gradient_checkpointing_func(block, hidden_states, emb, steps)
        else:
            output = block(hidden_states, emb, steps)
        if block_outputs is not None:
            block_outputs.append((block.name, output))
        return output

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple:
        r"""
        Args:
            sample (`torch.Tensor`): The noisy input, `(batch, channel, height, width)`.
            timestep (`torch.Tensor` or `float` or `int`): The diffusion timestep: a number, a 0-d
                tensor, a `(1,)` tensor or a `(batch,)` tensor, on any device.
            class_labels (`torch.Tensor`, *optional*): Class labels, required when
                `num_class_embeds` is set.
            return_dict (`bool`, *optional*, defaults to `True`): Return a `UNet2DOutput` instead of a tuple.

        Returns:
            [`~models.unets.unet_2d.UNet2DOutput`] or `tuple`: The output sample, shaped like `sample`
            but with `out_channels` channels.
        """
        # 0. Check the input before any compute
        if sample.ndim != 4:
            raise ValueError(f"sample must be (batch, channels, height, width), got shape {tuple(sample.shape)}.")
        if sample.shape[1] != self.config.in_channels:
            raise ValueError(
                f"sample has {sample.shape[1]} channels, but the model was built with in_channels="
                f"{self.config.in_channels}; convert the input or build the model with in_channels={sample.shape[1]}."
            )
        patch_size = self.config.patch_size
        if sample.shape[2] % patch_size or sample.shape[3] % patch_size:
            raise ValueError(
                f"sample of size {sample.shape[2]}x{sample.shape[3]} is not a multiple of the model's "
                f"patch_size={patch_size}; pad or resize it to a multiple of {patch_size}."
            )
        levels = len(self.down_blocks)
        bottleneck = (
            _downsampled(sample.shape[2] // patch_size, levels), _downsampled(sample.shape[3] // patch_size, levels)
        )
        if min(bottleneck) < 2:
            raise ValueError(
                f"sample of size {sample.shape[2]}x{sample.shape[3]} is too small for {levels} levels "
                f"(bottleneck {bottleneck[0]}x{bottleneck[1]}, needs at least 2x2)."
            )
        timesteps = self._prepare_timesteps(timestep, sample.shape[0], sample.device)
        steps = self._scheduled_steps(timesteps)
        # Block outputs are kept only to name the failing block if the output is not finite.
        block_outputs = [] if self.config.ode_check_finite and not torch.compiler.is_compiling() else None

        # 1. Timestep (and class) embedding: (batch, time_embedding_dim)
        emb = self._embed(timesteps, class_labels, self.dtype if not torch.is_autocast_enabled(sample.device.type) else sample.dtype)

        # 2. Stem: fold each patch_size x patch_size patch into channels
        hidden_states = self.conv_in(F.pixel_unshuffle(sample, patch_size) if patch_size > 1 else sample)

        # 3. Encoder
        skips = []
        for block, attention, transition in zip(self.down_blocks, self.down_attentions, self.down_transitions):
            hidden_states = attention(self._run_block(block, hidden_states, emb, block_outputs, steps))
            skips.append(hidden_states)
            hidden_states = transition(hidden_states)
            height, width = hidden_states.shape[-2:]
            hidden_states = F.interpolate(
                hidden_states, size=(math.ceil(height / 2), math.ceil(width / 2)), mode="bilinear", align_corners=False
            )

        # 4. Bottleneck
        hidden_states = self._run_block(self.mid_block, hidden_states, emb, block_outputs, steps)

        # 5. Decoder
        for transition, block, attention in zip(self.up_transitions, self.up_blocks, self.up_attentions):
            skip = skips.pop()
            hidden_states = F.interpolate(hidden_states, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            hidden_states = transition(torch.cat((hidden_states, skip), dim=1))
            hidden_states = attention(self._run_block(block, hidden_states, emb, block_outputs, steps))

        # 6. Head
        output = self.conv_out(self.conv_act(self.conv_norm_out(hidden_states)))
        if patch_size > 1:
            output = F.pixel_shuffle(output, patch_size)

        if not torch.compiler.is_compiling():
            self._record_nfe()
            if block_outputs is not None:
                self._check_finite(sample, output, block_outputs)

        if not return_dict:
            return (output,)
        return UNet2DOutput(sample=output)

    def _record_nfe(self) -> None:
        per_block = {block.name: block.last_nfe for block in self.dynamic_blocks}
        self._last_nfe = NFEStats(total=sum(per_block.values()), per_block=per_block)

    def _check_finite(self, sample: torch.Tensor, output: torch.Tensor, block_outputs: list) -> None:
        # One reduction and one host synchronisation on the output; the slower search for the
        # culprit runs only after a failure.
        if bool(torch.isfinite(output).all()):
            return
        solver = self.solver_settings.solver
        if not bool(torch.isfinite(sample).all()):
            raise NonFiniteStateError(
                f"The input sample contains NaN or inf values, so the output does too (ode_solver={solver!r}); "
                "check the data and the scheduler."
            )
        culprit = next(
            (f"dynamic block {name!r}" for name, tensor in block_outputs if not bool(torch.isfinite(tensor).all())),
            "an attention or output layer",
        )
        raise NonFiniteStateError(
            f"Non-finite values appeared in {culprit} with ode_solver={solver!r} "
            f"(ode_steps={self.solver_settings.steps}). A stiff acceleration field diverged: use more ode_steps, "
            "an adaptive solver, a lower learning rate, or disable the check with ode_check_finite=False."
        )
