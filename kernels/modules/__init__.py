from .mamba2 import Mamba2, RMSNormGated
from .mamba_simple import InferenceParams, Mamba

__all__ = ["Mamba", "Mamba2", "RMSNormGated", "InferenceParams"]
