"""Building blocks of the continuous U-Net: dynamic blocks and spatial self-attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ode import ODESolverSettings, solve_second_order


class _Float32SoftplusFunction(torch.autograd.Function):
    """softplus(x) = max(x, 0) + log(1 + exp(-|x|)), with the gradient sigmoid(x)."""

    @staticmethod
    def forward(ctx, input: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(input)
        # The in-place passes reuse one fresh tensor. For x > 17, exp(-x) is below float32's resolution next
        # to 1, so the result is exactly x, as with the default threshold of 20.
        output = input.abs().neg_().exp_().add_(1.0).log_()
        return output.add_(input.clamp_min(0.0))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        (input,) = ctx.saved_tensors
        return grad_output * torch.sigmoid(input)


class Softplus(nn.Softplus):
    """`nn.Softplus` with a faster path for float32 CPU tensors at the default beta and threshold.

    ATen's CPU softplus calls `log1p`, which runs several times slower than `log` (torch 2.14). In a
    `torch.profiler` run of `thesis_cunet` (32x32, batch 64, one thread), softplus took a quarter of the
    forward time. The fast path (also taken by bfloat16 and float16 CPU tensors, computed in float32)
    computes the same function with
    `log(1 + z)` for z = exp(-|x|) in (0, 1]. On a dense grid over [-120, 120] it differs from `F.softplus`
    by at most 1.2e-7 absolutely for outputs below 1, and by at most 6e-7 relatively for outputs of 0.1 and
    more. Other dtypes and devices, other parameters and `torch.compile` (which fuses the op by itself) use
    `nn.Softplus` unchanged.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if (
            input.dtype not in _FAST_SOFTPLUS_DTYPES
            or input.device.type != "cpu"
            or self.beta != 1.0
            or self.threshold != 20.0
            or torch.compiler.is_compiling()
        ):
            return super().forward(input)
        if input.dtype != torch.float32:
            # ATen's bfloat16 CPU softplus is slower still, so the float32 path with two casts costs far less.
            return _Float32SoftplusFunction.apply(input.float()).to(input.dtype)
        return _Float32SoftplusFunction.apply(input)


_FAST_SOFTPLUS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


NONLINEARITIES = {
    "softplus": Softplus,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
}


def get_nonlinearity(name: str) -> nn.Module:
    if name not in NONLINEARITIES:
        raise ValueError(f"Unknown nonlinearity {name!r}; choose one of {sorted(NONLINEARITIES)}.")
    return NONLINEARITIES[name]()


class InitialVelocityNetwork(nn.Module):
    """g(h): the initial velocity v(0) of a dynamic block, shaped like h.

    Instance norm, 3x3 conv, ReLU, instance norm, 1x1 conv, ReLU. The instance norms are GroupNorms with one
    channel per group: the same function and parameters as `nn.InstanceNorm2d(affine=True)`, but a training
    step of the default model ran 3.5% faster with them (bf16 autocast on a 2-core CPU). `InstanceNorm2d` reshapes
    its input to a single sample of batch x channels channels and runs a batch norm on it.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(channels, channels)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(channels, channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        velocity = F.relu(self.conv1(self.norm1(hidden_states)))
        return F.relu(self.conv2(self.norm2(velocity)))


class LinearInitialVelocity(nn.Module):
    """Initial velocity g(h) = W h + b from one 1x1 conv (the `"linear"` option)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(hidden_states)


class ZeroInitialVelocity(nn.Module):
    """Initial velocity g(h) = 0, so every block starts at rest (the `"zero"` option)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


INITIAL_VELOCITIES = {
    "network": InitialVelocityNetwork,
    "linear": LinearInitialVelocity,
    "zero": lambda channels: ZeroInitialVelocity(),
}


def check_initial_velocity(initial_velocity: str) -> None:
    """Raise a ValueError for an `initial_velocity` that is not one of `INITIAL_VELOCITIES`."""
    if initial_velocity not in INITIAL_VELOCITIES:
        raise ValueError(
            f"initial_velocity={initial_velocity!r} is invalid; choose one of {sorted(INITIAL_VELOCITIES)}."
        )


class AccelerationField(nn.Module):
    """a(x, v, s, emb): the acceleration of a dynamic block's second-order ODE.

    GroupNorm over the state [x, v], 3x3 conv, nonlinearity, GroupNorm, FiLM from the timestep
    embedding (`h * (1 + scale) + shift`), dropout, 3x3 conv, nonlinearity, plus a residual path from
    the state (a 1x1 conv, because [x, v] has twice the channels of the output). The field does not
    depend on the ODE time s: it is autonomous, which every solver handles.
    """

    def __init__(
        self,
        channels: int,
        embedding_dim: int,
        norm_num_groups: int,
        nonlinearity: str = "softplus",
        dropout: float = 0.0,
        use_residual: bool = True,
    ):
        super().__init__()
        self.norm_state = nn.GroupNorm(norm_num_groups, 2 * channels)
        self.conv1 = nn.Conv2d(2 * channels, channels, kernel_size=3, padding=1)
        self.norm_hidden = nn.GroupNorm(norm_num_groups, channels)
        self.film = nn.Linear(embedding_dim, 2 * channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.nonlinearity = get_nonlinearity(nonlinearity)
        self.residual = nn.Conv2d(2 * channels, channels, kernel_size=1) if use_residual else None

    def film_parameters(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the FiLM (scale, shift), each `(batch, channels, 1, 1)`, once per solve."""
        scale, shift = self.film(F.silu(emb)).chunk(2, dim=1)
        return scale[:, :, None, None], shift[:, :, None, None]

    def forward(
        self, x: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
    ) -> torch.Tensor:
        state = torch.cat((x, v), dim=1)  # (batch, 2 * channels, height, width)

        hidden = self.nonlinearity(self.conv1(self.norm_state(state)))
        hidden = self.norm_hidden(hidden) * (1 + scale) + shift
        hidden = self.nonlinearity(self.conv2(self.dropout(hidden)))

        if self.residual is not None:
            hidden = hidden + self.residual(state)
        return hidden


