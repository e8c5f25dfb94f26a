"""Tests of the ODE engine: the native integrators, the torchdiffeq and torchode backends and the step limits."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torchdiffeq

from diffusers_cunet.ode import (
    FIXED_STEP_INTEGRATORS,
    ODESolverError,
    ODESolverSettings,
    solve_second_order,
)


# Native names mapped to the torchdiffeq method with the same Butcher tableau.
TORCHDIFFEQ_COUNTERPARTS = {"euler": "euler", "midpoint": "midpoint", "heun": "heun2", "rk4": "rk4"}

EXPECTED_ORDERS = {
    "euler": 1,
    "semi_implicit_euler": 1,
    "midpoint": 2,
    "heun": 2,
    "verlet": 2,
    "rk4": 4,
    "rk4_classic": 4,
}

# Damped oscillator x'' = -OMEGA^2 x - DAMPING v, underdamped so the solution oscillates over s in [0, 1].
OMEGA = 3.0
DAMPING = 0.5


def nonlinear_acceleration(s, x, v):
    """A smooth field that couples x and v and depends on s, so every stage's node and inputs matter.

    The native backend passes s as a float, torchdiffeq as a 0-d tensor and torchode as one value per sample.
    """
    s = torch.as_tensor(s, dtype=x.dtype).reshape(-1, 1, 1, 1)
    return -torch.sin(x) - 0.4 * v * torch.tanh(v) + 0.3 * torch.cos(2.0 * s) * x * v


def initial_state(dtype=torch.float32):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=generator, dtype=dtype)
    v = torch.randn(2, 3, 4, 4, generator=generator, dtype=dtype)
    return x, v


def torchdiffeq_reference(method, x, v, steps):
    """Integrate with torchdiffeq on the grid of `steps` equal steps (its output times are the grid)."""

    def vector_field(s, state):
        position, velocity = state
        return velocity, nonlinear_acceleration(s, position, velocity)

    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=x.dtype)
    positions, velocities = torchdiffeq.odeint(vector_field, (x, v), grid, method=method)
    return positions[-1], velocities[-1]


def damped_oscillator_exact(x0, v0, s):
    decay = DAMPING / 2
    frequency = math.sqrt(OMEGA**2 - decay**2)
    envelope = math.exp(-decay * s)
    cosine, sine = math.cos(frequency * s), math.sin(frequency * s)
    amplitude = (v0 + decay * x0) / frequency
    x = envelope * (x0 * cosine + amplitude * sine)
    v = envelope * (-decay * (x0 * cosine + amplitude * sine) + frequency * (-x0 * sine + amplitude * cosine))
    return x, v


def damped_oscillator_error(name, steps):
    x0, v0 = 1.0, 0.5
    x = torch.tensor([x0], dtype=torch.float64)
    v = torch.tensor([v0], dtype=torch.float64)
    x_end, v_end = FIXED_STEP_INTEGRATORS[name].solve(lambda s, x, v: -(OMEGA**2) * x - DAMPING * v, x, v, steps)
    x_exact, v_exact = damped_oscillator_exact(x0, v0, 1.0)
    return max(abs(x_end.item() - x_exact), abs(v_end.item() - v_exact))


class CountingField:
    """Wrap an acceleration function and count its evaluations."""

    def __init__(self, acceleration):
        self.acceleration = acceleration
        self.calls = 0

    def __call__(self, s, x, v):
        self.calls += 1
        return self.acceleration(s, x, v)


def stiff_acceleration(s, x, v):
    return -1.0e6 * x - 1.0e3 * v


@pytest.mark.parametrize("steps", [1, 3, 8])
@pytest.mark.parametrize("name", sorted(TORCHDIFFEQ_COUNTERPARTS))
def test_native_matches_torchdiffeq(name, steps):
    x, v = initial_state()
    x_native, v_native = FIXED_STEP_INTEGRATORS[name].solve(nonlinear_acceleration, x, v, steps)
    x_reference, v_reference = torchdiffeq_reference(TORCHDIFFEQ_COUNTERPARTS[name], x, v, steps)

    torch.testing.assert_close(x_native, x_reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(v_native, v_reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("steps", [3, 8])
@pytest.mark.parametrize("name", sorted(TORCHDIFFEQ_COUNTERPARTS))
def test_torchdiffeq_backend_matches_native(name, steps):
    x, v = initial_state()
    native = solve_second_order(
        nonlinear_acceleration, x, v, ODESolverSettings(solver=name, steps=steps, backend="native")
    )
    backend = solve_second_order(
        nonlinear_acceleration, x, v, ODESolverSettings(solver=name, steps=steps, backend="torchdiffeq")
    )

    torch.testing.assert_close(backend[0], native[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(backend[1], native[1], rtol=0, atol=1e-5)
    assert backend[2] == native[2]


@pytest.mark.parametrize("name", sorted(EXPECTED_ORDERS))
def test_integrator_observed_order(name):
    errors = [damped_oscillator_error(name, steps) for steps in (16, 32, 64)]
    coarse_order = math.log2(errors[0] / errors[1])
    fine_order = math.log2(errors[1] / errors[2])

    assert FIXED_STEP_INTEGRATORS[name].order == EXPECTED_ORDERS[name]
    assert abs(coarse_order - EXPECTED_ORDERS[name]) < 0.3, errors
    assert abs(fine_order - EXPECTED_ORDERS[name]) < 0.3, errors


@pytest.mark.parametrize("steps", [1, 3, 8])
@pytest.mark.parametrize("name", sorted(FIXED_STEP_INTEGRATORS))
def test_num_evaluations_counts_calls(name, steps):
    integrator = FIXED_STEP_INTEGRATORS[name]
    field = CountingField(nonlinear_acceleration)
    x, v = initial_state()
    integrator.solve(field, x, v, steps)

    expected = integrator.stages * steps + (1 if name == "verlet" else 0)
    assert integrator.num_evaluations(steps) == expected
    assert field.calls == expected


@pytest.mark.parametrize("steps", [1, 3, 8])
@pytest.mark.parametrize("name", sorted(FIXED_STEP_INTEGRATORS))
def test_solve_second_order_reports_nfe(name, steps):
    field = CountingField(nonlinear_acceleration)
    x, v = initial_state()
    _, _, nfe = solve_second_order(field, x, v, ODESolverSettings(solver=name, steps=steps, backend="native"))

    assert nfe == FIXED_STEP_INTEGRATORS[name].num_evaluations(steps)
    assert field.calls == nfe


def test_torchode_dopri5_matches_torchdiffeq():
    x, v = initial_state(torch.float64)
    tolerances = dict(rtol=1e-8, atol=1e-8, max_steps=10_000)
    torchode_x, torchode_v, _ = solve_second_order(
        nonlinear_acceleration, x, v, ODESolverSettings(solver="dopri5", backend="torchode", **tolerances)
    )
    reference_x, reference_v, _ = solve_second_order(
        nonlinear_acceleration, x, v, ODESolverSettings(solver="dopri5", backend="torchdiffeq", **tolerances)
    )

    assert torchode_x.dtype == torch.float64
    torch.testing.assert_close(torchode_x, reference_x, rtol=0, atol=1e-6)
    torch.testing.assert_close(torchode_v, reference_v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("steps", [1, 3, 8])
@pytest.mark.parametrize("name", ["euler", "heun"])
def test_torchode_fixed_step_matches_torchdiffeq(name, steps):
    x, v = initial_state(torch.float64)
    field = CountingField(nonlinear_acceleration)
    torchode_x, torchode_v, nfe = solve_second_order(
        field, x, v, ODESolverSettings(solver=name, steps=steps, backend="torchode")
    )
    reference_x, reference_v, _ = solve_second_order(
        nonlinear_acceleration, x, v, ODESolverSettings(solver=name, steps=steps, backend="torchdiffeq")
    )

    torch.testing.assert_close(torchode_x, reference_x, rtol=0, atol=1e-6)
    torch.testing.assert_close(torchode_v, reference_v, rtol=0, atol=1e-6)
    assert nfe == FIXED_STEP_INTEGRATORS[name].num_evaluations(steps)
    assert field.calls == nfe


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["torchdiffeq", "torchode"])
def test_adaptive_stiff_field_raises(backend):
    x, v = initial_state()
    settings = ODESolverSettings(solver="dopri5", backend=backend, rtol=1e-6, atol=1e-6, max_steps=5)

    with pytest.raises(ODESolverError, match="dopri5"):
        solve_second_order(stiff_acceleration, x, v, settings, block_name="stiff block")


@pytest.mark.timeout(60)
def test_adaptive_nan_state_raises():
    x, v = initial_state()
    x[0, 0, 0, 0] = float("nan")

    with pytest.raises(ODESolverError, match="test block"):
        solve_second_order(
            nonlinear_acceleration, x, v, ODESolverSettings(solver="dopri5"), block_name="test block"
        )


# Runs in a `python -O` interpreter, where torchdiffeq's own step limit and underflow checks are assert
# statements and therefore removed, so only the engine's evaluation counter can stop the solve.
EVALUATION_LIMIT_SCRIPT = textwrap.dedent(
    """
    import torch
    from diffusers_cunet.ode import ODESolverError, ODESolverSettings, solve_second_order

    print("debug", __debug__)
    generator = torch.Generator().manual_seed(0)

    def noisy_acceleration(s, x, v):
        # A new random field on every call keeps the error estimate above the tolerance, so steps are rejected.
        return 1.0e3 * torch.randn(x.shape, generator=generator)

    def smooth_acceleration(s, x, v):
        return -x

    x = torch.zeros(1, 2, 3, 3)
    nan_x = x.clone()
    nan_x[0, 0, 0, 0] = float("nan")
    cases = [
        ("noisy", noisy_acceleration, x, ODESolverSettings(solver="dopri5", max_steps=5, rtol=1e-6, atol=1e-6)),
        ("nan", smooth_acceleration, nan_x, ODESolverSettings(solver="dopri5", max_steps=5)),
    ]
    for label, field, start, settings in cases:
        try:
            solve_second_order(field, start, torch.zeros_like(x), settings)
        except ODESolverError as error:
            print(label, "raised", error)
        else:
            print(label, "returned")
    """
)


@pytest.mark.timeout(120)
def test_evaluation_limit_without_asserts():
    result = subprocess.run(
        [sys.executable, "-O", "-c", EVALUATION_LIMIT_SCRIPT], capture_output=True, text=True, timeout=100
    )
    lines = result.stdout.splitlines()

    assert result.returncode == 0, result.stderr
    assert "debug False" in lines
    assert any(line.startswith("noisy raised") and "acceleration evaluations" in line for line in lines), lines
    assert any(line.startswith("nan raised") for line in lines), lines
