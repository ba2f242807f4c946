"""Network-worker benchmark: latency, 100 MB throughput, Boston Housing pointer training.

Starts a ``veil worker`` process on loopback (and a raw websockets echo server as
the transport baseline), then reports, each against its baseline *in the same run*:

1. round-trip latency of a small remote op: network worker vs VirtualWorker vs plain torch;
2. transfer throughput of a 100 MB tensor (send, get) vs raw websockets echo of 100 MB;
3. the Boston Housing pointer training loop over the network worker (MLP 13-32-24-1,
   batch 8, SGD lr 0.001, 10 epochs) vs pure PyTorch.

Usage: ``.venv/bin/python bench/bench_network.py [--epochs 10] [--mb 100]``
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

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
    v = _best_of(lambda: pv + pv, number=1000)
    n = _best_of(lambda: pn + pn, number=1000)
    print("1. round-trip latency of a remote op (8x13 add, best of 5 x 1000)")
    print(f"   plain torch      {plain * 1e6:8.2f} us")
    print(f"   VirtualWorker    {v * 1e6:8.1f} us   {v / plain:6.0f}x torch")
    print(f"   network worker   {n * 1e6:8.1f} us   {n / plain:6.0f}x torch, {n / v:.1f}x VirtualWorker")


def _echo_server_code(port: int) -> str:
    return (
        "import asyncio\n"
        "from websockets.asyncio.server import serve\n"
        "async def echo(ws):\n"
        "    async for m in ws: await ws.send(m)\n"
        "async def main():\n"
        f"    async with serve(echo, '127.0.0.1', {port}, compression=None, max_size=2**30):\n"
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
        payload = x.numpy().tobytes()
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


def bench_training(net, epochs: int, batch: int) -> None:
    x, y, _ = load_boston()
    x_train, y_train, x_test, y_test = train_test_split(x, y, seed=0)
    train_pure(x_train, y_train, 1, batch)  # warm-up
    t_pure, m_pure = train_pure(x_train, y_train, epochs, batch)
    t_net, m_net, stats, steps = train_network(net, x_train, y_train, epochs, batch)
    with torch.no_grad():
        mse_pure = F.mse_loss(m_pure(x_test), y_test).item()
        mse_net = F.mse_loss(m_net(x_test), y_test).item()
    print(f"3. Boston Housing, MLP 13-32-24-1, batch {batch}, SGD lr 0.001, {epochs} epochs, "
          f"{len(x_train)} training rows on one network worker")
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
    args = parser.parse_args()
    torch.set_num_threads(1)
    wp = start_worker("bench_alice", ["--token", TOKEN, "--max-message-mb", str(4 * args.mb)],
                      env={"OMP_NUM_THREADS": "1"})
    try:
        hook = sy.TorchHook(torch)
        net = sy.WebsocketClientWorker(hook, id="bench_alice", host="127.0.0.1", port=wp.port, token=TOKEN)
        virtual = sy.VirtualWorker(hook, id="bench_virtual")
        print(f"network worker: {net.url} (separate process, loopback); torch threads: 1 per process")
        bench_latency(net, virtual)
        bench_throughput(net, args.mb)
        bench_training(net, args.epochs, args.batch)
        net.close()
    finally:
        wp.stop()


if __name__ == "__main__":
    main()
