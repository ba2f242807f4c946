"""Network-worker benchmark: latency, 100 MB throughput, Boston Housing pointer training.

Starts a ``veil worker`` process on loopback (and a raw websockets echo server as
the transport baseline), then reports, each against its baseline *in the same run*:

1. round-trip latency of a small remote op: network worker vs VirtualWorker vs plain torch;
2. transfer throughput of a 100 MB tensor (send, get) vs raw websockets echo of 100 MB;
3. the Boston Housing pointer training loop over the network worker (MLP 13-32-24-1,
   batch 8, SGD lr 0.001, 10 epochs) vs pure PyTorch;
6. the same training as plans (one fit message per epoch round) vs pure PyTorch.

4./5. (``--stages``) where the time of one remote op and of one bulk transfer goes,
   stage by stage, next to a raw websockets echo of the same frame and a veil
   server whose request handler only echoes (the server's own request path).

Usage: ``.venv/bin/python bench/bench_network.py [--epochs 10] [--mb 100] [--stages] [--only-stages]
[--only-training N] [--only-plans N]``
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import veil as sy
from veil.datasets import load_boston, train_test_split
from veil.workers.websocket_launcher import free_port, start_worker
from veil.workers.websocket_transport import BlockingConnection

sys.path.insert(0, __import__("os").path.dirname(__file__))
from bench_core import _best_of, _mlp, train_pure  # noqa: E402  (same model, timer and baseline as the core benchmark)

TOKEN = "bench-network-token"


def bench_latency(net: sy.WebsocketClientWorker, virtual: sy.VirtualWorker) -> None:
    a = torch.randn(8, 13)
    pn, pv = a.send(net), a.send(virtual)
    plain = _best_of(lambda: a + a, number=5000)
    with _synchronous(net, virtual):  # a real round trip per op (pipelining would queue it)
        v = _best_of(lambda: pv + pv, number=1000)
        n = _best_of(lambda: pn + pn, number=1000)
    vq = _best_of(lambda: pv + pv, number=1000)
    nq = _best_of(lambda: pn + pn, number=1000)
    net.flush()
    virtual.flush()
    print("1. round-trip latency of a remote op (8x13 add, best of 5 x 1000)")
    print(f"   plain torch      {plain * 1e6:8.2f} us")
    print(f"   VirtualWorker    {v * 1e6:8.1f} us   {v / plain:6.0f}x torch   (pipelined, queued: {vq * 1e6:.1f} us)")
    print(f"   network worker   {n * 1e6:8.1f} us   {n / plain:6.0f}x torch, {n / v:.1f}x VirtualWorker"
          f"   (pipelined, queued: {nq * 1e6:.1f} us)")


@contextlib.contextmanager
def _synchronous(*workers):
    """Pipelining off for these destinations (every command waits for its reply)."""
    before = [w.pipelining for w in workers]
    for w in workers:
        w.pipelining = False
    try:
        yield
    finally:
        for w, b in zip(workers, before):
            w.pipelining = b


def _echo_server_code(port: int, floor: bool = False) -> str:
    """A websockets echo server. ``floor``: each binary frame answered where websockets parses it (a
    connection's read callback), as veil's server answers inline requests (``veil.workers.lane_connection``):
    the floor of any websockets server; else by the handler task, the library's own path."""
    floor_connection = (
        "from websockets.asyncio.server import ServerConnection\n"
        "from websockets.frames import Frame, Opcode\n"
        "from veil.workers.reply_frames import _write_frame\n"
        "class Floor(ServerConnection):\n"
        "    def process_event(self, event):\n"
        "        if type(event) is Frame and event.opcode is Opcode.BINARY and event.fin:\n"
        "            _write_frame(self.transport, 0x02, True, event.data)\n"
        "        else:\n"
        "            super().process_event(event)\n"
    ) if floor else ""
    return (
        "import asyncio\n"
        "from websockets.asyncio.server import serve\n"
        + floor_connection +
        "async def echo(ws):\n"
        "    async for m in ws: await ws.send(m)\n"
        "async def main():\n"
        f"    async with serve(echo, '127.0.0.1', {port}, compression=None, max_size=2**30"
        f"{', create_connection=Floor' if floor else ''}):\n"
        "        print('ready', flush=True); await asyncio.Future()\n"
        "asyncio.run(main())\n"
    )


def bench_throughput(net: sy.WebsocketClientWorker, mb: int) -> None:
    x = torch.randn(mb * 2**20 // 4)  # float32
    size = x.numel() * 4 / 1e6
    p = x.send(net)  # warm-up (allocator, page faults)
    p.get()
    t = time.perf_counter()
    p = x.send(net)
    t_send = time.perf_counter() - t
    t = time.perf_counter()
    back = p.get()
    t_get = time.perf_counter() - t
    assert torch.equal(back, x)
    port = free_port()
    echo = subprocess.Popen([sys.executable, "-c", _echo_server_code(port)], stdout=subprocess.PIPE, text=True)
    try:
        echo.stdout.readline()
        conn = BlockingConnection(f"ws://127.0.0.1:{port}", {}, max_size=2**30)
        payload = x.numpy().tobytes()  # one message of the tensor's bytes, as the client transport sends it
        conn.send(payload)
        conn.recv(60)
        t = time.perf_counter()
        conn.send(payload)
        conn.recv(60)
        t_echo = time.perf_counter() - t
        conn.close()
    finally:
        echo.kill()
        echo.wait()
    echo_rate = 2 * size / t_echo  # the payload crossed twice
    print(f"2. transfer of a {size:.0f} MB float32 tensor")
    print(f"   .send()          {size / t_send:8.0f} MB/s  ({t_send:.2f} s)")
    print(f"   .get()           {size / t_get:8.0f} MB/s  ({t_get:.2f} s)")
    print(f"   raw websockets echo baseline {echo_rate:8.0f} MB/s per direction  ({t_echo:.2f} s round trip)")
    print(f"   ratio: send {(size / t_send) / echo_rate:.2f}, get {(size / t_get) / echo_rate:.2f} of raw websockets")


def _null_server_code(port: int) -> str:
    """A real WebsocketServerWorker (auth, fair turn, cancellation, executor) whose handler does nothing:
    requests it runs inline are decoded (that decides inline) and answered OK; others are echoed."""
    return (
        "import torch, veil as sy\n"
        "from veil.workers.websocket_server import WebsocketServerWorker\n"
        "torch.set_num_threads(1)\n"
        "tokens = sy.TokenTable(); tokens.add(%r, 'bench')\n"
        "w = WebsocketServerWorker(sy.TorchHook(torch), id='null', port=%d, tokens=tokens, max_message=2**30)\n"
        "w._recv_msg = lambda data: data\n"
        "from veil.messaging import messages as m; from veil.messaging.serde import serialize\n"
        "ok = serialize(m.OkReply(), sender='null')\n"
        "w._serve_decoded = lambda msg, sender, prelude: ok  # inline requests: decoded once, then answered\n"
        "w.serve_forever(on_ready=lambda _: print('ready', flush=True))\n"
    ) % (TOKEN, port)


def _spawn(code: str):
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    proc.stdout.readline()
    return proc


def _echo_round_trip(url: str, headers: dict, frame: bytes, number: int) -> float:
    conn = BlockingConnection(url, headers, max_size=2**30)
    try:
        def once():
            conn.send(frame)
            conn.recv(60)
        return _best_of(once, number=number)
    finally:
        conn.close()


def _capture(worker):
    """Wraps ``worker._recv_msg`` to keep the last request and reply bytes."""
    seen = {}
    inner = worker._recv_msg

    def recv(data):
        seen["request"] = data
        seen["reply"] = reply = inner(data)
        return reply
    worker._recv_msg = recv
    return seen, lambda: worker.__dict__.pop("_recv_msg", None)


def _interleaved_best(fns: dict, rounds: int, number: int) -> dict:
    """Best per-call time of each fn, measured in alternating batches (a load spike hits all alike)."""
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            for _ in range(number):
                fn()
            best[k] = min(best[k], (time.perf_counter() - t) / number)
    return best


def bench_stages(net: sy.WebsocketClientWorker, virtual: sy.VirtualWorker, mb: int, rounds: int = 9) -> None:
    """Per-stage cost of a small remote op and of a bulk transfer (same run, same frames, interleaved)."""
    from veil.ids import new_id
    from veil.messaging.serde import deserialize, serialize
    from veil.workers.websocket_auth import handshake_headers

    me = net.hook.local_worker
    a = torch.randn(8, 13)
    pn, pv = a.send(net), a.send(virtual)
    seen, undo = _capture(net)
    with _synchronous(net, virtual):  # capture one real request/reply pair (pipelining would queue it)
        pn + pn
        undo()
        request, reply = seen["request"], seen["reply"]
        vseen, vundo = _capture(virtual)
        pv + pv
        vundo()
    msg, sender, prelude = deserialize(vseen["request"], virtual._decode_ctx)
    rmsg = deserialize(vseen["reply"], me._decode_ctx)[0]

    def handle():  # a fresh result id each time (ids are single-use); the objects are freed below
        msg.return_ids = [new_id()]
        virtual._handle(msg, sender)
    local = _interleaved_best({
        "ser": lambda: serialize(msg, sender=me.id, prelude=prelude),
        "dec": lambda: deserialize(vseen["request"], virtual._decode_ctx),
        "handle": handle,
        "exec": lambda: a + a,
        "enc": lambda: serialize(rmsg, sender=virtual.id),
        "cdec": lambda: deserialize(reply, me._decode_ctx),
    }, rounds=5, number=2000)
    virtual.clear_objects()
    pv = a.send(virtual)
    echo_port, null_port, floor_port = free_port(), free_port(), free_port()
    echo, null = _spawn(_echo_server_code(echo_port)), _spawn(_null_server_code(null_port))
    floor = _spawn(_echo_server_code(floor_port, floor=True))
    echo_conn = BlockingConnection(f"ws://127.0.0.1:{echo_port}", {}, max_size=2**30)
    floor_conn = BlockingConnection(f"ws://127.0.0.1:{floor_port}", {}, max_size=2**30)
    null_conn = BlockingConnection(f"ws://127.0.0.1:{null_port}", handshake_headers(TOKEN, ()), max_size=2**30)
    try:
        def rt(conn, frame):
            def once():
                conn.send(frame)
                conn.recv(60)
            return once
        net_ = _interleaved_best({
            "echo": rt(echo_conn, request), "null": rt(null_conn, request), "floor": rt(floor_conn, request),
            "net": lambda: pn + pn, "virtual": lambda: pv + pv,
        }, rounds=rounds, number=300)
        t_ser, t_dec, t_exec, t_enc, t_cdec = (local[k] for k in ("ser", "dec", "exec", "enc", "cdec"))
        t_handle, t_echo, t_null, t_total = local["handle"], net_["echo"], net_["null"], net_["net"]
        t_floor = net_["floor"]
        rest = t_total - t_null - t_ser - t_handle - t_enc - t_cdec  # t_null includes t_floor and the decode
        print(f"4. stages of one remote op (8x13 add; request {len(request)} B, reply {len(reply)} B; best of "
              f"{rounds} interleaved batches of 300 round trips / 5 x 2000 local calls; load {_load()})")
        rows = [
            ("client serialize (request)", t_ser),
            ("send + server receive + reply: echo answered in the server's read callback (floor)", t_floor),
            ("server path beyond that echo and the decode (session, inline turn, token)", t_null - t_floor - t_dec),
            ("server decode", t_dec),
            ("dispatch incl. monitor (handler minus execute)", t_handle - t_exec),
            ("execute (plain torch add)", t_exec),
            ("server encode (reply)", t_enc),
            ("client decode (reply)", t_cdec),
            ("rest (client pointer bookkeeping, scheduling)", rest),
        ]
        for name, v in rows:
            print(f"   {name:<80} {v * 1e6:8.1f} us")
        print(f"   {'total: network worker round trip':<80} {t_total * 1e6:8.1f} us   "
              f"{t_total / t_echo:.2f}x raw echo (target <= 1.5x)")
        print(f"   {'(raw websockets echo of the request frame, served by the reader task)':<80} {t_echo * 1e6:8.1f} us")
        print(f"   {'(VirtualWorker round trip, same op)':<80} {net_['virtual'] * 1e6:8.1f} us")

        # bulk: one send and one get of `mb` MB, next to a raw echo of the same frame
        x = torch.randn(mb * 2**20 // 4)
        size = x.numel() * 4 / 1e6
        seen, undo = _capture(net)
        p = x.send(net)
        send_req = seen["request"]
        p.get()
        get_reply = seen["reply"]
        undo()
        smsg, _, sprelude = deserialize(send_req, virtual._decode_ctx)
        send_bytes = b"".join(send_req) if isinstance(send_req, list) else send_req  # FrameParts: as sent
        gmsg = deserialize(get_reply, me._decode_ctx)[0]
        del seen, p
        bulk = {"echo": float("inf"), "send": float("inf"), "get": float("inf"),
                "ser": float("inf"), "dec": float("inf"), "enc": float("inf"), "cdec": float("inf")}
        for _ in range(3):
            t = time.perf_counter()
            echo_conn.send(send_req)
            echo_conn.recv(120)
            bulk["echo"] = min(bulk["echo"], (time.perf_counter() - t) / 2)
            t = time.perf_counter()
            p = x.send(net)
            bulk["send"] = min(bulk["send"], time.perf_counter() - t)
            t = time.perf_counter()
            p.get()
            bulk["get"] = min(bulk["get"], time.perf_counter() - t)
            owned = _owned(send_bytes)  # the server decodes the buffer it assembled (untimed: "receive")
            for k, fn in (("ser", lambda: serialize(smsg, sender=me.id, prelude=sprelude, parts_over=net.frame_parts_over)),
                          ("dec", lambda: deserialize(owned, virtual._decode_ctx)),
                          ("enc", lambda: serialize(gmsg, sender=net.id)),
                          ("cdec", lambda: deserialize(get_reply, me._decode_ctx))):
                t = time.perf_counter()
                fn()
                bulk[k] = min(bulk[k], time.perf_counter() - t)
        print(f"5. stages of a {size:.0f} MB transfer (best of 3 interleaved; one direction of a raw echo = half "
              f"its round trip; load {_load()})")
        for name, k in ((".send(): client serialize", "ser"), (".send(): server decode", "dec"),
                        (".get(): server encode (reply)", "enc"), (".get(): client decode", "cdec"),
                        ("raw websockets, one direction of the same frame", "echo")):
            print(f"   {name:<60} {bulk[k] * 1e3:8.1f} ms  ({size / bulk[k]:7.0f} MB/s)")
        for name, k in ((".send() total", "send"), (".get() total", "get")):
            print(f"   {name:<60} {bulk[k] * 1e3:8.1f} ms  ({size / bulk[k]:7.0f} MB/s, "
                  f"{bulk['echo'] / bulk[k]:.2f} of raw; target >= 0.8)")
    finally:
        for conn in (echo_conn, null_conn, floor_conn):
            conn.close()
        for proc in (echo, null, floor):
            proc.kill()
            proc.wait()


def _owned(data: bytes):
    """A request as the server holds it once received (an aligned OwnedFrame, see websocket_connections._receive)."""
    from veil.messaging.frames import OwnedFrame, frame_pad

    pad = frame_pad(data[:5])
    frame = OwnedFrame(pad)
    frame += data
    return memoryview(frame)[pad:] if pad else frame


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def bench_plans(net: sy.WebsocketClientWorker, virtual: sy.VirtualWorker, epochs: int, batch: int) -> None:
    """Training plans (one fit message per round) over the network worker vs pure PyTorch."""
    from veil import federated as fl

    x, y, _ = load_boston()
    x_train, y_train, x_test, y_test = train_test_split(x, y, seed=0)

    def fedavg(worker):
        model = _mlp()
        fed = fl.federate(torch.utils.data.TensorDataset(x_train, y_train), [worker])
        t = time.perf_counter()
        fl.train(model, fed, rounds=epochs, local_epochs=1, lr=0.001, batch_size=batch, progress=False)
        return time.perf_counter() - t, model

    fedavg(virtual)  # warm-up: tracing, caches
    t_pure = min(train_pure(x_train, y_train, epochs, batch)[0] for _ in range(2))
    t_virtual = min(fedavg(virtual)[0] for _ in range(2))
    me = net.hook.local_worker
    me.stats.reset()
    cpu = time.process_time()
    t_net, m_net = min((fedavg(net) for _ in range(2)), key=lambda r: r[0])
    cpu = (time.process_time() - cpu) / 2
    stats = me.stats.snapshot()
    with torch.no_grad():
        mse = F.mse_loss(m_net(x_test), y_test).item()
    print(f"6. training plans, Boston MLP, {epochs} epochs batch {batch}, one worker (best of 2; load {_load()})")
    print(f"   pure PyTorch          {t_pure:7.2f} s")
    print(f"   plans, VirtualWorker  {t_virtual:7.2f} s   {t_virtual / t_pure:5.2f}x")
    print(f"   plans, network worker {t_net:7.2f} s   {t_net / t_pure:5.2f}x pure PyTorch (target <= 1.5x), "
          f"test MSE {mse:.2f}")
    print(f"   per round (network): {stats['messages'] / (2 * epochs):.1f} requests, "
          f"{stats['bytes_sent'] / (2 * epochs):.0f} B sent, {stats['bytes_received'] / (2 * epochs):.0f} B received; "
          f"coordinator CPU {cpu / epochs * 1e3:.2f} ms")


def train_network(worker, x, y, epochs, batch):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.001)
    px, py = x.send(worker), y.send(worker)
    me = worker.hook.local_worker
    me.stats.reset()
    steps = 0
    t = time.perf_counter()
    model.send(worker)
    for _ in range(epochs):
        for i in range(0, px.shape[0], batch):
            opt.zero_grad()
            F.mse_loss(model(px[i:i + batch]), py[i:i + batch]).backward()
            opt.step()
            steps += 1
    model.get()
    return time.perf_counter() - t, model, me.stats.snapshot(), steps


#: runs of the pointer loop and of its pure-PyTorch baseline (row 3); each side reports its best
TRAINING_REPEAT = 3


def bench_training(net, epochs: int, batch: int) -> None:
    x, y, _ = load_boston()
    x_train, y_train, x_test, y_test = train_test_split(x, y, seed=0)
    train_pure(x_train, y_train, 1, batch)  # warm-up
    # best of REPEAT, the two alternating: one run of either swings ~2x on this host (a 0.1 s loop), and a
    # ratio of two single runs mixes both swings
    pure, network = [], []
    for _ in range(TRAINING_REPEAT):
        pure.append(train_pure(x_train, y_train, epochs, batch))
        network.append(train_network(net, x_train, y_train, epochs, batch))
    t_pure, m_pure = min(pure, key=lambda r: r[0])
    t_net, m_net, stats, steps = min(network, key=lambda r: r[0])
    with torch.no_grad():
        mse_pure = F.mse_loss(m_pure(x_test), y_test).item()
        mse_net = F.mse_loss(m_net(x_test), y_test).item()
    print(f"3. Boston Housing, MLP 13-32-24-1, batch {batch}, SGD lr 0.001, {epochs} epochs, "
          f"{len(x_train)} training rows on one network worker (best of {TRAINING_REPEAT} each, alternating)")
    print(f"   pure PyTorch          {t_pure:7.2f} s   test MSE {mse_pure:6.2f}")
    print(f"   veil network worker   {t_net:7.2f} s   test MSE {mse_net:6.2f}   ratio {t_net / t_pure:5.1f}x "
          f"(reference framework: 66x; aim <= 8x)")
    print(f"   per step: {stats['messages'] / steps:.1f} messages, {stats['bytes_sent'] / steps:.0f} B sent, "
          f"{stats['bytes_received'] / steps:.0f} B received; "
          f"{(t_net - t_pure) / stats['messages'] * 1e6:.0f} us of overhead per message")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--stages", action="store_true", help="also break one op and one transfer into stages")
    parser.add_argument("--only-stages", action="store_true", help="only the stage breakdown")
    parser.add_argument("--only-training", type=int, default=0, metavar="RUNS",
                        help="only the training loop (row 3), this many runs")
    parser.add_argument("--only-plans", type=int, default=0, metavar="RUNS",
                        help="only the training plans (row 6), this many runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    wp = start_worker("bench_alice", ["--token", TOKEN, "--max-message-mb", str(4 * args.mb)],
                      env={"OMP_NUM_THREADS": "1"})
    try:
        hook = sy.TorchHook(torch)
        net = sy.WebsocketClientWorker(hook, id="bench_alice", host="127.0.0.1", port=wp.port, token=TOKEN)
        virtual = sy.VirtualWorker(hook, id="bench_virtual")
        print(f"network worker: {net.url} (separate process, loopback); torch threads: 1 per process")
        if args.only_training:
            print(f"load {_load()}")
            for _ in range(args.only_training):
                bench_training(net, args.epochs, args.batch)
        elif args.only_plans:
            for _ in range(args.only_plans):
                bench_plans(net, virtual, args.epochs, args.batch)
        elif args.only_stages:
            with _synchronous(net, virtual):  # stages of a real round trip
                bench_stages(net, virtual, args.mb)
        else:
            bench_latency(net, virtual)
            bench_throughput(net, args.mb)
            bench_training(net, args.epochs, args.batch)
            bench_plans(net, virtual, args.epochs, args.batch)
            if args.stages:
                with _synchronous(net, virtual):  # stages of a real round trip
                    bench_stages(net, virtual, args.mb)
        net.close()
    finally:
        wp.stop()


if __name__ == "__main__":
    main()
