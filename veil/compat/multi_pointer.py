"""``x.send(bob, alice)``: one tensor sent to several workers (PySyft's MultiPointerTensor).

The result holds one ordinary pointer per worker (``.child``: worker id ->
pointer). Tensor methods and arithmetic run on every copy and give a new
MultiPointer; ``.get()`` returns the list of values (or their sum with
``sum_results=True``, PySyft's option).
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch


class MultiPointer:
    """Pointers to copies of one tensor on several workers."""

    def __init__(self, pointers: dict[str, Any]) -> None:
        self.child = dict(pointers)

    @classmethod
    def send(cls, tensor: torch.Tensor, workers: tuple, **kwargs: Any) -> "MultiPointer":
        from veil.api import send

        ids = [w.id for w in workers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"send() to several workers needs distinct workers, got {ids}")
        return cls({w.id: send(tensor, w, **kwargs) for w in workers})

    @property
    def locations(self) -> list:
        return [p.location for p in self.child.values()]

    @property
    def shape(self) -> torch.Size:
        return next(iter(self.child.values())).shape

    def __len__(self) -> int:
        return len(self.child)

    def __getitem__(self, worker_id: str) -> Any:
        return self.child[worker_id]

    def get(self, sum_results: bool = False) -> Any:
        values = [p.get() for p in self.child.values()]
        if not sum_results:
            return values
        # copies of one tensor have one shape: a sum never broadcasts the workers' answers (a column of n from
        # one and a row of n from another made n x n values here)
        shapes = {wid: tuple(getattr(v, "shape", ())) for wid, v in zip(self.child, values)}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"the workers answered values of different shapes, not copies of one tensor: {shapes}")
        return sum(values[1:], values[0])

    def _map(self, fn: Callable[[Any], Any]) -> "MultiPointer":
        return MultiPointer({wid: fn(p) for wid, p in self.child.items()})

    def _binary(self, other: Any, op: Callable[[Any, Any], Any]) -> "MultiPointer":
        if isinstance(other, MultiPointer):
            if other.child.keys() != self.child.keys():
                raise ValueError("both operands must live on the same workers")
            return MultiPointer({wid: op(p, other.child[wid]) for wid, p in self.child.items()})
        return self._map(lambda p: op(p, other))

    def __add__(self, other: Any) -> "MultiPointer":
        return self._binary(other, operator.add)

    def __sub__(self, other: Any) -> "MultiPointer":
        return self._binary(other, operator.sub)

    def __mul__(self, other: Any) -> "MultiPointer":
        return self._binary(other, operator.mul)

    def __truediv__(self, other: Any) -> "MultiPointer":
        return self._binary(other, operator.truediv)

    def __matmul__(self, other: Any) -> "MultiPointer":
        return self._binary(other, operator.matmul)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "child":
            raise AttributeError(name)
        method = getattr(torch.Tensor, name, None)
        if method is None or not callable(method):
            raise AttributeError(f"MultiPointer has no attribute {name!r}")
        return lambda *args, **kwargs: self._map(lambda p: getattr(p, name)(*args, **kwargs))

    def __repr__(self) -> str:
        inner = "\n".join(f"\t{wid} -> {p!r}" for wid, p in self.child.items())
        return f"[MultiPointer]\n{inner}"
