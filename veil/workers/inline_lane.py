"""The inline lane: short requests of a network worker served on its event loop thread.

A request that is short by construction (a plain torch op, a store/get/delete/list, an SMPC
opening of small shares; see :func:`_inline_kind`) runs on the asyncio loop when nothing else
holds or waits for the worker, without the hop to a handler thread and back (~2 context switches
per request on a 2-core box). The hot case, a plain command or skeleton use of a full-rights
session, skips the generic dispatch (:meth:`InlineLane._serve_command`) but not the reference
monitor: it still resolves and checks every object the command names. A torch op runs inline only
while what it may compute, told from its operands' shapes and public arguments before it runs, is
small (``inline_work.py``: ``outer``, a convolution with a large kernel, ``zeros(n)``, ``unbind`` of a
long tensor take a handler thread). A principal whose inline requests still run past their CPU budget
goes back to handler threads for good (counted per user, not per session: a reconnect does not start
afresh), so the loop stays responsive for everyone else.

:class:`InlineLane` is a mixin of :class:`~veil.workers.websocket_server.WebsocketServerWorker`;
it uses the server's lock (``_turn``), monitor, session bookkeeping and reply encoding.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any, Callable

from veil.exceptions import PermissionDeniedError, error_reply_fields
from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.messaging.serde import deserialize, serialize
from veil.messaging.skeleton_frames import decode_skeleton_use
from veil.mpc.party import OPENABLE, PARTY_FUNCTIONS, OpenMessage, step_name
from veil.workers import handlers as _handlers
from veil.workers import skeletons as _skeletons
from veil.workers.accounts import ACTING
from veil.workers.audit_writer import WAIT_S, held_by_reply
from veil.workers.base import HANDLERS, YIELD_EVERY
from veil.workers import inline_work
from veil.workers.inline_work import request_work
from veil.workers.loop_rows import after_rows, not_recorded
from veil.workers.monitor import Principal
from veil.workers.websocket_auth import FULL_ROLES, Session

log = logging.getLogger("veil.workers.websocket_server")

#: the inline fast path (see ``try_inline``): largest request, and the run time after which a
#: session's requests go back to handler threads for good
INLINE_MAX_BYTES = 256 * 2**10
#: most deferred commands a request may carry and still run on the event loop: the same
#: granularity at which a batch on a handler thread yields to other sessions (a frame of
#: thousands of small commands would otherwise hold every connection; red-team R1)
INLINE_MAX_COMMANDS = YIELD_EVERY
INLINE_BUDGET_SECONDS = 0.005  # CPU time of the loop thread (preemption on a busy box does not count)
#: over-budget requests (after the first, which starts the timing) before a principal's sessions leave the fast path
INLINE_STRIKES = 3
#: principals whose strikes are kept (least recently struck out first: an owner's worker may see many users)
INLINE_STRUCK_PRINCIPALS = 4096
#: an SMPC opening runs inline only while the shares its request names hold at most this many bytes
#: (its steps cost about linear time in them: 128 Ki ring elements take well under the CPU budget)
INLINE_MAX_SHARE_BYTES = 1 << 20
#: a torch op runs inline only while the stored objects it and its deferred commands name show at most this many
#: bytes (an expanded view counts as many as it shows): its work grows with them, and nothing interrupts an op on the
#: loop (a scientist's 4096^2 matmul held every connection, ping and revocation ~3 s a request; red team, session 65),
#: and while its estimated work is at most ``inline_work.INLINE_MAX_WORK`` (session 66: an op whose work is not
#: bounded by its operands' bytes, such as ``outer``, ``conv2d`` with a large kernel or ``zeros(n)``)
INLINE_MAX_OPERAND_BYTES = INLINE_MAX_SHARE_BYTES
#: most ids a get may name and still run on the event loop: each is an allowed audit row, one write of the owner's
#: database (a get naming one id 16,000 times held the loop ~5 s on a file database; a reconnect started afresh)
INLINE_MAX_GET_IDS = YIELD_EVERY
#: requests that never wait on another worker or run a long loop (torch ops, store, get, list)
INLINE_TYPES = frozenset((m.CommandMessage, m.ObjectMessage, m.GetObjectsMessage, m.DeleteMessage, m.SearchMessage,
                          m.ListObjectsMessage))

_OPS_BY_NAME = ALLOWLIST._by_name
_UNKNOWN = object()
_SKELETON = m.SkeletonCommand
_PREPARED = _skeletons.Skeleton


def _plain_op(name: Any) -> bool:
    op = _OPS_BY_NAME.get(name) if isinstance(name, str) else None
    return op is not None and not op.worker_function


def _party_step(name: Any) -> bool:
    """A protocol step of an SMPC party: a pure function of the party's shares and public values
    (it never calls another worker, waits or loops), registered in ``veil.mpc.party``."""
    if step_name(name) not in PARTY_FUNCTIONS:
        return False
    op = ALLOWLIST._by_name.get(name)
    return op is not None and op.worker_function


def _inline_kind(msg: Any, prelude: list) -> str | None:
    """Whether a decoded request is short by construction, and of which kind.

    ``"plain"``: a plain torch op, or a store/get/delete/list. ``"protocol"``: an SMPC opening
    (``OpenMessage`` of an openable step) whose deferred commands are plain ops or party steps:
    short while its shares are small, which :meth:`WebsocketServerWorker.try_inline` checks next.
    Worker functions (dealing, plan fit, serving) may call other workers or run long loops that
    check for cancellation, so they keep their handler thread. The request was decoded once
    (the decode is what the handler runs next anyway); no object of it has been resolved or run.
    """
    tp = type(msg)
    if tp is OpenMessage:
        if not (isinstance(msg.name, str) and msg.name in OPENABLE):
            return None
        kind, step_ok = "protocol", (lambda op: _plain_op(op) or _party_step(op))
    elif tp not in INLINE_TYPES or (tp is m.CommandMessage and not _plain_op(msg.op)):
        return None
    else:
        kind, step_ok = "plain", _plain_op
    return kind if _prelude_within(prelude, step_ok) else None


def _prelude_within(prelude: list, step_ok: Callable[[Any], bool]) -> bool:
    """A prelude of deletions and at most INLINE_MAX_COMMANDS deferred commands whose ops pass ``step_ok``."""
    commands = 0
    for item in prelude:
        if type(item) is not int:  # a deferred command (deserialize checked: a 5-field list)
            commands += 1
            # (a skeleton use, [k, ids, rids(, define)]: a plain torch op, checked when defined)
            if commands > INLINE_MAX_COMMANDS or not (type(item[0]) is int or step_ok(item[0])):
                return False
    return True


def _inline_ok(msg: Any, prelude: list) -> bool:
    """A plain request that may run on the event loop (see :func:`_inline_kind`)."""
    return _inline_kind(msg, prelude) == "plain"


_prepare = _skeletons.prepare


def _skeleton_use(table: dict, msg: m.SkeletonCommand) -> Any:
    """The prepared :class:`~veil.workers.skeletons.Skeleton` a well-formed use names; else the
    CommandMessage fields it stands for (``skeletons.expand``: a definition is checked and kept there,
    and anything malformed raises its error there, as on the handler-thread path)."""
    k, ids, out = msg.skeleton, msg.ids, msg.return_ids
    skeleton = table.get(k) if type(k) is int and msg.define is None else None
    if skeleton is not None and type(ids) is list and len(ids) == skeleton.n_slots and type(out) is list:
        prepared = skeleton.prepared
        if prepared is None:
            prepared = _prepare(skeleton)
        if prepared:
            for oid in ids:
                if type(oid) is not int:
                    break
            else:
                return skeleton
    return _skeletons.expand(table, msg)


def strike_key(session: Session) -> Any:
    """Whose strikes a session's slow inline requests count toward: its least user ``(role, name)`` (the scope of
    veil/workers/user_caches.py). Every session of a user shares it, so a reconnect keeps them; a connection
    presenting several tokens counts toward one of them, each a user whose token it holds, never another's."""
    users = session.account.users
    return users[0] if users else session.id


