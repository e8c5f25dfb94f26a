"""Fixed-step integrators for the second-order system dx/ds = v, dv/ds = a(x, v, s).

Every integrator is a small stateless class with its order and its stages per step, so the number of
acceleration evaluations (NFE) of a solve is known before it runs. The loops are plain unrolled
tensor code: no host synchronisation, no data-dependent Python control flow, so `torch.compile`
(including `fullgraph=True`) and CUDA graphs can capture them.

The Runge-Kutta methods treat (x, v) as one first-order state y = (x, v) with dy/ds = (v, a), which
is how torchdiffeq integrates a tuple state; for the same method and step count the results agree
with torchdiffeq to float rounding.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


# a(s, x, v) -> acceleration with x's shape. `s` is a Python float: the ODE time in [0, 1].
AccelerationFn = Callable[[float, torch.Tensor, torch.Tensor], torch.Tensor]


class FixedStepIntegrator:
    """Base class of the fixed-step integrators.

    Attributes:
        name (`str`): Name used in configs (`ode_solver`).
        order (`int`): Global order of accuracy in the step size.
        stages (`int`): Acceleration evaluations per step.
        extra_evaluations (`int`): Evaluations made once per solve on top of `stages * steps`.
    """

    name: str = ""
    order: int = 0
    stages: int = 0
    extra_evaluations: int = 0

    def num_evaluations(self, steps: int) -> int:
        """Number of acceleration evaluations (NFE) for a solve of `steps` steps."""
        return self.stages * steps + self.extra_evaluations

    def step(
        self, acceleration: AccelerationFn, s0: float, ds: float, x: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def solve(
        self,
        acceleration: AccelerationFn,
        x: torch.Tensor,
        v: torch.Tensor,
        steps: int,
        s_start: float = 0.0,
        s_end: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Integrate from `s_start` to `s_end` in `steps` equal steps and return (x, v) at `s_end`."""
        ds = (s_end - s_start) / steps
        for index in range(steps):
            x, v = self.step(acceleration, s_start + index * ds, ds, x, v)
        return x, v


class ExplicitRungeKutta(FixedStepIntegrator):
    """Explicit Runge-Kutta method given by its Butcher tableau, applied to y = (x, v)."""

    tableau: Sequence[Sequence[float]] = ()
    weights: Sequence[float] = ()
    nodes: Sequence[float] = ()

    def step(self, acceleration, s0, ds, x, v):
        # Stage slopes of y = (x, v): the slope of x is the stage velocity, the slope of v the
        # stage acceleration. Zero tableau entries are skipped at trace time. Each update is one
        # `torch.add(..., alpha=...)` rather than a multiply and an add, because at large batches these
        # memory-bound passes over the state cost several percent of a forward pass on CPU.
        velocity_slopes: list[torch.Tensor] = []
        acceleration_slopes: list[torch.Tensor] = []
        for stage, (row, node) in enumerate(zip(self.tableau, self.nodes)):
            x_stage, v_stage = x, v
            for coefficient, x_slope, v_slope in zip(row[:stage], velocity_slopes, acceleration_slopes):
                if coefficient != 0.0:
                    x_stage = torch.add(x_stage, x_slope, alpha=ds * coefficient)
                    v_stage = torch.add(v_stage, v_slope, alpha=ds * coefficient)
            velocity_slopes.append(v_stage)
            acceleration_slopes.append(acceleration(s0 + node * ds, x_stage, v_stage))

        x_next, v_next = x, v
        for weight, x_slope, v_slope in zip(self.weights, velocity_slopes, acceleration_slopes):
            if weight != 0.0:
                x_next = torch.add(x_next, x_slope, alpha=ds * weight)
                v_next = torch.add(v_next, v_slope, alpha=ds * weight)
        return x_next, v_next


class Euler(ExplicitRungeKutta):
    """Forward Euler. Order 1, 1 stage per step."""

    name = "euler"
    order = 1
    stages = 1
    tableau = ((),)
    weights = (1.0,)
    nodes = (0.0,)


class Midpoint(ExplicitRungeKutta):
    """Explicit midpoint method (RK2). Order 2, 2 stages per step."""

    name = "midpoint"
    order = 2
    stages = 2
    tableau = ((), (0.5,))
    weights = (0.0, 1.0)
    nodes = (0.0, 0.5)


