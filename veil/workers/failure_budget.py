"""Whether a command on values under review fails: no free bit a command.

An op may fail on the values of its arguments (an index out of range, a zero
integer divisor, a probability outside [0, 1], a singular matrix), and the
scientist sees whether a command failed without the owner's review. Repeated
with a shifted threshold (``take(zeros(2), (v < c).long() * 5)``,
``bernoulli(v - c)``), it is a binary search of a value under review.

:mod:`veil.workers.value_shapes` follows reviewed values through each command's
ATen ops and asks this module, before each op that touches one:

* :func:`refusal`: ops whose success follows a reviewed *value-dependent*
  argument that honest training has no use for are refused up front, whatever
  the values (one line, no bit): a distribution's parameters (``bernoulli``'s
  probabilities, ``poisson``'s rates, ``normal``'s std; ``bernoulli_(0.5)`` and
  dropout on reviewed data keep working: their probability is public),
  matrix decompositions and solvers (``linalg_*``, ``cholesky``, ``inverse``),
  integer division, remainder and fmod by a reviewed divisor (float division
  never fails), and torch's own asserts on a reviewed tensor;
* :func:`may_fail`: the ops honest training needs (targets of ``nll_loss``,
  indices of ``embedding``, ``gather``, ``index``, ``scatter``; any op not known
  to be data-oblivious, ``binary_cross_entropy`` for one; a one-element value
  ``masked_fill`` / ``index_fill`` / ``index_put`` convert to the destination's
  other dtype, which fails on overflow: ``converted_value``) run as in plain torch.
  A command that ran one of them on reviewed values and then failed is
  *counted* against its user and each reviewed dataset it read
  (:func:`end`); past the owner's budget (:data:`DEFAULT_BUDGET` failures,
  :func:`set_budget`), further commands of that user on that dataset are
  refused in one line, audited (:func:`spent`), until the owner forgives them
  (:func:`forgive`) or the worker restarts. Counted per user, not per
  connection: a new session would otherwise start a fresh budget. A running
  command holds a place in the budget (:func:`begin`, :func:`end`): commands
  running at once (plan runs and fits give up their turn between steps) could
  otherwise each fail once past it.

Failures of commands whose reviewed values entered only data-oblivious ops
(shape mismatches, dtype errors) are not counted: they follow no value.
What is left: success itself still answers each counted command, so over N
such commands with at most B failures a user learns at most
log2(sum_{i<=B} C(N, i)) <= B log2(e N / B) + 1 bits of a dataset (before: N).
Not counted: a command's time, which can follow reviewed values (a gather from
a large table is ~60 ms slower by 2^20 spread indices than by equal ones), nor
a deadline it then meets. Protocol steps (``veil.mpc.*``) are followed and
counted as torch ops are; a peer worker's requests never read reviewed data
(refused, counted against no one: see :mod:`veil.workers.value_shapes`).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from veil.workers.oblivious import _touches
from veil.workers.oblivious_ops import OBLIVIOUS, VALUE_CHECKED, converted_value

#: failures of value-dependent commands a user may have on one dataset under review (the owner may change it)
DEFAULT_BUDGET = 8
#: (user, dataset) counts one worker keeps; past it, a user's failures on further datasets share one count
#: (user, None), which refuses that user on every dataset once spent (dropping counts gave near-spent ones a
#: fresh budget)
MAX_COUNTS = 65_536

#: distribution ops -> arguments whose values make them fail (bernoulli's "self" is its probabilities only in
#: overloads without a "p": see _distribution_arguments)
_DISTRIBUTIONS = {
    "aten::bernoulli": frozenset({"p"}), "aten::bernoulli_": frozenset({"p"}), "aten::poisson": frozenset({"self"}),
    "aten::binomial": frozenset({"count", "prob"}), "aten::_standard_gamma": frozenset({"self"}),
    "aten::_sample_dirichlet": frozenset({"self"}), "aten::normal": frozenset({"std"}),
    "aten::_assert_async": frozenset({"self"}), "aten::_functional_assert_async": frozenset({"self"}),
}
#: decompositions and solvers beyond the linalg_ names (they fail on singular, indefinite or NaN matrices)
_LINALG = frozenset(f"aten::{n}" for n in (
    "cholesky", "cholesky_solve", "cholesky_inverse", "_cholesky_solve_helper", "inverse", "lu_solve", "_lu_with_info",
    "lu_unpack", "triangular_solve", "geqrf", "ormqr", "orgqr", "svd", "symeig", "eig", "lstsq", "det", "logdet",
    "slogdet", "pinverse", "matrix_power", "matrix_exp", "_linalg_check_errors"))
#: integer division by the argument "other" fails on a zero
_DIVISIONS = frozenset(f"aten::{n}" for n in ("div", "div_", "floor_divide", "floor_divide_", "remainder",
                                              "remainder_", "fmod", "fmod_"))
_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)


def refusal(func: Any, args: tuple, kwargs: dict, reviewed: set) -> str | None:
    """What ATen op ``func`` (touching a reviewed storage) may not do with one, or None: its success would follow
    a reviewed value-dependent argument honest training does not pass (decided by names and dtypes only)."""
    name = func._schema.name
    if name in _DISTRIBUTIONS:
        for arg in _distribution_arguments(func, name):
            if _touches((_argument(func, args, kwargs, arg),), reviewed):
                return f"whether {name} succeeds (its {arg!r})"
    elif name in _LINALG or (name.startswith(("aten::linalg_", "aten::_linalg_")) and name not in OBLIVIOUS):
        return f"whether {name} succeeds (a decomposition or solver)"
    elif name in _DIVISIONS:
        divisor = _argument(func, args, kwargs, "other")
        if _touches((divisor,), reviewed) and _integral(func, args, kwargs, divisor):
            return f"whether {name} succeeds (an integer divisor)"
    return None


def may_fail(func: Any, args: tuple, kwargs: dict, reviewed: set) -> bool:
    """Whether ATen op ``func`` (touching a reviewed storage) may fail on reviewed values: a reviewed index,
    target or divisor (``VALUE_CHECKED``), or any op not known to be data-oblivious."""
    name = func._schema.name
    if _touches((converted_value(func, args, kwargs),), reviewed):  # (masked_fill's overflow check)
        return True
    if name in OBLIVIOUS:
        return False
    checked = VALUE_CHECKED.get(name)
    if checked is None:
        return True
    return any(_touches((_argument(func, args, kwargs, arg),), reviewed) for arg in checked)


def _distribution_arguments(func: Any, name: str) -> frozenset:
    if name == "aten::bernoulli" and func._schema.overload_name in ("", "out"):
        return frozenset({"self"})  # bernoulli(p): the tensor is the probabilities
    return _DISTRIBUTIONS[name]


def _argument(func: Any, args: tuple, kwargs: dict, name: str) -> Any:
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            return args[i] if i < len(args) else kwargs.get(name)
    return None


def _integral(func: Any, args: tuple, kwargs: dict, divisor: Any) -> bool:
    """Whether the division runs in an integer dtype (a zero divisor raises; in floats it gives inf or NaN)."""
    name = func._schema.name
    if name in ("aten::div", "aten::div_") and _argument(func, args, kwargs, "rounding_mode") is None:
        return False  # true division
    dividend = _argument(func, args, kwargs, "self")
    try:
        dtype = (torch.result_type(dividend, divisor) if isinstance(dividend, torch.Tensor)
                 else torch.result_type(divisor, dividend))
    except (TypeError, RuntimeError):
        return True  # not understood: as if integral (refused)
    return dtype not in _FLOATING


class _Counts:
    """One worker's failure counts: (user, dataset) -> failures, and the owner's budget."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.budget = DEFAULT_BUDGET
        self.failures: dict[tuple, int] = {}
        #: (user, dataset) -> its commands running now: each holds a place in the budget until it ends (commands
        #: that give up their turn, long plan runs and fits in several sessions, would each fail once past it)
        self.running: dict[tuple, int] = {}


