"""``sy.frameworks.torch``: PySyft 0.2 paths (``fl``, ``dp``, ``nn``)."""

from veil.frameworks.torch import dp, fl, nn  # noqa: F401
