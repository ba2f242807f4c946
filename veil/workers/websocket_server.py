"""WebsocketServerWorker: a data owner's worker served over websockets (asyncio).

Each connection is authenticated in the opening handshake (see
``websocket_auth``) and becomes a session. Each session's requests run on a
handler thread of their own, but one request at a time holds the worker (a
:class:`~veil.workers.cancellation.FairLock`): the store needs no locks and torch
ops do not compete for the 2 CPU cores they would share anyway. Long commands
(plan ``fit``) hand the worker to waiting sessions between batches, stop at
their per-command deadline (``max_command_seconds``) and are cancelled when
their session disconnects. The asyncio loop stays free to read, refuse and
answer other connections while an operation runs.

Resources an attacker could pin are bounded: handshake slots are released on
every path (a request without ``Upgrade`` used to keep its slot forever), and
refused unauthenticated connections are audited in aggregate (:class:`RefusalLog`),
not one row each; one token holds a bounded share of the slots, unfinished
handshakes are few and small, and a message being received is held to the
session's memory quota (``websocket_connections``).

Per request the server
- replaces the envelope's claimed sender with the session id (so ``created_by``
  is the authenticated session, never a name the client chose),
- hands the reference monitor (``veil/workers/monitor.py``) a Principal for
  the session: the monitor scopes names to the session's namespace (its own
  objects, the owner's shared data, hand-offs), applies the owner's rules and
  writes every release and refusal to this worker's audit log (OwnerDB), and
- checks any claimed ``user`` of a get/move against the principals the
  connection proved.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable

from websockets.asyncio.server import ServerConnection, serve

from veil.exceptions import PermissionDeniedError, WorkerNotFoundError, error_reply_fields
from veil.messaging import messages as m
from veil.messaging.serde import serialize
from veil.mpc.material import drop_provider_scope
from veil.workers import cancellation, local_socket
from veil.workers.accounts import ACTING, SEP, SessionEndNotices, frame_sender, split_sender
from veil.workers.auth_throttle import FailureThrottle
from veil.workers.base import HANDLERS, BaseWorker
from veil.workers.get_ids import named_once
from veil.workers.lane_connection import LaneConnection
from veil.workers.monitor import Principal
from veil.workers.persistence import OwnerDB
from veil.workers import handlers as _handlers
from veil.workers import skeletons as _skeletons
from veil.governance.users_wire import owner_executor, release_owner_executor, serve_without_turn
from veil.workers.audit_writer import refused_request_log
from veil.workers.websocket_auth import RefusalLog, Session, TokenTable, check_request, run_session_end_handlers
from veil.workers.websocket_connections import (ISSUED_CLIENT_SESSIONS, OPEN_TIMEOUT, ConnectionServing,
                                                OpeningConnections)
from veil.workers.websocket_transport import SERVER_LOGGER
from veil.workers.reply_frames import REPLY_FRAGMENT
from veil.workers.inline_lane import InlineLane, PrincipalStrikes, _full_rights

if TYPE_CHECKING:
    import ssl

    from veil.hook import TorchHook

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE = 256 * 2**20
DEFAULT_MAX_CONNECTIONS = 64
#: per-command time limit (seconds) unless the owner sets one; None or 0: no limit
DEFAULT_MAX_COMMAND_SECONDS = 600.0
#: GIL switch interval while serving (seconds; Python's default is 0.005)
SWITCH_INTERVAL = 0.0005

#: requests that move data out of the worker -> audit action name
OUTBOUND: dict[type, str] = {m.GetObjectsMessage: "get", m.MoveMessage: "move", m.RemoteGetMessage: "remote_get"}


def _runs_own_commands(session: Session) -> bool:
    """Whether the server runs this session's commands itself (``_session_command`` and its batch and
    skeleton runners): the stock command handler, and a full role, whose requests check_request passes."""
    return HANDLERS.get(m.CommandMessage) is _handlers._handle_command and _full_rights(session)


def _ids_of(msg: Any) -> list:
    if type(msg) is m.RemoteGetMessage:
        return [msg.id]
    ids = getattr(msg, "ids", None)
    return ids if isinstance(ids, list) else []


class WebsocketServerWorker(ConnectionServing, InlineLane, BaseWorker):
    """A worker that serves authenticated network clients.

    Args:
        hook: the TorchHook of the server process.
        id: the worker's name (clients use the same name).
        host: interface to listen on (``127.0.0.1`` by default: expose it on purpose).
        port: TCP port; 0 picks a free one (see :attr:`bound_port` once ready).
        tokens: who may connect, as whom (at least one token is required).
        db: durable audit log and key-value/ledger store (in memory if None).
        max_message: largest request accepted, in bytes; larger ones close that
            connection with code 1009 (clients check the advertised limit first).
        ssl_context: serve TLS (``wss://``) when given.
        max_connections: further connections are refused with HTTP 503; the last
            ``max_connections // 16`` only to the owner's admin token and peers, and the
            last half of those (at least one) to the admin token alone.
        max_sessions_per_principal: connections one principal (token) may hold at once,
            the admin's aside (default ``max(4, max_connections // 4)``); further ones get 503.
        max_sessions_per_client: connections one client with its own issued token may hold
            (``TokenTable.add_issuer``); client-role sessions together hold at most 3/4 of the slots,
            and with an issuer, those of table tokens (a shared client token) half of that.
        max_command_seconds: per-command time limit; long commands check it
            between batches and fail with ``CommandTimeoutError`` (None/0: no limit).
        ping_interval: seconds between keepalive pings; a client that does not
            answer within twice that is disconnected (veil clients answer while idle).
    """

    #: an opening's reply over one fragment goes out in parts, from its tensors' memory (_part_fragments)
    reply_parts_over = REPLY_FRAGMENT

    def __init__(
        self,
        hook: "TorchHook | None" = None,
        id: str | None = None,
        host: str = "127.0.0.1",
        port: int = 8777,
        tokens: TokenTable | None = None,
        *,
        db: OwnerDB | None = None,
        max_message: int = DEFAULT_MAX_MESSAGE,
        ssl_context: "ssl.SSLContext | None" = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_command_seconds: float | None = DEFAULT_MAX_COMMAND_SECONDS,
        ping_interval: float = 30.0,
        max_sessions_per_principal: int | None = None,
        max_sessions_per_client: int = ISSUED_CLIENT_SESSIONS,
        **kwargs: Any,
    ) -> None:
        super().__init__(hook, id=id, **kwargs)
        if tokens is None or len(tokens) == 0:
            raise ValueError(
                f"worker {self.id!r} needs at least one access token to serve (veil never serves unauthenticated, "
                "unlike PySyft 0.2): tokens = sy.TokenTable(); tokens.add(sy.new_token(), 'alice'); "
                "WebsocketServerWorker(..., tokens=tokens), and clients pass token=... or set VEIL_TOKEN"
            )
        self.host, self.port, self.tokens = host, port, tokens
        self.db = db if db is not None else OwnerDB()
        self.monitor.audit_sink = self._audit_row  # audit rows go to the owner's durable log
        self.max_message, self.ssl_context, self.max_connections = max_message, ssl_context, max_connections
        self.ping_interval = ping_interval
        if max_sessions_per_principal is None:
            max_sessions_per_principal = max(4, max_connections // 4)
        if not max_sessions_per_principal >= 1:
            raise ValueError(f"max_sessions_per_principal must be at least 1, got {max_sessions_per_principal!r}")
        self.max_sessions_per_principal = max_sessions_per_principal
        if not max_sessions_per_client >= 1:
            raise ValueError(f"max_sessions_per_client must be at least 1, got {max_sessions_per_client!r}")
        #: sessions of one client with its own issued token (veil/workers/client_tokens.py)
        self.max_sessions_per_client = max_sessions_per_client
        #: slots only the owner's admin token and peers may take (the others see a full worker before); the
        #: last half of them (at least one) the admin's alone
        self.reserved_slots = max_connections // 16
        self.peers: dict[str, BaseWorker] = {}
        self.bound_port: int | None = None
        self.sessions: dict[str, Session] = {}
        if max_command_seconds is not None and not (max_command_seconds >= 0 and math.isfinite(max_command_seconds)):
            raise ValueError("max_command_seconds must be positive (or 0/None for no limit)")
        if not (ping_interval > 0 and math.isfinite(ping_interval)):  # NaN: keepalive would never fire
            raise ValueError(f"ping_interval must be a finite number of seconds > 0, got {ping_interval!r}")
        if max_message is not None and not max_message > 0:
            raise ValueError(f"max_message must be a number of bytes > 0, got {max_message!r}")
        self.max_command_seconds = max_command_seconds or None
        # connection -> (session, when its handshake was accepted); released on every path
        self._handshakes: dict[ServerConnection, tuple[Session, float]] = {}
        #: open connections by session id, and when they opened (the owner console lists and closes them)
        self._connections: dict[str, tuple[ServerConnection, float]] = {}
        self._local = threading.local()
        # one thread per session in flight (plus the end-of-session cleanups); one request holds the worker
        self._executor = ThreadPoolExecutor(max_workers=max_connections + 4, thread_name_prefix=f"veil-{self.id}")
        self._turn = cancellation.FairLock()
        #: running commands' tokens -> their session id (a revocation cancels its session's)
        self._running: dict[cancellation.CancelToken, str] = {}
        #: sessions with a full role (check_request passes all their requests) -> their Principal
        self._full_principals: dict[str, Principal] = {}
        self._slow_sessions: set[str] = set()  # sessions whose requests always take a handler thread
        # over-budget inline requests per principal (CPU time; inline_lane.strike_key), for principals whose inline
        # requests are timed: kept across their sessions (a reconnect must not start afresh), bounded
        self._strikes = PrincipalStrikes()
        # the same for SMPC openings, counted apart: a client's large `.get()` says nothing about its
        # openings, which are sized before they run inline
        self._slow_protocol: set[str] = set()
        self._protocol_strikes = PrincipalStrikes()
        self.refusals = refused = RefusalLog(self.db, self.id)
        #: failed authentications per source, at this port and the owner console alike (auth_throttle)
        self.auth_throttle = FailureThrottle()
        #: refused requests of sessions: aggregated per user past a burst (closed on the connect log's timer); rows
        #: of theirs, of refused connects and gets' allowed rows written in order by a thread of its own (audit_writer)
        self.audit_rows, self.refused_requests = refused_request_log(self.db, self._write_audit_now, self.id, refused)
        loop_write_lock = getattr(self.db, "loop_write_lock", None)  # (an in-memory database: the loop writes its rows)
        self.audit_rows.loop_lock = loop_write_lock() if callable(loop_write_lock) else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future | None = None
        # tells the peers a session used that it ended (veil/workers/accounts.py)
        self._session_ends = SessionEndNotices(self)
        from veil.governance.revocation import restore_revocations

        restore_revocations(self)  # names the owner revoked stay out across restarts

    # ------------------------------------------------------------ peers

    def add_peer(self, worker: BaseWorker) -> None:
        """Lets this worker reach ``worker`` (moves, pointer chains). Only peers are reachable; a peer whose
        name the owner revoked is not (its link refuses every request until readmitted)."""
        self.peers[worker.id] = worker
        if worker.id in self.tokens.revoked:
            from veil.governance.revocation import cut_peer_link

            cut_peer_link(self, worker.id)

    def resolve_worker(self, worker_id: str) -> BaseWorker:
        peer = self.peers.get(worker_id)
        if peer is None:
            raise WorkerNotFoundError(
                f"worker {self.id!r} has no peer {worker_id!r} (the data owner configures peers with --peer)"
            )
        if worker_id in self.tokens.revoked:
            raise PermissionDeniedError(f"worker {self.id!r} no longer reaches peer {worker_id!r}: the data owner "
                                        "revoked it")
        return peer

    # ------------------------------------------------------------ requests

    def current_session(self) -> Session | None:
        """The session whose request is being handled on this thread (None outside requests)."""
        return getattr(self._local, "session", None)

    def serve_bytes(self, data: bytes, session: Session, token: cancellation.CancelToken | None = None,
                    decoded: tuple | None = None) -> bytes:
        """Handles one request of ``session`` when it is its turn; always returns reply bytes.

        ``decoded``: the request as :meth:`serve_inline` already decoded it. Its rows are on record before the
        reply, waited for once it left the turn (a release's allowed row too, or it is an error: audit_writer.py)."""
        try:
            return self.settled(self._serve_bytes(data, session, token, decoded))
        finally:
            self.audit_rows.wait_mine()

    def _serve_bytes(self, data: bytes, session: Session, token: cancellation.CancelToken | None,
                     decoded: tuple | None) -> bytes:
        token = token if token is not None else cancellation.CancelToken(seconds=self.max_command_seconds)
        if session.has_role("admin"):  # the owner's users message (a revocation) does not wait for a long command
            reply = serve_without_turn(self, data, session, decoded)
            if reply is not None:
                return reply
        with self._turn:
            if session.revoked:  # revoked while this request waited for its turn: it never runs
                return serialize(m.ErrorReply("PermissionDeniedError", "access revoked by the data owner"),
                                 sender=self.id)
            token.start()
            self._running[token] = session.id
            self._local.session = session
            acting = ACTING.set(session.account)  # what it sends peers meanwhile is for this session (accounts.py)
            try:
                with cancellation.running(token, self._turn.yield_turn, self._turn):
                    return self._recv_msg(data) if decoded is None else self._serve_decoded(*decoded)
            except Exception as e:  # never drop the connection over one reply (was: close 1011)
                log.exception("worker %s: request of session %s failed outside the handlers", self.id, session.id)
                return serialize(m.ErrorReply(*error_reply_fields(e)), sender=self.id)
            finally:
                self._local.session = None
                ACTING.reset(acting)
                self._running.pop(token, None)

    def principal(self, sender: str) -> Principal:
        """The authenticated session (the claimed sender is ignored); for a peer's request, with the
        requester account its frame named (:meth:`_handle`; veil/workers/accounts.py); plain worker
        semantics in-process."""
        session = self.current_session()
        if session is None:
            return super().principal(sender)
        principal = self.principal_of(session)
        tag = getattr(self._local, "account", "")
        if tag and principal.is_peer:
            accounts = session.account_principals
            account_principal = accounts.get(tag)
            if account_principal is None:
                if len(accounts) >= 1024:  # a cache (the monitor bounds the accounts holding hand-offs)
                    accounts.clear()
                account_principal = accounts[tag] = replace(principal, account=tag)
            return account_principal
        return principal

    def _frame_sender(self, location: Any) -> str:
        """A frame to a peer names the requester account it is for (veil/workers/accounts.py)."""
        return frame_sender(self.id, location.id, self._session_ends)

    @staticmethod
    def principal_of(session: Session) -> Principal:
        """The monitor's Principal for ``session`` (made once)."""
        principal = session.principal
        if principal is None:
            principal = session.principal = Principal(
                session.id, session.user, namespace=session.id,
                roles=frozenset(p.role for p in session.principals), isolated=True)
        return principal

    def _audit_row(self, action: str, principal: Principal, ids: list, outcome: str, detail: str) -> None:
        self._audit(action, principal.user, principal.session, ids, outcome, detail)

    def requesting_user(self) -> str | None:
        session = self.current_session()
        return session.user if session is not None else super().requesting_user()

    def _batch_runner(self, sender: str) -> Callable[[list], Any] | None:
        """A session with full rights runs its deferred commands straight through ``_run_command``
        (what :meth:`_handle` does for a CommandMessage of that session: ``check_request`` passes
        every request of a full role, the handler is the stock one), auditing a refusal the monitor
        did not audit itself as :meth:`_handle` would. Other sessions: each through :meth:`_handle`."""
        session = self.current_session()
        if session is None:
            return super()._batch_runner(sender)
        if not _runs_own_commands(session):
            return None
        principal, run_command, audit = self.principal(session.id), _handlers._run_command, self._audit_refusal

        def run(item: Any) -> Any:  # _session_command's body (one frame less per deferred command)
            try:
                return run_command(self, principal, session.id, *item)
            except PermissionDeniedError as e:
                audit(e, "CommandMessage", session.user, session.id)
                raise
        return run

    def _skeleton_runner(self, sender: str) -> tuple | None:
        """A full-rights session runs its prepared deferred skeleton uses straight from their ids
        (``handlers.run_use``: the monitor resolves every id), a refusal audited as in :meth:`_batch_runner`."""
        session = self.current_session()
        if session is None or not _runs_own_commands(session):
            return None
        principal, run_use, audit = self.principal(session.id), _handlers.run_use, self._audit_refusal

        def run(skeleton: Any, ids: list, return_ids: list) -> Any:
            try:
                return run_use(self, principal, session.id, skeleton, ids, return_ids)
            except PermissionDeniedError as e:
                audit(e, "CommandMessage", session.user, session.id)
                raise
        return session.skeletons, run

    def _session_command(self, session: Session, principal: Principal, *command: Any) -> Any:
        """One command of a full-rights session, as :meth:`_handle` runs a CommandMessage of it."""
        try:
            return _handlers._run_command(self, principal, session.id, *command)
        except PermissionDeniedError as e:
            self._audit_refusal(e, "CommandMessage", session.user, session.id)
            raise

    def _handle(self, msg: Any, sender: str) -> Any:
        session = self.current_session()
        if session is None:  # in-process use (owner scripts, tests): plain worker semantics
            return super()._handle(msg, sender)
        if type(msg) is m.SkeletonCommand:  # its CommandMessage, for the sessions that may send skeletons
            msg = self._expand_skeleton(session, msg)
        if type(msg) is m.CommandMessage and _runs_own_commands(session):  # the hot request: as a deferred command
            return self._session_command(session, self.principal(session.id), msg.op, msg.args, msg.kwargs,
                                         msg.return_ids, msg.grad_enabled)
        action = OUTBOUND.get(type(msg))
        principal = session.user
        local = self._local
        previous = getattr(local, "account", "")
        local.account = split_sender(sender)[1] if SEP in sender else ""  # a peer's requester account
        try:
            check_request(session, msg)  # least privilege per role (client, peer)
            if action in ("get", "move"):
                principal = msg.user = session.claim_user(msg.user)
                named_once(msg.ids)  # (one allowed row per id, in the turn: get_ids.py)
            return super()._handle(msg, session.id)
        except PermissionDeniedError as e:
            self._audit_refusal(e, action or type(msg).__name__, principal, session.id, _ids_of(msg))
            raise
        finally:
            local.account = previous

    _stock_handle = _handle  # the inline lane serves commands itself only while this is the handler

    def _expand_skeleton(self, session: Session, msg: m.SkeletonCommand) -> m.CommandMessage:
        """A skeleton command as the CommandMessage it stands for (full roles only: others are refused
        before anything is kept; refusals audited)."""
        try:
            check_request(session, msg)  # client and peer roles never send skeletons
            return m.CommandMessage(*_skeletons.expand(session.skeletons, msg))
        except PermissionDeniedError as e:
            self._audit_refusal(e, "SkeletonCommand", session.user, session.id)
            raise

    def _skeleton_expander(self, sender: str) -> Callable[[list], Any]:
        """A batch's deferred skeleton uses ``[k, ids, return_ids(, define)]`` become their commands'
        fields with the session's table, as a synchronous skeleton command's (client/peer roles refused,
        audited, by :meth:`_expand_skeleton`)."""
        session = self.current_session()
        if session is None:
            return super()._skeleton_expander(sender)
        if _full_rights(session):  # check_request passes every request of a full role
            table, expand_item = session.skeletons, _skeletons.expand_item
            return lambda item: expand_item(table, item)

        def expand(item: list) -> tuple:
            msg = self._expand_skeleton(session, m.SkeletonCommand(*item))
            return msg.op, msg.args, msg.kwargs, msg.return_ids, msg.grad_enabled
        return expand

    def _audit_refusal(self, e: PermissionDeniedError, action: str, principal: str, session: str,
                       ids: list = ()) -> None:
        """Audits a refusal unless the monitor already wrote it (it marks those ``audited``)."""
        if not getattr(e, "audited", False):
            self._audit(action, principal, session, list(ids), "refused", str(e))

    def _audit(self, action: str, principal: str, session: str, ids: list, outcome: str, detail: str) -> None:
        if outcome == "refused":  # a requester controls how many: written in bounded numbers (refusal_rows.py)
            try:
                self.refused_requests.refused(action, principal, session, ids, detail)
            except Exception:  # a full disk must not turn a refusal into an allowed request
                log.exception("worker %s: could not write the audit log", self.id)
            return
        if self.queue_release_row(action, principal, session, ids, outcome, detail):  # (a get's: its reply waits)
            return
        self.audit_rows.wait()  # (after the refused rows handed before it: the log keeps its order)
        self._write_audit_now(action, principal, session, ids, outcome, detail)

    def _write_audit_now(self, action: str, principal: str, session: str, ids: list, outcome: str,
                         detail: str) -> None:
        try:
            self.db.audit(self.id, action, principal, session, ids, outcome, detail)
        except Exception:  # a full disk must not turn a refusal into an allowed request
            log.exception("worker %s: could not write the audit log", self.id)
            if outcome == "allowed":
                raise

    def end_session(self, session: Session) -> int:
        """Frees everything the session created; returns how many objects were freed."""
        self.sessions.pop(session.id, None)
        self._full_principals.pop(session.id, None)
        self._slow_sessions.discard(session.id)  # (its principal's strikes stay: inline_lane.PrincipalStrikes)
        self._slow_protocol.discard(session.id)
        drop_provider_scope(session.id)  # the MAC keys and fixed masks it registered at this crypto provider
        with self._turn:
            run_session_end_handlers(self, session.id)
            freed = self.monitor.end_session(session.id)
        self._session_ends.post(session.account)
        return freed

    # ------------------------------------------------------------ lifecycle

    async def serve_async(self, on_ready: Callable[["WebsocketServerWorker"], None] | None = None,
                          handle_signals: bool = False, on_stop: Callable[[], None] | None = None) -> None:
        """Serves until :meth:`stop` (or SIGINT/SIGTERM when ``handle_signals``). ``on_stop`` runs before
        the owner's database closes: what it still writes (the console's last failed log-ins) is kept."""
        self._loop = asyncio.get_running_loop()
        self._stop = self._loop.create_future()
        # A long command is a CPU-bound thread: with Python's default 5 ms GIL switch
        # interval every frame the event loop reads, and every handoff to another
        # session's thread, waits up to 5 ms behind it. 0.5 ms keeps others responsive.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._loop.add_signal_handler(sig, self.stop)
        # connections without a whole opening request yet: few, small, dropped oldest first (unauthenticated)
        openings = OpeningConnections(on_drop=self.refusals.refused)
        options = dict(
            process_request=self._check_handshake, process_response=self._add_headers, max_size=self.max_message,
            max_queue=4, compression=None, open_timeout=OPEN_TIMEOUT, ping_interval=self.ping_interval,
            ping_timeout=2 * self.ping_interval, close_timeout=2,
            create_connection=functools.partial(LaneConnection, openings=openings),
            logger=SERVER_LOGGER,  # never DEBUG: the library's DEBUG records carry tokens (headers) and shares
        )  # the same handler and limits on the TCP port and on the same-host Unix socket beside it
        async with serve(self._on_connection, self.host, self.port, ssl=self.ssl_context, **options) as server, \
                local_socket.serving_beside(self, self._on_connection, options):
            self.bound_port = next(iter(server.sockets)).getsockname()[1]
            flusher = asyncio.ensure_future(self._flush_refusals())
            syncer = asyncio.ensure_future(self._sync_policies())
            if on_ready is not None:
                on_ready(self)
            await self._stop
            flusher.cancel()
            syncer.cancel()
            for token in list(self._running):
                token.cancel("the worker is stopping")
        self._executor.shutdown(wait=True)
        release_owner_executor(self)
        try:
            if on_stop is not None:
                on_stop()
        finally:  # (the owner's database closes whatever the hook did)
            self.refusals.flush()  # (and waits for the refused rows still on their way)
            for peer in self.peers.values():
                close = getattr(peer, "close", None)
                if close is not None:
                    close()
            self.db.close()

    async def _flush_refusals(self) -> None:
        while True:
            await asyncio.sleep(self.refusals.window)
            try:
                self.refusals.flush_due()
            except Exception:
                log.exception("worker %s: could not write the audit log", self.id)

    async def _sync_policies(self) -> None:
        """The owner's stored policy decisions, reread while serving (another replica's tightening), on a
        handler thread in the worker's turn (the policies change what handlers check)."""
        from veil.governance import policy

        revocations = asyncio.ensure_future(self._sync_revocations(policy.SYNC_SECONDS))
        try:
            while True:
                await asyncio.sleep(policy.SYNC_SECONDS)
                try:
                    await self._loop.run_in_executor(self._executor, self._sync_policies_in_turn)
                except Exception:
                    log.exception("worker %s: could not reread the stored policy decisions", self.id)
        finally:
            revocations.cancel()

    async def _sync_revocations(self, every: float) -> None:
        """The stored revocations, reread on their own schedule and outside the worker's turn: a revocation
        made on another replica is in force here within ``every`` seconds (plus one database read), however
        long the command the worker is running (revocation.py has its own lock)."""
        from veil.governance.revocation import sync_stored_revocations

        while True:
            await asyncio.sleep(every)
            try:
                # (not on the handler threads, which requests waiting for the turn can all hold)
                await self._loop.run_in_executor(owner_executor(self), sync_stored_revocations, self)
            except Exception:
                log.exception("worker %s: could not reread the stored revocations", self.id)

    def _sync_policies_in_turn(self) -> list[int]:
        from veil.governance.policy import sync_stored_policies

        return sync_stored_policies(self, turn=self._turn)  # (it reads the database before taking the turn)

    def sync_policies_now(self) -> list[int]:
        """The stored revocations (a revocation or readmission made on another replica), then
        :func:`veil.governance.policy.sync_stored_policies` in the worker's turn."""
        from veil.governance.revocation import sync_stored_revocations

        sync_stored_revocations(self)
        return self._sync_policies_in_turn()

    # ------------------------------------------------------------ revocation (veil/governance/revocation.py)

    def revoke(self, name: str, by: str = "owner") -> int:
        """Owner: refuses principal ``name``'s tokens from now on (stored, restored at restart, synced to
        replicas) and closes its open sessions; returns how many were closed. Not the admin role."""
        from veil.governance.revocation import revoke

        return revoke(self, name, by)

    def readmit(self, name: str, by: str = "owner") -> None:
        """Owner: lets a revoked ``name`` in again (``veil users restore NAME``)."""
        from veil.governance.revocation import readmit

        readmit(self, name, by)

    def serve_forever(self, on_ready: Callable[["WebsocketServerWorker"], None] | None = None,
                      handle_signals: bool = True, on_stop: Callable[[], None] | None = None) -> None:
        """Blocking :meth:`serve_async` (the ``veil worker`` command)."""
        asyncio.run(self.serve_async(on_ready, handle_signals, on_stop))

    def start(self) -> None:
        """PySyft's ``server.start()``: serves until stopped (blocking, like :meth:`serve_forever`)."""
        self.serve_forever()

    def stop(self) -> None:
        """Stops serving (thread-safe); open connections are closed, their objects freed."""
        loop, fut = self._loop, self._stop
        if loop is None or fut is None:
            return

        def _set() -> None:
            if not fut.done():
                fut.set_result(None)

        loop.call_soon_threadsafe(_set)

    @property
    def url(self) -> str:
        scheme = "wss" if self.ssl_context is not None else "ws"
        return f"{scheme}://{self.host}:{self.bound_port or self.port}"
