"""An SMPC opening's allowed audit rows (openings.resolve_opening, peer_openings.py, audit_writer.py).

A peer round is one allowed row per party, written before anything leaves: the step, the other parties and the
ids the opened values are stored under (it was two rows, the second after the round, each settled on its own).
A handler thread's allowed row wakes no writer thread (the thread writes it itself when it settles it), while
the event loop's rows, which it never writes, still do; a row queued by a thread that never settles it is
written anyway.
"""

from __future__ import annotations

import threading
import time

import torch

from veil.workers import audit_writer

from network_helpers import PEER, base_args, stopped_worker_rows


def _mesh(spawn, data_dir) -> dict:
    """alice and bob (each with a data dir) and the dealer dave, every one peered with the others."""
    from veil.workers.websocket_launcher import free_port

    from worker_processes import peer_mesh_args, spawn_all

    ports = {name: free_port() for name in ("alice", "bob", "dave")}
    specs = {name: (base_args([*peer_mesh_args(name, ports, lambda n: f"{PEER}-{n}"), "--data-dir",
                               str(data_dir / name)]), port) for name, port in ports.items()}
    return spawn_all(spawn, specs)


def test_a_peer_round_is_one_allowed_row_per_party_naming_its_peer_and_stored_ids(spawn, connect, hook, tmp_path,
                                                                                    monkeypatch):
    from veil.tensors.mpc_glue import runtime
    from veil.tensors.mpc_glue.runtime import enable_peer_openings

    monkeypatch.setattr(runtime, "PEER_MIN_ELEMENTS", 0)
    procs = _mesh(spawn, tmp_path)
    alice, bob, dave = (connect(procs[name]) for name in ("alice", "bob", "dave"))
    enable_peer_openings(alice, bob)
    a, b = torch.randint(-2**20, 2**20, (16, 8)), torch.randint(-2**20, 2**20, (16, 8))
    try:
        got = (a.share(alice, bob, crypto_provider=dave) * b.share(alice, bob, crypto_provider=dave)).get()
    finally:
        enable_peer_openings(alice, bob, enabled=False)
    assert torch.equal(got, a * b)
    for name, other in (("alice", "bob"), ("bob", "alice")):
        rows = stopped_worker_rows(tmp_path / name, procs[name])
        assert not [r for r in rows if r["action"] == "peer_open"], "a second row for the round"
        opens = [r for r in rows if r["action"] == "open" and r["outcome"] == "allowed"]
        assert len(opens) == 1, opens  # one round: one row at each party
        detail, ids = opens[0]["detail"], opens[0]["object_ids"]
        assert detail.startswith("beaver_mask: 2 opened values stored as the row's last 2 ids ["), detail
        assert detail.endswith(f"], a peer round with ['{other}']"), detail
        stored = [int(i) for i in detail.split("[", 1)[1].split("]", 1)[0].split(",")]
        assert len(stored) == 2 and ids[-2:] == stored and len(ids) == 6, (ids, stored)  # x, y, a, b; e, f


def _parked_writer(written: list) -> audit_writer.RowWriter:
    """A writer whose thread wrote one refusal row and now waits for rows (``written``: (detail, thread name))."""
    writer = audit_writer.RowWriter(lambda *row: written.append((row[5], threading.current_thread().name)),
                                    f"aw-rows-{time.monotonic_ns()}")
    writer.submit("compute", "alice", "-", [], "refused", "first")
    assert writer.wait(5)
    time.sleep(0.1)  # (its thread back in its wait: only a wake-up, or IDLE_S, moves it now)
    return writer


def test_a_handler_threads_allowed_row_is_written_by_that_thread_when_it_settles(monkeypatch):
    monkeypatch.setattr(audit_writer, "IDLE_S", 5.0)
    written: list = []
    writer = _parked_writer(written)
    writer.submit_allowed("open", "alice", "s", [1], "allowed", "mine")
    time.sleep(0.3)
    assert [d for d, _ in written] == ["first"], "the writer's thread was woken for a handler thread's row"
    assert writer.settle_mine(5)
    assert written[-1] == ("mine", threading.current_thread().name)


def test_the_event_loops_allowed_row_wakes_the_writer(monkeypatch):
    monkeypatch.setattr(audit_writer, "IDLE_S", 5.0)
    written: list = []
    writer = _parked_writer(written)
    writer.inline_started()
    try:
        writer.submit_allowed("open", "alice", "s", [1], "allowed", "inline")
        tickets = writer.take_allowed()
    finally:
        writer.inline_ended()
    deadline = time.monotonic() + 2.0  # (well before IDLE_S: woken, not timed out)
    while not tickets[0][0] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tickets[0][0] is True and written[-1][0] == "inline", written
    assert written[-1][1] != threading.current_thread().name


def test_an_allowed_row_never_settled_is_written_anyway(monkeypatch):
    monkeypatch.setattr(audit_writer, "IDLE_S", 0.2)
    written: list = []
    writer = _parked_writer(written)

    def handler():  # a request that failed before its reply: its tickets dropped, its row still queued
        writer.submit_allowed("open", "alice", "s", [1], "allowed", "orphan")
        writer.wait_mine(0)

    t = threading.Thread(target=handler)
    t.start()
    t.join(5)
    deadline = time.monotonic() + 3.0
    while "orphan" not in [d for d, _ in written] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "orphan" in [d for d, _ in written], written


def test_an_inline_reply_whose_rows_are_on_record_goes_unwrapped_and_one_not_yet_written_waits(monkeypatch):
    import asyncio

    from veil.workers.loop_rows import AfterRows, after_rows, released

    monkeypatch.setattr(audit_writer, "IDLE_S", 5.0)
    gate = threading.Event()  # (holds the "pending" row's write until its reply was wrapped)

    def write(*row):
        if row[5] == "fails":
            raise RuntimeError("the database refused the row")
        if row[5] == "pending":
            gate.wait(10)

    writer = audit_writer.RowWriter(write, f"aw-rows-{time.monotonic_ns()}")
    for detail, want in (("written", bytes), ("pending", AfterRows), ("fails", AfterRows)):
        writer.inline_started()
        try:
            writer.submit_allowed("open", "alice", "s", [1], "allowed", detail)
        finally:
            writer.inline_ended()
        if detail != "pending":  # (the writer's thread, woken by the loop's row, writes it)
            writer.wait(5)
        reply = after_rows(writer, b"the opened values", "w")
        assert type(reply) is want, (detail, reply)
        if detail == "pending":  # (opened only now: set after the first row, it let this one be written first)
            gate.set()
        sent = asyncio.run(released(writer, reply))
        if detail == "fails":
            assert b"the opened values" not in sent and b"audit log is unavailable" in sent, sent
        else:
            assert sent == b"the opened values"
