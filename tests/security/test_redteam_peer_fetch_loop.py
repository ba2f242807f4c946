"""Red team, peer fetches served on the server's event loop (``PeerRounds.take_on_loop``,
``serve_fetch_on_loop``): a fetch whose round is published is answered at once, one that waits is parked
as a future instead of holding a handler thread. The attacks a hostile peer can make there, each against
the rules of the thread path: waiting past the limits, fetching as a non-reader, twice, or another step,
hanging up while parked, and parking again and again for rounds that never come (the parked futures and
waiting slots must not pile up). The cluster tests in test_redteam_peer_fetch.py run the same rules over
real ``veil worker`` processes (whose peer sessions now take this path)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from veil.workers.peer_rounds import MAX_WAITING_PER_PEER, PeerOpeningError, PeerRounds

ROUND = "r" * 20
SHARE = [torch.arange(4, dtype=torch.int64)]


def _run(coro):
    return asyncio.run(coro)


async def _never() -> asyncio.Future:
    return asyncio.get_running_loop().create_future()


def _idle(rounds: PeerRounds) -> None:
    """Nothing of a finished fetch stays behind: no parked future, no waiting slot."""
    assert rounds._parked == {} and rounds._waiting == {}


def test_a_parked_fetch_wakes_when_its_round_is_published_and_takes_it_once():
    rounds = PeerRounds()

    async def main():
        closed = await _never()
        fetch = asyncio.ensure_future(rounds.take_on_loop(ROUND, "charlie", "beaver_mask", 5.0, closed))
        await asyncio.sleep(0.01)
        assert not fetch.done() and rounds._waiting == {"charlie": 1}
        # the round's own request registers and publishes it from a handler thread
        rnd = rounds.open("session-x", ROUND, "beaver_mask", frozenset({"charlie"}))
        threading.Thread(target=rounds.publish, args=(rnd, SHARE)).start()
        got = await asyncio.wait_for(fetch, 5.0)
        assert got is SHARE
        with pytest.raises(PeerOpeningError, match="already took"):
            await rounds.take_on_loop(ROUND, "charlie", "beaver_mask", 5.0, closed)
        rounds.wait_taken(ROUND, rnd)  # the publishing party sees its reader took it
    _run(main())
    _idle(rounds)


def test_a_parked_fetch_is_woken_only_by_its_own_rounds_publication_or_end():
    """Other rounds registering, publishing, being taken or ending, and its own round registering, leave a
    parked fetch parked (the same future, unresolved: no loop wake-up for a change that cannot end its
    wait); its own round's publication wakes it and it takes the share."""
    rounds = PeerRounds()
    other = "o" * 20

    async def main():
        closed = await _never()
        fetch = asyncio.ensure_future(rounds.take_on_loop(ROUND, "charlie", "beaver_mask", 5.0, closed))
        await asyncio.sleep(0.01)
        ((_, parked),) = rounds._parked[ROUND]

        def elsewhere():
            rnd = rounds.open("session-y", other, "beaver_mask", frozenset({"charlie"}))
            rounds.publish(rnd, SHARE)
            assert rounds.take(other, "charlie", "beaver_mask", 0.1) is SHARE
            rounds.close(other, rnd)
            rounds.open("session-x", ROUND, "beaver_mask", frozenset({"charlie"}))

        worker = threading.Thread(target=elsewhere)
        worker.start()
        worker.join(5.0)
        await asyncio.sleep(0.01)
        assert not parked.done() and rounds._parked[ROUND] == [(asyncio.get_running_loop(), parked)]
        assert not fetch.done()
        rounds.publish(rounds._open[ROUND], SHARE)
        assert await asyncio.wait_for(fetch, 5.0) is SHARE
    _run(main())
    _idle(rounds)


@pytest.mark.parametrize("reader, name, match", [("dave", "beaver_mask", "not a reader"),
                                                  ("charlie", "trunc_mask", "opens 'beaver_mask'")])
