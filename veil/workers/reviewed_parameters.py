"""Where a value under the owner's review may enter a worker function that :mod:`veil.workers.value_shapes` does not
follow.

Plans, protocol steps and secure aggregation's steps run under value_shapes' dispatch modes: a reviewed value there
decides no shape, Python value or uncounted failure. Every other worker function (``veil.he.op``,
``veil.compat.*``, ``veil.fl.*``, ``veil.plan.load_state``, ``veil.dp.*``, and any added later) reads its arguments
in Python, where nothing follows them: a reviewed value decides nothing only where that function was written to
take one value-free (``request_reads_owner_data``: HE plaintexts encoded whatever they hold, fixed-point encodings
clamped, state copied as it is). ``veil.he.op`` took its plaintext value-free only when it was the tensor itself:
the same reviewed tensor inside a list was encoded as any list is, so success or failure (NaN, a magnitude past a
small key's room) was a free bit of it, uncounted and unreviewed; ``veil.dp.sanitized_gradient`` ran its dry run on
reviewed ``params`` and answered with the plan's error text, which quoted a reviewed index (red team:
test_redteam_session67_review.py).

So, as :func:`veil.workers.oblivious.worker_function_refusal` does for secrets: such a function's parameters are
public to reviewed values unless :data:`TAKES_REVIEWED` names them, and then only in the form it names (the
argument itself, or an item of a list argument). A reviewed value anywhere else is refused before the function
runs, by position and name alone, whatever the values.
"""

from __future__ import annotations

from typing import Any

#: the argument is the reviewed object itself
ONE = "one"
#: the argument is a list (or tuple) whose items may be reviewed objects
ITEMS = "items"

#: worker functions not followed by value_shapes that take a reviewed value, where, and in which form: each is
#: value-free in that parameter (its outcome, error and work follow no value of it; what it stores derives from it)
TAKES_REVIEWED: dict[str, dict[str, str]] = {
    "veil.he.op": {"a": ONE, "b": ONE},
    "veil.compat.encode": {"tensor": ONE},
    "veil.compat.decode": {"tensor": ONE},
    "veil.fl.encrypt_state": {"state": ITEMS},
    "veil.fl.check_commitments": {"ciphertexts": ITEMS},
    "veil.plan.load_state": {"state": ITEMS, "values": ITEMS},
    "veil.dp.query": {"x": ONE},
}


def refusal(op: Any, params: list, under: list, resolved: Any) -> str | None:
    """Why worker function ``op`` (not followed by value_shapes; ``params``: its parameter names after the worker)
    may not run with the reviewed objects ``under`` ((id, entry) pairs) where the arguments ``resolved`` (``(args,
    kwargs)`` as the monitor resolved them) hold them, or None."""
    reviewed = {id(e.obj) for _, e in under}
    if not reviewed:
        return None
    args, kwargs = resolved if type(resolved) is tuple and len(resolved) == 2 else ((), {})
    takes = TAKES_REVIEWED.get(op.name, {})
    named = [(params[i] if i < len(params) else None, v) for i, v in enumerate(args or ())]
    named += list(kwargs.items()) if type(kwargs) is dict else []
    for name, value in named:
        form = takes.get(name) if type(name) is str else None
        if form == ONE and id(value) in reviewed:
            continue
        if form == ITEMS and type(value) in (list, tuple):
            if any(_holds(v, reviewed) for v in value if id(v) not in reviewed):
                return _why(op.name, name, nested=True)
            continue
        if _holds(value, reviewed):
            return _why(op.name, name, nested=id(value) not in reviewed)
    return None


def _holds(value: Any, reviewed: set) -> bool:
    """Whether one of the objects ``reviewed`` (ids) is ``value`` or in it (lists, tuples, dicts)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if id(v) in reviewed:
            return True
        if type(v) in (list, tuple):
            stack.extend(v)
        elif type(v) is dict:
            stack.extend(v.values())
    return False


def _why(op_name: str, name: Any, nested: bool) -> str:
    shown = repr(name) if type(name) is str else "(an extra argument)"
    where = f"nested in its parameter {shown}" if nested else f"its parameter {shown}"
    return (f"{op_name}: a value under the owner's review (not released) cannot be {where} (it reads it where "
            "veil does not follow it); it is refused whatever the values")
