"""Values under review decide no result shape and no Python value of a command.

Every command's reply describes its result (shape, dtype), and the scientist
gets it without review: ``torch.zeros(x[0].long())`` on data under review is a
descriptor of ``(x[0],)``, ``masked_select(arange(100), arange(100) < x[0])``
has ``x[0]`` elements, ``x[x > 0]`` as many as positive values. The owner has
released none of them.

:func:`guard` runs a requester-chosen op (a torch op, a plan's run or fit)
on inputs derived from owner data under review (a release of them waits for
the owner's approval) under a TorchDispatchMode that follows those storages
through the ATen ops of the call, as :mod:`veil.workers.oblivious` does for
secrets, and refuses before the op runs:

* the value-shaped ops (``VALUE_SHAPED``: ``nonzero``, ``masked_select``,
  ``unique``, ``repeat_interleave``, ``bincount``, ...) and indexing with a
  boolean or byte mask (``x[x > 0]``) on such values;
* such a value turned into a Python value (``.item()``, a tensor used as a
  size, count or bound: ``zeros(t)``, ``arange(t)``, ``narrow`` or ``topk``
  by a tensor): every ATen op returning a non-tensor.

Unlike secrets, reviewed values may enter any other op (their owner may
approve the results; errors on them are value-free already): shapes that
follow only the shapes of owner data stay as they are. The refusal names the
op only and depends on which inputs are reviewed, never on values. Whether an
op fails on such values (``zeros(12)[x]``, ``bernoulli(x - c)``) is
:mod:`veil.workers.failure_budget`'s: refused up front where honest training
has no use for the argument, else counted against the user's budget on the
dataset. The guard runs beside a secret input's guard too.

Three reads the dispatch mode cannot see are refused beside it: a torch
function that reads a tensor argument's values in Python, with no ATen op
(``tensordot``'s ``dims.tolist()``: the contracted dims, so the result's
shape, followed ``dims``), seen by a TorchFunctionMode at each top-level call
(each op of a plan too); a write through a reviewed mask of more than one
value (``a[m] = v`` succeeds iff ``v`` broadcasts to ``m.sum()`` rows: an
equality test of the count); and a reviewed value as a protocol step's public
parameter (``veil.mpc.mac_digits(limb, width)``: 4 digits for 16, 2 for 32,
an error else), as :func:`veil.workers.oblivious.protocol_refusal` for shares.

Protocol steps (``veil.mpc.*`` worker functions, and secure aggregation's but
``masked_input``: :data:`FOLLOWED_PROTOCOLS`, which a scientist may run on
anything it can name) are followed as torch ops are, past that check: a step on
a reviewed value computes what plain torch does, its Python reads of the value
are refused, its failures are counted, and past the budget it is refused. The
decision on secret sharing: a value under review enters an SMPC computation only
through ``veil.compat.share_own`` (a release the owner approves) or an opening
the owner reviews. Every step's result is a "share" (``trunc_local(x, 1)`` of a
reviewed ``x`` is ``x``), so an opening reviews each input that derives from owner
data whatever its kind (``OpeningRules.resolve_opening``): steps need not be
refused on reviewed values, what they compute leaves only on review.

Every other worker function (``veil.he.op``, ``veil.compat.*``, ``veil.fl.*``, ``veil.plan.load_state``,
``veil.dp.*``, and any added later) reads its arguments in Python and is not followed: :func:`guard` refuses a
reviewed value there but in the parameters, and the form, :mod:`veil.workers.reviewed_parameters` names.

A peer worker's session (a peer token alone) never names reviewed data: its
requests are deliveries of what it deals (``PEER_COMMANDS``), and one naming a
value under review is refused whatever the values, counted against no budget
(a peer's count would be shared by every user whose MPC goes through it, and
a user going through peers would get a budget per peer).
"""

from __future__ import annotations

from typing import Any

import torch

from veil.exceptions import PermissionDeniedError, register_remote_error
from veil.workers import failure_budget
from veil.workers.oblivious import GuardsPythonReads, _key, _public_parameters, _touches
from veil.workers.oblivious_ops import VALUE_SHAPED
from veil.workers.websocket_auth import PEER_COMMANDS

