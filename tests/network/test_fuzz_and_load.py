"""A running server under hostile input (fuzz) and under many concurrent clients (load)."""

import random
import threading

import msgpack
import psutil
import torch

from veil.messaging import messages as m
from veil.messaging.serde import deserialize, serialize
from veil.workers.websocket_auth import handshake_headers
from veil.workers.websocket_transport import BlockingConnection

from network_helpers import OTHER, TOKEN, base_args


def _corpus() -> list[bytes]:
    t = torch.arange(6.0).reshape(2, 3)
    ref = m.ObjectRef(1001)
    msgs = [
        m.ObjectMessage([m.StoredObject(1001, t, ("#a",), "d", None)]),
        m.ObjectMessage([m.StoredObject(1002, torch.tensor([1, 2], dtype=torch.int64))]),
        m.CommandMessage("torch.add", (ref, 1.5), {}, [2001]),
        m.CommandMessage("Tensor.sum", (ref,), {"dim": 0}, None),
        m.CommandMessage("Tensor.__getitem__", (ref, (slice(0, 1), Ellipsis)), {}, [2002]),
        m.GetObjectsMessage([1001], False, None),
        m.GetObjectsMessage([2001], True, "hospital"),
        m.DeleteMessage([1002, 2001]),
        m.SearchMessage(["#a"]),
        m.MoveMessage([1001], "bob", [3001]),
        m.RemoteGetMessage(1001),
        m.ListObjectsMessage(),
    ]
    return [serialize(msg, sender="me", prelude=[5]) for msg in msgs]


def _mutate(rng: random.Random, corpus: list[bytes]) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 200))
    data = bytearray(rng.choice(corpus))
    if kind == 1:  # flip bytes
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 2:  # truncate
        del data[rng.randrange(len(data)):]
    elif kind == 3:  # insert junk
        pos = rng.randrange(len(data) + 1)
        data[pos:pos] = rng.randbytes(rng.randrange(1, 20))
    elif kind == 4:  # structurally valid msgpack, hostile values
        value = [1, rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 60, 61, 99, -1]), rng.choice(["me", 7, None]),
                 rng.choice([[], [1, 2], "x", [2**70 - 1 if rng.random() < 0.5 else -1]]),
                 *[rng.choice([None, "torch.load", [1], {"a": 1}, 2**63 - 1, b"\x00" * 8, [[[]]]])
                   for _ in range(rng.randrange(0, 6))]]
        try:
            return msgpack.packb(value)
        except (OverflowError, TypeError):
            return bytes(data)
    else:  # splice two messages
        other = rng.choice(corpus)
        cut = rng.randrange(len(data))
        data = data[:cut] + other[rng.randrange(len(other)):]
    return bytes(data)


def _connect(port: int, token: str = TOKEN) -> BlockingConnection:
    return BlockingConnection(f"ws://127.0.0.1:{port}", handshake_headers(token))


def test_fuzz_ten_thousand_hostile_messages(spawn):
    wp = spawn("alice", base_args())
    server = psutil.Process(wp.pid)
    rng = random.Random(1234)
    corpus = _corpus()
    conn = _connect(wp.port)
    errors = 0
    rss_after_warmup = None
    for i in range(10_000):
        if i % 2500 == 0 and i:
            conn.close()  # a new session: objects the valid mutants stored are freed
            conn = _connect(wp.port)
        if i == 2000:
            rss_after_warmup = server.memory_info().rss
        conn.send(_mutate(rng, corpus))
        reply, _, _ = deserialize(conn.recv(10))  # every request gets a well-formed reply
        errors += type(reply) is m.ErrorReply
    conn.close()
    assert errors > 8000  # nearly all were refused; the rest were harmless valid requests
    growth = server.memory_info().rss - rss_after_warmup
    assert growth < 40 * 2**20, f"server memory grew by {growth / 2**20:.1f} MiB under fuzzing"
    ok = _connect(wp.port)
    ok.send(serialize(m.ObjectMessage([m.StoredObject(9, torch.ones(3))]), sender="me"))
    assert type(deserialize(ok.recv(10))[0]) is m.OkReply
    ok.send(serialize(m.GetObjectsMessage([9]), sender="me"))
    assert torch.equal(deserialize(ok.recv(10))[0].objects[0], torch.ones(3))
    ok.close()
    assert wp.alive()


def test_twenty_concurrent_clients_five_hundred_ops_each(spawn, connect):
    wp = spawn("alice", base_args())
    n_clients, n_ops = 20, 500
    clients = [connect(wp, token=TOKEN if k % 2 else OTHER) for k in range(n_clients)]
    failures: list[str] = []
    done = [0] * n_clients

    def run(k: int) -> None:
        try:
            c = clients[k]
            base = torch.tensor([float(k), 0.0]).send(c)
            for i in range(n_ops):
                got = (base + torch.tensor([0.0, float(i)])).get()
                if not torch.equal(got, torch.tensor([float(k), float(i)])):
                    failures.append(f"client {k} op {i}: got {got.tolist()}")
                    return
                done[k] += 1
        except Exception as e:  # reported below with the client number
            failures.append(f"client {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures[:5]
    assert done == [n_ops] * n_clients
