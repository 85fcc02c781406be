from .conv import causal_conv1d_fn, causal_conv1d_ref, causal_conv1d_update

__all__ = ["causal_conv1d_fn", "causal_conv1d_ref", "causal_conv1d_update"]
