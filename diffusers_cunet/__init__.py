"""diffusers-cunet: a continuous U-Net (second-order neural ODE blocks) denoiser for diffusers.

Importing the package registers `diffusers_cunet` with diffusers' pipeline loader, so
`DDPMPipeline.from_pretrained(...)` loads a saved continuous U-Net from a folder or the Hub.
"""

from .models import ContinuousUNet2DModel, NFEStats
from .ode import NonFiniteStateError, ODESolverError, ODESolverSettings
from . import presets

__version__ = "0.1.0"

__all__ = [
    "ContinuousUNet2DModel",
    "NFEStats",
    "NonFiniteStateError",
    "ODESolverError",
    "ODESolverSettings",
    "presets",
]
