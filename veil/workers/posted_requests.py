"""Reading the replies of requests posted and not read yet (a mixin of :class:`veil.workers.outbox.Outbox`).

A destination that takes a request without waiting for its reply (``post``/``collect``: network
workers) may have several requests of this process unread: a full batch of deferred commands
(``Outbox._post_batch``, at most one) and SMPC peer rounds (``Outbox.send_round(post=...)``, whose
replies carry nothing). ``_in_flight`` keeps them per destination, oldest first, as ``[worker,
prelude, bytes sent, ticket, what]`` (``what``: None for a batch, the round's description for a
round); this reads them, in order, and raises the first failure as the request's own would have been.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from veil.mpc.errors import party_error

if TYPE_CHECKING:
    from veil.workers.base import BaseWorker


class PostedRequests:
    """Mixin of Outbox (needs ``_in_flight``, ``_pending_deletes``, ``_queue_lock``, ``_send_lock``,
    ``_note_lost``, ``_read_reply`` and ``stats``)."""

    def _collect(self, location: "BaseWorker") -> None:
        """Reads the replies to the requests posted to ``location`` (oldest first) and raises the first failure."""
        flights = self._in_flight.pop(id(location), None)
        first = None
        for flight in flights or ():
            if flight[0] is not location:  # (an id reused by a new worker object: nothing posted)
                continue
            try:
                self._collect_one(flight)
            except Exception as e:
                first = first or e
        if first is None:
            return
        # as for a failure inside one request: the commands deferred after it did not run either
        # (they may use its results); queued deletions still go with the next request
        with self._queue_lock:
            entry = self._pending_deletes.get(id(location))
            later = [item for item in entry[1] if type(item) is not int] if entry else []
            if later:
                entry[1][:] = [item for item in entry[1] if type(item) is int]
                entry[2] = 0
        if later:
            self._note_lost(location, later, 0, f"an earlier deferred command failed ({type(first).__name__})")
        raise first

    def _collect_one(self, flight: list) -> Any:
        """The decoded reply to one posted request ``[worker, prelude, bytes sent, ticket, what]``; a
        failure of a posted round (``what``) is raised as the round's own would have been."""
        location, prelude, sent, ticket, what = flight
        try:
            try:
                reply_bytes = location.collect(ticket)
            except Exception as e:
                if prelude:
                    self._note_lost(location, prelude, 0, f"{type(e).__name__}: {e}")
                raise
            self.stats.record(sent, len(reply_bytes))
            return self._read_reply(reply_bytes, location, prelude)
        except Exception as e:
            if what is None:
                raise
            error = party_error(e, location.id, what)
            if error is e:
                raise
            raise error from e

    def wait_posted(self) -> None:
        """Reads the reply of every request posted and not read yet (peer rounds, a batch of deferred
        commands), for every destination, raising the first failure; sends nothing. A timed SMPC call
        ends with it: a posted round's work is done once its reply came."""
        first_error = None
        for key in list(self._in_flight):
            flights = self._in_flight.get(key)
            if flights:
                try:
                    with self._send_lock(flights[0][0]):
                        self._collect(flights[0][0])
                except Exception as e:
                    first_error = first_error or e
        if first_error is not None:
            raise first_error
