"""``sy.frameworks.torch.dp.pate`` (PySyft 0.2 path); veil's own PATE tools are in ``veil.dp.pate``."""

from veil.compat.pate_analysis import perform_analysis, perform_analysis_torch

__all__ = ["perform_analysis", "perform_analysis_torch"]