class PrincipalStrikes(OrderedDict):
    """Over-budget inline requests per principal (:func:`strike_key`), for principals whose inline requests are
    timed: at most ``INLINE_STRUCK_PRINCIPALS``, the least recently struck (or sent to threads) dropped first.
    Dropping one only forgives it its strikes; no principal's count moves with another's requests. (Used from
    the event loop thread; a key another thread dropped meanwhile is no error, only forgiven.)"""

    def timing(self, key: Any) -> None:
        """Times ``key``'s requests from now on (its first request past the budget in wall time)."""
        if key not in self:
            self[key] = 0
            while len(self) > INLINE_STRUCK_PRINCIPALS:
                self.popitem(last=False)

    def strike(self, key: Any) -> int:
        """Counts one over-budget request of ``key``; its strikes now."""
        strikes = self[key] = self.get(key, 0) + 1
        try:
            self.move_to_end(key)
        except KeyError:
            pass
        while len(self) > INLINE_STRUCK_PRINCIPALS:
            self.popitem(last=False)
        return strikes

    def struck_out(self, key: Any) -> bool:
        """Whether ``key``'s sessions use handler threads (kept among the most recent while it sends requests)."""
        if self.get(key, 0) < INLINE_STRIKES:
            return False
        try:
            self.move_to_end(key)
        except KeyError:
            pass
        return True


