"""Inputs from other languages: shapes, counts and tensors as R (reticulate) or numpy hand them over.

Where serving expects a torch tensor, a shape or a count, it also accepts:

* **numpy arrays** (any memory order) and anything ``numpy.asarray`` takes:
  nested lists, Python numbers, Keras/TF tensors that convert to numpy;
* from **R through reticulate**: a numeric vector arrives as a list of floats
  (one value as a float), a matrix or array as a numpy array, ``NULL`` as
  ``None``, ``3L`` as an int and ``3`` as a float.

Layout: reticulate keeps R's *indexing*: ``x[i, j, k]`` in R is
``x[i-1, j-1, k-1]`` here, whatever the storage order (R stores arrays
column-major; the numpy array is Fortran-ordered and converted as such). What
does not survive is R's *fill order*: ``array(v, dim = c(1, 28, 28, 1))``
fills the first index fastest, so a row-major flattened image ``v`` ends up
transposed. Use ``reticulate::array_reshape(v, c(1, 28, 28, 1))`` (row-major,
like numpy and torch) for flattened data. A flat vector is never reshaped for
you: the error names the shape the model expects.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch

from veil.serving.errors import ServingError


def as_count(value: Any, what: str = "count") -> Optional[int]:
    """``3``, ``3L`` (R), ``3.0`` or a one-element array -> 3; ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor) or hasattr(value, "__array__"):
        value = torch.as_tensor(_numpy(value)).reshape(-1).tolist()
        if len(value) != 1:
            raise ServingError(f"{what} must be one number, got {len(value)}")
        value = value[0]
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    # NaN/Inf first (R's NA_real_, Inf): int() of them raises ValueError/OverflowError, not a ServingError
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or float(value) != int(value)):
        raise ServingError(f"{what} must be a whole number, got {value!r}")
    return int(value)


def as_shape(shape: Any, what: str = "shape") -> Optional[tuple]:
    """``c(1, 28, 28, 1)`` (floats), a tuple, a ``torch.Size`` or a numpy array -> ``(1, 28, 28, 1)``."""
    if shape is None:
        return None
    if isinstance(shape, numbers.Real):  # an R vector of length one arrives as a scalar
        shape = [shape]
    if isinstance(shape, torch.Tensor) or hasattr(shape, "__array__"):
        shape = torch.as_tensor(_numpy(shape)).reshape(-1).tolist()
    if not isinstance(shape, (list, tuple, torch.Size)):
        raise ServingError(f"{what} must be a sequence of whole numbers, got {type(shape).__name__}")
    dims = []
    for d in shape:
        if d is None:  # Keras writes an unknown batch size as None: one request
            d = 1
        if (isinstance(d, bool) or not isinstance(d, numbers.Real) or not math.isfinite(d)
                or float(d) != int(d) or int(d) < 0):
            raise ServingError(f"{what} must be whole numbers >= 0, got {list(shape)!r}")
        dims.append(int(d))
    return tuple(dims)


def as_tensor(x: Any) -> torch.Tensor:
    """A float tensor from a torch tensor, numpy array, R vector/matrix/array or nested list.

    Raises:
        ServingError: ``x`` is ``None`` or not numeric.
    """
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise ServingError("complex inputs are not supported: the model takes real numbers")
        return x.detach()
    if x is None:
        raise ServingError("no input given (NULL / None); pass a tensor, numpy array or R array")
    try:
        arr = _numpy(x)
        if arr.dtype.kind == "c":  # a float cast would silently drop the imaginary part: another input
            raise ServingError("complex inputs are not supported: the model takes real numbers")
        return torch.as_tensor(arr, dtype=torch.float32)
    except (TypeError, ValueError) as e:
        raise ServingError(f"cannot use a {type(x).__name__} as a tensor: {e}") from None


def _numpy(x: Any) -> Any:
    import numpy as np

    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor inside a Keras wrapper
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise TypeError("not a numeric array")
    return np.ascontiguousarray(arr)  # Fortran-ordered arrays from R keep their indexing
