"""This machine's loopback floor: one blocking TCP socket pair, a 1-byte request and an N-byte reply.

Run: ``.venv/bin/python bench/bench_raw_socket.py [bytes ...]`` (default 8 KiB, 512 KiB, 1 MiB).

No websockets, no veil: what any transport on this box pays at least (the network benchmarks'
ratios are against websockets' own echo; this shows how far that echo is from the socket).

``--exchange A,B [A,B ...]``: a peer opening's traffic instead. Two processes on one TCP connection,
the first sending A bytes while the second sends B (each sends on a thread and receives on another,
as two parties opening their shares to each other do); printed: the wall time per exchange and the
CPU time it costs both processes together (kernel copies included), the median of 20. A network
``mul 1e6``'s peer traffic is ``--exchange 16000000,16000000 0,8000000`` (the masked operands both
ways, then the truncation's masked product one way): the least CPU any transport over loopback TCP adds
to the VirtualWorker call. ``--unix``: the same exchanges over a Unix stream socket pair (what same-host
peer links use, ``veil.workers.local_socket``, with its 4 MiB buffers), each size after its TCP run.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time

REPEAT = 200


def reply_time(n: int) -> list[float]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload = bytes(n)
        for _ in range(REPEAT):
            conn.recv(1)
            conn.sendall(payload)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    sock = socket.create_connection(srv.getsockname())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    view = memoryview(bytearray(n))
    times = []
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        sock.send(b"x")
        got = 0
        while got < n:
            got += sock.recv_into(view[got:])
        times.append(time.perf_counter() - t0)
    sock.close()
    srv.close()
    return times


EXCHANGES = 20


def _exchange_side(sock: socket.socket, send: int, receive: int) -> tuple[list[float], float]:
    """This side's part of ``EXCHANGES`` exchanges (a 1-byte handshake between them): wall times, CPU s."""
    payload, into = memoryview(bytearray(os.urandom(send))), memoryview(bytearray(receive))
    times, cpu = [], 0.0
    for _ in range(EXCHANGES):
        sock.sendall(b"x")
        sock.recv(1)  # both sides start together
        c0, t0 = time.process_time(), time.perf_counter()
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        got = 0
        while got < receive:
            got += sock.recv_into(into[got:])
        sender.join()
        times.append(time.perf_counter() - t0)
        cpu += time.process_time() - c0
    return times, cpu / EXCHANGES


def _pair(unix: bool) -> tuple[socket.socket, socket.socket]:
    """Two connected stream sockets: loopback TCP (no Nagle) or a Unix pair with local links' buffers."""
    if unix:
        from veil.workers.local_socket import widen

        pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for sock in pair:
            widen(sock)
        return pair
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    one = socket.create_connection(srv.getsockname())
    other, _ = srv.accept()
    srv.close()
    for sock in (one, other):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return one, other


def exchange(a: int, b: int, unix: bool = False) -> tuple[float, float]:
    """(median wall s, CPU s of both processes) per exchange of ``a`` bytes one way and ``b`` the other."""
    mine, theirs = _pair(unix)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the second party: sends b, receives a, reports its CPU through the pipe
        mine.close()
        os.write(writer, repr(_exchange_side(theirs, b, a)[1]).encode())
        os._exit(0)
    theirs.close()
    times, cpu = _exchange_side(mine, a, b)
    os.waitpid(pid, 0)
    other = float(os.read(reader, 64))
    for fd in (reader, writer):
        os.close(fd)
    mine.close()
    return statistics.median(times), cpu + other


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exchange", nargs="+", metavar="A,B", help="bytes each way of simultaneous exchanges")
    ap.add_argument("--unix", action="store_true", help="also over a Unix socket pair (same-host peer links)")
    ap.add_argument("sizes", nargs="*", type=int)
    args = ap.parse_args()
    if args.exchange:
        for unix in (False, True) if args.unix else (False,):
            total_wall = total_cpu = 0.0
            for spec in args.exchange:
                a, b = (int(float(v)) for v in spec.split(","))
                wall, cpu = exchange(a, b, unix)
                total_wall, total_cpu = total_wall + wall, total_cpu + cpu
                print(f"{'unix' if unix else 'tcp ':4} {a:>11} / {b:>11} bytes: {wall * 1e3:.2f} ms, "
                      f"CPU of both processes {cpu * 1e3:.2f} ms")
            if len(args.exchange) > 1:
                print(f"{'unix' if unix else 'tcp '} all in turn: {total_wall * 1e3:.2f} ms, CPU {total_cpu * 1e3:.2f} ms")
        return
    sizes = args.sizes or [8 << 10, 512 << 10, 1 << 20]
    for n in sizes:
        t = reply_time(n)
        med = statistics.median(t)
        print(f"{n:>9} bytes: median {med * 1e3:.3f} ms, min {min(t) * 1e3:.3f} ms ({n / med / 1e6:.0f} MB/s)")


if __name__ == "__main__":
    main()
