"""Models: the continuous U-Net and its building blocks."""

from .blocks import AccelerationField, DynamicBlock, InitialVelocityNetwork, SpatialSelfAttention
from .unet_continuous import ContinuousUNet2DModel, NFEStats

__all__ = [
    "AccelerationField",
    "ContinuousUNet2DModel",
    "DynamicBlock",
    "InitialVelocityNetwork",
    "NFEStats",
    "SpatialSelfAttention",
]