#: ATen ops whose result shape follows the values of a boolean/byte index (``x[mask]``)
_MASK_INDEXED = frozenset({"aten::index", "aten::_unsafe_index"})
#: value-shaped ATen ops beyond the oblivious table's (a sparse layout's element count follows the values)
_SHAPED = VALUE_SHAPED | frozenset({"aten::_to_sparse", "aten::to_sparse", "aten::_to_sparse_csr",
                                    "aten::_to_sparse_csc", "aten::_to_sparse_bsr", "aten::_to_sparse_bsc",
                                    "aten::dense_to_sparse", "aten::sparse_mask"})
#: ATen ops writing ``values`` through ``indices``: with a mask, they succeed iff ``values`` fit its count
_MASK_WRITES = frozenset({"aten::index_put", "aten::index_put_", "aten::_index_put_impl_"})
_NO_TORCH_FUNCTION = torch._C.DisableTorchFunction
#: worker functions that are protocol steps (veil's own code): a reviewed value may not be a public parameter
PROTOCOL_STEPS = "veil.mpc."


@register_remote_error
class ShapeRefused(PermissionDeniedError):
    """A command whose result shape or Python value would follow values under review (value-free)."""

    value_free = True


class _FollowsReviewed(GuardsPythonReads):
    """Follows reviewed storages through one command; refuses value-sized results and Python values of them."""

    def __init__(self, op_name: str, reviewed: set[int], sources: frozenset = frozenset()) -> None:
        super().__init__()
        self.op_name, self.reviewed = op_name, reviewed
        self.sources = sources  # the reviewed datasets its inputs derive from (failure_budget counts on them)
        self.may_fail = False  # an op whose success may follow reviewed values ran (failure_budget.may_fail)
        self.budget_of: tuple | None = None  # (worker, user): whose failure budget it holds a place in (guard)
        self.held = False
        self.newly_spent: list = []  # the datasets whose budget its failure spent (audited by failed())

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # nothing compiled runs in a command: no dynamo-disabling wrapper around every op (~30 us each)
        return False

    def _refuse(self, what: str) -> ShapeRefused:
        return ShapeRefused(f"{self.op_name}: {what} would follow the values of data under the owner's review "
                            "(not released); it is refused whatever the values")

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        with _NO_TORCH_FUNCTION():  # (its own tensor calls, storage lookups: not through ReadsInPython, ~3 us each)
            return self._follow(func, args, kwargs or {})

    def _follow(self, func: Any, args: tuple, kwargs: dict) -> Any:
        reviewed = self.reviewed
        if not (_touches(args, reviewed) or (kwargs and _touches(tuple(kwargs.values()), reviewed))):
            return func(*args, **kwargs)
        name = func._schema.name
        if name in _SHAPED:
            raise self._refuse(f"the shape of {name}")
        why = failure_budget.refusal(func, args, kwargs, reviewed)
        if why is not None:
            raise self._refuse(why)
        if not self.may_fail:
            self.may_fail = failure_budget.may_fail(func, args, kwargs, reviewed)
        if name in _MASK_INDEXED and _masks(args[1] if len(args) > 1 else kwargs.get("indices"), reviewed):
            raise self._refuse("the shape of an index by a mask")
        if (name in _MASK_WRITES and len(args) > 2 and isinstance(args[2], torch.Tensor) and args[2].numel() != 1
                and _masks(args[1], reviewed)):
            raise self._refuse("whether a write through a mask succeeds")
        out = func(*args, **kwargs)
        for r in (out if type(out) in (tuple, list) else (out,)):
            if isinstance(r, torch.Tensor):
                k = _key(r)
                if k is not None:
                    reviewed.add(k)
            elif type(r) in (tuple, list):  # e.g. split: a list of tensors
                for t in r:
                    k = _key(t) if isinstance(t, torch.Tensor) else None
                    if k is not None:
                        reviewed.add(k)
            elif r is not None:  # .item(), a size, a bound, a branch: the value itself, unreviewed
                raise self._refuse(f"a Python value ({name})")
        return out

    def __enter__(self) -> _FollowsReviewed:
        if self.budget_of is not None and self.sources:
            worker, user = self.budget_of
            if not failure_budget.begin(worker, user, self.sources):
                raise _spent_refusal(worker, user, self.op_name)
            self.held = True
        try:
            return super().__enter__()  # (with the reads in Python, beside the ATen ops)
        except BaseException:
            self._end(None)
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._end(exc[1] if len(exc) > 1 else None)

    def _read_followed(self) -> set:
        return self.reviewed

    def _end(self, error: BaseException | None) -> None:
        """Gives back its place in the failure budget; a failure after an op that may fail on reviewed values is
        counted (a refusal, a deadline or a cancellation is not: they follow no value)."""
        if not self.held:
            return
        from veil.exceptions import CommandTimeoutError

        self.held = False
        counted = (isinstance(error, Exception) and self.may_fail
                   and not isinstance(error, (PermissionDeniedError, CommandTimeoutError)))
        worker, user = self.budget_of
        self.newly_spent = failure_budget.end(worker, user, self.sources, counted)


