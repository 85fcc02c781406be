from .interface import mamba_chunk_scan_combined
from .reference import ssd_minimal_discrete, ssd_sequential_ref

__all__ = ["mamba_chunk_scan_combined", "ssd_minimal_discrete", "ssd_sequential_ref"]
