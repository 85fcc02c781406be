"""Shared test helpers."""
import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-relative error of a against the reference b, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
