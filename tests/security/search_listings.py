"""What the search/listing red teams share (the compat surface's first and second passes): a hostile worker that
answers every search with pages of its choosing, and a listing followed page by page as the client does."""

from __future__ import annotations

import time
from typing import Any, Callable

from veil.messaging import messages as m

from server_sessions import request


def paging_worker(hook: Any, wid: str, page: Callable[[], Any], served: list, most: int = 12,
                  pause: float = 0.0) -> Any:
    """A hostile worker that answers each SearchMessage with ``page()`` after ``pause`` seconds, recording the
    cursor each asks with in ``served``; past ``most`` asks it fails (the client should have stopped by then)."""
    from veil.workers.virtual import VirtualWorker

    class Paging(VirtualWorker):
        def _handle(self, msg, sender):
            if type(msg) is not m.SearchMessage:
                return super()._handle(msg, sender)
            served.append(msg.after)
            if len(served) > most:
                raise RuntimeError("the client is still asking")
            time.sleep(pause)
            return page()

    return Paging(hook, id=wid)


def follow_pages(srv: Any, s: Any, ask: Callable[[Any], Any]) -> list:
    """Every page of a listing (``ask(after)`` a request), followed as the client does:
    [(descriptor ids, next_after)]."""
    pages, after = [], None
    while len(pages) < 1000:
        reply = request(srv, s, ask(after))
        assert type(reply) is m.DescriptorsReply, reply
        pages.append(([d.id for d in reply.descriptors], reply.next_after))
        if reply.next_after is None:
            return pages
        after = reply.next_after
    raise AssertionError("the listing did not end")
