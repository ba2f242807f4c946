"""Timestamps of every stage of an SMPC round, on the orchestrator and in ``veil worker`` processes.

Used by ``bench_net_rounds.py --breakdown`` only: it monkeypatches veil's functions with timing
wrappers (nothing in veil itself changes). ``time.perf_counter`` is CLOCK_MONOTONIC on Linux,
one clock for every process on the machine, so the orchestrator's and the workers' timestamps
line up. Workers load this module through a ``sitecustomize`` on their ``PYTHONPATH`` when
``VEIL_ROUND_TRACE`` names an output folder, and write their records there when they exit.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import threading
import time

now = time.perf_counter
RECORDS: list[dict] = []
_local = threading.local()


def _cur() -> dict:
    rec = getattr(_local, "rec", None)
    if rec is None:
        rec = _local.rec = {}
    return rec


def install_worker(out_dir: str) -> None:
    """Worker side: receive -> handler start -> decode -> prelude -> handle -> encode -> send."""
    from websockets.asyncio.server import ServerConnection

    from veil.workers import base, websocket_connections as ws_mod, websocket_server

    state: dict = {}  # the request being served (a party serves one request at a time)

    from veil.workers import audit_writer

    orig_log = audit_writer.refused_request_log

    def refused_request_log(db, write_now, *a, **kw):  # each audit row's write, timed (its thread's own)
        def timed_write(*row):
            t0 = now()
            try:
                return write_now(*row)
            finally:
                RECORDS.append({"kind": "audit_write", "t0": t0, "t1": now(), "action": row[0]})
        return orig_log(db, timed_write, *a, **kw)

    audit_writer.refused_request_log = refused_request_log
    websocket_server.refused_request_log = refused_request_log

    orig_receive = ws_mod._receive

    async def _receive(ws):
        data = await orig_receive(ws)
        state.clear()
        state.update(t_recv=now(), n_in=len(data) if not isinstance(data, str) else 0)
        return data

    ws_mod._receive = _receive
    # a request's bytes reaching the loop (its read callback) and the lane's look at it (decode, inline or not)
    from veil.workers import lane_connection

    for meth, kind in (("data_received", "loop_data"), ("process_event", "lane_event")):
        orig_cb = getattr(lane_connection.LaneConnection, meth)

        def traced_cb(self, arg, _orig=orig_cb, _kind=kind):
            t0 = now()
            try:
                return _orig(self, arg)
            finally:
                RECORDS.append({"kind": _kind, "t0": t0, "t1": now()})

        setattr(lane_connection.LaneConnection, meth, traced_cb)

    def wrap_sync(owner, name, key_start=None, key_end=None, first_only=False):
        orig = getattr(owner, name)

        def wrapper(*a, **kw):
            if key_start and not (first_only and key_start in state):
                state[key_start] = now()
            try:
                return orig(*a, **kw)
            finally:
                if key_end:
                    state[key_end] = now()

        setattr(owner, name, wrapper)

    cls = websocket_server.WebsocketServerWorker
    wrap_sync(cls, "try_inline", "t_inline_try", "t_inline_done")  # (a request it declines goes on to serve_bytes)
    wrap_sync(cls, "serve_bytes", "t_thread", "t_thread_done")
    orig_deser = base.deserialize

    def deserialize(*a, **kw):
        t0 = now()
        out = orig_deser(*a, **kw)
        state["t_dec"] = now() - t0
        state["type"] = type(out[0]).__name__
        state["n_prelude"] = len(out[2] or ())
        if type(out[0]).__name__ == "OpenMessage":
            state["name"] = out[0].name
        return out

    base.deserialize = deserialize
    from veil.workers import inline_lane

    if inline_lane.deserialize is orig_deser:  # the inline lane decodes requests itself (once, before deciding)
        inline_lane.deserialize = deserialize
    orig_ser = base.serialize

    def serialize(*a, **kw):
        t0 = now()
        out = orig_ser(*a, **kw)
        state["t_enc"] = now() - t0
        return out

    base.serialize = serialize
    orig_prelude = base.BaseWorker._run_prelude

    def _run_prelude(self, prelude, sender):
        t0 = now()
        try:
            return orig_prelude(self, prelude, sender)
        finally:
            state["t_prelude"] = now() - t0

    base.BaseWorker._run_prelude = _run_prelude
    orig_handle = cls._handle

    def _handle(self, msg, sender):
        t0 = now()
        try:
            return orig_handle(self, msg, sender)
        finally:
            state["t_handle"] = now() - t0

    cls._handle = _handle
    orig_send = ServerConnection.send

    async def send(self, message, *a, **kw):
        t0 = now()
        try:
            return await orig_send(self, message, *a, **kw)
        finally:
            if "t_recv" in state:
                state.update(t_send0=t0, t_send1=now(), n_out=len(message) if isinstance(message, (bytes, bytearray)) else -1)
                RECORDS.append(dict(state))
                state.clear()

    ServerConnection.send = send

    # replies leave through the server module's own frame writers (reply_frames), not ws.send
    for name in ("_send_one", "_send_fragmented"):
        orig_writer = getattr(ws_mod, name)

        async def writer(ws, payload, _orig=orig_writer):
            t0 = now()
            try:
                return await _orig(ws, payload)
            finally:
                if "t_recv" in state:
                    size = len(payload) if isinstance(payload, (bytes, bytearray)) else -1
                    state.update(t_send0=t0, t_send1=now(), n_out=size)
                    RECORDS.append(dict(state))
                    state.clear()

        setattr(ws_mod, name, writer)

    _install_peer_path()

    profiles = []
    if os.environ.get("VEIL_ROUND_PROFILE"):  # cProfile: one profiler for the loop thread, one for handler threads
        import cProfile

        loop_prof, thread_prof = cProfile.Profile(), cProfile.Profile()
        profiles += [("loop", loop_prof), ("thread", thread_prof)]
        orig_serve_async = cls.serve_async

        async def serve_async(self, *a, **kw):
            loop_prof.enable()
            try:
                return await orig_serve_async(self, *a, **kw)
            finally:
                loop_prof.disable()

        cls.serve_async = serve_async
        orig_sb = cls.serve_bytes

        def serve_bytes(self, *a, **kw):
            thread_prof.enable()
            try:
                return orig_sb(self, *a, **kw)
            finally:
                thread_prof.disable()

        cls.serve_bytes = serve_bytes

    def dump() -> None:
        with open(os.path.join(out_dir, f"worker-{os.getpid()}.json"), "w") as f:
            json.dump(RECORDS, f)
        for tag, prof in profiles:
            prof.dump_stats(os.path.join(out_dir, f"prof-{tag}-{os.getpid()}.pstats"))

    atexit.register(dump)


def _install_peer_path() -> None:
    """Peer openings (``veil.workers.peer_openings``): one record per round and party with the times its
    handler started, its step ran, it published, each fetch request left and came back, it summed, its
    readers took its outputs and it ended; and one per served fetch (the publishing side's take)."""
    from veil.workers import peer_openings as po

    rounds: dict[str, dict] = {}
    local = threading.local()

    def timed(name, before, after=None):
        orig = getattr(po, name)

        def wrapper(*a, **kw):
            before(a)
            try:
                return orig(*a, **kw)
            finally:
                if after:
                    after(a)

        setattr(po, name, wrapper)

    from veil.workers import websocket_server as ws_mod

    orig_serve = ws_mod.WebsocketServerWorker.serve_bytes

    def serve_bytes(*a, **kw):
        local.t_thread = now()
        try:
            return orig_serve(*a, **kw)
        finally:
            rec = getattr(local, "rec", None)
            if rec is not None:
                rec["t_done"] = now()
                local.rec = None

    ws_mod.WebsocketServerWorker.serve_bytes = serve_bytes
    orig_run_request = ws_mod.WebsocketServerWorker._run_request

    async def _run_request(*a, **kw):
        t0 = now()
        out = await orig_run_request(*a, **kw)
        RECORDS.append({"kind": "peer_loop", "t0": t0, "t1": now()})
        return out

    ws_mod.WebsocketServerWorker._run_request = _run_request
    from websockets.asyncio.server import ServerConnection

    orig_ws_send = ServerConnection.send

    async def ws_send(self, message, *a, **kw):
        t0 = now()
        try:
            return await orig_ws_send(self, message, *a, **kw)
        finally:
            RECORDS.append({"kind": "peer_small_send", "t0": t0, "t1": now()})

    ServerConnection.send = ws_send

    from veil.workers import base

    orig_prelude = base.BaseWorker._run_prelude

    def _run_prelude(self, prelude, sender):
        local.t_prelude0 = now()
        cpu0 = time.thread_time()
        try:
            return orig_prelude(self, prelude, sender)
        finally:
            local.t_prelude1 = now()
            local.prelude_cpu = time.thread_time() - cpu0

    base.BaseWorker._run_prelude = _run_prelude

    def start(a):
        msg = a[1]
        rec = rounds[msg.round] = {"kind": "peer", "round": msg.round, "name": msg.name, "t_start": now(),
                                   "worker": getattr(a[0], "id", "?"),
                                   "t_thread": getattr(local, "t_thread", 0), "fetches": []}
        if getattr(local, "t_prelude0", 0) >= rec["t_thread"]:
            rec["t_prelude0"], rec["t_prelude1"] = local.t_prelude0, local.t_prelude1
            rec["prelude_cpu"] = local.prelude_cpu
        local.rec = rec
        RECORDS.append(rec)

    timed("_check_message", start)
    orig_run = po.run_openable

    def run_openable(*a, **kw):
        rec = getattr(local, "rec", None)
        if rec is not None:
            rec["t_step0"] = now()
        try:
            return orig_run(*a, **kw)
        finally:
            if rec is not None:
                rec["t_step1"] = now()

    po.run_openable = run_openable
    # inside the step's runner: the monitor passed (t_run), the fetches posted, the share slot reserved (its
    # allowed row waited for first: peer_slot_outputs.into_peer_slot)
    timed("_post_fetches", lambda a: getattr(local, "rec", None) is not None and local.rec.__setitem__("t_run", now()),
          lambda a: getattr(local, "rec", None) is not None and local.rec.__setitem__("t_posted", now()))
    timed("into_peer_slot", lambda a: None,
          lambda a: getattr(local, "rec", None) is not None and local.rec.__setitem__("t_slot", now()))
    timed("_fetch_all", lambda a: rounds[a[1].round].__setitem__("t_fetch0", now()),
          lambda a: rounds[a[1].round].__setitem__("t_fetch1", now()))
    timed("_combine", lambda a: None, lambda a: local.rec.__setitem__("t_combined", now()))
    # the audit rows on record before anything is published (leaving_rows.on_record_before_leaving)
    timed("on_record_before_leaving",
          lambda a: getattr(local, "rec", None) is not None and local.rec.__setitem__("t_on_record0", now()),
          lambda a: getattr(local, "rec", None) is not None and local.rec.__setitem__("t_on_record", now()))
    # the slot path waits for its allowed row inside into_peer_slot, before the step (peer_slot_outputs)
    from veil.workers import peer_slot_outputs as pso
    orig_slot_record = pso.on_record_before_leaving

    def slot_record(*a, **kw):
        rec = getattr(local, "rec", None)
        t0 = now()
        try:
            return orig_slot_record(*a, **kw)
        finally:
            if rec is not None:
                rec["t_slot_record0"], rec["t_slot_record"] = t0, now()

    pso.on_record_before_leaving = slot_record
    orig_expect = po.expect_reply

    @contextlib.contextmanager
    def expect_reply(n):
        t0 = now()
        with orig_expect(n):
            yield
        rec = getattr(local, "rec", None)
        if rec is not None:  # the pool thread's fetches of a third party are not recorded
            rec["fetches"].append((t0, now()))

    po.expect_reply = expect_reply
    cls = po.PeerRounds
    for meth, key in (("publish", "t_published"), ("wait_taken", "t_taken")):
        orig_m = getattr(cls, meth)

        def wrapped(self, *a, _orig=orig_m, _key=key, **kw):
            out = _orig(self, *a, **kw)
            rec = getattr(local, "rec", None)
            if rec is not None:
                rec[_key] = now()
            return out

        setattr(cls, meth, wrapped)
    orig_close = cls.close

    def close(self, round_id, rnd=None):
        out = orig_close(self, round_id, rnd)
        rec = rounds.pop(round_id, None)
        if rec is not None and getattr(local, "rec", None) is rec:
            rec["t_end"] = now()
        return out

    cls.close = close
    orig_take = cls.take

    def take(self, round_id, reader, name, wait=60.0):
        t0 = now()
        out = orig_take(self, round_id, reader, name, wait)
        RECORDS.append({"kind": "peer_take", "round": round_id, "t0": t0, "t1": now(), "got": out is not None})
        return out

    cls.take = take

    from veil.workers import websocket_connections

    orig_frag = websocket_connections._send_fragmented

    async def _send_fragmented(ws, fragments):
        t0 = now()
        try:
            return await orig_frag(ws, fragments)
        finally:
            RECORDS.append({"kind": "peer_send", "t0": t0, "t1": now()})

    websocket_connections._send_fragmented = _send_fragmented
    # a peer's fetch served on the loop: from its decoding to its reply (slot placed), and a slot reply's send
    serving = websocket_connections.ConnectionServing
    for meth, kind in (("_serve_peer_fetch", "peer_serve"), ("_send_slot", "peer_slot_send")):
        orig_async = getattr(serving, meth)

        async def traced(self, *a, _orig=orig_async, _kind=kind, **kw):
            t0 = now()
            try:
                return await _orig(self, *a, **kw)
            finally:
                RECORDS.append({"kind": _kind, "t0": t0, "t1": now()})

        setattr(serving, meth, traced)
    orig_on_loop = websocket_connections.serve_fetch_on_loop

    async def serve_fetch_on_loop(*a, **kw):
        t0 = now()
        try:
            return await orig_on_loop(*a, **kw)
        finally:
            RECORDS.append({"kind": "peer_take_on_loop", "t0": t0, "t1": now()})

    websocket_connections.serve_fetch_on_loop = serve_fetch_on_loop
    from veil.workers import share_slots

    orig_place = share_slots.SlotPool.place

    def place(self, *a, **kw):
        t0 = now()
        try:
            return orig_place(self, *a, **kw)
        finally:
            RECORDS.append({"kind": "peer_place", "t0": t0, "t1": now()})

    share_slots.SlotPool.place = place


def install_orchestrator() -> list[dict]:
    """Orchestrator side: per request serialize, transport (send + wait + read), decode; per round the
    hand-off to the pool threads. Returns the list records are appended to."""
    from veil.tensors.mpc_glue import runtime as rt
    from veil.workers import outbox, websocket_client

    orig_round = rt.one_round

    def one_round(requests, what, *a, **kw):
        t0 = now()
        out = orig_round(requests, what, *a, **kw)
        RECORDS.append({"kind": "round", "what": what, "t0": t0, "t1": now(), "n": len(requests)})
        return out

    rt.one_round = one_round
    orig_send_msg = outbox.Outbox.send_msg

    def send_msg(self, msg, location):
        rec = _local.rec = {"kind": "req", "to": getattr(location, "id", "?"), "type": type(msg).__name__,
                            "thread": threading.current_thread().name, "t_call": now()}
        try:
            return orig_send_msg(self, msg, location)
        finally:
            rec["t_done"] = now()
            RECORDS.append(rec)
            _local.rec = None

    outbox.Outbox.send_msg = send_msg
    orig_ser = outbox.serialize

    def serialize(*a, **kw):
        rec = _cur()
        rec["t_ser0"] = now()
        out = orig_ser(*a, **kw)
        rec["t_ser1"] = now()
        return out

    outbox.serialize = serialize
    orig_deser = outbox.deserialize

    def deserialize(*a, **kw):
        rec = _cur()
        rec["t_dec0"] = now()
        out = orig_deser(*a, **kw)
        rec["t_dec1"] = now()
        return out

    outbox.deserialize = deserialize
    orig_recv = websocket_client.WebsocketClientWorker._recv_msg

    def _recv_msg(self, data):
        rec = _cur()
        rec["t_wire0"] = now()
        out = orig_recv(self, data)
        rec["t_wire1"] = now()
        rec["n_out"], rec["n_in"] = (data.nbytes if hasattr(data, "nbytes") else len(data)), len(out)
        return out

    websocket_client.WebsocketClientWorker._recv_msg = _recv_msg
    # rounds sent from one thread (Outbox.send_round): every request posted, then every reply collected
    orig_round_send = outbox.Outbox.send_round
    posted: dict[int, dict] = {}

    def send_round(self, requests, post=None):
        _local.in_round = True
        try:
            return orig_round_send(self, requests, post)
        finally:
            _local.in_round = False

    outbox.Outbox.send_round = send_round

    framing: dict[int, dict] = {}  # a round's requests are all serialized, then all posted: by frame

    def serialize_in_round(*a, **kw):
        if not getattr(_local, "in_round", False):
            return serialize(*a, **kw)
        _local.rec = rec = {"kind": "req", "type": type(a[0]).__name__, "thread": threading.current_thread().name,
                            "t_call": now()}
        out = serialize(*a, **kw)
        framing[id(out)] = rec
        _local.rec = None
        return out

    outbox.serialize = serialize_in_round
    client = websocket_client.WebsocketClientWorker
    orig_post, orig_collect = client.post, client.collect

    def post(self, data):
        rec = framing.pop(id(data), None)
        if rec is not None and getattr(_local, "in_round", False):
            rec.update(to=self.id, t_wire0=now(), n_out=data.nbytes if hasattr(data, "nbytes") else len(data))
            ticket = orig_post(self, data)
            posted[(id(self), ticket)] = rec  # (a posted round's reply is collected later, by the next round)
            return ticket
        return orig_post(self, data)

    def collect(self, ticket):
        out = orig_collect(self, ticket)
        rec = posted.pop((id(self), ticket), None)
        if rec is not None:
            rec["t_wire1"], rec["n_in"] = now(), len(out)
            _local.rec = rec
        return out

    client.post, client.collect = post, collect
    orig_read = outbox.Outbox._read_reply

    def _read_reply(self, *a, **kw):
        try:
            return orig_read(self, *a, **kw)
        finally:
            rec = _local.rec
            if rec is not None and "t_wire1" in rec:
                rec.setdefault("t_dec0", rec["t_wire1"])
                rec.setdefault("t_dec1", rec["t_dec0"])
                rec["t_done"] = now()
                RECORDS.append(rec)
                _local.rec = None

    outbox.Outbox._read_reply = _read_reply
    return RECORDS


if os.environ.get("VEIL_ROUND_TRACE_WORKER"):
    install_worker(os.environ["VEIL_ROUND_TRACE_WORKER"])
