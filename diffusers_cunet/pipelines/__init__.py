from .pipeline_cunet import ContinuousUNetPipeline


__all__ = ["ContinuousUNetPipeline"]
