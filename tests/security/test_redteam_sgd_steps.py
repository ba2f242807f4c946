"""Red team of the batched SGD update's party steps (``sgd_flatten``, ``sgd_apply``, veil/tensors/mpc_glue/optim.py):
a hostile requester (a serving model owner) calls them on a party directly, with a client's protected input share
and with malformed arguments. (Their arithmetic against torch: tests/mpc/test_lazy_gradients.py.)

They are worker functions any session with compute rights may name: what they return from a protected share
must stay protected (nothing opened, nothing fetched), malformed calls must be one clear error each, and the
party must keep serving with every stored object unchanged.
"""

import pytest
import torch

from veil.exceptions import PermissionDeniedError, VeilError
from veil.messaging import messages as m
from veil.mpc.party import WIRE_PREFIX
from veil.mpc.ring import DTYPE

from tests.security.test_redteam_dealt import BATCH, SECRET, SHAPE, _cmd, _setup

OWN = 7101  # the owner's own share on party a (one it may read)


@pytest.fixture
def party(hook, request):
    a, b, owner, _ = _setup(hook, f"rsgd{request.node.name[-12:]}", SECRET)
    owner.send_msg(m.ObjectMessage([m.StoredObject(OWN, torch.arange(3, dtype=DTYPE).view(SHAPE))]), a)
    return a, owner


def _get(owner, a, oid):
    """Fetches (and so removes) object ``oid``."""
    return owner.send_msg(m.GetObjectsMessage([oid]), a).objects[0]


def _stored(owner, a, oid, copy_id):
    """What ``oid`` holds, read through a copy (a fetch removes what it fetches)."""
    _cmd(owner, a, "Tensor.clone", (m.ObjectRef(oid),), [copy_id])
    return _get(owner, a, copy_id)


def test_the_steps_on_a_protected_share_give_protected_results(party):
    a, owner = party
    _cmd(owner, a, WIRE_PREFIX + "sgd_flatten", ([m.ObjectRef(OWN)], [3]), [7200])  # the owner's own, flat
    _cmd(owner, a, WIRE_PREFIX + "sgd_flatten", ([m.ObjectRef(BATCH)], [3]), [7201])
    _cmd(owner, a, WIRE_PREFIX + "sgd_apply", ([m.ObjectRef(OWN)], m.ObjectRef(7201)), [7202])
    _cmd(owner, a, WIRE_PREFIX + "sgd_apply", ([m.ObjectRef(BATCH)], m.ObjectRef(7200)), [7203])
    for derived in (7201, 7202, 7203):  # each depends on the client's share
        with pytest.raises(PermissionDeniedError):
            _get(owner, a, derived)
    # nothing stored changed: the steps return new tensors
    assert torch.equal(_stored(owner, a, OWN, 7205), torch.arange(3, dtype=DTYPE).view(SHAPE))


@pytest.mark.parametrize("step,args", [
    ("sgd_flatten", (m.ObjectRef(OWN), [1])),  # not a list of shares
    ("sgd_flatten", ([m.ObjectRef(OWN)], [1, 2])),  # a factor too many
    ("sgd_flatten", ([m.ObjectRef(OWN)], [0.5])),  # a float factor (a fixed-point product needs its truncation)
    ("sgd_flatten", ([m.ObjectRef(OWN)], [1 << 70])),  # outside the ring's integers
    ("sgd_flatten", ([], [])),
    ("sgd_apply", ([m.ObjectRef(OWN)], torch.zeros(4, dtype=DTYPE))),  # an update of the wrong size
    ("sgd_apply", ([m.ObjectRef(OWN)], torch.zeros(1, 3, dtype=DTYPE))),  # not flat
    ("sgd_apply", (m.ObjectRef(OWN), torch.zeros(3, dtype=DTYPE))),
    ("sgd_apply", ([], torch.zeros(0, dtype=DTYPE))),
])
def test_malformed_calls_are_one_error_each_and_the_party_keeps_serving(party, step, args):
    a, owner = party
    with pytest.raises((VeilError, ValueError, TypeError, OverflowError, RuntimeError)):
        _cmd(owner, a, WIRE_PREFIX + step, args, [7301])
    with pytest.raises(VeilError):  # no result was stored under the requested id
        _get(owner, a, 7301)
    assert torch.equal(_stored(owner, a, OWN, 7303), torch.arange(3, dtype=DTYPE).view(SHAPE))
    _cmd(owner, a, WIRE_PREFIX + "sgd_flatten", ([m.ObjectRef(OWN)], [2]), [7302])  # and serves the next one
    _cmd(owner, a, WIRE_PREFIX + "sgd_apply", ([m.ObjectRef(OWN)], m.ObjectRef(7302)), [7304])
