"""Red team (session 67, second pass) of today's fixes: bypasses, regressions and the denial of service a fix adds.

Each test failed on the code before its fix (see the commit that added it)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_redteam_session66_protocol_seeds import Parties, _no_values, _outcome  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

N = {f: ALLOWLIST.by_func(f).name for f in (torch.floor_divide, torch.Tensor.__getitem__)}


@pytest.fixture
def parties(hook):
    return Parties(hook)


# ------------------------------------------------------------------ b4eacc4: Python reads of a secret, another door

def test_a_serving_owner_cannot_read_a_share_through_a_list_index_of_secret_scalars(parties):
    """Attack (a bypass of b4eacc4's Python-read guard): ``x[([b],)]`` with ``b`` a 0-dim secret (bit j of the
    client's share at party 0, plain torch ops) and ``x`` a public (1,) tensor. torch turns a list of 0-dim tensors
    in an index into a fresh index tensor in C++ (``lift_fresh``: no ATen op reads ``b``), so the guard saw a public
    index and the op failed iff the bit was 1 (index 1 out of bounds). Must hold: every probe gets the same one-line
    refusal, whatever the bit, naming no value; the service still serves."""
    bits = [(int(parties.shares[0][0, 0]) >> j) & 1 for j in range(6)]
    assert len(set(bits)) == 2  # (both outcomes would show, were they told)
    share = parties.element(0, 0)
    outcomes = []
    for j in range(len(bits)):
        b = parties.hidden(0, N[torch.floor_divide], m.ObjectRef(parties.bit(0, share, j)), 32)  # 0 or 1
        reply, _ = parties.cmd(0, N[torch.Tensor.__getitem__], torch.zeros(1), ([m.ObjectRef(b)],))
        _no_values(reply, parties)
        outcomes.append(_outcome(reply))
    assert len(set(outcomes)) == 1, list(zip(bits, outcomes))
    kind, error, _ = outcomes[0]
    assert kind == "ErrorReply" and error == "PermissionDeniedError", outcomes[0]
    parties.still_serves()


def _set_at(y, index):
    y[index] = 1.0
    return y


@pytest.mark.parametrize("spelling", ["([s],)", "(..., [s])", "[[s]]", "(([s],),)", "setitem ([s],)"])
def test_the_secret_guard_refuses_a_secret_listed_in_an_index(spelling):
    """Each spelling that makes torch build an index tensor from listed tensors in C++ is refused, one value-free
    line, whatever the value (in range or not); the guard leaves no mode on."""
    from veil.exceptions import PermissionDeniedError
    from veil.workers import oblivious

    calls = {"([s],)": lambda x, s: x[([s],)], "(..., [s])": lambda x, s: x[..., [s]], "[[s]]": lambda x, s: x[[[s]]],
             "(([s],),)": lambda x, s: x[(([s],),)], "setitem ([s],)": lambda x, s: _set_at(x, ([s],))}
    texts = set()
    for value in (0, 7):
        secret = torch.tensor(value)
        with pytest.raises(PermissionDeniedError) as info:
            with oblivious.guard("probe", [secret]):
                calls[spelling](torch.zeros(2, 2), secret)
        texts.add(str(info.value))
        assert torch._C._len_torch_function_stack() == 0
    (text,) = texts
    assert "\n" not in text and "whatever the values" in text, text


def test_a_secret_indexed_by_public_lists_still_computes():
    """Legit: a secret indexed by public lists (and by public tensors in a list) equals plain torch's."""
    from veil.workers import oblivious

    a = torch.arange(12.0).reshape(3, 4)
    secret = a.clone()
    with oblivious.guard("probe", [secret]):
        rows = secret[([0, 2],)]
        cols = secret[..., [1, 3]]
        listed = secret[([torch.tensor(1)],)]
    assert torch.equal(rows, a[[0, 2]]) and torch.equal(cols, a[:, [1, 3]]) and torch.equal(listed, a[[1]])


def test_a_reviewed_value_listed_in_an_index_is_refused_whatever_it_is(hook):
    """The same door for a value under the owner's review (value_shapes shares the Python-read guard): ``x[([i],)]``
    with ``i = (d[0, 0] > c)`` as a long, on a public (1,) ``x``, failed iff ``d[0, 0] > c``. Must hold: one refusal
    for both thresholds, naming no value."""
    from test_redteam_session67_review import Reviewed

    w = Reviewed(hook)
    x00 = w.derived(torch.Tensor.__getitem__, w.d, (0, 0))
    outcomes = set()
    for threshold in (0.0, 10.0):
        i = w.derived(torch.Tensor.long, w.derived(torch.gt, x00, threshold))
        reply, _ = w.cmd(N[torch.Tensor.__getitem__], torch.zeros(1), ([i],))
        outcomes.add(w.outcome(reply))
    assert len(outcomes) == 1, f"the reply tells the reviewed values apart: {outcomes}"
    (kind, _, text), = outcomes
    assert kind == "ErrorReply" and "1.5" not in text, outcomes
    w.still_serves()


# ------------------------------------------------------------------ 13e6bf5: a state named again, another argument

def test_a_masked_input_refuses_an_expanded_losses_view_without_a_quota(hook):
    """Attack (a bypass of 13e6bf5): ``masked_input``'s ``losses`` takes a float64 copy for its mean, but only the
    state tensors were checked: an ``expand`` view of one element as ``losses`` (a few bytes held) made the worker
    allocate its whole logical size as float64 in one call. Must hold: refused in one line before anything is made;
    nothing was masked; the worker serves on."""
    from server_sessions import answers_next_command, computed, send_tensor
    from test_redteam_session63 import MASKED, Setup
    from aten_watch import LargestMade as _Largest

    limit, entries, named = 1 << 20, 16_384, 64
    setup = Setup(hook)
    assert setup.srv.monitor.max_session_bytes is None  # no quota
    setup.srv.max_message = limit
    state = [m.ObjectRef(send_tensor(setup.srv, setup.s1, torch.ones(8)))]
    one = m.ObjectRef(send_tensor(setup.srv, setup.s1, torch.ones(1, 1)))
    losses = computed(setup.srv, setup.s1, "Tensor.expand", one, named, entries)  # 8 MiB as float64
    tag = setup.round()
    seen = _Largest()
    with seen:
        reply, _ = setup.command(setup.s1, MASKED, tag, [setup.srv.id, "p1"], state, 1.0, losses)
    assert type(reply) is m.ErrorReply and "\n" not in reply.message.strip(), reply
    assert seen.most * 8 <= limit, f"masked_input made a tensor of {seen.most} entries first"
    assert not setup.went_through(tag)
    answers_next_command(setup.srv, setup.s1)


def test_a_masked_input_with_honest_losses_still_masks(hook):
    """Guard: a losses tensor of its own storage (the batch's losses) is no named-again entry: the input is masked."""
    from server_sessions import send_tensor
    from test_redteam_session63 import MASKED, Setup

    setup = Setup(hook)
    setup.srv.max_message = 1 << 20
    state = [m.ObjectRef(send_tensor(setup.srv, setup.s1, torch.ones(8)))]
    losses = m.ObjectRef(send_tensor(setup.srv, setup.s1, torch.rand(64, 1024)))  # 512 KiB as float64
    tag = setup.round()
    reply, _ = setup.command(setup.s1, MASKED, tag, [setup.srv.id, "p1"], state, 1.0, losses)
    assert type(reply) is m.OkReply, reply
    assert setup.went_through(tag)


# ------------------------------------------------------------------ 435515d: session-end notices, a cycler's backlog

def test_a_session_cyclers_backlog_at_a_peer_refuses_only_its_own_new_sessions(monkeypatch):
    """Attack (a denial of service 435515d added): a user whose sessions each reach a slow peer and end fills that
    peer's backlog of session ends; ``admit`` then refused the first frame of *every* new session to the peer,
    other users' included, as long as the cycler kept it full. Must hold: the cycler's new sessions are refused
    there (its ends must be told first), another user's new session reaches the peer, and once the peer caught up
    the cycler's do again."""
    from test_redteam_session67_session_ends import CAP, _admitted, _until, _Worker
    from veil.workers import accounts
    from veil.workers.accounts import Account, SessionEndNotices

    monkeypatch.setattr(accounts, "ACCOUNT_ENDS_QUEUED", CAP)
    worker = _Worker()
    notices = SessionEndNotices(worker)
    mallory, bob = (("scientist", "mallory"),), (("scientist", "bob"),)
    for _ in range(CAP + 1):  # (the first one is in flight at the slow peer)
        ended = Account(users=mallory)
        ended.peers.add("slow")
        notices.post(ended)

    assert not _admitted_as(notices, "slow", mallory), "the cycler's own backlog did not hold its new sessions"
    assert _admitted_as(notices, "slow", bob), "another user's new session was refused by the cycler's backlog"
    worker.open.set()
    _until(lambda: len(worker.told_to("slow")) == CAP + 1)
    _until(lambda: _admitted_as(notices, "slow", mallory))
    assert _admitted_as(notices, "slow", mallory) and _admitted(notices, "slow")


def _admitted_as(notices, pid: str, users: tuple) -> bool:
    from veil.workers.accounts import Account

    try:
        notices.admit(Account(users=users), pid)
    except Exception:  # noqa: BLE001
        return False
    return True
