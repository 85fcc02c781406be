from .conv import causal_conv1d_fn, causal_conv1d_ref, causal_conv1d_update
from .varlen import causal_conv1d_varlen_states

__all__ = ["causal_conv1d_fn", "causal_conv1d_ref", "causal_conv1d_update", "causal_conv1d_varlen_states"]
