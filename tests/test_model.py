"""Tests of ContinuousUNet2DModel: shapes, timesteps, serialization, the ODE settings and diffusers' model features."""

import copy
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from safetensors.torch import load_file, save_file
from torch import nn

from diffusers_cunet import ContinuousUNet2DModel, NonFiniteStateError, ODESolverError
from diffusers_cunet.models.blocks import AccelerationField, DynamicBlock, Softplus, SpatialSelfAttention
from diffusers_cunet.ode import FIXED_STEP_INTEGRATORS, ODESolverSettings
from diffusers_cunet.presets import PRESETS, thesis_cunet, thesis_unet


# Two levels at 8x8 (bottleneck 2x2), attention at the deeper level. Every test model derives from it.
TINY_CONFIG = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(4, 8),
    norm_num_groups=4,
    attention_levels=(1,),
    attention_head_dim=4,
    time_embedding_dim=8,
)
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def build_model(**overrides):
    torch.manual_seed(0)
    return ContinuousUNet2DModel(**{**TINY_CONFIG, **overrides}).eval()


def random_sample(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=dtype)


def run_model(model, sample, timestep=500, **kwargs):
    with torch.no_grad():
        return model(sample, timestep, **kwargs).sample


def max_relative_error(output, reference):
    """Largest absolute difference relative to the reference's standard deviation."""
    return ((output.float() - reference.float()).abs().max() / reference.float().std()).item()


def rms_relative_error(output, reference):
    """Root-mean-square difference relative to the reference's standard deviation."""
    return ((output.float() - reference.float()).square().mean().sqrt() / reference.float().std()).item()


@pytest.fixture
def count_acceleration_calls(monkeypatch):
    """Patch AccelerationField.forward to count its calls, and return the one-element call counter."""
    calls = [0]
    original_forward = AccelerationField.forward

    def counting_forward(self, *args, **kwargs):
        calls[0] += 1
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(AccelerationField, "forward", counting_forward)
    return calls


# ---------------------------------------------------------------- shapes and timesteps


@pytest.mark.parametrize("norm_num_groups", [4, 8])
def test_forward_four_levels_mnist_shape(norm_num_groups):
    model = build_model(
        sample_size=28,
        block_out_channels=(8, 16, 16, 16),
        norm_num_groups=norm_num_groups,
        attention_levels=(2,),
        attention_head_dim=8,
    )
    output = run_model(model, random_sample(2, 1, 28, 28))

    assert output.shape == (2, 1, 28, 28)
    assert output.dtype == torch.float32
    assert bool(torch.isfinite(output).all())


