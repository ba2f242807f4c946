"""``sy.frameworks.torch``: PySyft 0.2 paths (``fl``, ``dp``)."""

from veil.frameworks.torch import dp, fl  # noqa: F401