class _Refusing:
    """A context that refuses on entry (inside the command's try: audited and answered as the op's refusal)."""

    def __init__(self, error: ShapeRefused) -> None:
        self.error = error

    def __enter__(self) -> None:
        raise self.error

    def __exit__(self, *exc: Any) -> None:
        return None


def _masks(indices: Any, reviewed: set) -> bool:
    """Whether a boolean or byte index among ``indices`` is (or derives from) a reviewed value."""
    if type(indices) not in (tuple, list):
        return False
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) and _key(t) in reviewed
               for t in indices)


#: worker functions that run a requester's plan, op by op, on their arguments (copies of the owner's data)
PLAN_RUNS = frozenset({"veil.plan.run", "veil.plan.fit"})


def guard(worker: Any, user: str, op_name: str, found: dict, resolved: Any = None,
          passed: Any = None, outer: Any = None) -> Any:
    """The context a requester-chosen op (a torch op, a plan, a protocol step) runs in when one of its inputs
    (``found``: id -> entry) could leave ``user``'s hands only with the owner's approval (it derives from a dataset
    under review); ``outer`` (the secret inputs' guard, or None) when none could. A plan gets copies of the
    owner's tensors: ``resolved`` (the arguments as the monitor resolved them) and ``passed`` (as the plan gets
    them, the same structure) say which tensor it runs on stands for which. A refusal when ``user`` spent its
    failure budget on one of those datasets, or when a peer worker's session names one."""
    for e in found.values():
        if e.provenance:
            break
    else:  # the usual protocol step (shares of clients' own values): nothing derives from owner data, no check
        return outer
    from veil.governance.release import needs_review

    if op_name.startswith(PROTOCOL_STEPS):  # then followed as a torch op is (the module's docstring)
        refusal = _public_refusal(worker, user, op_name, found, resolved)
        if refusal is not None:
            return refusal
    under = [(oid, e) for oid, e in found.items() if e.provenance and needs_review(worker, oid, e, user)]
    if _parameters_checked(op_name):  # (another worker function: reviewed values only where it takes them)
        why = _parameter_refusal(op_name, under, resolved)
        return outer if why is None else _Refusing(ShapeRefused(why))
    keys = {k for k in (_key(e.obj) for oid, e in under) if k is not None}
    if not keys:
        return outer
    if _peer_asks(worker):
        return _Refusing(ShapeRefused(
            f"{op_name}: a peer worker's request may not name data under the owner's review (a peer only hands "
            "over what it deals); it is refused whatever the values, and counted against no one's failure budget"))
    if passed is not None:
        keys |= {_key(after) for before, after in zip(_leaves(resolved), _leaves(passed))
                 if _key(before) in keys and _key(after) is not None}
    sources = _reviewed_sources(worker, under)
    if failure_budget.spent(worker, user, sources):
        return _Refusing(_spent_refusal(worker, user, op_name))
    follows = _FollowsReviewed(op_name, keys, sources)
    follows.budget_of = (worker, user)
    return follows if outer is None else _Both(outer, follows)


