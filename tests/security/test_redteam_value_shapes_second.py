"""Red team, second pass: reads of values under review that veil/workers/value_shapes.py's dispatch mode missed.

The first pass refuses value-sized ATen ops and every ATen op turning a reviewed value into a Python value (the
``_local_scalar_dense`` of ``zeros(v)``, ``split(x, v)``, ``expand(v)``, ...). Holes found (v: a value under review,
SECRET[1, 0] * 10 = 40 or similar; each test below failed before the fix, checked by running this file in a git
worktree of the commit before it, e4ab78f's code):

* ``torch.tensordot(a, b, dims=t)`` reads ``t.tolist()`` in Python, no ATen op: the contracted dims, so the
  result's shape, followed a reviewed ``t`` (``dims=[[k-1], [k-1]]`` on (2, 3, 4, 5) tensors gave (2, 3, 5, 2, 3, 5):
  k = 3), in a command and in a plan whose spec sets the op's dims. Now a TorchFunctionMode beside the dispatch mode refuses a reviewed tensor where torch reads values
  in Python (tensordot's dims, tolist, numpy).
* ``a[m] = vals`` with a reviewed mask ``m`` succeeded iff ``vals`` broadcast to ``m.sum()`` rows: one command
  tested "count == n". A write of one value through such a mask (``a[x < 0] = 0``) is served; of more is refused.
* ``veil.mpc.mac_digits(limb, width=w)`` with a reviewed ``w``: 4 results for 16, 2 for 32, an error else (protocol
  steps are not followed; oblivious.protocol_refusal stopped shares only). A reviewed value as a protocol step's
  public parameter is refused now.

Held (guards): values written into a client's tensor (in place, ``out=``, ``copy_``) stay followed in the next
command; sizes parsed from a reviewed tensor by torch are refused across the allowlist's size-taking ops; honest
uses (a public dims tensor, a scalar write through a reviewed mask) match plain torch; the modes are off after a
refusal; no allowlisted Python torch function reads values by tolist/numpy without being listed.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch

from veil.exceptions import PermissionDeniedError, ReviewPendingError
from veil.messaging import messages as m

sys.path.insert(0, str(Path(__file__).resolve().parent))
from review_steps import SECRET, review_owner, send  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def reviewed(hook):
    """``(owner, x, v, k)``: SECRET under review on an in-process owner, v = 40 and k = 3 computed from it."""
    owner = review_owner(hook, "value-shapes-2")
    x = owner.search("#d")[0]
    return owner, x, (x[1, 0] * 10).long(), (x[0, 0] * 2).long()


def _refused(make) -> str:
    with pytest.raises(PermissionDeniedError) as info:
        make()
    text = str(info.value)
    assert "\n" not in text and "review" in text, text
    return text


def _stored(owner, ptr) -> torch.Tensor:
    """What the owner holds under ``ptr``'s id (the owner reads it; the scientist waits for review)."""
    return dict(owner.monitor.owner_entries())[ptr.id_at_location].obj


def _command(owner, op: str, *args, ids=None):
    refs = tuple(m.ObjectRef(a.id_at_location) if hasattr(a, "id_at_location") else a for a in args)
    return send(owner.hook, owner, m.CommandMessage(op, refs, {}, ids))  # (sent now: a setitem is not deferred)


def _still_serves(x) -> None:
    s = x.sum(0)
    assert tuple(s.shape) == (3,)
    with pytest.raises(ReviewPendingError):
        s.get()


def _no_mode_left_on() -> None:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    assert _get_current_dispatch_mode() is None and torch._C._len_torch_function_stack() == 0


def test_tensordot_dims_from_a_reviewed_value_size_no_result(reviewed):
    owner, x, v, k = reviewed
    a, b = torch.ones(2, 3, 4, 5), torch.ones(2, 3, 4, 5)
    assert tuple(torch.tensordot(a, b, dims=torch.tensor([[2], [2]])).shape) == (2, 3, 5, 2, 3, 5)  # what it told
    dims = torch.stack([k.view(1) - 1, k.view(1) - 1])  # [[2], [2]] under review
    _refused(lambda: torch.tensordot(a.send(owner), b.send(owner), dims=dims))
    _no_mode_left_on()
    _still_serves(x)


def test_a_crafted_plan_contracts_no_dims_read_from_reviewed_values(reviewed):
    """A plan cannot trace tensordot by a traced dims (tolist is not allowlisted), but its spec is the scientist's:
    the op's dims set to the plan's second input. Each plan op is a top-level call: refused as a command's is."""
    from veil.plans import func2plan
    from veil.plans.ops import SlotRef

    owner, x, v, k = reviewed

    @func2plan(args_shape=[(2, 3, 4, 5), (2, 1)])
    def contract(a, dims):
        return torch.tensordot(a, a, dims=0)

    (op,) = contract.spec.ops
    op.kwargs["dims"] = SlotRef(1)
    sent = contract.send(owner)
    ones = torch.ones(2, 3, 4, 5)
    public = sent(ones.send(owner), torch.tensor([[2], [2]]).send(owner))
    assert tuple(public.shape) == tuple(torch.tensordot(ones, ones, dims=torch.tensor([[2], [2]])).shape)
    _refused(lambda: sent(ones.send(owner), torch.stack([k.view(1) - 1, k.view(1) - 1])))
    _no_mode_left_on()
    _still_serves(x)


