"""``sy.grid`` (PySyft 0.2 path): searching several workers at once."""

from veil.compat.grid import PrivateGridNetwork

__all__ = ["PrivateGridNetwork"]
