"""diffusers-cunet: a continuous U-Net (second-order neural ODE blocks) denoiser for diffusers.

Importing the package registers `diffusers_cunet` with diffusers' pipeline loader, so
`DDPMPipeline.from_pretrained(...)` loads a saved continuous U-Net from a folder or the Hub.
"""

from .models import ContinuousUNet2DModel, NFEStats
from .ode import NonFiniteStateError, ODESolverError, ODESolverSettings
from . import presets
from .hub.loading import register_with_diffusers as _register_with_diffusers
from .pipelines import ContinuousUNetPipeline

# The class must be importable from the package before diffusers' loader tables point at it.
_register_with_diffusers()

__version__ = "0.1.0"

__all__ = [
    "ContinuousUNet2DModel",
    "ContinuousUNetPipeline",
    "NFEStats",
    "NonFiniteStateError",
    "ODESolverError",
    "ODESolverSettings",
    "presets",
]
