"""Constants and helpers shared by the network tests (imported by name: not a conftest)."""

from __future__ import annotations

import contextlib
import socket

import torch

import veil as sy

TOKEN = "net-scientist-token"
OTHER = "net-other-scientist-token"
HOSPITAL = "net-hospital-token"
ADMIN = "net-admin-token"
PEER = "net-peer-token"
BOSTON = str(__import__("pathlib").Path(sy.__file__).parent / "datasets" / "data" / "boston_housing.csv")


def base_args(extra: list[str] = ()) -> list[str]:
    return ["--token", TOKEN, "--user", f"other={OTHER}", "--user", f"hospital={HOSPITAL}",
            "--admin-token", ADMIN, *extra]


def start_peered_pair(spawn, data_dir) -> dict:
    """alice and bob (``spawn`` fixture), each accepting the other as a peer, each with its own data dir."""
    from veil.workers.websocket_launcher import free_port

    from worker_processes import spawn_all

    ports = {"alice": free_port(), "bob": free_port()}
    specs = {}
    for name, other in (("alice", "bob"), ("bob", "alice")):
        args = base_args(["--peer", f"{other}=127.0.0.1:{ports[other]}", "--peer-token", f"{other}={PEER}",
                          "--accept-peer", f"{other}={PEER}", "--data-dir", str(data_dir / name)])
        specs[name] = (args, ports[name])
    return spawn_all(spawn, specs)


def stopped_worker_rows(data_dir, worker_proc) -> list[dict]:
    """The audit log of a ``veil worker`` process with this data dir, read once the process stopped."""
    from veil.workers.persistence import OwnerDB

    worker_proc.stop()
    db = OwnerDB.in_dir(data_dir)
    try:
        return db.audit_entries()
    finally:
        db.close()


def tensor_eq(a, b) -> bool:
    return torch.equal(a, b)


def in_process_server(hook, worker_id: str):
    """A WebsocketServerWorker that is not listening, with one authenticated scientist session registered:
    ``(server, tokens, session)``, for driving its request path (``try_inline``, ``serve_bytes``) directly."""
    from veil.workers.websocket_auth import authenticate
    from veil.workers.websocket_server import WebsocketServerWorker

    tokens = sy.TokenTable()
    tokens.add(TOKEN, "scientist")
    server = WebsocketServerWorker(hook, id=worker_id, port=0, tokens=tokens)
    session = authenticate(tokens, [TOKEN])
    server.sessions[session.id] = session
    return server, tokens, session


def listening_server(hook, prefix: str):
    """Yields an in-process worker with one scientist token (:data:`TOKEN`) serving on loopback from a thread,
    stopped afterwards (a fixture body: the test may spy on its lane or its sockets)."""
    import os
    import time

    from veil.workers.websocket_server import WebsocketServerWorker
    from worker_processes import serve_in_thread, stop_served

    tokens = sy.TokenTable()
    tokens.add(TOKEN, "scientist")
    server = WebsocketServerWorker(hook, id=f"{prefix}-{os.getpid()}-{time.monotonic_ns()}", port=0, tokens=tokens)
    thread = serve_in_thread(server)
    yield server
    stop_served(server, thread)


def store_as(server, session, oid, tensor) -> None:
    """Stores ``tensor`` under ``oid`` through ``session``'s request path (an ObjectMessage; asserts OkReply)."""
    from veil.messaging import messages as m
    from veil.messaging.serde import deserialize, serialize

    data = serialize(m.ObjectMessage([m.StoredObject(oid, tensor)]), sender="c")
    assert deserialize(server.serve_bytes(data, session))[0] == m.OkReply()


def get_as(server, session, oid):
    """``oid``'s value as ``session`` gets it (a GetObjectsMessage), or the ErrorReply."""
    from veil.messaging import messages as m
    from veil.messaging.serde import deserialize, serialize

    reply = deserialize(server.serve_bytes(serialize(m.GetObjectsMessage([oid], False), sender="c"), session))[0]
    return reply.objects[0] if type(reply) is not m.ErrorReply else reply


def self_signed_cert(folder) -> tuple:
    """(cert.pem, key.pem) in ``folder``: a one-day self-signed certificate for localhost and 127.0.0.1 (the
    openssl command; callers skip without it)."""
    import subprocess
    from pathlib import Path

    cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


@contextlib.contextmanager
def slot_link():
    """A share-slot link without workers (``veil.workers.share_slots``): (the publisher's pool on one end of a
    Unix socket pair, the reader's end, the reader's maps); closed after."""
    from veil.workers.share_slots import SlotMaps, SlotPool

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    pool, maps = SlotPool(a), SlotMaps()
    try:
        yield pool, b, maps
    finally:
        pool.close()
        maps.close()
        b.close()


def send_placed(pool, reader: socket.socket, maps, placed: tuple) -> object:
    """What the server's loop and the reader's transport do with a placed slot reply (``SlotPool.place``'s
    (reply, descriptor)): sent, with the descriptor the first time, and received with room for descriptors
    (the reader maps what came); returns the reply."""
    from veil.workers.share_slots import send_with_fd

    reply, fd = placed
    payload = b"reply"
    if fd is None:
        pool.raw.send(payload)
    else:
        assert send_with_fd(pool.raw, payload, fd) == len(payload)
        pool.sent(reply)
    buf = bytearray(64)
    got, ancdata, _, _ = reader.recvmsg_into([buf], maps.read_size(), socket.MSG_CMSG_CLOEXEC)
    assert bytes(buf[:got]) == payload
    maps.received(ancdata)
    return reply