def _full_rights(session: Session) -> bool:
    """Whether ``check_request`` passes every request of ``session`` (a full role among its principals)."""
    for p in session.principals:
        if p.role in FULL_ROLES:
            return True
    return False


class InlineLane:
    """The event-loop fast path of :class:`~veil.workers.websocket_server.WebsocketServerWorker`."""

    #: the server's stock request handler: a subclass that overrides ``_handle`` keeps every
    #: command on the generic path (set by the server class)
    _stock_handle: Callable | None = None

    def serve_inline(self, data: bytes, session: Session) -> bytes | None:
        """The fast path: runs a short request on this thread, no thread hop (see :meth:`try_inline`); not on an
        event loop: a get's reply waits here for its allowed rows (a connection awaits them: :meth:`lane_request`)."""
        reply = self.try_inline(data, session)[0]
        tickets = self.audit_rows.take_allowed()
        if tickets and not self.audit_rows._settle(tickets, self.audit_rows.take_mine(), WAIT_S):
            return not_recorded(self.id)
        return reply

    def queue_release_row(self, *row: Any) -> bool:
        """Queues an allowed row whose release is the request's reply (a get's, ``get_ids.resolve_each``) with the
        refusal rows, in order: the request waits for it only before its reply, out of the turn, off the loop
        (:meth:`settled`, ``loop_rows.released``). Whether it did (else the row is written now)."""
        if not held_by_reply() or self.current_session() is None:  # (in process: no reply waits for it)
            return False
        self.audit_rows.submit_allowed(*row)
        return True

    def settled(self, reply: bytes) -> bytes:
        """(a handler thread, out of the turn) ``reply`` once the rows it handed are on record; an error instead
        when one of its allowed rows is not (nothing is released before its row is on record)."""
        return reply if self.audit_rows.settle_mine() else not_recorded(self.id)

    def lane_request(self, data: bytes, session: Session) -> tuple[bytes | None, tuple | None]:
        """:meth:`try_inline` for a connection's read callback (``lane_connection``): a failure outside its
        own handling is answered with an error, never left to the reader, which would run the request again."""
        try:
            reply, decoded = self.try_inline(data, session)
            reply = after_rows(self.audit_rows, reply, self.id)  # (sent once its rows are written: loop_rows.py)
        except Exception as e:
            log.exception("worker %s: the inline lane failed on a request of session %s", self.id, session.id)
            return self._error_bytes(e), None
        if reply is not None and session.revoked:  # revoked while it ran (revoke() takes no turn): no result out
            return serialize(m.ErrorReply("PermissionDeniedError", "access revoked by the data owner"),
                             sender=self.id), None
        return reply, decoded

    def try_inline(self, data: bytes, session: Session) -> tuple[bytes | None, tuple | None]:
        """Runs a short request on the event loop thread: ``(reply, None)``; else ``(None, decoded)``.

        Only when nothing else holds or waits for the worker (``FairLock.try_acquire``)
        and the request is short by construction (:func:`_inline_kind`, decided on the
        request decoded once, with the session current: decoded pointers get the
        session's rights; an SMPC opening also only while the shares it and its deferred
        steps name hold at most ``INLINE_MAX_SHARE_BYTES``); otherwise the request takes its handler thread as before,
        with what was decoded here (``decoded``, or None: decoded there). A malformed
        request is answered here (the same error reply the handler thread gives). A
        principal whose inline requests used more than ``INLINE_BUDGET_SECONDS`` of CPU
        ``INLINE_STRIKES`` times (torch ops that ran long all the same; counted once one of
        its requests ran past the budget in wall time, per :func:`strike_key`, across its
        sessions) uses handler threads from then on, so the loop stays responsive; plain
        requests and openings are counted apart.
        """
        key = strike_key(session)
        slow_plain = session.id in self._slow_sessions or self._strikes.struck_out(key)
        slow_open = session.id in self._slow_protocol or self._protocol_strikes.struck_out(key)
        if (slow_plain and slow_open) or len(data) > INLINE_MAX_BYTES or not self._turn.try_acquire():
            return None, None
        if session.revoked:  # revoked while this frame waited: the handler thread refuses it (serve_bytes)
            self._turn.release()
            return None, None
        # (the rows its reply goes after are its own, not a refused handshake's; it never waits on the row writer)
        self.audit_rows.inline_started()
        # No CancelToken: nothing that runs inline checks one (worker functions, which do, never run here).
        # The thread CPU clock is a system call (~1 us, and on a busy VM the point where the kernel
        # switches tasks, ~4 us more per request in practice); a request that took less wall time than
        # the budget used less CPU than it. So a principal's requests read it only once one of them ran
        # past the budget in wall time (then it is in _strikes); from then on every strike is CPU time.
        # Plain requests and openings are counted apart (_strikes/_slow_sessions, _protocol_strikes/_slow_protocol).
        timed = key in self._strikes or key in self._protocol_strikes
        started, wall = (time.thread_time() if timed else 0.0), time.perf_counter()
        slow, strikes_of = self._slow_sessions, self._strikes
        acting = ACTING.set(session.account)  # what it sends peers meanwhile is for this session (accounts.py)
        try:
            self._local.session = session
            try:
                decoded = decode_skeleton_use(data) or deserialize(data, self._decode_ctx)
            except Exception as e:
                return self._error_bytes(e), None
            msg = decoded[0]
            tp = type(msg)
            if (tp is m.CommandMessage or tp is _SKELETON) and not slow_plain:
                principal = self._full_principals.get(session.id, _UNKNOWN)
                if principal is _UNKNOWN:  # first request: does check_request pass all of this session's?
                    principal = self._full_principals[session.id] = self.principal_of(session) \
                        if _full_rights(session) and type(self)._handle is type(self)._stock_handle else None
                if principal is not None and HANDLERS.get(m.CommandMessage) is _handlers._handle_command:
                    prelude = decoded[2]
                    if (not prelude or (len(prelude) == 1 and type(prelude[0]) is int)
                            or _prelude_within(prelude, _plain_op)) \
                            and (tp is _SKELETON or _plain_op(msg.op)):  # a skeleton's op: checked when defined
                        if not self._light(principal, decoded, session):
                            return None, decoded  # large operands, or much work: a handler thread
                        return self._serve_command(session, principal, msg, prelude), None
            kind = _inline_kind(msg, decoded[2])
            if tp is m.GetObjectsMessage and (_handlers._tracking(self) or self.audit_rows.full()
                                              or (type(msg.ids) is list and len(msg.ids) > INLINE_MAX_GET_IDS)):
                # a release under the owner's review files or marks it in the owner's database (release.py): on a
                # handler thread, which waits for that outside the turn (the loop thread would hold everybody);
                # so does one naming many ids (an allowed row each), or while refusal rows are counted past the
                # writer's cap (the loop never waits for room). Else its allowed rows are queued (the loop writes
                # none): the connection awaits them before the reply (loop_rows.py)
                return None, decoded
            if kind == "protocol":
                if self.audit_rows.full():  # (an opening's allowed row is queued as a get's, above)
                    return None, decoded
                slow, strikes_of = self._slow_protocol, self._protocol_strikes
            if kind is None or (slow_open if kind == "protocol" else slow_plain):
                return None, decoded
            if kind == "protocol" and not (self._small_shares(decoded) and self._light(
                    self.principal(decoded[1]), decoded, session, protocol=True)):
                return None, decoded  # large shares, or deferred torch ops of much work: a handler thread
            if kind == "plain" and not self._light(self.principal(decoded[1]), decoded, session):
                return None, decoded  # a torch op on large operands, or of much work: a handler thread
            return self._serve_decoded(*decoded), None
        except Exception as e:
            log.exception("worker %s: request of session %s failed outside the handlers", self.id, session.id)
            return serialize(m.ErrorReply(*error_reply_fields(e)), sender=self.id), None
        finally:
            self.audit_rows.inline_ended()
            self._local.session = None
            ACTING.reset(acting)
            self._turn.release()
            if time.perf_counter() - wall > INLINE_BUDGET_SECONDS:
                if not timed:  # the first long request (or a preemption): time this principal's requests
                    strikes_of.timing(key)
                elif time.thread_time() - started > INLINE_BUDGET_SECONDS and strikes_of.strike(key) >= INLINE_STRIKES:
                    slow.add(session.id)  # (its principal's other sessions: struck_out)

    def _serve_command(self, session: Session, principal: Principal, msg: m.CommandMessage | m.SkeletonCommand,
                       prelude: list) -> bytes:
        """The hot request, inline: a plain torch op of a full-rights session (a CommandMessage, or a
        skeleton command expanded to its fields after the prelude), after its deletions (or a batch of
        plain deferred ops). What ``_serve_decoded`` -> ``_handle`` -> ``_session_command`` run for it,
        without their dispatch: ``check_request`` passes every request of a full role, the handler is
        the stock one, and the monitor still resolves and checks every object it names."""
        try:
            if prelude:
                if len(prelude) == 1 and type(prelude[0]) is int:  # the result pointer the client dropped
                    self.monitor.discard(principal, prelude[0])
                else:
                    self._run_prelude(prelude, session.id)  # its failures are audited and named there
            # refusals of the definition are a SkeletonCommand's, of the command it stands for a
            # CommandMessage's: the audit rows of the handler-thread path (_expand_skeleton, _session_command)
            action = type(msg).__name__
            try:
                if action == "SkeletonCommand":
                    use = _skeleton_use(session.skeletons, msg)  # a definition is kept (or refused) here
                    action = "CommandMessage"
                    reply = _handlers.run_use(self, principal, session.id, use, msg.ids, msg.return_ids) \
                        if type(use) is _PREPARED \
                        else _handlers._run_command(self, principal, session.id, *use)
                else:
                    reply = _handlers._run_command(self, principal, session.id, msg.op, msg.args, msg.kwargs,
                                                   msg.return_ids, msg.grad_enabled)
            except PermissionDeniedError as e:
                self._audit_refusal(e, action, session.user, session.id)
                raise
        except Exception as e:  # as _serve_decoded: a failing op is an error reply
            reply = m.ErrorReply(*error_reply_fields(e))
        return self._reply_bytes(reply)

    def _small_shares(self, decoded: tuple) -> bool:
        """Whether the objects an opening and its deferred steps name hold at most ``INLINE_MAX_SHARE_BYTES``
        (``ReferenceMonitor.stored_bytes``: sizes only; results of the request's own steps count 0)."""
        return self.monitor.stored_bytes(self.principal(decoded[1]), _named_ids(decoded)) <= INLINE_MAX_SHARE_BYTES

    def _light(self, principal: Principal, decoded: tuple, session: Session, protocol: bool = False) -> bool:
        """Whether the torch ops of a request (a command, a skeleton use, its deferred commands) may run on the
        loop: their estimated work is at most ``INLINE_MAX_WORK`` (``inline_work.request_work``: shapes and public
        arguments, nothing run) and, but for an opening's (its shares are sized apart), the stored objects they
        name show at most ``INLINE_MAX_OPERAND_BYTES`` in all. A store, get, delete or list with no deferred
        command has none."""
        msg, prelude = decoded[0], decoded[2] or ()
        tp = type(msg)
        if tp is not m.CommandMessage and tp is not _SKELETON and not any(type(item) is not int for item in prelude):
            return True
        work, nbytes = request_work(decoded, session.skeletons, self.monitor.stored_size, principal)
        return work <= inline_work.INLINE_MAX_WORK and (protocol or nbytes <= INLINE_MAX_OPERAND_BYTES)


def _named_ids(decoded: tuple) -> list:
    """The object ids a request's own arguments and its deferred commands name (ObjectRefs, skeleton uses' ids)."""
    msg, _, prelude = decoded
    steps = [(item[1], item[2]) if type(item[0]) is not int  # (a skeleton use names its objects by id)
             else [m.ObjectRef(i) for i in item[1] if type(i) is int] for item in prelude or () if type(item) is not int]
    ids = [r.id for r in m.object_refs((getattr(msg, "args", None), getattr(msg, "kwargs", None), steps))]
    if type(msg) is _SKELETON and type(msg.ids) is list:
        ids.extend(i for i in msg.ids if type(i) is int)
    return ids
