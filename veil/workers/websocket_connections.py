"""How a network worker meets its connections: handshake slots, one request loop per connection.

:class:`ConnectionServing` is a mixin of :class:`~veil.workers.websocket_server.WebsocketServerWorker`.
It authenticates each opening handshake (``websocket_auth``) and keeps a slot for it until the
connection becomes a session or fails (released on every path: a request without ``Upgrade`` used to
keep its slot forever). Each session's loop reads one message at a time and answers it, in this order:
a request the event-loop lane already served (``LaneConnection``), one served inline on the loop
(``try_inline``), a peer's share fetch (served on the loop from published shares), else the worker's
handler thread (``serve_bytes``), cancelled if the connection closes first. Large replies go out as
fragments from the tensors' memory (``reply_frames``).

What one client may pin is bounded (red team, tests/security/test_redteam_wire_resources.py and
test_redteam_serving_slots.py): a principal holds at most ``max_sessions_per_principal`` sessions (the
owner's admin token aside), a client with its own issued token (``client_tokens``) at most
``max_sessions_per_client``, client-role sessions together at most :data:`CLIENT_SLOT_SHARE` of them; a few
slots are kept for the admin and peers, the last of them for the admin alone; a message being received is
capped by the session's memory quota, and so are the bytes queued for a session's reader
(``LaneConnection``); connections that have not sent their whole opening request are few and small
(:class:`OpeningConnections`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

from veil.exceptions import PermissionDeniedError
from veil.governance.users_wire import serve_users_message
from veil.messaging import messages as m
from veil.messaging.frames import FrameParts, OwnedFrame, frame_pad
from veil.messaging.serde import deserialize, serialize
from veil.workers import cancellation, local_socket
from veil.workers.auth_throttle import Throttled, source_of, unguessable
from veil.workers.lane_connection import LaneConnection
from veil.workers.loop_rows import AfterRows, after_rows, released
from veil.workers.peer_openings import HUNG_UP, PeerFetchMessage, serve_fetch_on_loop
from veil.workers.reply_frames import (REPLY_FRAGMENT, _fragments, _part_fragments, _send_fragmented, _send_one,
                                       send_with_descriptor)
from veil.workers.share_slots import SlotPool, SlotSend
from veil.workers.websocket_auth import Session, authenticate, tokens_from_headers
from veil.workers.websocket_client import MAX_SIZE_HEADER

log = logging.getLogger(__name__)

#: the websockets opening-handshake timeout; a handshake slot older than this is stale
OPEN_TIMEOUT = 10.0

#: a peer fetch (a round id and a step name) is far smaller: a larger request is not decoded on the loop
_PEER_FETCH_MAX_BYTES = 512

#: most bytes a connection may send before its opening request is whole (a veil client's, 8 tokens
#: included, is under 1 KiB). websockets' own limits (8 KiB a line, 128 lines: module constants read from
#: environment variables at import, shared by every server and client of the process) let a connection
#: without a token make the worker hold ~1 MiB until the open timeout
MAX_OPENING_BYTES = 16 * 1024
#: connections whose opening request is not whole yet, in all and from one address; past either, the
#: oldest (of the busiest address) is dropped: a flood of stalled handshakes cannot lock others out
MAX_OPENING = 512
MAX_OPENING_PER_ADDRESS = 64
#: sessions one client holding its own issued token may have at once (a ModelClient needs one per party)
ISSUED_CLIENT_SESSIONS = 4
#: the share of a worker's connections that client-role sessions may hold together
CLIENT_SLOT_SHARE = 0.75
#: how far a message being received may go past the session's memory quota: a request's envelope, and the
#: small requests (deletes, gets) of a session whose quota is tiny
QUOTA_MESSAGE_SLACK = 2**20


async def _receive(ws: ServerConnection) -> Any:
    """The next message. A fragmented one (veil clients fragment large requests) is assembled in an
    OwnedFrame, whose main tensor the decoder then uses in place: websockets' own assembly would
    join the fragments into immutable bytes, and decoding would copy the tensor once more."""
    first = frame = None
    pad = 0
    async for fragment in ws.recv_streaming():  # the library still checks frames and the size limit
        if first is None:
            first = fragment
        elif isinstance(first, str):
            first += fragment
        else:
            if frame is None:
                pad = frame_pad(first[:5])
                frame = OwnedFrame(pad)
                frame += first
            frame += fragment
    if frame is None:
        return first
    return memoryview(frame)[pad:] if pad else frame



class OpeningConnections:
    """Connections whose opening request has not arrived whole (``LaneConnection`` reports them): each may
    send at most :data:`MAX_OPENING_BYTES` before it, and at most ``limit`` of them (``per_address`` from
    one source, :func:`source_of`) are kept; past that the oldest is dropped. ``on_drop(address, reason)``
    audits a drop."""

    def __init__(self, on_drop: Any = None, limit: int = MAX_OPENING, per_address: int = MAX_OPENING_PER_ADDRESS,
                 max_bytes: int = MAX_OPENING_BYTES) -> None:
        self.on_drop, self.limit, self.per_address, self.max_bytes = on_drop, limit, per_address, max_bytes
        self._by_address: dict[str, dict[Any, int]] = {}  # source -> {connection: bytes so far}, oldest first
        self._address: dict[Any, tuple[str, str]] = {}  # connection -> (its source, its own address: audited)

    def add(self, connection: Any, address: str) -> None:
        source = source_of(address)
        mine = self._by_address.get(source)
        if mine is not None and len(mine) >= self.per_address:
            self._drop(next(iter(mine)), "too many unfinished opening handshakes from this address")
        elif len(self._address) >= self.limit:
            # the busiest source loses its oldest; among equally busy ones (a flood from many sources, one each)
            # a random one, so a lone client's handshake is not always the one to go
            most = max(len(held) for held in self._by_address.values())
            busiest = secrets.choice([held for held in self._by_address.values() if len(held) == most])
            self._drop(next(iter(busiest)), "too many unfinished opening handshakes")
        self._by_address.setdefault(source, {})[connection] = 0
        self._address[connection] = (source, address)

    def received(self, connection: Any, nbytes: int) -> bool:
        """Counts bytes of an opening request; False: past :data:`MAX_OPENING_BYTES` (dropped)."""
        held = self._address.get(connection)
        if held is None:
            return True
        mine = self._by_address[held[0]]
        mine[connection] += nbytes
        if mine[connection] <= self.max_bytes:
            return True
        self._drop(connection, f"opening request over {self.max_bytes >> 10} KiB")
        return False

    def discard(self, connection: Any) -> None:
        """The connection's request is whole (or it closed)."""
        held = self._address.pop(connection, None)
        if held is not None:
            mine = self._by_address[held[0]]
            del mine[connection]
            if not mine:
                del self._by_address[held[0]]

    def _drop(self, connection: Any, reason: str) -> None:
        address = self._address.get(connection, ("?", "?"))[1]
        self.discard(connection)
        connection.transport.abort()
        if self.on_drop is not None:
            try:
                self.on_drop(address, reason)
            except Exception:  # (the audit log failing must not keep the connection)
                log.exception("could not audit a dropped opening handshake")


