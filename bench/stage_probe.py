"""Per-stage timers for SMPC over network workers (bench/bench_mpc_stages.py), in any veil process.

``install()`` wraps the wire's stages (serde encode/decode, the client transport's send and
receive, the worker's deferred steps and opening handler, the server's receive and reply) with
timers that add up wall and thread-CPU seconds per stage, and keeps a timeline of the client's
send/receive intervals per thread (to see whether the parties' transfers overlap). Worker
processes install it through ``bench/stage_site/sitecustomize.py`` when ``VEIL_STAGES_DIR`` is
set; SIGUSR1 makes them write their totals to ``$VEIL_STAGES_DIR/<pid>.json``. Measurement only:
nothing in veil imports this.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import threading
import time

TOTALS: dict[str, list] = {}  # stage -> [calls, wall s, thread CPU s]
TIMELINE: list[tuple] = []  # (thread native id, stage, start, end) for the client's transfers
_LOOP_TIDS: set[int] = set()
_LOCK = threading.Lock()


def _add(stage: str, wall: float, cpu: float) -> None:
    with _LOCK:
        acc = TOTALS.setdefault(stage, [0, 0.0, 0.0])
        acc[0] += 1
        acc[1] += wall
        acc[2] += cpu


def _wrap(owner, name: str, stage: str, timeline: bool = False) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def timed(*a, **k):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(*a, **k)
        finally:
            t1 = time.perf_counter()
            _add(stage, t1 - t0, time.thread_time() - c0)
            if timeline:
                with _LOCK:
                    TIMELINE.append((threading.get_native_id(), stage, t0, t1))

    setattr(owner, name, timed)


def _thread_cpu(tid: int) -> float:
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except OSError:
        return 0.0


def snapshot() -> dict:
    """Totals so far, and the CPU seconds of the process and of the server's event-loop thread(s)."""
    with _LOCK:
        out = {"stages": {k: list(v) for k, v in TOTALS.items()}}
    out["process_cpu"] = time.process_time()
    out["loop_cpu"] = sum(_thread_cpu(t) for t in _LOOP_TIDS)
    names = {t.native_id: t.name for t in threading.enumerate()}
    threads: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        name = names.get(int(tid), "?")
        name = "event loop" if int(tid) in _LOOP_TIDS else name.split("_")[0].rstrip("0123456789-")
        threads[name] = threads.get(name, 0.0) + _thread_cpu(int(tid))
    out["threads"] = threads
    return out


def install(server: bool = False) -> None:
    """Wraps the stages (call before anything binds veil's serde functions by name)."""
    import sys

    import veil  # noqa: F401  (everything that binds serde's functions by name is imported now)
    from veil.messaging import serde

    from veil.mpc import party

    def everywhere(module, name: str, stage: str) -> None:  # also where ``from module import name`` bound it
        original = getattr(module, name)
        _wrap(module, name, stage)
        for mod in list(sys.modules.values()):
            if mod is not module and getattr(mod, name, None) is original:
                setattr(mod, name, getattr(module, name))

    everywhere(serde, "serialize", "encode")
    everywhere(serde, "deserialize", "decode")
    everywhere(party, "open_parties", "open_parties (round + combine)")
    from veil.workers import websocket_transport as wt

    _wrap(wt.BlockingConnection, "send", "client send (mask + socket write)", timeline=True)
    _wrap(wt.BlockingConnection, "recv", "client recv (wait + socket read)", timeline=True)
    from veil.tensors.mpc_glue import runtime

    _wrap(runtime.WorkerRuntime, "open_on_parties", "open_on_parties (round)")
    if not server:
        return
    from veil.workers import base, websocket_connections as ws
    from veil.mpc.party import OpenMessage

    _wrap(base.BaseWorker, "_run_prelude", "worker: deferred steps (compute)")
    handler = base.HANDLERS[OpenMessage]
    base.HANDLERS[OpenMessage] = functools.wraps(handler)(
        lambda *a, _h=handler: _timed_call(_h, "worker: opening step (monitor + compute)", a))
    receive = ws._receive

    async def timed_receive(conn):
        _LOOP_TIDS.add(threading.get_native_id())
        return await receive(conn)

    ws._receive = timed_receive
    out_dir = os.environ.get("VEIL_STAGES_DIR")
    if out_dir:
        def dump(signum, frame):  # noqa: ARG001
            path = os.path.join(out_dir, f"{os.getpid()}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(snapshot(), f)
            os.replace(path + ".tmp", path)

        signal.signal(signal.SIGUSR1, dump)


def _timed_call(fn, stage: str, args: tuple):
    t0, c0 = time.perf_counter(), time.thread_time()
    try:
        return fn(*args)
    finally:
        _add(stage, time.perf_counter() - t0, time.thread_time() - c0)
