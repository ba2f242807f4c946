"""Secret values decide no shape, no success and no Python value of a requester-chosen op.

A serving owner computes on a client's share but may not learn it; what it
always learns of a command is whether it succeeded, the error text and the
result's shape. ``nonzero(x & 2)`` has as many rows as set bits,
``zeros(12)[x]`` fails iff some value is >= 12, ``1 // x`` iff one is 0,
``torch.zeros(x[:1])`` has ``x[0]`` elements: repeated per bit, each is the
whole share.

:func:`guard` runs a torch op whose inputs include *secret* values (a share
revealable only to someone else, dealt material) under a TorchDispatchMode
that follows them through every ATen op the call decomposes into (an
output computed from a secret is secret) and refuses, before the op runs:

* every ATen op not on the allowlist of data-oblivious ops
  (:mod:`veil.workers.oblivious_ops`): those whose shape or success depends
  on values (``nonzero``, ``one_hot``, ``linalg_cholesky``), and any op nobody
  has yet checked;
* a secret in an argument whose values may make an allowed op fail: indices,
  divisors, targets (``VALUE_CHECKED``);
* a secret turned into a Python value (``.item()``, ``int(t)``, a tensor used
  as a size, ``bool(t)``): every op returning a non-tensor from a secret;
* a secret read in Python with no ATen op at all (``tensordot``'s
  ``dims.tolist()``: the contracted dims, so the result's shape or failure,
  followed a serving client's share; ``tolist``, ``numpy``, ``__array__``; a
  secret listed in an index, ``x[([s],)]``, made a fresh index tensor in C++),
  seen by a TorchFunctionMode at each top-level torch call (each op of a plan).

The refusal depends only on the op and on which arguments are secret, never
on values. Errors of any command on a secret are value-free
(``owner_guard.client_error``).

Protocol steps (``veil.mpc.*``) are veil's code and the hot path (the guard
would make an FSS comparison ~3x slower): they are not followed, but a secret
may not be one of their public parameters (:func:`protocol_refusal`: shapes,
counts, divisors, flags), where it would become a Python value.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from veil.exceptions import PermissionDeniedError
from veil.messaging import messages as m
from veil.workers.oblivious_ops import OBLIVIOUS, VALUE_CHECKED, VALUE_SHAPED, converted_value


def _key(t: Any) -> int | None:
    if not isinstance(t, torch.Tensor) or t.is_meta:
        return None
    try:
        return t.untyped_storage().data_ptr() or None
    except (RuntimeError, NotImplementedError):
        return None


#: torch functions that read a tensor argument's values in Python, never through an ATen op (a dispatch mode sees
#: none): (position, name) of that argument. ``tensordot`` turns a tensor ``dims`` into lists with ``.tolist()``
READ_IN_PYTHON = {torch.tensordot: (2, "dims"), torch.Tensor.tolist: (0, "self"), torch.Tensor.numpy: (0, "self"),
                  torch.Tensor.__array__: (0, "self")}
#: torch functions whose index (argument 1) turns a list or tuple of tensors in it into a fresh index tensor in C++
#: (``x[([s],)]``, ``x[..., [s]]``: no ATen op reads ``s``, so its values would make the op fail unseen)
INDEX_LISTS = frozenset({torch.Tensor.__getitem__, torch.Tensor.__setitem__})


def _listed_in_index(index: Any, followed: set) -> bool:
    """Whether a followed tensor is inside a list or tuple item of ``index`` (a direct tensor item is read through
    ATen ops the dispatch guards see)."""
    items = index if type(index) in (tuple, list) else (index,)
    return any(type(v) in (tuple, list) and _touches((v,), followed) for v in items)


class ReadsInPython(TorchFunctionMode):
    """Sees each top-level torch call of a command (nested ones run with it off): refuses, with ``refuse(what)``,
    those that would read the values of a tensor whose storage is in ``followed`` in Python, where a dispatch mode
    sees no ATen op."""

    def __init__(self, followed: set, refuse: Any) -> None:
        super().__init__()
        self.followed, self.refuse = followed, refuse

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        where = READ_IN_PYTHON.get(func)
        if where is not None:
            pos, name = where
            value = args[pos] if len(args) > pos else kwargs.get(name)
            if _touches((value,), self.followed):
                raise self.refuse(f"a Python value ({getattr(func, '__name__', func)} reads {name!r})")
        elif func in INDEX_LISTS and len(args) > 1 and _listed_in_index(args[1], self.followed):
            raise self.refuse(f"a Python value ({func.__name__} reads a list in its index)")
        return func(*args, **kwargs)


class GuardsPythonReads(TorchDispatchMode):
    """A dispatch mode entered and left together with :class:`ReadsInPython` over the storages
    :meth:`_read_followed` names, refusing with the mode's ``_refuse``: the reads no ATen op shows are guarded
    exactly while its ops are."""

    def _read_followed(self) -> set:
        raise NotImplementedError

    def _refuse(self, why: str) -> Exception:
        raise NotImplementedError

    def __enter__(self) -> Any:
        self._reads = ReadsInPython(self._read_followed(), self._refuse)
        self._reads.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self._reads.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._reads.__exit__(*exc)


class _Oblivious(GuardsPythonReads):
    """Follows secret storages through one command and refuses value-dependent shapes, failures, scalars."""

    def __init__(self, op_name: str, secret: set[int]) -> None:
        super().__init__()
        self.op_name, self.secret = op_name, secret

    def _read_followed(self) -> set:
        return self.secret

    def _refuse(self, why: str) -> PermissionDeniedError:
        return PermissionDeniedError(f"{self.op_name}: {why} would depend on the values of a share you may not "
                                     "reveal; it is refused whatever the values")

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        secret = self.secret
        touched = _touches(args, secret) or (kwargs and _touches(tuple(kwargs.values()), secret))
        if not touched:
            return func(*args, **kwargs)
        name = func._schema.name
        if _touches((converted_value(func, args, kwargs),), secret):  # (masked_fill's overflow check)
            raise self._refuse(f"whether {name} succeeds (a value converted to the destination's dtype)")
        if name in OBLIVIOUS:
            pass
        elif name in VALUE_SHAPED:
            raise self._refuse(f"the shape of {name}")
        else:
            checked = VALUE_CHECKED.get(name)
            if checked is None:  # not known to be data-oblivious: refused, whatever torch does with values
                raise self._refuse(f"whether {name} succeeds or what it returns (not a data-oblivious op)")
            for i, a in enumerate(func._schema.arguments):
                if a.name in checked:
                    value = args[i] if i < len(args) else kwargs.get(a.name)
                    if _touches((value,), secret):
                        raise self._refuse(f"whether {name} succeeds ({a.name!r})")
        out = func(*args, **kwargs)
        for r in (out if type(out) in (tuple, list) else (out,)):
            if type(r) is torch.Tensor:
                k = _key(r)
                if k is not None:
                    secret.add(k)
            elif type(r) in (tuple, list):  # e.g. split: a list of tensors
                for t in r:
                    k = _key(t)
                    if k is not None:
                        secret.add(k)
            elif r is not None:  # .item(), a size, a branch: a secret leaves the ring as a Python value
                raise self._refuse(f"a Python value ({name})")
        return out


def _touches(values: tuple, secret: set) -> bool:
    """Whether a secret storage is among ``values`` (tensors, or lists of them: ``indices``, ``cat``)."""
    for v in values:
        if isinstance(v, torch.Tensor):
            if _key(v) in secret:
                return True
        elif type(v) in (tuple, list) and v and _touches(tuple(v), secret):
            return True
    return False


def guard(op_name: str, secret_values: list) -> contextlib.AbstractContextManager:
    """The context a requester-chosen torch op runs in when ``secret_values`` (its secret inputs) is not empty."""
    keys = {k for k in (_key(t) for t in secret_values) if k is not None}
    if not keys:
        return contextlib.nullcontext()
    return _Oblivious(op_name, keys)


#: parameters of protocol steps that are public values (sizes, counts, flags, divisors, PRG seeds), whatever their
#: annotation. A seed is the verifier's or dealer's random bytes, never a share: a stored object the requester may
#: not reveal, named as one, was read as bytes whose count decided success (red team:
#: test_redteam_session66_protocol_seeds.py). The public constant of the MAC steps (``mac_public``, ``mac_scale``,
#: ``mac_add_public``: ``public``), a split product's block sizes and slices (``product_join``,
#: ``mac_product_join``, ``product_pieces``) and an SGD step's integer factors (``sgd_flatten``) are the
#: orchestrator's public values too, annotated as tensors or lists: honest code sends them inline, never as a
#: stored object (red team: test_redteam_session66_openings.py)
PUBLIC_NAMES = frozenset({"shape", "spec", "count", "n_values", "columns", "width", "role", "level", "divisor",
                          "shift", "first", "negate", "op", "op_kwargs", "subtract", "kind", "key_id", "party_ids",
                          "ids", "seeded", "seed", "public", "block_sizes", "x_slices", "y_slices", "factors"})
#: annotations of parameters that take shares (tensors, or lists of them); every other annotated one is public
_SHARE_ANNOTATIONS = frozenset({"", "torch.Tensor", "Tensor", "list", "tuple", "Any", "Sequence", "Optional[torch.Tensor]"})


def protocol_refusal(op_name: str, func: Any, args: Any, kwargs: dict, secret: set) -> str | None:
    """Why the protocol step ``op_name`` (veil's own code, not followed by :func:`guard`: it is the hot path)
    may not run: a secret object (``secret``: ids) passed as one of its public parameters would become a
    Python value (a shape, a count, a branch, a divisor). None: it may run."""
    for pos, name in _public_parameters(op_name, func):
        if (pos < len(args) and any(r.id in secret for r in m.object_refs(args[pos]))) or (
                name in kwargs and any(r.id in secret for r in m.object_refs(kwargs[name]))):
            return f"{op_name}: a share you may not reveal cannot be its public parameter {name!r}"
    return None


#: (keyed by allowlisted protocol steps only: bounded, and never evicted; a first use costs microseconds once)
_PUBLIC_CACHE: dict[str, tuple] = {}


def _public_parameters(op_name: str, func: Any) -> tuple:
    """``(position, name)`` of a protocol step's public parameters (cached per step)."""
    cached = _PUBLIC_CACHE.get(op_name)
    if cached is not None:
        return cached
    import inspect

    from veil.mpc.party import PARTY_FUNCTIONS, step_name

    fn = PARTY_FUNCTIONS.get(step_name(op_name))
    skip = 0 if fn is not None else 1  # registered worker functions take the worker first
    try:
        params = list(inspect.signature(fn if fn is not None else func).parameters.values())[skip:]
    except (TypeError, ValueError):
        params = []
    out = []
    for i, p in enumerate(params):
        ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
        ann = "" if p.annotation is inspect.Parameter.empty else ann
        # A veil.mpc worker function that is no party step (a seeded share, a dealing, a MAC key, received
        # material) computes on nothing but what the requester or dealer sends as values: every parameter is
        # public, whatever its annotation, so that no such function (today's or a new one) reads a share it
        # may not reveal as its input (prg_share's seed was one; red team: test_redteam_session66_protocol_seeds)
        if fn is None or p.name in PUBLIC_NAMES or ann not in _SHARE_ANNOTATIONS:
            out.append((i, p.name))
    _PUBLIC_CACHE[op_name] = cached = tuple(out)
    return cached


def worker_function_refusal(op: Any, args: Any, kwargs: Any, secret: set) -> str | None:
    """Why worker function ``op`` outside ``veil.mpc`` may not run with the secret objects ``secret`` (ids) where the
    requester put them (``args``/``kwargs``: the command as sent), or None. Its parameters are public unless it
    registered them as ``secret_parameters`` (a plan's inputs and state): veil's worker functions read their
    arguments in Python (``tolist``, ``numpy``, a byte string, a hash, an encoding) where the guard's dispatch mode
    sees no ATen op, so a secret there could decide their success, error or timing (red team:
    test_redteam_session66_worker_params.py). Refused by position and name alone, whatever the values."""
    params = _worker_parameters(op)
    kwargs = kwargs if type(kwargs) is dict else {}
    named = [(params[i] if i < len(params) else None, v) for i, v in enumerate(args or ())]
    named += list(kwargs.items())
    for name, value in named:
        if name in op.secret_parameters:
            continue
        if any(r.id in secret for r in m.object_refs(value)):
            shown = name if type(name) is str else "(an extra argument)"
            return f"{op.name}: a share you may not reveal cannot be its public parameter {shown!r}"
    return None


_WORKER_PARAMS: dict[str, list] = {}


def _worker_parameters(op: Any) -> list:
    """The names of a worker function's parameters after the worker, in order (cached per allowlisted name)."""
    cached = _WORKER_PARAMS.get(op.name)
    if cached is None:
        import inspect

        try:
            params = list(inspect.signature(op.func).parameters.values())[1:]
        except (TypeError, ValueError):
            params = []
        cached = _WORKER_PARAMS[op.name] = [p.name for p in params
                                            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return cached
