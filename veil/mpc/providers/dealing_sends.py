"""How a crypto provider's dealing sends the parties their parts, once its material is made.

A dealing holds its provider's slots of its parties (:func:`veil.mpc.runtime.awaiting_replies`), then the one
dealing slot while it makes its material (:func:`veil.mpc.runtime.one_step_at_a_time`). It gives the dealing
slot up before it waits on any party (a party's reply may take up to a peer link's timeout, 120 s, and every
session's dealings waited for it), and frees each party's slot as that party answers: a party that never
answers holds back the dealings to it alone, and a dealing that also names honest parties frees theirs once
they answered (its sends run beside each other where the parties are network workers).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

from veil.mpc.runtime import beside


@contextmanager
def answering(answered: Callable[[int], None], index: int) -> Iterator[None]:
    """Frees party ``index``'s slot at the end of the block (its reply, or its error, came)."""
    try:
        yield
    finally:
        answered(index)


def replied(call: Callable[[], Any], answered: Callable[[int], None], index: int) -> Callable[[], Any]:
    """``call`` (a send to party ``index``), freeing that party's slot once it returns or raises."""
    def run() -> Any:
        with answering(answered, index):
            return call()

    return run


def send_each(worker: Any, parties: Sequence[Any], messages: Sequence[Any], answered: Callable[[int], None],
              elements: int = 0) -> list:
    """Sends party ``i`` ``messages[i]`` (network parties all at once, on the runtime's threads), freeing each
    party's slot as it answers; the replies, or the first error once every send ended."""
    calls = [replied(_send(worker, msg, party), answered, i) for i, (msg, party) in enumerate(zip(messages, parties))]
    return beside(calls, parties, elements)()


def started_beside(calls: Sequence[Callable[[], Any]], parties: Sequence[Any], elements: int) -> Callable[[], list]:
    """:func:`veil.mpc.runtime.beside` for sends started while the material is still being made (under the
    dealing slot): a call the runtime would run now on this thread (in-process parties, small material) is
    held back instead, and runs when the returned call is made (after the dealing slot is given up), which
    then waits for the others and gives every result, raising the first error once all ended. No party is
    waited on under the dealing slot, whatever runs the sends."""
    here, held_back = threading.get_ident(), []

    def deferred(k: int, call: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            if threading.get_ident() == here:
                held_back.append(k)
                return None
            return call()
        return run

    wait_others = beside([deferred(k, call) for k, call in enumerate(calls)], parties, elements)

    def finish() -> list:
        results, error = [None] * len(calls), None
        for k in list(held_back):
            try:
                results[k] = calls[k]()
            except Exception as e:  # noqa: BLE001  (the others still run, as they would on threads)
                error = error or e
        try:
            for k, result in enumerate(wait_others()):
                if k not in held_back:
                    results[k] = result
        except Exception as e:  # noqa: BLE001
            error = error or e
        if error is not None:
            raise error
        return results

    return finish


def wait_quietly(wait: Callable[[], Any]) -> None:
    """Waits for sends already started when the dealing failed (its own error is the one to raise)."""
    try:
        wait()
    except Exception:  # noqa: BLE001
        pass


def _send(worker: Any, msg: Any, party: Any) -> Callable[[], Any]:
    return lambda: worker.send_msg(msg, party)