@pytest.mark.parametrize(
    "timestep",
    [
        500,
        500.0,
        torch.tensor(500),
        torch.tensor([500]),
        torch.full((3,), 500),
        torch.tensor(500, dtype=torch.int64),
        torch.tensor([500.0], dtype=torch.float64),
        torch.full((3,), 500.0, dtype=torch.float64),
    ],
    ids=["int", "float", "0d", "1", "batch", "int64", "float64", "float64_batch"],
)
def test_timestep_forms_agree(timestep):
    model = build_model()
    sample = random_sample(3, 1, 8, 8)

    reference = run_model(model, sample, 500)
    output = run_model(model, sample, timestep)

    assert output.dtype == torch.float32
    torch.testing.assert_close(output, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fractional", [500.5, torch.tensor(500.5), torch.tensor([500.5], dtype=torch.float64)])
def test_fractional_timestep_not_truncated(fractional):
    model = build_model()
    sample = random_sample(3, 1, 8, 8)

    fractional_output = run_model(model, sample, fractional)

    assert (fractional_output - run_model(model, sample, 500)).abs().max() > 1e-4
    assert (fractional_output - run_model(model, sample, 501)).abs().max() > 1e-4


def test_per_sample_timesteps_match_single():
    model = build_model()
    sample = random_sample(3, 1, 8, 8)
    timesteps = torch.tensor([10, 500, 990])

    batched = run_model(model, sample, timesteps)

    for index, timestep in enumerate(timesteps.tolist()):
        single = run_model(model, sample[index : index + 1], timestep)
        torch.testing.assert_close(batched[index : index + 1], single, rtol=0, atol=1e-5)


def test_return_dict_false_returns_tuple():
    model = build_model()
    sample = random_sample(1, 1, 8, 8)

    with torch.no_grad():
        output = model(sample, 10, return_dict=False)

    assert isinstance(output, tuple)
    torch.testing.assert_close(output[0], run_model(model, sample, 10), rtol=0, atol=0)


def test_class_conditional_forward():
    model = build_model(num_class_embeds=3)
    sample = random_sample(2, 1, 8, 8)

    first = run_model(model, sample, 10, class_labels=torch.tensor([0, 0]))
    second = run_model(model, sample, 10, class_labels=torch.tensor([2, 2]))

    assert first.shape == (2, 1, 8, 8)
    assert (first - second).abs().max() > 1e-4


def test_patch_size_folds_pixels_into_stem():
    model = build_model(sample_size=(16, 12), patch_size=2)
    stem_inputs = []
    model.conv_in.register_forward_pre_hook(lambda module, args: stem_inputs.append(args[0].shape))
    output = run_model(model, random_sample(2, 1, 16, 12))

    assert stem_inputs == [(2, 4, 8, 6)]
    assert output.shape == (2, 1, 16, 12)
    assert bool(torch.isfinite(output).all())


def test_patch_size_28x28_runs():
    # 28x28 digits with 2x2 patches: levels of 14x14 and 7x7, and a 4x4 bottleneck.
    model = build_model(sample_size=28, patch_size=2)
    output = run_model(model, random_sample(2, 1, 28, 28))

    assert output.shape == (2, 1, 28, 28)


def test_patch_size_rejects_odd_sample():
    model = build_model(sample_size=16, patch_size=2)
    stem_calls = []
    model.conv_in.register_forward_pre_hook(lambda module, args: stem_calls.append(module))

    with pytest.raises(ValueError, match=re.escape("15x16 is not a multiple of the model's patch_size=2")):
        run_model(model, random_sample(1, 1, 15, 16))
    assert stem_calls == []


def test_patch_size_round_trip(tmp_path):
    model = build_model(sample_size=16, patch_size=2)
    sample = random_sample(2, 1, 16, 16)
    output = run_model(model, sample)

    model.save_pretrained(tmp_path)
    reloaded = ContinuousUNet2DModel.from_pretrained(tmp_path).eval()

    assert json.loads((tmp_path / "config.json").read_text())["patch_size"] == 2
    torch.testing.assert_close(run_model(reloaded, sample), output, rtol=0, atol=1e-6)


@pytest.mark.parametrize("preset", ["mnist_cunet", "thesis_cunet"])
def test_gradients_keep_parameter_layout(preset):
    # DistributedDataParallel copies each gradient into a bucket laid out like its parameter. A gradient with
    # other strides, such as a channels-last one, makes it warn on every rank.
    torch.manual_seed(0)
    model = PRESETS[preset](32, 1)
    mismatched = []

    def check_layout(grad, name, parameter):
        if grad.stride() != parameter.stride():
            mismatched.append(name)

    for name, parameter in model.named_parameters():
        # A tensor hook receives the gradient as backward computes it, before AccumulateGrad copies it into
        # the parameter's layout. DDP's reducer reads it at that point too.
        parameter.register_hook(lambda grad, name=name, parameter=parameter: check_layout(grad, name, parameter))
    # oneDNN picks the layout by size: at batch 2 every gradient matched, at batch 64 four 1x1-conv ones did not.
    model(random_sample(64, 1, 32, 32), 500).sample.square().mean().backward()

    assert mismatched == []


# ---------------------------------------------------------------- serialization


def test_rectangular_sample_size_round_trip(tmp_path):
    model = build_model(sample_size=(16, 24))
    sample = random_sample(2, 1, 16, 24)
    output = run_model(model, sample)

    model.save_pretrained(tmp_path)
    saved_config = json.loads((tmp_path / "config.json").read_text())
    reloaded = ContinuousUNet2DModel.from_pretrained(tmp_path).eval()

    assert output.shape == (2, 1, 16, 24)
    assert saved_config["sample_size"] == [16, 24]
    assert tuple(reloaded.config.sample_size) == (16, 24)
    torch.testing.assert_close(run_model(reloaded, sample), output, rtol=0, atol=1e-6)


def test_save_pretrained_writes_safetensors_only(tmp_path):
    model = build_model()
    model.save_pretrained(tmp_path)
    names = sorted(path.name for path in tmp_path.iterdir())

    assert names == ["config.json", WEIGHTS_NAME]
    assert not [name for name in names if name.endswith(".bin")]


def test_reload_gives_equal_outputs(tmp_path):
    model = build_model()
    sample = random_sample(2, 1, 8, 8)
    model.save_pretrained(tmp_path)
    reloaded = ContinuousUNet2DModel.from_pretrained(tmp_path).eval()

    torch.testing.assert_close(run_model(reloaded, sample), run_model(model, sample), rtol=0, atol=1e-6)


def test_config_json_lists_every_argument(tmp_path):
    build_model(mid_block_channels=None, num_class_embeds=None).save_pretrained(tmp_path)
    saved_config = json.loads((tmp_path / "config.json").read_text())
    arguments = set(inspect.signature(ContinuousUNet2DModel.__init__).parameters) - {"self"}

    assert arguments - set(saved_config) == set()
    assert saved_config["mid_block_channels"] is None
    assert saved_config["num_class_embeds"] is None


RELOAD_SCRIPT = textwrap.dedent(
    """
    import sys

    import torch
    from safetensors.torch import load_file, save_file

    from diffusers_cunet import ContinuousUNet2DModel

    model_dir, tensors_path, output_path = sys.argv[1:]
    model = ContinuousUNet2DModel.from_pretrained(model_dir).eval()
    tensors = load_file(tensors_path)
    with torch.no_grad():
        output = model(tensors["sample"], tensors["timestep"]).sample
    save_file({"output": output.contiguous()}, output_path)
    """
)


def test_reload_in_fresh_process(tmp_path):
    model = build_model(sample_size=(8, 12))
    sample = random_sample(2, 1, 8, 12)
    timestep = torch.tensor([3, 700])
    expected = run_model(model, sample, timestep)
    model.save_pretrained(tmp_path / "model")
    save_file({"sample": sample, "timestep": timestep}, tmp_path / "inputs.safetensors")

    result = subprocess.run(
        [
            sys.executable,
            "-c",
            RELOAD_SCRIPT,
            str(tmp_path / "model"),
            str(tmp_path / "inputs.safetensors"),
            str(tmp_path / "output.safetensors"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )

    assert result.returncode == 0, result.stderr
    output = load_file(tmp_path / "output.safetensors")["output"]
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- dynamic blocks and NFE


def build_dynamic_block(solver, steps):
    torch.manual_seed(0)
    block = DynamicBlock(4, embedding_dim=8, norm_num_groups=2)
    block.solver_settings = ODESolverSettings(solver=solver, steps=steps, backend="native")
    return block


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("solver", sorted(FIXED_STEP_INTEGRATORS))
def test_zero_field_moves_by_initial_velocity(solver, steps, monkeypatch):
    block = build_dynamic_block(solver, steps)
    hidden_states = random_sample(2, 4, 6, 6)
    velocity = torch.full_like(hidden_states, 0.75)
    monkeypatch.setattr(block.acceleration, "forward", lambda x, v, scale, shift: torch.zeros_like(x))
    monkeypatch.setattr(block.initial_velocity, "forward", lambda hidden: velocity)

    with torch.no_grad():
        output = block(hidden_states, torch.randn(2, 8))

    torch.testing.assert_close(output, hidden_states + velocity, rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("solver", sorted(FIXED_STEP_INTEGRATORS))
def test_zero_field_zero_velocity_is_identity(solver, steps, monkeypatch):
    block = build_dynamic_block(solver, steps)
    hidden_states = random_sample(2, 4, 6, 6)
    monkeypatch.setattr(block.acceleration, "forward", lambda x, v, scale, shift: torch.zeros_like(x))
    monkeypatch.setattr(block.initial_velocity, "forward", lambda hidden: torch.zeros_like(hidden))

    with torch.no_grad():
        output = block(hidden_states, torch.randn(2, 8))

    torch.testing.assert_close(output, hidden_states, rtol=0, atol=0)


@pytest.mark.parametrize("solver", ["semi_implicit_euler", "rk4"])
def test_initial_velocity_sets_v0(solver, monkeypatch):
    """With a zero acceleration field a block returns h + g(h): g is a 1x1 conv for "linear", 0 for "zero"."""
    hidden_states = random_sample(2, 4, 6, 6)
    emb = torch.randn(2, 8)
    outputs = {}
    for kind in ("network", "linear", "zero"):
        torch.manual_seed(0)
        block = DynamicBlock(4, embedding_dim=8, norm_num_groups=2, initial_velocity=kind)
        block.solver_settings = ODESolverSettings(solver=solver, steps=1, backend="native")
        monkeypatch.setattr(block.acceleration, "forward", lambda x, v, scale, shift: torch.zeros_like(x))
        with torch.no_grad():
            outputs[kind] = block(hidden_states, emb)
            if kind == "linear":
                expected = hidden_states + block.initial_velocity.conv(hidden_states)
                torch.testing.assert_close(outputs[kind], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(outputs["zero"], hidden_states, rtol=0, atol=0)
    assert not torch.allclose(outputs["network"], outputs["linear"])


def test_initial_velocity_round_trip(tmp_path):
    counts = {}
    for kind in ("network", "linear", "zero"):
        torch.manual_seed(0)
        model = build_model(initial_velocity=kind)
        counts[kind] = sum(parameter.numel() for parameter in model.parameters())
        model.save_pretrained(tmp_path / kind)
        reloaded = ContinuousUNet2DModel.from_pretrained(tmp_path / kind)
        assert reloaded.config.initial_velocity == kind
        sample = random_sample(2, 1, 8, 8)
        torch.testing.assert_close(run_model(reloaded, sample), run_model(model, sample), rtol=0, atol=0)
    # A 1x1 conv has fewer weights than the norm, 3x3 conv and 1x1 conv of the network; "zero" has none.
    assert counts["network"] > counts["linear"] > counts["zero"]


@pytest.mark.parametrize(
    "solver, backend, steps, per_block",
    [
        ("rk4", "native", 4, 16),
        ("rk4", "native", 3, 12),
        ("rk4_classic", "native", 2, 8),
        ("verlet", "native", 4, 5),
        ("euler", "native", 4, 4),
        ("semi_implicit_euler", "native", 3, 3),
        ("midpoint", "native", 3, 6),
        ("rk4", "torchdiffeq", 4, 16),
        ("rk4", "torchdiffeq", 3, 12),
        ("euler", "torchdiffeq", 3, 3),
        ("heun", "torchdiffeq", 3, 6),
        ("midpoint", "torchdiffeq", 7, 14),
        ("euler", "torchode", 3, 3),
        ("heun", "torchode", 3, 6),
    ],
)
def test_nfe_matches_counted_calls(solver, backend, steps, per_block, count_acceleration_calls):
    model = build_model(ode_solver=solver, ode_backend=backend, ode_steps=steps)
    block_names = [block.name for block in model.dynamic_blocks]

    run_model(model, random_sample(2, 1, 8, 8))

    assert count_acceleration_calls[0] == per_block * len(block_names)
    assert model.nfe.per_block == dict.fromkeys(block_names, per_block)
    assert model.nfe.total == per_block * len(block_names)


def test_nfe_counts_adaptive_solve(count_acceleration_calls):
    model = build_model(ode_solver="dopri5")

    run_model(model, random_sample(2, 1, 8, 8))

    assert model.nfe.total == count_acceleration_calls[0]
    assert all(count >= 6 for count in model.nfe.per_block.values())


def test_nfe_follows_set_ode_solver():
    model = build_model(ode_solver="rk4", ode_steps=1)
    run_model(model, random_sample(1, 1, 8, 8))
    model.set_ode_solver(solver="verlet", steps=2)

    assert set(model.nfe.per_block.values()) == {3}


# ---------------------------------------------------------------- failures of the solve


def scale_acceleration_weights(model, factor):
    with torch.no_grad():
        for block in model.dynamic_blocks:
            for parameter in block.acceleration.parameters():
                parameter.mul_(factor)


@pytest.mark.timeout(120)
def test_stiff_field_finite_or_solver_error():
    model = build_model(ode_solver="dopri5", ode_max_steps=5, ode_rtol=1e-6, ode_atol=1e-6)
    scale_acceleration_weights(model, 50.0)

    try:
        output = run_model(model, random_sample(2, 1, 8, 8))
    except ODESolverError as error:
        assert "ode_max_steps" in str(error)
    else:
        assert bool(torch.isfinite(output).all())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("solver, backend", [("rk4", "native"), ("rk4", "torchdiffeq"), ("dopri5", "torchdiffeq")])
def test_nan_input_raises_solver_error(solver, backend):
    model = build_model(ode_solver=solver, ode_backend=backend)
    sample = random_sample(2, 1, 8, 8)
    sample[1, 0, 3, 4] = float("nan")

    with pytest.raises(ODESolverError):
        run_model(model, sample)


def test_nan_input_names_input():
    model = build_model()
    sample = random_sample(2, 1, 8, 8)
    sample[1, 0, 3, 4] = float("nan")

    with pytest.raises(NonFiniteStateError, match="input sample"):
        run_model(model, sample)


def test_non_finite_block_named(monkeypatch):
    model = build_model()
    monkeypatch.setattr(
        model.mid_block.acceleration, "forward", lambda x, v, scale, shift: torch.full_like(x, float("inf"))
    )

    with pytest.raises(NonFiniteStateError, match="'mid_block'"):
        run_model(model, random_sample(2, 1, 8, 8))


@pytest.mark.parametrize("solver, backend", [("rk4", "native"), ("rk4", "torchdiffeq")])
def test_check_finite_disabled_returns_nan(solver, backend):
    model = build_model(ode_solver=solver, ode_backend=backend, ode_check_finite=False)
    sample = random_sample(2, 1, 8, 8)
    sample[1, 0, 3, 4] = float("nan")

    output = run_model(model, sample)

    assert bool(torch.isnan(output).any())


# ---------------------------------------------------------------- gradients


def parameter_gradients(model, sample, timestep):
    model.zero_grad()
    model(sample, timestep).sample.square().mean().backward()
    return {name: parameter.grad for name, parameter in model.named_parameters()}


@pytest.mark.timeout(300)
def test_adjoint_gradients_match_backprop():
    model = build_model(ode_steps=32, attention_levels=(1,)).double()
    sample = random_sample(1, 1, 8, 8, dtype=torch.float64)
    timestep = torch.tensor([700.0], dtype=torch.float64)

    expected = parameter_gradients(model, sample, timestep)
    model.set_ode_solver(adjoint=True)
    adjoint = parameter_gradients(model, sample, timestep)

    assert model.solver_settings.resolved_backend == "torchdiffeq"
    assert [name for name, gradient in expected.items() if gradient is None] == []
    assert [name for name, gradient in adjoint.items() if gradient is None] == []
    assert any(name.startswith("time_embedding.") for name in adjoint)
    assert any(name.startswith("down_attentions.1.") for name in adjoint)
    for name, gradient in adjoint.items():
        torch.testing.assert_close(gradient, expected[name], rtol=1e-3, atol=1e-7, msg=lambda text: f"{name}: {text}")


def test_gradient_checkpointing_same_gradients(count_acceleration_calls):
    model = build_model().train()
    sample = random_sample(2, 1, 8, 8)
    expected = parameter_gradients(model, sample, 300)
    calls_without_checkpointing = count_acceleration_calls[0]

    model.enable_gradient_checkpointing()
    count_acceleration_calls[0] = 0
    checkpointed = parameter_gradients(model, sample, 300)

    assert model.is_gradient_checkpointing
    # Checkpointing recomputes every block's solve during the backward pass.
    assert count_acceleration_calls[0] == 2 * calls_without_checkpointing
    for name, gradient in checkpointed.items():
        torch.testing.assert_close(gradient, expected[name], rtol=0, atol=1e-5, msg=lambda text: f"{name}: {text}")


# ---------------------------------------------------------------- reduced precision


def test_bf16_weights_and_input():
    model = build_model()
    reduced = copy.deepcopy(model).to(torch.bfloat16)
    sample = random_sample(2, 1, 8, 8).to(torch.bfloat16)
    # The float32 reference uses the same bf16-rounded weights, so the difference is the bf16 arithmetic.
    reference = run_model(copy.deepcopy(reduced).float(), sample.float())

    output = run_model(reduced, sample)

    assert output.dtype == torch.bfloat16
    assert bool(torch.isfinite(output).all())
    assert rms_relative_error(output, reference) < 0.1
    assert max_relative_error(output, reference) < 0.5


# The attention's RMSNorm runs in float32 under autocast, so torch's warning about a bf16 input with a
# float32 weight must not appear.
@pytest.mark.filterwarnings("error:Mismatch dtype between input and weight:UserWarning")
def test_bf16_autocast_float32_weights():
    model = build_model()
    sample = random_sample(2, 1, 8, 8)
    reference = run_model(model, sample)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = run_model(model, sample)

    assert model.dtype == torch.float32
    assert bool(torch.isfinite(output).all())
    assert rms_relative_error(output, reference) < 0.1
    assert max_relative_error(output, reference) < 0.5


# ---------------------------------------------------------------- attention


def reference_attention(attention: SpatialSelfAttention, hidden_states: torch.Tensor) -> torch.Tensor:
    """Compute the attention head by head with 1x1 convs and an explicit softmax."""
    batch, channels, height, width = hidden_states.shape
    head_dim = channels // attention.num_heads
    rms = hidden_states.pow(2).mean(dim=1, keepdim=True).add(attention.norm.eps).rsqrt()
    normed = hidden_states * rms * attention.norm.weight[None, :, None, None]
    query, key, value = attention.to_qkv(normed).flatten(2).chunk(3, dim=1)  # each (batch, channels, pixels)
    heads = []
    for head in range(attention.num_heads):
        rows = slice(head * head_dim, (head + 1) * head_dim)
        scores = torch.einsum("bcp,bcq->bpq", query[:, rows], key[:, rows]) / head_dim**0.5
        heads.append(torch.einsum("bpq,bcq->bcp", scores.softmax(dim=-1), value[:, rows]))
    attended = torch.cat(heads, dim=1).reshape(batch, channels, height, width)
    return hidden_states + attention.to_out(attended)


@pytest.mark.parametrize("channels, head_dim", [(8, 4), (8, 8), (12, 4)])
def test_attention_matches_reference(channels, head_dim):
    torch.manual_seed(0)
    attention = SpatialSelfAttention(channels, head_dim).double()
    for parameter in attention.parameters():
        nn.init.normal_(parameter, std=0.5)  # a non-zero output projection and norm weights away from 1
    hidden_states = torch.randn(2, channels, 4, 6, dtype=torch.float64, requires_grad=True)

    output = attention(hidden_states)
    expected = reference_attention(attention, hidden_states)

    assert output.shape == hidden_states.shape
    assert output.is_contiguous()
    torch.testing.assert_close(output, expected, rtol=1e-10, atol=1e-10)
    (grad,) = torch.autograd.grad(output.square().sum(), hidden_states)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), hidden_states)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-9)


# Fused attention kernels (flash attention on CPUs and GPUs) take only queries, keys and values whose head
# dimension is contiguous. Other strides fall back to the slower unfused path.
@pytest.mark.parametrize("autocast", [False, True])
def test_attention_gives_fused_kernels_contiguous_heads(monkeypatch, autocast):
    seen = []
    original_attention = F.scaled_dot_product_attention

    def record_strides(query, key, value, **kwargs):
        seen.append([tensor.stride(-1) for tensor in (query, key, value)])
        return original_attention(query, key, value, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", record_strides)
    model = build_model()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        model(random_sample(2, 1, 8, 8), 10).sample.float().sum().backward()

    assert seen
    assert all(strides == [1, 1, 1] for strides in seen), seen


# ---------------------------------------------------------------- invalid arguments


INVALID_CONFIGS = [
    (dict(block_out_channels=(6, 8)), ValueError, "block_out_channels[0]=6"),
    (dict(mid_block_channels=10), ValueError, "mid_block_channels=10"),
    (dict(sample_size=4), ValueError, "sample_size=4"),
    (dict(sample_size=(8, 4)), ValueError, "sample_size=(8, 4)"),
    (dict(sample_size="8"), TypeError, "'8'"),
    (dict(ode_solver="rk5"), ValueError, "'rk5'"),
    (dict(ode_backend="jax"), ValueError, "'jax'"),
    (dict(ode_steps=0), ValueError, "ode_steps=0"),
    (dict(ode_steps=-1), ValueError, "ode_steps=-1"),
    (dict(ode_steps=2.0), TypeError, "2.0"),
    (dict(ode_rtol=0.0), ValueError, "ode_rtol=0.0"),
    (dict(ode_atol=-1e-3), ValueError, "ode_atol=-0.001"),
    (dict(ode_max_steps=0), ValueError, "ode_max_steps=0"),
    (dict(attention_levels=(2,)), ValueError, "contains 2"),
    (dict(attention_levels=(-3,)), ValueError, "contains -3"),
    (dict(attention_head_dim=3, block_out_channels=(4, 8)), ValueError, "attention_head_dim=3"),
    (dict(ode_solver="dopri5", ode_backend="native"), ValueError, "'dopri5'"),
    (dict(ode_adjoint=True, ode_backend="native"), ValueError, "ode_backend='native'"),
    (dict(ode_solver="rk4", ode_backend="torchode"), ValueError, "'rk4'"),
    (dict(ode_solver="verlet", ode_backend="torchdiffeq"), ValueError, "'verlet'"),
    (dict(nonlinearity="swoosh"), ValueError, "'swoosh'"),
    (dict(initial_velocity="learned"), ValueError, "initial_velocity='learned'"),
    (dict(dropout=1.0), ValueError, "dropout=1.0"),
    (dict(num_class_embeds=0), ValueError, "num_class_embeds=0"),
    (dict(patch_size=0), ValueError, "patch_size=0"),
    (dict(patch_size=3), ValueError, "patch_size=3"),
    (dict(patch_size=2), ValueError, "sample_size of at least 10"),
]


@pytest.mark.parametrize("overrides, error, value", INVALID_CONFIGS)
def test_invalid_config_raises(overrides, error, value):
    with pytest.raises(error, match=re.escape(value)):
        build_model(**overrides)


INVALID_SOLVER_CHANGES = [
    (dict(solver="rk5"), "'rk5'"),
    (dict(backend="jax"), "'jax'"),
    (dict(steps=0), "ode_steps=0"),
    (dict(rtol=-1.0), "ode_rtol=-1.0"),
    (dict(solver="dopri5", backend="native"), "'dopri5'"),
    (dict(adjoint=True, backend="native"), "ode_backend='native'"),
    (dict(backend="torchode"), "'rk4'"),
]


@pytest.mark.parametrize("changes, value", INVALID_SOLVER_CHANGES)
def test_set_ode_solver_rejects_invalid(changes, value):
    model = build_model()

    with pytest.raises(ValueError, match=re.escape(value)):
        model.set_ode_solver(**changes)

    assert model.solver_settings == ODESolverSettings(solver="rk4", steps=1)
    assert model.config.ode_solver == "rk4"


INVALID_CALLS = [
    (dict(sample=random_sample(2, 3, 8, 8)), ValueError, "sample has 3 channels"),
    (dict(sample=random_sample(1, 8, 8)), ValueError, "(1, 8, 8)"),
    (dict(sample=random_sample(2, 1, 4, 4)), ValueError, "4x4"),
    (dict(timestep=torch.tensor([1, 2])), ValueError, "timestep has 2 values for a batch of 3"),
    (dict(timestep=torch.ones(3, 1)), ValueError, "(3, 1)"),
    (dict(timestep="500"), TypeError, "'500'"),
    (dict(timestep=torch.tensor(True)), TypeError, "torch.bool"),
    (dict(class_labels=torch.tensor([0, 1, 2])), ValueError, "num_class_embeds=None"),
]


@pytest.mark.parametrize("call, error, value", INVALID_CALLS)
def test_invalid_call_raises_before_compute(call, error, value):
    model = build_model()
    stem_calls = []
    model.conv_in.register_forward_pre_hook(lambda module, args: stem_calls.append(module))
    arguments = {"sample": random_sample(3, 1, 8, 8), "timestep": 500, **call}

    with pytest.raises(error, match=re.escape(value)):
        run_model(model, **arguments)

    assert stem_calls == []


@pytest.mark.parametrize(
    "class_labels, value",
    [(None, "class_labels are required"), (torch.tensor([0, 1]), "class_labels has 2 values for a batch of 3")],
)
def test_missing_class_labels_raise(class_labels, value):
    model = build_model(num_class_embeds=4)
    stem_calls = []
    model.conv_in.register_forward_pre_hook(lambda module, args: stem_calls.append(module))

    with pytest.raises(ValueError, match=re.escape(value)):
        run_model(model, random_sample(3, 1, 8, 8), class_labels=class_labels)

    assert stem_calls == []


# ---------------------------------------------------------------- set_ode_solver and diffusers features


def test_set_ode_solver_updates_blocks_and_config():
    model = build_model()

    model.set_ode_solver(solver="verlet", steps=3, backend="native")

    assert all(block.solver_settings.solver == "verlet" for block in model.dynamic_blocks)
    assert all(block.solver_settings.steps == 3 for block in model.dynamic_blocks)
    assert all(block.solver_settings.backend == "native" for block in model.dynamic_blocks)
    assert model.config.ode_solver == "verlet"
    assert model.config.ode_steps == 3
    assert model.config.ode_backend == "native"


def test_set_ode_solver_survives_save(tmp_path):
    model = build_model()
    model.set_ode_solver(solver="dopri5", backend="torchdiffeq", rtol=1e-4, max_steps=50)

    model.save_pretrained(tmp_path)
    reloaded = ContinuousUNet2DModel.from_pretrained(tmp_path)

    assert reloaded.config.ode_solver == "dopri5"
    assert reloaded.config.ode_rtol == 1e-4
    assert reloaded.solver_settings == model.solver_settings
    assert all(block.solver_settings.solver == "dopri5" for block in reloaded.dynamic_blocks)


def test_from_pretrained_torch_dtype(tmp_path):
    build_model().save_pretrained(tmp_path)

    model = ContinuousUNet2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)

    assert model.dtype == torch.bfloat16
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}


def test_variant_save_and_load(tmp_path):
    model = build_model().to(torch.float16)
    model.save_pretrained(tmp_path, variant="fp16")

    reloaded = ContinuousUNet2DModel.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)

    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (tmp_path / WEIGHTS_NAME).exists()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_low_cpu_mem_usage_loads_same_weights(tmp_path):
    model = build_model()
    model.save_pretrained(tmp_path)

    lazy = ContinuousUNet2DModel.from_pretrained(tmp_path, low_cpu_mem_usage=True)
    eager = ContinuousUNet2DModel.from_pretrained(tmp_path, low_cpu_mem_usage=False)

    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(lazy.state_dict()[name], tensor, rtol=0, atol=0)
        torch.testing.assert_close(eager.state_dict()[name], tensor, rtol=0, atol=0)