def _spent_refusal(worker: Any, user: str, op_name: str) -> ShapeRefused:
    """The refusal of a command of ``user`` whose failures (and running commands) fill its budget on a dataset."""
    return ShapeRefused(
        f"{op_name}: commands of {user!r} on data under the owner's review failed on its values "
        f"{failure_budget.budget(worker)} times, or would with those running now; further commands on it are "
        "refused until the owner resets the count (failure_budget.forgive) or the running ones ended")


def _reviewed_sources(worker: Any, under: list) -> frozenset:
    """The datasets under review among the sources of ``under`` ((id, entry) pairs)."""
    from veil.governance.provenance import sources_of
    from veil.governance.state import _STATE

    state = _STATE.get(worker)
    policies = state.policies if state is not None else {}
    return frozenset(s for oid, e in under for s in sources_of(oid, e) if policies.get(s) == "review")


class _Both:
    """A secret inputs' guard and the reviewed inputs' (:class:`_FollowsReviewed`), entered together."""

    def __init__(self, outer: Any, follows: _FollowsReviewed) -> None:
        self.outer, self.follows = outer, follows

    def __enter__(self) -> None:
        self.outer.__enter__()
        try:
            self.follows.__enter__()
        except BaseException:
            self.outer.__exit__(None, None, None)
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            self.follows.__exit__(*exc)
        finally:
            self.outer.__exit__(*exc)


def failed(worker: Any, principal: Any, action: str, context: Any, ids: list, error: BaseException) -> None:
    """After a command run in ``context`` (what :func:`guard` or the secret guard gave) failed: a refusal
    (value-free) is audited; so is the failure that spent its user's budget on a dataset (counted as the guard
    ended, :meth:`_FollowsReviewed._end`)."""
    if isinstance(error, PermissionDeniedError):
        worker.monitor.audit(action, principal, ids, "refused", str(error))
        return
    follows = context.follows if type(context) is _Both else context
    if type(follows) is not _FollowsReviewed:
        return
    for source in follows.newly_spent:  # (counted as the command's guard ended: _FollowsReviewed._end)
        worker.monitor.audit(action, principal, ids, "refused", f"{follows.op_name}: {principal.user!r} spent the "
                             f"failure budget on dataset {source!r} under review; further commands are refused")


#: other protocols' worker functions, followed as ``veil.mpc.*`` steps are: a scientist runs them on anything it
#: names, and they read tensor arguments in Python (secure aggregation's share_keys checks each byte of its key
#: table and its own row: with a table computed from a reviewed x, its failure was a bit of x, uncounted; red team:
#: test_redteam_review_peer_second.py). Not their ``REVIEWED_INPUTS`` steps: the owner's approval releases those.
FOLLOWED_PROTOCOLS = ("veil.secagg.",)


def followed(name: str) -> bool:
    """Whether worker function ``name`` is checked by :func:`guard` (torch ops on owner-derived data are, always):
    plans, protocol steps and what peers may run, followed op by op (a peer naming reviewed data is refused there),
    and every other worker function but the ``REVIEWED_INPUTS`` steps, whose parameters are checked
    (:mod:`veil.workers.reviewed_parameters`)."""
    return _dispatch_followed(name) or _parameters_checked(name)


def _parameters_checked(name: str) -> bool:
    """Whether ``name`` is a worker function that value_shapes does not follow, whose parameters it checks."""
    checked = _CHECKED.get(name)
    if checked is None:
        from veil.messaging.allowlist import ALLOWLIST
        from veil.workers.owner_guard import REVIEWED_INPUTS

        try:
            worker_function = ALLOWLIST.by_name(name).worker_function
        except Exception:  # noqa: BLE001 - (not allowlisted: never run)
            worker_function = False
        checked = _CHECKED[name] = (worker_function and not _dispatch_followed(name)
                                    and name not in REVIEWED_INPUTS)
    return checked


#: (keyed by allowlisted op names only: bounded, and never evicted)
_CHECKED: dict[str, bool] = {}


