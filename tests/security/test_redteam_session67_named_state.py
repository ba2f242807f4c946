"""Red team (session 67): one big tensor named many times in a federated state, on a worker without a quota.

Attack: ``veil.secagg.masked_input`` and ``veil.fl.encrypt_state`` flatten their state list in one ``torch.cat``
(after a float64 copy per entry). Under ``--max-session-mb`` the whole is sized first; without a quota nothing
was: a request naming one big tensor N times (a few bytes per name) made the worker allocate N float64 copies of
it, and their concatenation (a 256 MiB message names ~10^7 ids: terabytes for a 1 MB tensor), in one call no
deadline interrupts. An ``expand`` view of one element does the same (charged its storage, concatenated whole).

Must hold: without a quota, the entries a state names past the storage its tensors hold (a tensor named again, an
expanded view) make at most the worker's largest message (what the requester could have sent itself), refused in
one line before anything is made; honest states (each tensor once) are not bounded by it; the worker serves on.
Shown at a scaled-down message limit (1 MiB).
"""

from __future__ import annotations

import pytest
import torch

from veil.ids import new_id
from veil.messaging import messages as m

from server_sessions import answers_next_command, computed, send_tensor  # noqa: E402
from aten_watch import LargestMade as _Largest  # noqa: E402
from test_redteam_session63 import MASKED, Setup  # noqa: E402

LIMIT = 1 << 20  # the worker's largest message, scaled down
ENTRIES = 16_384  # a 64 KiB float32 tensor (128 KiB as float64)
NAMED = 64  # named 64 times: 8 MiB of float64 entries past its storage


def _setup(hook):
    setup = Setup(hook)
    assert setup.srv.monitor.max_session_bytes is None  # no quota
    setup.srv.max_message = LIMIT
    return setup


def _refused(reply) -> str:
    assert type(reply) is m.ErrorReply and reply.error == "RemoteExecutionError", reply
    assert "\n" not in reply.message.strip() and "named again" in reply.message, reply.message
    return reply.message


@pytest.mark.parametrize("how", ["named again", "expanded view"])
def test_a_masked_input_naming_one_tensor_many_times_is_refused_before_it_allocates(hook, how):
    setup = _setup(hook)
    if how == "named again":
        one = m.ObjectRef(send_tensor(setup.srv, setup.s1, torch.ones(ENTRIES)))
        state = [one] * NAMED
    else:
        one = m.ObjectRef(send_tensor(setup.srv, setup.s1, torch.ones(1, 1)))
        state = [computed(setup.srv, setup.s1, "Tensor.expand", one, NAMED, ENTRIES)]
    tag = setup.round()
    seen = _Largest()
    with seen:
        reply, _ = setup.command(setup.s1, MASKED, tag, [setup.srv.id, "p1"], state, 1.0)
    _refused(reply)
    assert seen.most * 8 <= LIMIT, f"masked_input made a tensor of {seen.most} entries first"
    assert not setup.went_through(tag)
    answers_next_command(setup.srv, setup.s1)


def test_encrypt_state_naming_one_tensor_many_times_is_refused_before_it_allocates(hook):
    setup = _setup(hook)
    one = m.ObjectRef(send_tensor(setup.srv, setup.s1, torch.ones(ENTRIES)))
    seen = _Largest()
    with seen:  # (no key: the refusal must come before the state is flattened, whatever follows)
        reply, _ = setup.command(setup.s1, "veil.fl.encrypt_state", [one] * NAMED, 1.0, None, new_id(), n=0)
    _refused(reply)
    assert seen.most * 8 <= LIMIT, f"encrypt_state made a tensor of {seen.most} entries first"
    answers_next_command(setup.srv, setup.s1)


def test_an_honest_state_past_the_message_limit_still_masks(hook):
    """Guard: distinct tensors, together larger than the limit, name nothing twice: the masked input goes."""
    setup = _setup(hook)
    state = [m.ObjectRef(send_tensor(setup.srv, setup.s1, torch.full((ENTRIES,), float(k)))) for k in range(NAMED)]
    state.append(state[0])  # a tied parameter named again: well under the limit
    tag = setup.round()
    reply, _ = setup.command(setup.s1, MASKED, tag, [setup.srv.id, "p1"], state, 1.0)
    assert type(reply) is m.OkReply, reply
    assert setup.went_through(tag)