def test_dtype_and_device_properties():
    model = build_model()

    assert model.dtype == torch.float32
    assert model.device == torch.device("cpu")
    assert model.to(torch.bfloat16).dtype == torch.bfloat16


def test_no_split_modules_exist():
    model = build_model()
    module_class_names = {type(module).__name__ for module in model.modules()}

    assert model._no_split_modules
    assert set(model._no_split_modules) <= module_class_names


# ---------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("solver", ["rk4", "verlet"])
def test_compile_fullgraph_no_graph_break(solver):
    # The "eager" backend runs only Dynamo's tracing, which is where graph breaks happen. With
    # fullgraph=True any graph break raises.
    torch._dynamo.reset()
    model = build_model(ode_solver=solver, ode_backend="native", ode_steps=2)
    sample = random_sample(2, 1, 8, 8)
    expected = run_model(model, sample)

    compiled = torch.compile(model, backend="eager", fullgraph=True)
    output = run_model(compiled, sample)

    # Under tracing, softplus takes ATen's kernel instead of the eager float32 fast path, which
    # differs by up to about 1e-6, so the tolerance is 1e-5.
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)
    assert model.nfe.total == model.solver_settings.fixed_nfe() * len(model.dynamic_blocks)


# NOTE: Inductor compiles C++ kernels with gcc, which is slow on CPU. On a shared 2-core machine (load average
# 3 to 7) with an empty kernel cache, the two cases took 80 to 190 s together, and 14 s once the cache under
# /tmp/torchinductor_<user> was warm.
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("solver", ["rk4", "verlet"])
def test_compile_inductor_matches_eager(solver):
    torch._dynamo.reset()
    model = build_model(block_out_channels=(4,), attention_levels=(0,), ode_solver=solver, ode_backend="native")
    sample = random_sample(2, 1, 8, 8)
    expected = run_model(model, sample)

    output = run_model(torch.compile(model, fullgraph=True), sample)

    torch.testing.assert_close(output, expected, rtol=0, atol=1e-4)