def test_a_non_reader_or_another_step_is_refused_on_the_loop_and_takes_nothing(reader, name, match):
    rounds = PeerRounds()
    rnd = rounds.open("session-x", ROUND, "beaver_mask", frozenset({"charlie"}))
    rounds.publish(rnd, SHARE)

    async def main():
        closed = await _never()
        with pytest.raises(PeerOpeningError, match=match):
            await rounds.take_on_loop(ROUND, reader, name, 1.0, closed)
        assert await rounds.take_on_loop(ROUND, "charlie", "beaver_mask", 1.0, closed) is SHARE
    _run(main())
    _idle(rounds)


def test_parked_fetches_stay_within_the_per_peer_limit():
    """A peer parks MAX_WAITING_PER_PEER fetches for a round that does not exist yet; one more is refused at
    once (as on the thread path); another peer still waits; when the round comes one of them takes it."""
    rounds = PeerRounds()

    async def main():
        closed = await _never()
        parked = [asyncio.ensure_future(rounds.take_on_loop(ROUND, "charlie", "beaver_mask", 5.0, closed))
                  for _ in range(MAX_WAITING_PER_PEER)]
        await asyncio.sleep(0.01)
        with pytest.raises(PeerOpeningError, match="too many"):
            await rounds.take_on_loop(ROUND, "charlie", "beaver_mask", 5.0, closed)
        other = asyncio.ensure_future(rounds.take_on_loop(ROUND, "dave", "beaver_mask", 5.0, closed))
        await asyncio.sleep(0.01)
        assert rounds._waiting == {"charlie": MAX_WAITING_PER_PEER, "dave": 1}
        rnd = rounds.open("session-x", ROUND, "beaver_mask", frozenset({"charlie"}))
        rounds.publish(rnd, SHARE)
        results = await asyncio.gather(*parked, other, return_exceptions=True)
        taken = [r for r in results if r is SHARE]
        refused = [r for r in results if isinstance(r, PeerOpeningError)]
        assert len(taken) == 1 and len(refused) == len(results) - 1
        assert any("not a reader" in str(r) for r in refused)  # dave waited, and is still refused
    _run(main())
    _idle(rounds)


def test_a_fetch_whose_connection_closes_while_parked_frees_its_slot_and_takes_nothing():
    rounds = PeerRounds()

    async def main():
        closed = asyncio.get_running_loop().create_future()
        fetch = asyncio.ensure_future(rounds.take_on_loop(ROUND, "charlie", "beaver_mask", 5.0, closed))
        await asyncio.sleep(0.01)
        closed.set_result(None)  # the peer hung up
        with pytest.raises(ConnectionError):
            await fetch
        _idle(rounds)
        rnd = rounds.open("session-x", ROUND, "beaver_mask", frozenset({"charlie"}))
        rounds.publish(rnd, SHARE)
        assert await rounds.take_on_loop(ROUND, "charlie", "beaver_mask", 1.0, await _never()) is SHARE
    _run(main())
    _idle(rounds)


def test_fetches_for_rounds_that_never_come_leave_nothing_parked():
    """A hostile peer fetches well-formed round ids no round will ever have, again and again: each is
    answered "not yet" (None) after its wait, and no parked future or waiting slot piles up."""
    rounds = PeerRounds()

    async def main():
        closed = await _never()
        for k in range(200):
            assert await rounds.take_on_loop(f"{k:020d}", "charlie", "beaver_mask", 0.0005, closed) is None
            assert sum(map(len, rounds._parked.values())) <= 1
    _run(main())
    _idle(rounds)


def test_an_ended_round_refuses_a_parked_fetch():
    """The round's session ends while a fetch for it is parked: the fetch wakes and is refused (ended)."""
    rounds = PeerRounds()
    rnd = rounds.open("session-x", ROUND, "beaver_mask", frozenset({"charlie"}))

    async def main():
        closed = await _never()
        fetch = asyncio.ensure_future(rounds.take_on_loop(ROUND, "charlie", "beaver_mask", 5.0, closed))
        await asyncio.sleep(0.01)
        threading.Thread(target=rounds.close, args=(ROUND, rnd)).start()
        with pytest.raises(PeerOpeningError, match="ended, or never registered"):
            await asyncio.wait_for(fetch, 5.0)
    _run(main())
    _idle(rounds)
