"""Solve the second-order system of a dynamic block with one of three backends.

- `native`: the unrolled fixed-step integrators of `integrators.py` (the hot path).
- `torchdiffeq`: adaptive solvers (`dopri5`, `bosh3`), the fixed-step methods it shares with the
  native backend, and adjoint gradients.
- `torchode`: batch-parallel solving (each sample gets its own step size), an optional extra.

`auto` picks `native` for fixed-step solvers without adjoint and `torchdiffeq` otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .integrators import (
    ADAPTIVE_SOLVERS,
    FIXED_STEP_INTEGRATORS,
    ODE_SOLVERS,
    TORCHDIFFEQ_METHOD_NAMES,
    AccelerationFn,
)


ODE_BACKENDS: tuple[str, ...] = ("auto", "native", "torchdiffeq", "torchode")

# torchode ships these methods; our names map to its registry names.
TORCHODE_METHOD_NAMES: dict[str, str] = {"euler": "euler", "heun": "heun", "dopri5": "dopri5"}


class ODESolverError(RuntimeError):
    """A dynamic block's ODE solve failed: too many steps, step size underflow or a solver error."""


class NonFiniteStateError(ODESolverError):
    """A dynamic block produced NaN or infinite values."""


@dataclass(frozen=True)
class ODESolverSettings:
    """Solver settings of a dynamic block, which is solved over the ODE time s in [0, 1].

    Args:
        solver (`str`): A fixed-step method (`euler`, `semi_implicit_euler`, `midpoint`, `heun`,
            `rk4`, `rk4_classic`, `verlet`) or an adaptive one (`dopri5`, `bosh3`).
        steps (`int`): Number of steps of a fixed-step method.
        rtol (`float`), atol (`float`): Tolerances of an adaptive method.
        max_steps (`int`): Maximum number of steps (accepted or rejected) of an adaptive method.
        adjoint (`bool`): Compute gradients with the adjoint method (torchdiffeq backend).
        backend (`str`): `auto`, `native`, `torchdiffeq` or `torchode`.
    """

    solver: str = "rk4"
    steps: int = 1
    rtol: float = 1e-3
    atol: float = 1e-3
    max_steps: int = 1000
    adjoint: bool = False
    backend: str = "auto"

    def __post_init__(self):
        validate_solver_settings(self)

    @property
    def is_adaptive(self) -> bool:
        return self.solver in ADAPTIVE_SOLVERS

    @property
    def resolved_backend(self) -> str:
        """The backend that runs the solve once `auto` is resolved."""
        if self.backend != "auto":
            return self.backend
        if self.is_adaptive or self.adjoint:
            return "torchdiffeq"
        return "native"

    def fixed_nfe(self) -> int | None:
        """NFE of one solve for fixed-step methods, or `None` for adaptive methods (counted at run time)."""
        if self.is_adaptive:
            return None
        return FIXED_STEP_INTEGRATORS[self.solver].num_evaluations(self.steps)