# ---------------------------------------------------------------- nonlinearity


def test_fast_softplus_matches_torch():
    softplus = Softplus()
    grid = torch.linspace(-120.0, 120.0, 200_001)
    special = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0, 16.0, 17.0, 20.0, 21.0])
    reference = F.softplus(grid)

    output = softplus(grid)
    small = reference < 1
    relative_error = (output - reference).abs() / reference

    assert isinstance(softplus, nn.Softplus)
    assert (output - reference)[small].abs().max() <= 2e-7
    assert relative_error[~small].max() <= 2e-7
    assert torch.equal(softplus(special), F.softplus(special))
    assert torch.isnan(softplus(torch.tensor([float("nan")]))).all()


def test_fast_softplus_gradients_match_torch():
    inputs = (torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 10).requires_grad_(True)

    (gradient,) = torch.autograd.grad(Softplus()(inputs).sum(), inputs, create_graph=True)
    (reference,) = torch.autograd.grad(F.softplus(inputs).sum(), inputs, create_graph=True)
    (second,) = torch.autograd.grad(gradient.sum(), inputs)
    (second_reference,) = torch.autograd.grad(reference.sum(), inputs)

    torch.testing.assert_close(gradient, reference, rtol=0, atol=2e-7)
    torch.testing.assert_close(second, second_reference, rtol=0, atol=2e-7)


