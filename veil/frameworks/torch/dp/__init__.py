"""``sy.frameworks.torch.dp`` (PySyft 0.2 path)."""

from veil.frameworks.torch.dp import pate  # noqa: F401