def _dispatch_followed(name: str) -> bool:
    """Whether worker function ``name`` runs under :class:`_FollowsReviewed`: plans, protocol steps, what peers may
    run, and the followed protocols' steps but their ``REVIEWED_INPUTS``."""
    if name in PLAN_RUNS or name.startswith(PROTOCOL_STEPS) or name in PEER_COMMANDS:
        return True
    if not name.startswith(FOLLOWED_PROTOCOLS):
        return False
    from veil.workers.owner_guard import REVIEWED_INPUTS

    return name not in REVIEWED_INPUTS


def _parameter_refusal(op_name: str, under: list, resolved: Any) -> str | None:
    """The refusal of a worker function that value_shapes does not follow, given the reviewed objects ``under``
    where a parameter does not take them (:mod:`veil.workers.reviewed_parameters`), else None."""
    from veil.messaging.allowlist import ALLOWLIST
    from veil.workers import reviewed_parameters
    from veil.workers.oblivious import _worker_parameters

    op = ALLOWLIST.by_name(op_name)
    return reviewed_parameters.refusal(op, _worker_parameters(op), under, resolved)


def refuse_reviewed_output(worker: Any, principal: Any, ref: Any) -> None:
    """A serving output share (``veil.serving``'s respond: it goes to the service's clients, not through a get or
    an opening) deriving from data under the owner's review is refused, in one line, audited: a service's owner
    computed ``batch + x`` on a reviewed ``x`` and its client fetched ``x`` (red team:
    test_redteam_review_budget_peer.py). A model trained on reviewed data is served once the owner released it."""
    from veil.governance.release import needs_review
    from veil.workers.principals import Purpose

    oid = getattr(ref, "id", ref)
    entry = worker.monitor.resolve(principal, oid, Purpose.PROTOCOL_STEP)
    if entry.provenance and needs_review(worker, oid, entry, principal.user):
        why = (f"object {oid} derives from data under the owner's review: a serving output of it would release it "
               "to the service's clients unreviewed (the owner releases the model or the values first)")
        worker.monitor.audit("release", principal, [oid], "refused", why)
        raise PermissionDeniedError(why)


def _peer_asks(worker: Any) -> bool:
    """Whether the request being handled is a peer worker's (a network session holding a peer token and no
    scientist or admin token beside it); in-process senders are not sessions."""
    current = getattr(worker, "current_session", None)
    session = current() if current is not None else None
    return session is not None and session.peer_only


def _public_refusal(worker: Any, user: str, op_name: str, found: dict, resolved: Any) -> _Refusing | None:
    """A refusal when a value under review is one of protocol step ``op_name``'s public parameters (a size, a
    count, a flag: a Python value its code branches on), else None. Shares in its other arguments may be."""
    from veil.governance.release import needs_review
    from veil.messaging.allowlist import ALLOWLIST

    if not any(e.provenance for e in found.values()):  # shares of a client's own values: nothing under review
        return None
    args, kwargs = resolved if type(resolved) is tuple and len(resolved) == 2 else ((), {})
    public = [v for pos, name in _public_parameters(op_name, ALLOWLIST.by_name(op_name).func)
              for v in ((args[pos],) if pos < len(args) else ()) + ((kwargs[name],) if name in kwargs else ())]
    tensors = {_key(t) for t in _leaves(public) if t is not None}
    if not tensors:  # the usual step: public parameters are ints, bools, lists of them
        return None
    reviewed = {_key(e.obj) for oid, e in found.items() if e.provenance and needs_review(worker, oid, e, user)}
    if not tensors & (reviewed - {None}):
        return None
    return _Refusing(ShapeRefused(f"{op_name}: a value under the owner's review (not released) cannot be a public "
                                  "parameter of a protocol step (a size, count or flag); it is refused whatever "
                                  "the values"))


def _leaves(value: Any) -> list:
    """The tensors in ``value`` (lists, tuples, dicts), in a fixed order; other leaves as None."""
    out: list = []
    stack = [value]
    while stack:
        v = stack.pop()
        if type(v) in (list, tuple):
            stack.extend(reversed(v))
        elif type(v) is dict:
            stack.extend(reversed(list(v.values())))
        else:
            out.append(v if isinstance(v, torch.Tensor) else None)
    return out