_WORKERS_LOCK = threading.Lock()


def _counts(worker: Any) -> _Counts:
    counts = worker.__dict__.get("_review_failures")
    if counts is None:
        with _WORKERS_LOCK:
            counts = worker.__dict__.setdefault("_review_failures", _Counts())
    return counts


def set_budget(worker: Any, failures: int) -> None:
    """The owner's budget: failures of value-dependent commands a user may have on one dataset under review."""
    if type(failures) is not int or failures < 1:
        raise ValueError(f"the failure budget must be an int >= 1, got {failures!r}")
    _counts(worker).budget = failures


def budget(worker: Any) -> int:
    return _counts(worker).budget


def forgive(worker: Any, user: str | None = None) -> None:
    """The owner's reset of ``user``'s counts (everyone's when None)."""
    counts = _counts(worker)
    with counts.lock:
        for key in [k for k in counts.failures if user is None or k[0] == user]:
            del counts.failures[key]


def spent(worker: Any, user: str, sources: frozenset) -> bool:
    """Whether ``user`` has spent its failure budget on one of the datasets ``sources``."""
    counts = _counts(worker)
    if not counts.failures:
        return False
    budget, failures = counts.budget, counts.failures
    return failures.get((user, None), 0) >= budget or any(failures.get((user, s), 0) >= budget for s in sources)


def begin(worker: Any, user: str, sources: frozenset) -> bool:
    """Holds a place for a command of ``user`` on ``sources`` about to run (False, holding none, when its failures
    and running commands fill the budget on one of them); :func:`end` gives it back."""
    counts = _counts(worker)
    with counts.lock:
        failures, running, budget = counts.failures, counts.running, counts.budget
        if (failures.get((user, None), 0) >= budget
                or any(failures.get((user, s), 0) + running.get((user, s), 0) >= budget for s in sources)):
            return False
        for s in sources:
            running[(user, s)] = running.get((user, s), 0) + 1
    return True


def end(worker: Any, user: str, sources: frozenset, failed: bool) -> list:
    """A command :func:`begin` held a place for ended; ``failed``: it failed after an op that may fail on reviewed
    values, counted on each of ``sources`` at once (under the same lock). The datasets whose budget it spent."""
    counts = _counts(worker)
    now_spent = []
    with counts.lock:
        failures, running, budget = counts.failures, counts.running, counts.budget
        for s in sources:
            n = running.get((user, s), 0) - 1
            if n > 0:
                running[(user, s)] = n
            else:
                running.pop((user, s), None)
        if not failed:
            return now_spent
        shared = False
        for s in sources:
            key = (user, s)
            if key not in failures and len(failures) >= MAX_COUNTS:  # bounded: one count for the rest
                if shared:
                    continue
                key, shared = (user, None), True
            n = failures.get(key, 0) + 1
            failures[key] = n
            if n == budget:
                now_spent.append(s)
    return now_spent