def test_tensordot_with_public_dims_on_reviewed_data_is_plain_torch(reviewed):
    owner, x, v, k = reviewed
    w = torch.arange(12.0).reshape(3, 4)
    got = torch.tensordot(x, w.send(owner), dims=torch.tensor([[1], [0]]).send(owner))
    assert torch.equal(_stored(owner, got), torch.tensordot(SECRET, w, dims=torch.tensor([[1], [0]])))
    with pytest.raises(ReviewPendingError):
        got.get()


@pytest.mark.parametrize("n", [3, 4])  # SECRET has 4 positive values: before the fix 3 failed, 4 succeeded
def test_a_write_through_a_reviewed_mask_tells_no_count(reviewed, n):
    owner, x, v, k = reviewed
    target = torch.zeros(6).send(owner)
    mask = x.view(-1) > 0
    _refused(lambda: _command(owner, "Tensor.__setitem__", target, mask, torch.ones(n).send(owner), ids=[]))
    assert torch.equal(_stored(owner, target), torch.zeros(6))  # nothing written
    _still_serves(x)


def test_one_value_written_through_a_reviewed_mask_is_plain_torch(reviewed):
    owner, x, v, k = reviewed
    clipped = x.clone()
    assert type(_command(owner, "Tensor.__setitem__", clipped, clipped < 0, 0.0, ids=[])) is m.OkReply
    want = SECRET.clone()
    want[want < 0] = 0.0
    assert torch.equal(_stored(owner, clipped), want)
    with pytest.raises(ReviewPendingError):
        clipped.get()


def test_a_reviewed_value_is_no_public_parameter_of_a_protocol_step(reviewed):
    owner, x, v, k = reviewed
    limb = torch.arange(6).send(owner)
    width = (x[1, 0] * 4).long()  # 16: four digits
    reply = _command(owner, "veil.mpc.mac_digits", limb, 16)  # a public width: as before
    assert type(reply) is m.ResultReply and len(reply.result) == 4
    _refused(lambda: _command(owner, "veil.mpc.mac_digits", limb, width))
    _no_mode_left_on()
    _still_serves(x)


def test_values_written_into_a_clients_tensor_stay_followed(reviewed):
    """In place, out= and copy_ into a tensor the scientist sent: the next command sized by it is refused."""
    owner, x, v, k = reviewed
    added = torch.zeros(1).send(owner)
    added.add_(v.float().view(1))
    out = torch.zeros(1, dtype=torch.long).send(owner)
    torch.add(v.view(1), 0, out=out)
    copied = torch.zeros(1, dtype=torch.long).send(owner)
    copied.copy_(v.view(1))
    for t in (added.long(), out, copied):
        _refused(lambda: torch.zeros(t))
        _refused(lambda: torch.masked_select(torch.arange(100).send(owner), torch.arange(100).send(owner) < t))
    assert int(_stored(owner, copied)) == 40


_SIZED = {
    "split": lambda P, v, k: torch.split(P, v.view(1)),
    "chunk": lambda P, v, k: torch.chunk(P, v),
    "expand": lambda P, v, k: torch.ones(1).send(P.location).expand(v.view(1)),
    "tile": lambda P, v, k: torch.tile(P, (v,)),
    "pad": lambda P, v, k: torch.nn.functional.pad(P, (v, 0)),
    "unfold": lambda P, v, k: P.unfold(0, v, 1),
    "unflatten": lambda P, v, k: P.unflatten(0, (k.view(1) + 1, -1)),
    "narrow start": lambda P, v, k: torch.narrow(P, 0, v, 2),
    "one_hot": lambda P, v, k: torch.nn.functional.one_hot(k.view(1)),
    "adaptive pool": lambda P, v, k: torch.nn.functional.adaptive_avg_pool1d(P.view(1, 1, -1), v),
    "randint": lambda P, v, k: torch.randint(0, 5, (v,)),
    "a 0-d mask": lambda P, v, k: P[v > 10],
}


@pytest.mark.parametrize("op", sorted(_SIZED))
def test_sizes_torch_parses_from_a_reviewed_value_are_refused(reviewed, op):
    owner, x, v, k = reviewed
    _refused(lambda: _SIZED[op](torch.arange(100.0).send(owner), v, k))
    _no_mode_left_on()


def test_every_python_read_of_values_in_allowlisted_torch_functions_is_listed():
    """tensordot read dims.tolist() unseen by the dispatch mode: any allowlisted torch function written in Python
    that reads values by tolist/numpy must be in the guards' table (oblivious.READ_IN_PYTHON, which the review
    and the secret guards share; a torch upgrade adding one fails here)."""
    from veil.messaging.allowlist import ALLOWLIST
    from veil.workers.oblivious import READ_IN_PYTHON as _READ_IN_PYTHON

    readers = set()
    for op in ALLOWLIST._by_name.values():
        if op.worker_function or not inspect.isfunction(op.func):
            continue
        try:
            source = inspect.getsource(op.func)
        except (OSError, TypeError):
            continue
        if ".tolist()" in source or ".numpy()" in source:
            readers.add(op.func)
    assert torch.tensordot in readers and readers <= set(_READ_IN_PYTHON), readers - set(_READ_IN_PYTHON)