class Heun(ExplicitRungeKutta):
    """Heun's method, also called the explicit trapezoidal rule (torchdiffeq's `heun2`).

    Order 2, 2 stages per step.
    """

    name = "heun"
    order = 2
    stages = 2
    tableau = ((), (1.0,))
    weights = (0.5, 0.5)
    nodes = (0.0, 1.0)


class RK4(ExplicitRungeKutta):
    """Kutta's 3/8-rule fourth-order method: torchdiffeq's `rk4`. Order 4, 4 stages per step."""

    name = "rk4"
    order = 4
    stages = 4
    tableau = ((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0))
    weights = (1 / 8, 3 / 8, 3 / 8, 1 / 8)
    nodes = (0.0, 1 / 3, 2 / 3, 1.0)


class ClassicRK4(ExplicitRungeKutta):
    """The classic fourth-order Runge-Kutta method (1/6, 1/3, 1/3, 1/6). Order 4, 4 stages per step."""

    name = "rk4_classic"
    order = 4
    stages = 4
    tableau = ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0))
    weights = (1 / 6, 1 / 3, 1 / 3, 1 / 6)
    nodes = (0.0, 0.5, 0.5, 1.0)


class SemiImplicitEuler(FixedStepIntegrator):
    """Semi-implicit (symplectic) Euler: update v with a(x, v), then x with the new v.

    Order 1, 1 stage per step. Exact for a constant acceleration in v, and stable for oscillatory
    fields where forward Euler grows.
    """

    name = "semi_implicit_euler"
    order = 1
    stages = 1

    def step(self, acceleration, s0, ds, x, v):
        v_next = torch.add(v, acceleration(s0, x, v), alpha=ds)
        x_next = torch.add(x, v_next, alpha=ds)
        return x_next, v_next


class VelocityVerlet(FixedStepIntegrator):
    """Velocity Verlet (leapfrog in kick-drift-kick form) with a predicted velocity.

    Classic velocity Verlet is second order only when the acceleration ignores v. Here a(x, v, s)
    depends on v, so the acceleration at the new position is evaluated with the predicted velocity
    v + ds * a, which keeps the method second order (checked on a damped oscillator in the tests).
    The acceleration at the end of one step is reused at the start of the next, so a solve costs
    one evaluation per step plus one at the start: NFE = steps + 1. Also known as Störmer-Verlet.
    """

    name = "verlet"
    order = 2
    stages = 1
    extra_evaluations = 1

    def solve(self, acceleration, x, v, steps, s_start=0.0, s_end=1.0):
        ds = (s_end - s_start) / steps
        a = acceleration(s_start, x, v)
        for index in range(steps):
            s_next = s_start + (index + 1) * ds
            x = torch.add(x, v, alpha=ds).add_(a, alpha=0.5 * ds * ds)
            v_predicted = torch.add(v, a, alpha=ds)
            a_next = acceleration(s_next, x, v_predicted)
            v = torch.add(v, a + a_next, alpha=0.5 * ds)
            a = a_next
        return x, v

    def step(self, acceleration, s0, ds, x, v):
        return self.solve(acceleration, x, v, 1, s0, s0 + ds)


FIXED_STEP_INTEGRATORS: dict[str, FixedStepIntegrator] = {
    integrator.name: integrator
    for integrator in (
        Euler(),
        SemiImplicitEuler(),
        Midpoint(),
        Heun(),
        RK4(),
        ClassicRK4(),
        VelocityVerlet(),
    )
}

# Adaptive methods served by torchdiffeq (and torchode), with their stages per accepted step.
ADAPTIVE_SOLVERS: dict[str, int] = {"dopri5": 6, "bosh3": 3}

# Our fixed-step names mapped to torchdiffeq's method of the same scheme.
TORCHDIFFEQ_METHOD_NAMES: dict[str, str] = {
    "euler": "euler",
    "midpoint": "midpoint",
    "heun": "heun2",
    "rk4": "rk4",
    "dopri5": "dopri5",
    "bosh3": "bosh3",
}

ODE_SOLVERS: tuple[str, ...] = tuple(FIXED_STEP_INTEGRATORS) + tuple(ADAPTIVE_SOLVERS)


def get_fixed_step_integrator(name: str) -> FixedStepIntegrator:
    """Look up a fixed-step integrator by name, raising `ValueError` with the valid names."""
    if name not in FIXED_STEP_INTEGRATORS:
        raise ValueError(
            f"Unknown fixed-step ODE solver {name!r}; choose one of {sorted(FIXED_STEP_INTEGRATORS)}."
        )
    return FIXED_STEP_INTEGRATORS[name]