class DynamicBlock(nn.Module):
    """Map a feature map h to x(1), where x(0) = h, v(0) = g(h), dx/ds = v, dv/ds = a(x, v, s, emb).

    The solver settings are assigned by the owning model (`solver_settings`), so that
    `set_ode_solver` changes every block at once. After each call, `last_nfe` is the number of
    acceleration evaluations of that call.
    """

    def __init__(
        self,
        channels: int,
        embedding_dim: int,
        norm_num_groups: int,
        nonlinearity: str = "softplus",
        dropout: float = 0.0,
        use_residual: bool = True,
        name: str = "dynamic block",
        initial_velocity: str = "network",
    ):
        super().__init__()
        check_initial_velocity(initial_velocity)
        self.initial_velocity = INITIAL_VELOCITIES[initial_velocity](channels)
        self.acceleration = AccelerationField(
            channels, embedding_dim, norm_num_groups, nonlinearity, dropout, use_residual
        )
        self.name = name
        self.solver_settings = ODESolverSettings()
        self.last_nfe = 0

    def forward(self, hidden_states: torch.Tensor, emb: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        settings = self.solver_settings
        if steps is not None and steps != settings.steps:
            settings = ODESolverSettings(**{**settings.__dict__, "steps": steps})

        velocity = self.initial_velocity(hidden_states)
        scale, shift = self.acceleration.film_parameters(emb)
        scale = scale.to(hidden_states.dtype)
        shift = shift.to(hidden_states.dtype)

        def acceleration(s, x, v):
            return self.acceleration(x, v, scale, shift)

        adjoint_params = ()
        if settings.adjoint:
            # The adjoint recomputes the field backwards in s, so it needs every tensor the field reads
            # that requires a gradient, including the FiLM scale and shift computed outside the solve.
            # The FiLM layer's own parameters are left out, because autograd already reaches them
            # through scale and shift. Listing them too would double their gradient.
            film_parameters = set(self.acceleration.film.parameters())
            adjoint_params = tuple(
                parameter for parameter in self.acceleration.parameters() if parameter not in film_parameters
            ) + (scale, shift)
        position, _, nfe = solve_second_order(
            acceleration, hidden_states, velocity, settings, block_name=self.name, adjoint_params=adjoint_params
        )
        if not torch.compiler.is_compiling():
            self.last_nfe = nfe
        return position


class SpatialSelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection.

    RMSNorm over channels, 1x1-conv queries, keys and values, scaled dot-product attention with
    dropout on the attention weights, 1x1-conv output projection.
    """

    def __init__(self, channels: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        if channels % head_dim != 0 and head_dim < channels:
            raise ValueError(
                f"attention_head_dim={head_dim} does not divide the attention level's width {channels}; "
                "choose a head size that divides it."
            )
        self.num_heads = max(1, channels // head_dim)
        self.norm = nn.RMSNorm(channels, eps=1e-6)
        self.to_qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.to_out = nn.Conv2d(channels, channels, kernel_size=1)
        self.dropout = dropout

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = hidden_states.shape
        heads = self.num_heads
        # Pixels as tokens: (batch, height * width, channels). The 1x1 convs' weights act as linear layers on the
        # tokens, so queries, keys and values come out with a contiguous head dimension. Fused attention kernels
        # need that. With strided heads, scaled_dot_product_attention falls back to its unfused path, which made a
        # bf16 training step of the default model 1.2% slower on a 2-core Xeon (torch 2.14).
        tokens = hidden_states.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
        # The norm runs in float32 at least, also for bf16/fp16 inputs or weights and under autocast.
        norm_dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        normed = F.rms_norm(tokens.to(norm_dtype), (channels,), self.norm.weight.to(norm_dtype), self.norm.eps)
        normed = normed.to(hidden_states.dtype)

        qkv = F.linear(normed, self.to_qkv.weight.flatten(1), self.to_qkv.bias)
        # (3, batch, heads, height * width, head_dim)
        query, key, value = qkv.reshape(batch, height * width, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
        dropout_p = self.dropout if self.training else 0.0
        if query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16):
            # On a CPU, bfloat16 attention runs slower than float32 (torch 2.14), so it runs in float32 there,
            # also under autocast.
            with torch.autocast("cpu", enabled=False):
                attended = F.scaled_dot_product_attention(
                    query.float(), key.float(), value.float(), dropout_p=dropout_p
                ).to(query.dtype)
        else:
            attended = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout_p)
        attended = attended.transpose(1, 2).reshape(batch, height * width, channels)
        output = F.linear(attended, self.to_out.weight.flatten(1), self.to_out.bias)
        # Back to (batch, channels, height, width). The copy keeps a channels-last view from reaching the layers
        # after this one, where it slows GroupNorm and gives conv weight gradients channels-last strides, which
        # DistributedDataParallel warns about.
        return hidden_states + output.reshape(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()
