"""Timestamps of every stage of an SMPC round, on the orchestrator and in ``veil worker`` processes.

Used by ``bench_net_rounds.py --breakdown`` only: it monkeypatches veil's functions with timing
wrappers (nothing in veil itself changes). ``time.perf_counter`` is CLOCK_MONOTONIC on Linux,
one clock for every process on the machine, so the orchestrator's and the workers' timestamps
line up. Workers load this module through a ``sitecustomize`` on their ``PYTHONPATH`` when
``VEIL_ROUND_TRACE`` names an output folder, and write their records there when they exit.
"""

from __future__ import annotations

import atexit
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

    from veil.workers import base, websocket_server as ws_mod

    state: dict = {}  # the request being served (a party serves one request at a time)

    orig_receive = ws_mod._receive

    async def _receive(ws):
        data = await orig_receive(ws)
        state.clear()
        state.update(t_recv=now(), n_in=len(data) if not isinstance(data, str) else 0)
        return data

    ws_mod._receive = _receive

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

    cls = ws_mod.WebsocketServerWorker
    wrap_sync(cls, "serve_inline", "t_inline_try", "t_inline_done")
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
    if hasattr(outbox.Outbox, "send_request"):  # rounds sent and read from one thread (split requests)
        split: dict[int, dict] = {}
        orig_sr, orig_rr = outbox.Outbox.send_request, outbox.Outbox.receive_reply

        def send_request(self, msg, location):
            rec = _local.rec = {"kind": "req", "to": getattr(location, "id", "?"), "type": type(msg).__name__,
                                "thread": threading.current_thread().name, "t_call": now(), "split": True}
            try:
                out = orig_sr(self, msg, location)
            finally:
                _local.rec = None
            split[id(location)] = rec
            return out

        def receive_reply(self, pending):
            rec = _local.rec = split.pop(id(pending[0]))
            try:
                return orig_rr(self, pending)
            finally:
                rec["t_done"] = now()
                RECORDS.append(rec)
                _local.rec = None

        outbox.Outbox.send_request, outbox.Outbox.receive_reply = send_request, receive_reply
        client = websocket_client.WebsocketClientWorker
        orig_send, orig_recv2 = client._send_request, client._receive_reply

        def _send_request(self, data):
            rec = _cur()
            rec["t_wire0"] = now()
            rec["n_out"] = data.nbytes if hasattr(data, "nbytes") else len(data)
            return orig_send(self, data)

        def _receive_reply(self):
            rec = _cur()
            out = orig_recv2(self)
            rec["t_wire1"], rec["n_in"] = now(), len(out)
            return out

        client._send_request, client._receive_reply = _send_request, _receive_reply
    return RECORDS


if os.environ.get("VEIL_ROUND_TRACE_WORKER"):
    install_worker(os.environ["VEIL_ROUND_TRACE_WORKER"])
