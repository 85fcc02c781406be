from .interface import selective_scan_fn
from .mamba_inner import mamba_inner_fn
from .reference import selective_scan_ref

__all__ = ["selective_scan_fn", "selective_scan_ref", "mamba_inner_fn"]
