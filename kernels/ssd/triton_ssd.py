"""Triton SSD kernels: not written yet. Until they land, backend="triton" runs the chunked torch path
(ssd_torch), which is correct on every device but not tuned for GPUs."""
TRITON_SSD_AVAILABLE = False


def ssd_triton(*args, **kwargs):  # pragma: no cover - placeholder until the kernels land
    raise NotImplementedError("Triton SSD kernels are not available yet")
