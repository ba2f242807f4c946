"""PySyft 0.2's ``sy.frameworks`` paths, re-exporting veil.compat (nothing is defined here)."""

from veil.frameworks import torch  # noqa: F401
