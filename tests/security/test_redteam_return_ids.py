"""Red team (finding of session 43, fixed): return ids checked before a command's op runs (``monitor.check_free`` in
``veil/workers/handlers.py::_run_resolved``, commit f6a2fb7).

That commit checked each id of a non-empty *list* for its type and freedom, not the ids' form against the
op: a return-id list of the wrong length (``[0, 0]``, two fresh ids for a one-result in-place op) or a
non-list value (an int, a map, a string) still let the in-place op write into its input before
``RemoteExecutionError("... returned 1 tensors but the caller expected ...")`` refused the command. Now
a non-list, or more than one id for an op that writes its first argument, is refused before the op runs.

Also checked (passing regressions, new coverage): check_free keeps another session's ids invisible (no
"already in use" existence oracle across namespaces) through the real command path, and a deferred
(batched) in-place command with a taken id writes nothing.
"""

from __future__ import annotations

import secrets

import pytest
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError, VeilError
from veil.ids import new_id
from veil.messaging import messages as m
from veil.workers import handlers
from veil.workers.monitor import Principal, Purpose


def _worker(hook):
    return sy.VirtualWorker(hook, id=f"s43-ids-{secrets.token_hex(3)}")


@pytest.mark.parametrize("ids", ["two_fresh", "zeros", "int", "map", "str"])
def test_a_command_refused_for_malformed_return_ids_writes_nothing(hook, ids):
    w, me = _worker(hook), hook.local_worker
    value = {"two_fresh": [new_id(), new_id()], "zeros": [0, 0], "int": 7, "map": {"a": 1}, "str": "x"}[ids]
    mine = torch.tensor([1.0, 2.0, 3.0]).send(w)
    with pytest.raises(VeilError):  # refused: the op has one result, the ids say otherwise
        me.send_msg(m.CommandMessage("Tensor.add_", (m.ObjectRef(mine.id_at_location), 2.0), {}, value), w)
    assert torch.equal(mine.get(), torch.tensor([1.0, 2.0, 3.0])), "a refused command wrote into its input"


def test_check_free_hides_other_sessions_ids_through_the_command_path(hook):
    """Passes today; fails if check_free looked beyond the requester's namespace (and the owner's data)."""
    w = _worker(hook)
    s1 = Principal("session-1", "u1", namespace="session-1", isolated=True)
    s2 = Principal("session-2", "u2", namespace="session-2", isolated=True)
    oid = new_id()
    w.monitor.store(s1, oid, torch.tensor([1.0, 2.0]))
    w.monitor.check_free(s2, [oid])  # invisible to session 2
    mine = new_id()
    w.monitor.store(s2, mine, torch.tensor([5.0, 5.0]))
    # session 2 runs an in-place op returning under session 1's id: stored in its own namespace, no oracle
    handlers._run_command(w, s2, "session-2", "Tensor.add", [m.ObjectRef(mine), 1.0], {}, [oid], False)
    assert torch.equal(w.monitor.resolve(s2, oid, Purpose.REVEAL).obj, torch.tensor([6.0, 6.0]))
    assert torch.equal(w.monitor.resolve(s1, oid, Purpose.REVEAL).obj, torch.tensor([1.0, 2.0]))
    with pytest.raises(PermissionDeniedError, match="already in use"):  # its own id: refused before the op
        handlers._run_command(w, s2, "session-2", "Tensor.add_", [m.ObjectRef(mine), 1.0], {}, [oid], False)
    assert torch.equal(w.monitor.resolve(s2, mine, Purpose.REVEAL).obj, torch.tensor([5.0, 5.0]))
    # the error is the same for an id taken in the own namespace and an owner id, never for session 1's
    w.monitor.check_free(s2, [new_id()])


def test_a_deferred_in_place_command_with_a_taken_id_writes_nothing(hook):
    """Passes today; fails if the batch runner stored results without check_free before the op."""
    w, me = _worker(hook), hook.local_worker
    mine = torch.tensor([1.0, 2.0, 3.0]).send(w)
    taken = torch.tensor([9.0]).send(w)
    me.defer(w, ["Tensor.mul_", [m.ObjectRef(mine.id_at_location), 3.0], {}, [taken.id_at_location], False])
    with pytest.raises(PermissionDeniedError, match="already in use"):
        me.flush(w)
    assert torch.equal(mine.get(), torch.tensor([1.0, 2.0, 3.0]))
    # (the client now records the taken id as a result never created; the worker's object is intact)
    owner = w.principal(me.id)
    assert torch.equal(w.monitor.resolve(owner, taken.id_at_location, Purpose.REVEAL).obj, torch.tensor([9.0]))
