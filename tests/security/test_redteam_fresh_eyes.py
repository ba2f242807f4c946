"""Red team (fresh eyes): the MPC protocol steps a session can call by name, which no pass had attacked for
resources - ``veil.mpc.prg_share``, ``veil.mpc.expand_material`` and ``veil.mpc.receive_comparison``.

They are worker functions, and worker functions are not sized on ``meta`` before they run
(``veil/workers/output_bounds.py`` sizes torch ops only): the requester names a shape and an item count, the
worker expands that much AES keystream, and only the store's quota said no - after the memory was filled.

Findings (each test below failed before this pass; checked by running it against the unfixed functions):

1. ``test_a_seeded_share_is_refused_before_it_is_expanded``: ``prg_share(seed, [2**24])`` under a 64 MiB
   quota expanded 128 MiB before the store refused it; ``[2**37]`` tried to allocate 1 TiB (the allocator's
   error proves it ran). No bound at all without a quota.
2. ``test_a_seeded_share_takes_only_whole_sizes``: ``[-1]`` and ``[3.5]`` were taken (``int()`` of each).
3. ``test_received_comparison_material_is_bounded_before_it_is_expanded``: ``receive_comparison`` had no
   element bound (``check_spec`` checks types only): a 1 TiB allocation attempt, or 3 x 128 MiB expanded
   past a 64 MiB quota.
4. ``test_expanded_dealt_material_is_refused_before_it_is_expanded``: ``expand_material`` was bounded
   (``MAX_DEAL_ELEMENTS``, 1 GiB) but expanded up to that before a smaller quota refused it.

Requests go through a real ``WebsocketServerWorker`` session (``serve_bytes``), in process; nothing here
allocates more than a few KiB for real (the expansion is spied on).
"""

from __future__ import annotations

import pytest
import torch

from veil.messaging import messages as m
from veil.mpc import prg
from veil.mpc.providers import fss_dealing, worker_dealer
from veil.tensors.mpc_glue import remote_sharing

from server_sessions import quota_worker, session_helpers  # noqa: E402

TOKEN = "rt-fresh-eyes-scientist"
QUOTA = 64 << 20
SEED = torch.arange(32, dtype=torch.uint8)

_session, _request, _send, _command, _result = session_helpers(TOKEN)

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture
def served(hook):
    # (hook: the session fixture that makes veil's torch hook)
    srv = quota_worker(hook, "fresh-eyes-a", TOKEN, QUOTA)
    return srv, _session(srv)


@pytest.fixture
def expanded(monkeypatch):
    """The element counts each protocol step asked the PRG to expand (the real expansion still runs)."""
    asked = []

    def spy(seed, label, shape):
        asked.append(int(torch.Size([int(d) for d in shape]).numel()))
        return prg.expand(seed, label, shape)

    for module in (remote_sharing, fss_dealing, worker_dealer):
        monkeypatch.setattr(module, "expand", spy)
    return asked


def _error(reply) -> tuple[str, str]:
    assert type(reply) is m.ErrorReply, reply
    return reply.error, reply.message


@pytest.mark.parametrize("shape, refusal", [([1 << 24], "QuotaExceededError"), ([1 << 37], "MPCError")])
def test_a_seeded_share_is_refused_before_it_is_expanded(served, expanded, shape, refusal):
    srv, s = served
    reply, _ = _command(srv, s, "veil.mpc.prg_share", SEED, shape)
    error, message = _error(reply)
    assert error == refusal and "allocate" not in message
    assert "\n" not in message
    assert expanded == []  # refused before any keystream was made
    ok, (rid,) = _command(srv, s, "veil.mpc.prg_share", SEED, [3, 2])  # the session still serves
    assert type(ok) is m.OkReply


@pytest.mark.parametrize("shape", [[-1], [3.5], [2, "4"], [True]])
def test_a_seeded_share_takes_only_whole_sizes(served, expanded, shape):
    srv, s = served
    reply, _ = _command(srv, s, "veil.mpc.prg_share", SEED, shape)
    assert _error(reply)[0] == "MPCError"
    assert expanded == []


def test_an_honest_seeded_share_is_the_owners_stream(served):
    """What the data owner subtracts for this party's share (``share_on_workers``) is what the party stores:
    the bound did not change the values."""
    srv, s = served
    reply, (rid,) = _command(srv, s, "veil.mpc.prg_share", SEED, [3, 2])
    assert type(reply) is m.OkReply
    stored = dict(srv.monitor.owner_entries())[rid].obj
    assert torch.equal(stored, prg.expand(bytes(SEED.tolist()), "share", [3, 2]))


@pytest.mark.parametrize("shape, count, refusal", [
    ([1 << 24], 1, "QuotaExceededError"),  # 3 fields of 128 MiB under a 64 MiB quota
    ([1 << 37], 1, "ProviderError"),  # past any bound: was a 1 TiB allocation attempt
    ([0], 1 << 27, "ProviderError"),  # empty fields, but a loop step each
])
def test_received_comparison_material_is_bounded_before_it_is_expanded(served, expanded, shape, count, refusal):
    srv, s = served
    reply, _ = _command(srv, s, "veil.mpc.receive_comparison", shape, 1, count, SEED, [], [])
    error, message = _error(reply)
    assert error == refusal and "allocate" not in message
    assert expanded == []


def test_expanded_dealt_material_is_refused_before_it_is_expanded(served, expanded):
    srv, s = served
    reply, _ = _command(srv, s, "veil.mpc.expand_material", SEED, "zero", ([1 << 25],), 1, [])
    assert _error(reply)[0] == "QuotaExceededError"
    assert expanded == []
    reply, _ = _command(srv, s, "veil.mpc.expand_material", SEED, "zero", ([4],), 1, [])
    assert type(reply) is m.OkReply and expanded == [4]  # a small one still runs
