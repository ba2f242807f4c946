"""This machine's loopback floor: one blocking TCP socket pair, a 1-byte request and an N-byte reply.

Run: ``.venv/bin/python bench/bench_raw_socket.py [bytes ...]`` (default 8 KiB, 512 KiB, 1 MiB).

No websockets, no veil: what any transport on this box pays at least (the network benchmarks'
ratios are against websockets' own echo; this shows how far that echo is from the socket).
"""

from __future__ import annotations

import socket
import statistics
import sys
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


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [8 << 10, 512 << 10, 1 << 20]
    for n in sizes:
        t = reply_time(n)
        med = statistics.median(t)
        print(f"{n:>9} bytes: median {med * 1e3:.3f} ms, min {min(t) * 1e3:.3f} ms ({n / med / 1e6:.0f} MB/s)")


if __name__ == "__main__":
    main()
