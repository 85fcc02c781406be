from .mamba_simple import InferenceParams, Mamba

__all__ = ["Mamba", "InferenceParams"]