def validate_solver_settings(settings: ODESolverSettings) -> None:
    """Raise `ValueError`/`TypeError` naming the invalid value and the fix."""
    if settings.solver not in ODE_SOLVERS:
        raise ValueError(f"Unknown ode_solver {settings.solver!r}; choose one of {list(ODE_SOLVERS)}.")
    if settings.backend not in ODE_BACKENDS:
        raise ValueError(f"Unknown ode_backend {settings.backend!r}; choose one of {list(ODE_BACKENDS)}.")
    if isinstance(settings.steps, bool) or not isinstance(settings.steps, int):
        raise TypeError(f"ode_steps must be an int, got {settings.steps!r} of type {type(settings.steps).__name__}.")
    if settings.steps < 1:
        raise ValueError(f"ode_steps={settings.steps} is invalid; use at least 1 step per dynamic block.")
    for name, value in (("ode_rtol", settings.rtol), ("ode_atol", settings.atol)):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name}={value!r} is invalid; tolerances must be positive finite numbers such as 1e-3.")
    if isinstance(settings.max_steps, bool) or not isinstance(settings.max_steps, int) or settings.max_steps < 1:
        raise ValueError(f"ode_max_steps={settings.max_steps!r} is invalid; use a positive int such as 1000.")

    backend = settings.resolved_backend
    if backend == "native" and settings.is_adaptive:
        raise ValueError(
            f"ode_backend='native' runs fixed-step solvers only, but ode_solver={settings.solver!r} is adaptive; "
            "use ode_backend='torchdiffeq' (or 'auto')."
        )
    if settings.adjoint and backend != "torchdiffeq":
        raise ValueError(
            f"ode_adjoint=True needs the torchdiffeq backend, but ode_backend={settings.backend!r}; "
            "use ode_backend='torchdiffeq' (or 'auto')."
        )
    if backend == "torchdiffeq" and settings.solver not in TORCHDIFFEQ_METHOD_NAMES:
        raise ValueError(
            f"ode_solver={settings.solver!r} has no torchdiffeq counterpart; use the native backend or one of "
            f"{sorted(TORCHDIFFEQ_METHOD_NAMES)}."
        )
    if backend == "torchode" and settings.solver not in TORCHODE_METHOD_NAMES:
        raise ValueError(
            f"ode_solver={settings.solver!r} is not available in torchode; choose one of "
            f"{sorted(TORCHODE_METHOD_NAMES)} or another backend."
        )


class _CountingAcceleration:
    """Wrap an acceleration function to count evaluations and stop runaway adaptive solves."""

    def __init__(self, acceleration: AccelerationFn, limit: int | None, describe: str):
        self.acceleration = acceleration
        self.limit = limit
        self.describe = describe
        self.count = 0

    def __call__(self, s, x, v):
        self.count += 1
        if self.limit is not None and self.count > self.limit:
            raise ODESolverError(
                f"{self.describe} exceeded {self.limit} acceleration evaluations without reaching s=1; "
                "raise ode_max_steps or the tolerances (ode_rtol, ode_atol), or use a fixed-step solver."
            )
        return self.acceleration(s, x, v)


def _evaluation_limit(settings: ODESolverSettings) -> int:
    # Every attempted step costs `stages` evaluations, plus a few for the initial step-size guess.
    return ADAPTIVE_SOLVERS.get(settings.solver, 4) * (settings.max_steps + 1) + 4


