"""The ODE engine: second-order integrators, solver backends and NFE bookkeeping."""

from .integrators import (
    ADAPTIVE_SOLVERS,
    FIXED_STEP_INTEGRATORS,
    ODE_SOLVERS,
    ClassicRK4,
    Euler,
    FixedStepIntegrator,
    Heun,
    Midpoint,
    RK4,
    SemiImplicitEuler,
    VelocityVerlet,
    get_fixed_step_integrator,
)
from .solve import (
    ODE_BACKENDS,
    NonFiniteStateError,
    ODESolverError,
    ODESolverSettings,
    solve_second_order,
    validate_solver_settings,
)

__all__ = [
    "ADAPTIVE_SOLVERS",
    "FIXED_STEP_INTEGRATORS",
    "ODE_BACKENDS",
    "ODE_SOLVERS",
    "ClassicRK4",
    "Euler",
    "FixedStepIntegrator",
    "Heun",
    "Midpoint",
    "NonFiniteStateError",
    "ODESolverError",
    "ODESolverSettings",
    "RK4",
    "SemiImplicitEuler",
    "VelocityVerlet",
    "get_fixed_step_integrator",
    "solve_second_order",
    "validate_solver_settings",
]
