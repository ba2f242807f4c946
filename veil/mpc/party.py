"""Party functions: one protocol step run by each party on its own shares.

A protocol (Beaver, truncation, comparison) is written as a few *party
functions* (pure torch code on one party's shares and public values) and two
ways of running them:

* :func:`run_party` computes a step whose result stays with the party (a new
  share). For a remote share it is **one command message** to that party; the
  result's shape is found locally by running the function on meta tensors.
* :func:`open_parties` runs an *openable* step on every party and sums the
  results: an opening. For remote shares it is **one message per party** (an
  :class:`OpenMessage`, whose reply carries the step's output), all in flight
  at once (one round). Only functions registered with ``openable=True`` may be opened, and
  each of them outputs values masked by dealer randomness (``x - a``).

Local shares (plain tensors) run the same functions in-process, so the
protocol code is identical for simulations and for workers. Remote shares
are reached through the injected party runtime (:mod:`veil.mpc.runtime`);
this module knows no transport and no pointer class.

Trust model (semi-honest, as PySyft 0.2 and CrypTen): the orchestrator relays
openings of masked values; it never receives an unmasked share through this
module (it can still ``.get()`` pointers it owns, like any PySyft user).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Hashable, Mapping, Optional, Sequence

import torch
from torch.utils._pytree import tree_map

from veil.messaging import messages as m
from veil.messaging.allowlist import register_worker_function
from veil.mpc import wire_ops  # noqa: F401  (allowlists aten ops on shares)
from veil.mpc.errors import MPCError
from veil.mpc.opening import record_opening
from veil.mpc.output_buffers import is_buffer
from veil.mpc.runtime import PartyRuntime, runtime_of

#: name -> pure party function (explicit registry; see ``party_function``)
PARTY_FUNCTIONS: dict[str, Callable[..., Any]] = {}
#: names whose outputs may be returned to the orchestrator (masked values only)
OPENABLE: set[str] = set()
#: openable names whose outputs are XOR shares (combined by ``^``, not ``+``)
XOR_OPENABLE: set[str] = set()
#: openable names whose first n outputs are XOR shares and the rest additive (two openings in one round)
XOR_LEADING: dict[str, int] = {}
#: steps of a few elementwise passes per tensor (a Beaver or truncation mask, a truncation finish): the
#: runtime weighs their tensors lighter when it decides whether in-process parties take threads
LIGHT: set[str] = set()
#: steps that only read their tensor arguments and return fresh tensors: an in-process worker may decode a
#: request made only of them without copying its tensors (``veil.workers.virtual``; the opened e, f, c)
BORROWS: set[str] = set()

WIRE_PREFIX = "veil.mpc."


def step_name(op: Any) -> Optional[str]:
    """The party function name in a wire op name (``veil.mpc.<name>``), or None for any other op name or value
    (registered or not: callers look the name up in the registry they need)."""
    return op[len(WIRE_PREFIX):] if type(op) is str and op.startswith(WIRE_PREFIX) else None


def party_function(name: str, openable: bool = False, xor: bool | int = False,
                   light: bool = False, borrows: bool = False) -> Callable[[Callable], Callable]:
    """Registers a party function and allowlists it as a worker function.

    ``xor``: an openable step whose outputs are XOR (boolean) shares; an int
    ``n``: its first ``n`` outputs are, the others additive. ``light``: a few
    elementwise passes per tensor (:data:`LIGHT`). ``borrows``: it writes into
    no argument and returns no argument's memory (:data:`BORROWS`).
    """

    def register(fn: Callable) -> Callable:
        if name in PARTY_FUNCTIONS:
            raise ValueError(f"party function {name!r} is already registered")
        PARTY_FUNCTIONS[name] = fn
        if light:
            LIGHT.add(name)
        if borrows:
            BORROWS.add(name)
        if openable:
            OPENABLE.add(name)
            if xor is True:
                XOR_OPENABLE.add(name)
            elif xor:
                XOR_LEADING[name] = int(xor)
        register_worker_function(WIRE_PREFIX + name, lambda worker, *a, **k: fn(*a, **k))
        return fn

    return register


@m.register_message
@dataclass
class OpenMessage:
    """Run an openable party function and return its outputs (one opening share).

    The handler (a worker's side) is registered by the worker runtime,
    :mod:`veil.tensors.mpc_glue.runtime`; it asks the reference monitor first.
    """

    TYPE: ClassVar[int] = 40
    name: str = ""
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if type(self.args) is list:
            self.args = tuple(self.args)


def check_openable(name: Any, kwargs: Any) -> None:
    """Refuses a request to open anything but a registered openable step."""
    if not isinstance(name, str) or name not in OPENABLE:
        raise MPCError(f"{name!r} is not an openable protocol step")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise MPCError("OpenMessage kwargs must be a map with string keys")


def run_openable(name: str, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """Runs openable step ``name`` on one party's (resolved) shares; its outputs as a list."""
    check_openable(name, kwargs)
    with torch.no_grad():
        out = PARTY_FUNCTIONS[name](*args, **kwargs)
    outputs = list(out) if isinstance(out, (tuple, list)) else [out]
    if not all(isinstance(o, torch.Tensor) for o in outputs):
        raise MPCError(f"{name} must return tensors")
    # Outputs are the reply's alone (a server sends them from their memory after the handler returns; an
    # in-process worker hands that memory to the caller, who sums into it): one that shares memory with an
    # argument (a stored share) or with an earlier output is copied; output k written into the runner's
    # buffer k (veil.mpc.output_buffers: disjoint pieces of memory no argument is in) is its own.
    stored = {a.untyped_storage().data_ptr() for a in m.arg_leaves((args, kwargs))  # (pytree's walk: ~3x slower)
              if isinstance(a, torch.Tensor) and a.numel()}
    held, own = set(stored), []
    for k, o in enumerate(outputs):
        if o.numel():
            at = o.untyped_storage().data_ptr()
            if at in stored or (at in held and not is_buffer(o, k)):
                o = o.clone()
            held.add(o.untyped_storage().data_ptr())
        own.append(o)
    return own


def _party_of(values: Any) -> tuple[Optional[PartyRuntime], Any]:
    """The runtime and party of the one remote location among ``values`` ((None, None) if all local)."""
    runtime, party = None, None
    for leaf in m.arg_leaves(values):  # lists, tuples, dicts: pytree's walk costs ~3x more per step
        rt = runtime_of(leaf)
        if rt is None:
            continue
        where = rt.location(leaf)
        if runtime is None:
            runtime, party = rt, where
        elif where is not party:
            name = lambda w: getattr(w, "id", w)  # noqa: E731
            raise MPCError(f"a party step mixes shares on {name(party)!r} and {name(where)!r}")
    return runtime, party


def _meta(value: Any) -> Any:
    def to_meta(v):
        if isinstance(v, torch.Tensor):
            return torch.empty(tuple(v.shape), dtype=v.dtype, device="meta")
        return v

    return tree_map(to_meta, value)


#: (step, argument shapes/dtypes and public values) -> output tree on meta tensors. Kept in the orchestrator's
#: process (a scientist's own, or a serving owner's for its clients): cleared when full, so a client sending
#: many shapes makes others' next steps pay a meta run again (~0.1 ms beside a protocol round's network
#: time), and a hit says only that a step of those public shapes ran there -- kept as is
_META_OUT: dict[tuple, Any] = {}
_META_CACHE_SIZE = 4096


def _shape_key(v: Any) -> Any:
    """``v``'s structure, tensor shapes and dtypes, and public scalars, as a hashable (one walk)."""
    tp = type(v)
    if tp is list or tp is tuple:
        return (tp is list, *map(_shape_key, v))
    if tp is dict:
        return ("d", *((k, _shape_key(x)) for k, x in v.items()))
    if isinstance(v, torch.Tensor):
        rt = runtime_of(v)
        return rt.describe(v) if rt is not None else (tuple(v.shape), v.dtype)
    if v is None or tp in (bool, int, float, str):
        return (tp, v)
    raise TypeError("not cacheable")  # (a builtin: veil's own exception classes all cross the wire)


def _signature(name: str, args: tuple, kwargs: dict) -> Optional[tuple]:
    """A hashable description of a step's inputs that fixes its output shapes (None: not cacheable)."""
    try:
        return name, _shape_key(args), _shape_key(kwargs)
    except TypeError:  # a value no key describes: the step is not cached
        return None


def _output_meta(name: str, fn: Callable, args: tuple, kwargs: dict) -> Any:
    """The step's output shapes, found by running it on meta tensors (cached per signature)."""
    key = _signature(name, args, kwargs)
    out = _META_OUT.get(key) if key is not None else None
    if out is None:
        out = fn(*_meta(args), **_meta(kwargs))
        if key is not None:
            if len(_META_OUT) >= _META_CACHE_SIZE:
                _META_OUT.clear()
            _META_OUT[key] = out
    return out


def run_party(name: str, *args: Any, _defer: bool = False, **kwargs: Any) -> Any:
    """Runs party function ``name`` where its share arguments live.

    ``_defer`` is accepted for callers written against the earlier opt-in:
    every remote step now rides on the party's next request (the runtime's
    queue, see :meth:`veil.mpc.runtime.PartyRuntime.run_on_party`).

    Returns:
        The function's output: local tensors, or handles to the results on
        the party (same tree structure). A remote step may ride on the next
        request to that party (its error, if any, is raised there).
    """
    fn = PARTY_FUNCTIONS[name]
    runtime, _ = _party_of((args, kwargs))
    if runtime is None:
        return fn(*args, **kwargs)
    return runtime.run_on_party(name, args, kwargs, _output_meta(name, fn, args, kwargs))


def open_parties(name: str, per_party: Mapping[Hashable, tuple], **kwargs: Any) -> list[torch.Tensor]:
    """Runs an openable step on every party and sums the outputs (one round).

    Remote parties get their requests all at once (see
    :meth:`veil.mpc.runtime.PartyRuntime.open_on_parties`); local shares are
    computed here.

    Args:
        name: An openable party function returning a tuple of tensors.
        per_party: party -> positional arguments for that party.
        **kwargs: Public keyword arguments, identical for every party.

    Returns:
        The opened values (sums over parties in Z/2^64), in output order.
    """
    if name not in OPENABLE:
        raise MPCError(f"{name!r} is not an openable protocol step")
    fn = PARTY_FUNCTIONS[name]
    outputs: list = [None] * len(per_party)
    remote: dict[int, list[int]] = {}  # id(runtime) -> positions
    runtimes: dict[int, PartyRuntime] = {}
    all_args = list(per_party.values())
    for k, args in enumerate(all_args):
        runtime, _ = _party_of(args)
        if runtime is None:
            out = fn(*args, **kwargs)
            outputs[k] = list(out) if isinstance(out, (tuple, list)) else [out]
        else:
            runtimes[id(runtime)] = runtime
            remote.setdefault(id(runtime), []).append(k)
    received: set[int] = set()  # positions whose outputs were decoded for this round alone (ours to overwrite)
    for key, idx in remote.items():
        for k, out in zip(idx, runtimes[key].open_on_parties(name, [tuple(all_args[k]) for k in idx], kwargs)):
            outputs[k] = list(out)
            received.add(k)
    totals: list[torch.Tensor] | None = None
    n_xor = sys.maxsize if name in XOR_OPENABLE else XOR_LEADING.get(name, 0)  # outputs combined by ^
    # Sum into a received reply's tensors when there is one (no new tensor of the opened size per value)
    first = min(received) if received else 0
    outputs = [outputs[first]] + outputs[:first] + outputs[first + 1:]
    in_place = bool(received)
    for out in outputs:
        if totals is not None and (len(out) != len(totals) or any(
                not isinstance(o, torch.Tensor) or o.shape != t.shape or o.dtype != t.dtype
                for o, t in zip(out, totals))):
            # a deviating party (or a broken one) must not corrupt the value silently by broadcasting
            raise MPCError(f"{name}: the parties' opening replies differ in count, shape or dtype")
        if totals is None:
            totals = out
        elif in_place and all(t.is_contiguous() and not t.requires_grad for t in totals):
            for j, (t, o) in enumerate(zip(totals, out)):
                if j < n_xor:
                    t.bitwise_xor_(o)
                else:
                    t.add_(o)  # int64 addition wraps: sum mod 2^64
        else:
            totals = [t ^ o if j < n_xor else t + o for j, (t, o) in enumerate(zip(totals, out))]
    n = len(per_party)
    per_party_bytes = (n - 1) * sum(t.numel() * t.element_size() for t in totals)  # its share of every entry
    record_opening(n * (n - 1) * ring_words(totals), {p: per_party_bytes for p in per_party})
    return totals


def ring_words(tensors: Sequence[torch.Tensor]) -> int:
    """The tensors' size in 8-byte ring words (int64 shares: one per entry; bits packed 8 to a uint8: 1/64 each)."""
    return sum((t.numel() * t.element_size() + 7) // 8 for t in tensors)


def open_at_parties(name: str, per_party: Mapping[Hashable, tuple], **kwargs: Any) -> dict[Hashable, list]:
    """Opens an openable step where the opened values are used: party -> the opened values, in output order.

    When every party is remote on one runtime that can open among the parties
    (:meth:`veil.mpc.runtime.PartyRuntime.open_at_parties`: peer openings between network
    workers), the parties exchange their outputs directly and each gets handles to the
    opened values on itself; otherwise this is :func:`open_parties` (the star) and every
    party gets the same public tensors. Either way one round, counted the same.
    """
    opened = _open_among_parties(name, per_party, kwargs, top_bits=False)
    if opened is not None:
        return opened
    totals = open_parties(name, per_party, **kwargs)
    return {p: totals for p in per_party}


def open_top_bits_at_parties(name: str, per_party: Mapping[Hashable, tuple], **kwargs: Any) -> dict | None:
    """A peer opening of a one-output step in which only the first party keeps the opened value and every
    other party keeps its top bits packed 8 to a uint8 byte (truncation: :mod:`veil.mpc.truncation`):
    party -> [handle]. The others send their shares to the first party only, and it sends back 1/64 of
    the bytes. None when these parties cannot open among themselves (the caller opens through the star)."""
    return _open_among_parties(name, per_party, kwargs, top_bits=True)


def _open_among_parties(name: str, per_party: Mapping[Hashable, tuple], kwargs: dict,
                        top_bits: bool) -> dict[Hashable, list] | None:
    if name not in OPENABLE:
        raise MPCError(f"{name!r} is not an openable protocol step")
    runtime, where = None, []
    for args in per_party.values():
        rt, party = _party_of(args)
        if rt is None or (runtime is not None and rt is not runtime) or any(party is w for w in where):
            return None
        runtime = rt
        where.append(party)
    if runtime is None or len(where) < 2 or not runtime.opens_among(where):
        return None
    all_args = [tuple(a) for a in per_party.values()]
    out = _output_meta(name, PARTY_FUNCTIONS[name], all_args[0], kwargs)
    meta = list(out) if isinstance(out, (tuple, list)) else [out]
    if top_bits and len(meta) != 1:
        raise MPCError(f"{name}: a top-bits opening opens one value, not {len(meta)}")
    opened = runtime.open_at_parties(name, all_args, kwargs, meta, top_bits=True) if top_bits \
        else runtime.open_at_parties(name, all_args, kwargs, meta)
    if opened is None:
        return None
    n = len(per_party)
    numel = sum(t.numel() for t in meta)
    if top_bits:  # the others' shares to the first party, the packed bits back: counted as one round
        first, *rest = per_party
        record_opening((n - 1) * numel, {first: (n - 1) * ((numel + 7) // 8), **{p: 8 * numel for p in rest}})
    else:
        nbytes = sum(t.numel() * t.element_size() for t in meta)
        record_opening(n * (n - 1) * ring_words(meta), {p: (n - 1) * nbytes for p in per_party})
    return dict(zip(per_party, opened))