def solve_second_order(
    acceleration: AccelerationFn,
    x: torch.Tensor,
    v: torch.Tensor,
    settings: ODESolverSettings,
    block_name: str = "dynamic block",
    adjoint_params: Sequence[torch.Tensor] = (),
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Integrate dx/ds = v, dv/ds = a(s, x, v) from s=0 to s=1.

    Args:
        acceleration: `a(s, x, v)`, returns a tensor shaped like `x`.
        x, v: Initial position and velocity, `(batch, channels, height, width)`.
        settings: The solver settings.
        block_name: Used in error messages.
        adjoint_params: Every tensor the acceleration reads that needs a gradient (the block's
            parameters and tensors computed outside the solve, such as the FiLM scale and shift).
            Only the adjoint method uses them.

    Returns:
        `(x(1), v(1), nfe)`.
    """
    backend = settings.resolved_backend
    describe = f"{block_name} (ode_solver={settings.solver!r}, backend={backend!r})"

    if backend == "native":
        integrator = FIXED_STEP_INTEGRATORS[settings.solver]
        x_end, v_end = integrator.solve(acceleration, x, v, settings.steps)
        return x_end, v_end, integrator.num_evaluations(settings.steps)

    limit = _evaluation_limit(settings) if settings.is_adaptive else None
    counted = _CountingAcceleration(acceleration, limit, describe)
    try:
        if backend == "torchdiffeq":
            x_end, v_end = _solve_torchdiffeq(counted, x, v, settings, adjoint_params)
        else:
            x_end, v_end = _solve_torchode(counted, x, v, settings, describe)
    except AssertionError as error:
        # torchdiffeq reports step-size underflow, max_num_steps and non-finite states with bare
        # assertions; turn them into the project's error with the block and solver named.
        raise ODESolverError(
            f"{describe} failed: {error}. Raise ode_max_steps or the tolerances, or check the input for NaN/inf."
        ) from error
    return x_end, v_end, counted.count


def _solve_torchdiffeq(counted, x, v, settings, adjoint_params):
    import torchdiffeq

    method = TORCHDIFFEQ_METHOD_NAMES[settings.solver]
    # The ODE time stays float32 (or float64 with float64 states) even when the state is bf16/fp16.
    time_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    ode_time = torch.tensor([0.0, 1.0], dtype=time_dtype, device=x.device)

    def vector_field(s, state):
        position, velocity = state
        return velocity, counted(s, position, velocity)

    if settings.is_adaptive:
        options = {"max_num_steps": settings.max_steps}
    else:
        steps = settings.steps
        # An explicit grid: a `step_size` of 1/steps can round to one extra tiny step. The grid spans
        # the interval torchdiffeq passes in, because the adjoint's backward solve runs over [-1, 0].
        options = {"grid_constructor": lambda func, y0, t: torch.linspace(t[0], t[-1], steps + 1, dtype=t.dtype, device=t.device)}

    kwargs = dict(rtol=settings.rtol, atol=settings.atol, method=method, options=options)
    if settings.adjoint:
        # torchdiffeq replaces `options` with `adjoint_options` for the backward solve, so the grid
        # and the step limit must be passed again, or the backward solve takes a single step.
        adjoint_options = {**options, "norm": "seminorm"}
        trajectory = torchdiffeq.odeint_adjoint(
            vector_field, (x, v), ode_time, adjoint_params=tuple(adjoint_params), adjoint_options=adjoint_options, **kwargs
        )
    else:
        trajectory = torchdiffeq.odeint(vector_field, (x, v), ode_time, **kwargs)
    positions, velocities = trajectory
    return positions[-1], velocities[-1]


def _solve_torchode(counted, x, v, settings, describe):
    try:
        import torchode
    except ImportError as error:
        raise ImportError(
            "ode_backend='torchode' needs the torchode package; install it with `pip install diffusers-cunet[torchode]`."
        ) from error

    batch = x.shape[0]
    shape = x.shape
    features = x[0].numel()
    state_dtype = x.dtype

    def flat_field(s, state):
        # torchode integrates flat (batch, features) states; s has shape (batch,).
        position = state[:, :features].reshape(shape)
        velocity = state[:, features:].reshape(shape)
        acceleration = counted(s, position, velocity)
        return torch.cat((velocity.reshape(batch, features), acceleration.reshape(batch, features)), dim=1)

    term = torchode.ODETerm(flat_field)
    method_class = {"euler": torchode.Euler, "heun": torchode.Heun, "dopri5": torchode.Dopri5}[settings.solver]
    step_method = method_class(term=term)
    time_dtype = torch.float64 if state_dtype == torch.float64 else torch.float32
    t_start = torch.zeros(batch, dtype=time_dtype, device=x.device)
    t_end = torch.ones(batch, dtype=time_dtype, device=x.device)
    y0 = torch.cat((x.reshape(batch, features), v.reshape(batch, features)), dim=1)
    problem = torchode.InitialValueProblem(y0=y0, t_start=t_start, t_end=t_end)

    if settings.is_adaptive:
        controller = torchode.IntegralController(atol=settings.atol, rtol=settings.rtol, term=term)
        dt0 = None
    else:
        controller = torchode.FixedStepController()
        dt0 = torch.full((batch,), 1.0 / settings.steps, dtype=time_dtype, device=x.device)
    solver = torchode.AutoDiffAdjoint(step_method, controller, max_steps=settings.max_steps)
    solution = solver.solve(problem, dt0=dt0)

    # One host synchronisation: torchode reports failures per sample in `status`.
    if bool((solution.status != 0).any()):
        codes = sorted({int(code) for code in solution.status.tolist()} - {0})
        names = [torchode.Status(code).name for code in codes]
        raise ODESolverError(
            f"{describe} failed for some samples with status {names}; raise ode_max_steps or the tolerances."
        )
    final = solution.ys[:, -1].to(state_dtype)
    return final[:, :features].reshape(shape), final[:, features:].reshape(shape)