def _client_only(session: Any) -> bool:
    """Whether a session's only role is ``client`` (a serving client's connection)."""
    return session.has_role("client") and not any(session.has_role(r) for r in ("scientist", "admin", "peer"))


def _issued(session: Any) -> bool:
    """Whether a session presented a client token an issuer secret made (``client_tokens``)."""
    return any(getattr(p, "issued_by", "") for p in session.principals)


class ConnectionServing:
    """The network half of :class:`~veil.workers.websocket_server.WebsocketServerWorker` (a mixin): the
    opening handshake's slots, one loop per connection that reads requests and sends replies, and the
    owner's disconnect. What a request does is the worker's business (``serve_bytes``, ``try_inline``)."""

    @property
    def peer_slot_pools(self) -> dict:
        """Peer worker id -> the share slots of its latest same-host link here (``peer_slot_outputs``)."""
        pools = self.__dict__.get("_peer_slot_pools")
        return pools if pools is not None else self.__dict__.setdefault("_peer_slot_pools", {})

    def _release_stale_handshakes(self) -> None:
        """Frees slots of handshakes that will never become sessions (closed, or past the open timeout)."""
        now = time.monotonic()
        for connection, (_, since) in list(self._handshakes.items()):
            if now - since > OPEN_TIMEOUT or connection.state.name == "CLOSED":
                self._handshakes.pop(connection, None)

    def _check_handshake(self, connection: ServerConnection, request: Any) -> Any:
        self._release_stale_handshakes()
        if len(self.sessions) + len(self._handshakes) >= self.max_connections:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections\n")
        peer = local_socket.source(connection)
        blocked = self.auth_throttle.blocked_for(peer)
        session = failure = None
        try:
            tokens = local_socket.tokens_for(self, connection, request, tokens_from_headers)  # (Unix: a ticket's)
            if not blocked or unguessable(tokens) or local_socket.is_unix(connection.transport):  # (blocked:
                session = authenticate(self.tokens, tokens)  # short tokens are not even looked up, so no timing
                # can tell a right guess apart either; over Unix the tokens came with an unguessable ticket)
        except Exception as e:  # noqa: BLE001  (a malformed request is refused as a bad token: no 500, no traceback)
            failure = e
        if blocked and session is None:
            # one answer whatever the tokens (a right guess is not told apart); generated tokens still get in
            refusal = Throttled.after(blocked)
            self.refusals.refused(peer, str(refusal))
            response = connection.respond(HTTPStatus.TOO_MANY_REQUESTS, f"{refusal}\n")
            response.headers["Retry-After"] = str(refusal.seconds)
            return response
        if session is None:
            # each unknown token presented is a guess (no token, or a malformed header, guesses nothing)
            self.auth_throttle.failed(peer, getattr(failure, "failures", 0))
            e = failure
            reason = str(e) if isinstance(e, PermissionDeniedError) else f"malformed token headers ({type(e).__name__})"
            self.refusals.refused(peer, reason)
            return connection.respond(HTTPStatus.UNAUTHORIZED, "access token required\n")
        refusal = self._slot_refusal(session)
        if refusal is not None:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, refusal)
        self._handshakes[connection] = (session, time.monotonic())
        return None

    def _slot_refusal(self, session: Session) -> str | None:
        """Why an authenticated ``session`` gets none of the free slots (None: it gets one). The owner's
        admin token is never refused one, and the last of the ``reserved_slots`` are its alone (peers may
        take the others: hostile peers cannot lock the owner out); any other principal holds at most
        ``max_sessions_per_principal`` (one token cannot lock every other out), a client an owner issued
        its own token (``client_tokens``) at most ``max_sessions_per_client``, and client-role sessions
        together at most :data:`CLIENT_SLOT_SHARE` of the worker (so clients cannot lock out a model owner),
        those of table tokens half of that where clients may have tokens of their own."""
        if session.has_role("admin"):
            return None
        held = [*self.sessions.values(), *(s for s, _ in self._handshakes.values())]
        admin_only = max(1, self.reserved_slots // 2) if self.reserved_slots else 0
        kept = admin_only if session.has_role("peer") else self.reserved_slots
        if len(held) >= self.max_connections - kept:
            return "too many connections\n"
        if _client_only(session):
            share = int(self.max_connections * CLIENT_SLOT_SHARE)
            if sum(_client_only(s) for s in held) >= share:
                return "too many client connections\n"
            if self.tokens.issues_tokens and not _issued(session) and \
                    sum(_client_only(s) and not _issued(s) for s in held) >= share // 2:
                # table tokens (a cluster's shared client token) hold half the client share: a holder of the
                # shared token cannot lock out the clients the owner gave tokens of their own
                return "too many client connections\n"
        for p in session.principals:
            cap = self.max_sessions_per_principal
            if getattr(p, "issued_by", ""):  # (principals made by hand in tests may lack the field)
                cap = min(cap, getattr(self, "max_sessions_per_client", ISSUED_CLIENT_SESSIONS))
            if sum(any(q.name == p.name for q in s.principals) for s in held) >= cap:
                return "too many connections with this token\n"
        return None

    def _message_limit(self, session: Session) -> int:
        """The largest message ``session`` may send: ``max_message``, and with a session quota
        (``--max-session-mb``) at most the quota (plus :data:`QUOTA_MESSAGE_SLACK`): a message being received
        is memory the session holds (the library closes the connection with 1009 past it; veil clients
        check the advertised limit first). Not for the owner's admin token, nor peer links (charged per
        requester account, veil/workers/quota.py)."""
        quota = self.monitor.max_session_bytes
        if quota is None or session.has_role("admin") or session.peer_only:
            return self.max_message
        return min(self.max_message, quota + QUOTA_MESSAGE_SLACK)

    def _add_headers(self, connection: ServerConnection, request: Any, response: Any) -> Any:
        limit = self.max_message
        if response.status_code != HTTPStatus.SWITCHING_PROTOCOLS:
            # refused after authentication (e.g. no Upgrade header): the slot is free again
            self._handshakes.pop(connection, None)
        else:
            pending = self._handshakes.get(connection)
            if pending is not None:
                # set before the 101 goes out: the library checks it as it parses each frame's header
                limit = connection.protocol.max_message_size = self._message_limit(pending[0])
                local_socket.answer(self, connection, request, response, tokens_from_headers, pending[0])
        response.headers[MAX_SIZE_HEADER] = str(limit)
        return response

    async def _on_connection(self, ws: LaneConnection) -> None:
        pending = self._handshakes.pop(ws, None)
        if pending is None:  # released as stale meanwhile: re-authentication would be needed
            await ws.close(1013, "handshake slot expired")
            return
        session = pending[0]
        self.sessions[session.id] = session
        self._connections[session.id] = (ws, time.time())
        loop = asyncio.get_running_loop()
        ws.serving = asyncio.current_task()
        closed = asyncio.ensure_future(ws.wait_closed())
        # requests that arrive while this loop waits for one are served where they are read (LaneConnection)
        ws.lane = functools.partial(self.lane_request, session=session)
        slots = SlotPool.for_connection(ws.transport) if session.peer_only else None  # (a same-host peer's)
        peer = self.principal_of(session).user if slots is not None else None
        if slots is not None:  # the peer's latest link: a round writes its outputs for it there (peer_slot_outputs)
            self.peer_slot_pools[peer] = slots
        try:
            while True:
                if ws.backlog():  # pipelined requests: other connections' reads go between them
                    await asyncio.sleep(0)
                try:
                    data = await _receive(ws)
                except ConnectionClosedOK:
                    break
                if session.revoked:  # the owner revoked it (close_sessions_of): pipelined frames never run
                    break
                if isinstance(data, str):
                    reply = serialize(m.ErrorReply("SerializationError", "text frames are not accepted; send binary"),
                                      sender=self.id)
                else:
                    reply, decoded = ws.take_handoff(data)
                    if reply is None and decoded is None:  # (the lane did not take it: busy then, or never saw it)
                        reply, decoded = self.try_inline(data, session)
                        reply = after_rows(self.audit_rows, reply, self.id)
                    if type(reply) is AfterRows:  # (after its refusal rows: awaited here, not on the loop)
                        reply = await released(self.audit_rows, reply)
                    if reply is None and session.peer_only:
                        reply = await self._serve_peer_fetch(data, decoded, session, closed, slots)
                        if reply is HUNG_UP:
                            break
                    if reply is None and session.has_role("admin"):  # (a revocation: no turn, no handler thread)
                        reply, decoded = await serve_users_message(self, data, session, decoded)
                    if reply is None:
                        reply = await self._run_request(loop, data, session, closed, decoded)
                    if reply is None:
                        break
                if session.revoked:  # revoked while this reply was made: nothing goes out after revoke() returned
                    break
                if type(reply) is SlotSend:  # shares in a slot; the bytes reply if it could not go
                    reply = await self._send_slot(ws, reply, slots)
                    if reply is None:
                        continue
                if type(reply) is FrameParts:
                    await _send_fragmented(ws, _part_fragments(reply))
                elif len(reply) > REPLY_FRAGMENT:
                    await _send_fragmented(ws, _fragments(reply))
                else:
                    await _send_one(ws, reply)
        except ConnectionClosed:
            pass  # the client went away (or sent an oversized frame): free its objects below
        finally:
            ws.lane = None
            closed.cancel()
            if slots is not None:
                if self.peer_slot_pools.get(peer) is slots:
                    del self.peer_slot_pools[peer]
                slots.close()
            self._connections.pop(session.id, None)
            await loop.run_in_executor(self._executor, self.end_session, session)

    async def _serve_peer_fetch(self, data: Any, decoded: tuple | None, session: Session,
                                closed: asyncio.Future, slots: SlotPool | None = None) -> Any:
        """A peer session's share fetch, served on the loop (``peer_openings.serve_fetch_on_loop``: no
        handler thread, no worker lock; it takes only published shares); None: the handler thread serves
        this request (anything else, a refusal); ``HUNG_UP``: the peer hung up while its fetch waited."""
        if decoded is None:  # try_inline did not decode it (the worker was busy): a fetch is a few dozen bytes
            if len(data) > _PEER_FETCH_MAX_BYTES:
                return None
            self._local.session = session
            try:
                decoded = deserialize(data, self._decode_ctx)
            except Exception:  # the handler thread answers it with the decoding error
                return None
            finally:
                self._local.session = None
        msg, _sender, prelude = decoded
        if type(msg) is not PeerFetchMessage or prelude:
            return None
        if slots is not None:
            slots.release(msg.done)
        reply = await serve_fetch_on_loop(self, self.principal_of(session), msg, closed)
        if reply is None or reply is HUNG_UP:
            return reply
        if slots is not None and msg.slots is True and type(reply) is m.ObjectsReply:
            placed = slots.place(reply.objects)
            if placed is not None:
                return SlotSend(placed[0], placed[1], reply)
        return self._reply_bytes(reply)

    async def _send_slot(self, ws: LaneConnection, out: SlotSend, slots: SlotPool) -> Any:
        """Sends a share slot reply (with the slot's descriptor the first time); None once it went, else the
        bytes reply to send instead (the slot is free again)."""
        data = serialize(out.reply, sender=self.id)
        if out.fd is None:
            await _send_one(ws, data)
            return None
        if await send_with_descriptor(ws, data, slots.raw, out.fd):
            slots.sent(out.reply)
            return None
        slots.unplace(out.reply)
        return self._reply_bytes(out.fallback)

    async def _run_request(self, loop: asyncio.AbstractEventLoop, data: bytes, session: Session,
                           closed: asyncio.Future, decoded: tuple | None = None) -> bytes | None:
        """Runs one request; cancels it if the connection closes first (then returns None)."""
        token = cancellation.CancelToken(seconds=self.max_command_seconds)
        work = loop.run_in_executor(self._executor, self.serve_bytes, data, session, token, decoded)
        await asyncio.wait((work, closed), return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            token.cancel(f"session {session.id} disconnected")
            await asyncio.wait((work,))  # it stops at its next checkpoint; its objects are freed after
            log.warning("worker %s: session %s disconnected; its running command was cancelled", self.id, session.id)
            return None
        return work.result()

    def disconnect(self, session_id: str, by: str = "owner") -> bool:
        """Owner: closes one client's connection (its objects are freed); thread-safe. False if not connected."""
        found = self._connections.get(session_id)
        if found is None or self._loop is None:
            return False
        session = self.sessions.get(session_id)
        self._audit("disconnect", by, session_id, [], "allowed",
                    f"owner closed session {session_id} of {session.user if session else '?'}")
        closing = asyncio.run_coroutine_threadsafe(self._close_until_ended(found[0]), self._loop)
        try:
            closing.result(timeout=6)
        except Exception:  # a client that does not answer the close is dropped by the close timeout
            pass
        return True

    @staticmethod
    async def _close_until_ended(ws: Any) -> None:
        """Closes ``ws``, then waits (5 s at most) until the task serving it has ended its session: the
        console's page after a disconnect must no longer list it (that task's ``finally`` runs after
        ``close`` returns)."""
        await ws.close(4000, "disconnected by the data owner")
        serving = getattr(ws, "serving", None)
        if serving is not None:
            await asyncio.wait((serving,), timeout=5)

    def wait_sessions_ended(self, name: str, seconds: float = 5.0) -> None:
        """Waits (``seconds`` at most; from any thread but the loop's) until the tasks serving principal ``name``'s
        connections have ended their sessions: the console's page after a revocation must no longer list them
        (:meth:`close_sessions_of` has the loop close them, and their objects are freed after)."""
        tasks = []
        for sid, (ws, _) in list(self._connections.items()):  # (the loop changes both meanwhile: read once each)
            session = self.sessions.get(sid)
            if session is not None and getattr(ws, "serving", None) is not None \
                    and any(p.name == name for p in session.principals):
                tasks.append(ws.serving)
        if not tasks or self._loop is None:
            return
        waiting = asyncio.run_coroutine_threadsafe(asyncio.wait(tasks, timeout=seconds), self._loop)
        try:
            waiting.result(timeout=seconds + 1)
        except Exception:  # (past the bound: the page lists what is still closing)
            pass

    def close_sessions_of(self, name: str, reason: str) -> int:
        """Closes every connection (and handshake in progress) that authenticated as principal ``name``:
        a revocation (veil/governance/revocation.py). At once, from any thread: its sessions are marked so
        that no further request of theirs runs (``serve_bytes``, ``try_inline``, the read loop check the
        mark), their running commands are cancelled at their next checkpoint, and the loop closes the
        connections, which frees their objects through the session-end path. Returns how many were open."""
        hit = [s for s in [*self.sessions.values(), *(s for s, _ in list(self._handshakes.values()))]
               if any(p.name == name for p in s.principals)]
        for session in hit:
            session.revoked = True
        ids = {s.id for s in hit}
        for token, sid in list(self._running.items()):
            if sid in ids:
                token.cancel(reason)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._close_revoked, name, reason)
        return len(hit)

    def _close_revoked(self, name: str, reason: str) -> None:
        """On the event loop (where handshakes become sessions, so none slips between): every connection
        of ``name`` is closed, every handshake of it dropped (``_on_connection`` then refuses it)."""
        for connection, (session, _) in list(self._handshakes.items()):
            if any(p.name == name for p in session.principals):
                session.revoked = True
                self._handshakes.pop(connection, None)
        for sid, (ws, _) in list(self._connections.items()):
            session = self.sessions.get(sid)
            if session is not None and any(p.name == name for p in session.principals):
                session.revoked = True
                asyncio.ensure_future(ws.close(4003, reason))
