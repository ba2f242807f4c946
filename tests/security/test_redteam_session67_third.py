"""Red team (session 67, third pass) of the last hour's fixes: bypasses by another spelling, and regressions.

Each test failed on the code before its fix (see the commit that added it)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_redteam_session67_second import _admitted_as  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


# ------------------------------------------------------------------ d45c2de: session-end notices counted per user


def test_a_user_holding_several_tokens_queues_no_more_session_ends_than_one_user(monkeypatch):
    """Attack (a bypass of d45c2de): the ends waiting at a peer were counted per *set* of users a connection
    presented. A user holding k tokens (up to 8 per connection: its scientist token, a client token, a second
    account) got a fresh bound of ends for every combination of them: 2^k - 1 times ACCOUNT_ENDS_QUEUED ends
    queued at one slow peer (the worker's memory, and every other user's ends waiting behind them in the peer's
    one queue), its new sessions admitted all along. Must hold: once mallory's ends at the peer are at the bound,
    no new session presenting mallory's token reaches it, whatever other tokens it presents too; bob's does; once
    the peer caught up, mallory's do again."""
    from test_redteam_session67_session_ends import CAP, _until, _Worker
    from veil.workers import accounts
    from veil.workers.accounts import Account, SessionEndNotices

    monkeypatch.setattr(accounts, "ACCOUNT_ENDS_QUEUED", CAP)
    worker = _Worker()
    notices = SessionEndNotices(worker)
    mallory = ("scientist", "mallory")
    held = [("client", "mallory-serving"), ("scientist", "mallory-second"), ("client", "mallory-third")]
    combos = [tuple(sorted((mallory, *extra))) for r in range(len(held) + 1)
              for extra in itertools.combinations(held, r)]
    posted = 0
    for users in combos:  # each combination of mallory's tokens, cycled until refused (at most CAP + 1 each)
        for _ in range(CAP + 1):
            if not _admitted_as(notices, "slow", users):
                break
            ended = Account(users=users)
            ended.peers.add("slow")
            notices.post(ended)
            posted += 1
    assert posted <= CAP + 1, (
        f"mallory's sessions queued {posted} ends at the slow peer (bound {CAP}) by presenting "
        f"{len(combos)} combinations of the tokens it holds")
    for users in combos:
        assert not _admitted_as(notices, "slow", users), users
    assert _admitted_as(notices, "slow", (("scientist", "bob"),)), "another user's session was refused"
    worker.open.set()
    _until(lambda: len(worker.told_to("slow")) == posted)
    _until(lambda: _admitted_as(notices, "slow", combos[-1]))
    assert all(_admitted_as(notices, "slow", users) for users in combos), "the peer caught up, mallory stays refused"


# ------------------------------------------------------------------ 2b67885 / b174334: another step's request-written list

def test_an_fss_join_of_more_chunks_than_any_split_is_refused_before_it_runs(hook):
    """Attack (the class 2b67885 and b174334 closed for the joins and mac_combine, another step): ``fss_join(chunks,
    shape)`` (an FSS comparison's last step at each party) concatenates a request-written list: naming one stored
    empty share N times costs the quota nothing and ~10 bytes an entry on the wire, and made a reshape per entry
    and a cat of N (one result: output_pieces does not count it), with no cancellation point. Must hold: at most
    ``comparison.MAX_CHUNKS`` chunks (what ``fss_chunks`` cuts a value into), refused before any op in one line; the
    worker serves on; an honest join joins."""
    from server_sessions import answers_next_command, open_session, quota_worker, run_command, send_tensor
    from aten_watch import AtenOps as _Ops
    from veil.ids import new_id
    from veil.messaging import messages as m
    from veil.mpc import comparison

    import torch

    token = "rt67-third-fss-join-scientist-0123456789abcdef"
    srv = quota_worker(hook, f"rt67-fssjoin-{new_id() % 10**9}", token, 1 << 20)
    s = open_session(srv, token)
    empty = m.ObjectRef(send_tensor(srv, s, torch.zeros(0, dtype=torch.int64)))
    asked = 3 * comparison.MAX_CHUNKS
    with _Ops() as ops:
        reply, _ = run_command(srv, s, "veil.mpc.fss_join", [empty] * asked, [0])
    assert type(reply) is m.ErrorReply, reply
    assert "\n" not in reply.message.strip() and "fss_join" in reply.message, reply.message
    assert ops.count < 100, f"fss_join ran {ops.count} ops before it was refused"
    answers_next_command(srv, s)
    # honest: a value cut by fss_chunks into its most chunks is joined back
    v = torch.arange(comparison.MAX_CHUNKS, dtype=torch.int64).view(4, -1)
    cut = comparison._fss_chunks([v], 1)
    assert torch.equal(comparison._fss_join(list(cut), list(v.shape)), v)
