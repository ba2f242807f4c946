"""``sy.federated.floptimizer`` (PySyft 0.2 path)."""

from veil.compat.floptimizer import Optims

__all__ = ["Optims"]