def test_fast_softplus_bf16_uses_float32():
    inputs = (torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 8).to(torch.bfloat16).requires_grad_(True)

    output = Softplus()(inputs)
    (gradient,) = torch.autograd.grad(output.float().sum(), inputs)

    assert output.dtype == gradient.dtype == torch.bfloat16
    reference = F.softplus(inputs.detach().float())
    torch.testing.assert_close(output.float(), reference, rtol=2**-8, atol=2**-8)
    torch.testing.assert_close(gradient.float(), torch.sigmoid(inputs.detach().float()), rtol=2**-8, atol=2**-8)


def test_softplus_other_dtypes_use_torch():
    inputs = torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    assert torch.equal(Softplus()(inputs), F.softplus(inputs))


# ---------------------------------------------------------------- presets


def test_presets_build():
    cunet = thesis_cunet(64, 3)
    unet = thesis_unet(64, 3)
    cunet_parameters = sum(parameter.numel() for parameter in cunet.parameters())
    unet_parameters = sum(parameter.numel() for parameter in unet.parameters())
    print(f"thesis_cunet(64, 3): {cunet_parameters} parameters; thesis_unet(64, 3): {unet_parameters} parameters")

    assert isinstance(cunet, ContinuousUNet2DModel)
    assert isinstance(unet, UNet2DModel)
    assert cunet.config.sample_size == 64
    assert unet.config.in_channels == 3
    assert cunet_parameters == 10_559_363
    assert unet_parameters == 35_746_307
