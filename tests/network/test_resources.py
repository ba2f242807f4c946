"""Resources an attacker could pin on a running ``veil worker``: each finding of issue 12, reproduced.

Handshake slots, long commands (other sessions keep being served, a deadline,
cancellation on disconnect), replies that cannot be encoded, deep nesting,
log flooding and CLI input errors.
"""

import http.client
import os
import subprocess
import sys
import textwrap
import time

import msgpack
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from veil.exceptions import CommandTimeoutError
from veil.ids import new_id
from veil.messaging import messages as m
from veil.messaging.serde import EXT_CODES, deserialize, serialize
from veil.plans import training_plan
from veil.workers.auth_throttle import FREE_FAILURES
from veil.workers.persistence import OwnerDB
from veil.workers.websocket_auth import handshake_headers
from veil.workers.websocket_transport import BlockingConnection
from veil.messaging.serde import WIRE_VERSION

from network_helpers import TOKEN, base_args

from tests.cli_batch import run_veil


def _http_get(port: int, headers: dict) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/", headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def _plan_and_data(worker, rows: int = 400):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 8), nn.ReLU(), nn.Linear(8, 1))
    plan = training_plan(model, F.mse_loss, lr=0.01, args_shape=[(-1, 13), (-1, 1)])
    return plan.send(worker), torch.randn(rows, 13).send(worker), torch.randn(rows, 1).send(worker)


def test_requests_without_upgrade_do_not_leak_handshake_slots(plain_worker, connect):
    wp = plain_worker
    statuses = {_http_get(wp.port, handshake_headers(TOKEN)) for _ in range(80)}  # > 64 slots
    assert 503 not in statuses and all(s >= 400 for s in statuses)
    alice = connect(wp)  # immediately: no waiting for slots to expire
    assert torch.equal((torch.tensor([1.0, 2.0]).send(alice) * 3).get(), torch.tensor([3.0, 6.0]))


def test_unencodable_result_is_an_error_reply_not_a_closed_connection(plain_worker):
    wp = plain_worker
    conn = BlockingConnection(f"ws://127.0.0.1:{wp.port}", handshake_headers(TOKEN))
    try:
        # a meta tensor (shapes only, no data; its bytes could not be encoded back) is not even stored
        conn.send(serialize(m.CommandMessage("torch.zeros", (3,), {"device": torch.device("meta")}, [4242])))
        reply = deserialize(conn.recv(30))[0]
        assert type(reply) is m.ErrorReply and "meta" in reply.message
        conn.send(serialize(m.GetObjectsMessage([4242], False, None)))
        reply = deserialize(conn.recv(30))[0]
        assert type(reply) is m.ErrorReply
        # the same connection keeps working
        conn.send(serialize(m.ObjectMessage([m.StoredObject(77, torch.ones(2))])))
        assert type(deserialize(conn.recv(30))[0]) is m.OkReply
    finally:
        conn.close()


def test_deeply_nested_frame_is_refused_and_worker_survives(plain_worker, connect):
    wp = plain_worker
    inner = msgpack.packb([])
    for _ in range(300):
        inner = msgpack.packb([msgpack.ExtType(EXT_CODES.TUPLE, inner)])
    frame = msgpack.packb([WIRE_VERSION, 1, "x", [], "torch.add", [msgpack.ExtType(EXT_CODES.TUPLE, inner)], {}, None, False])
    conn = BlockingConnection(f"ws://127.0.0.1:{wp.port}", handshake_headers(TOKEN))
    try:
        conn.send(frame)
        reply = deserialize(conn.recv(30))[0]
        assert type(reply) is m.ErrorReply and reply.error == "SerializationError"
    finally:
        conn.close()
    assert wp.alive()
    assert (torch.ones(2).send(connect(wp)) + 1).get().tolist() == [2.0, 2.0]


def test_command_time_limit(spawn, connect):
    wp = spawn("alice", base_args(["--max-command-seconds", "1.5"]))
    alice = connect(wp)
    plan, x, y = _plan_and_data(alice)
    with pytest.raises(CommandTimeoutError, match="max-command-seconds"):
        plan.fit(x, y, batch_size=8, epochs=10_000)
    assert plan.fit(x, y, batch_size=8, epochs=1).get().shape == (50,)  # still serves, plan intact


_ATTACKER = textwrap.dedent("""
    import sys, torch, torch.nn.functional as F
    from torch import nn
    import veil as sy
    from veil.plans import training_plan
    hook = sy.TorchHook(torch)
    w = sy.WebsocketClientWorker(hook, id="alice", host="127.0.0.1", port=int(sys.argv[1]), token=sys.argv[2],
                                 timeout=600)
    model = nn.Sequential(nn.Linear(13, 8), nn.ReLU(), nn.Linear(8, 1))
    plan = training_plan(model, F.mse_loss, lr=0.01, args_shape=[(-1, 13), (-1, 1)]).send(w)
    x, y = torch.randn(400, 13).send(w), torch.randn(400, 1).send(w)
    print("fitting", flush=True)
    plan.fit(x, y, batch_size=8, epochs=10_000)
    print("finished", flush=True)
""")


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_long_fit_does_not_block_others_and_stops_when_its_session_leaves(spawn, connect):
    wp = spawn("alice", base_args())
    attacker = subprocess.Popen([sys.executable, "-c", _ATTACKER, str(wp.port), TOKEN],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert attacker.stdout.readline().strip() == "fitting"
        time.sleep(1.0)  # the fit is running now
        victim = connect(wp)
        x = torch.arange(5.0).send(victim)
        for i in range(5):  # answered while the 500,000-batch fit is still running
            assert torch.equal((x * i).get(), torch.arange(5.0) * i)
        assert attacker.poll() is None
    finally:
        attacker.kill()
        attacker.wait(10)
    assert _wait_for(lambda: any("cancelled" in line for line in wp.output), 60), wp.output[-10:]
    assert (torch.ones(3).send(connect(wp)) * 2).get().tolist() == [2.0, 2.0, 2.0]


def test_close_from_another_thread_ends_a_request_in_flight(spawn, connect):
    """A user closing a connection while another thread waits on a long command: the waiting call raises
    ConnectionLostError at once (close() used to wait for the reply, here for the whole fit), the worker
    cancels the command as for any departed session and keeps serving."""
    import threading

    from veil.exceptions import ConnectionLostError

    wp = spawn("alice", base_args())
    alice = connect(wp)
    plan, x, y = _plan_and_data(alice)
    raised = []

    def fit():
        try:
            plan.fit(x, y, batch_size=8, epochs=10_000)  # 500,000 batches: minutes
        except Exception as e:  # noqa: BLE001
            raised.append(e)

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    time.sleep(1.0)  # the fit is running on the worker now
    alice.close()
    thread.join(60)
    assert not thread.is_alive() and len(raised) == 1 and type(raised[0]) is ConnectionLostError, raised
    assert _wait_for(lambda: any("cancelled" in line for line in wp.output), 60), wp.output[-10:]
    assert (torch.ones(3).send(connect(wp)) * 2).get().tolist() == [2.0, 2.0, 2.0]


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def test_a_result_beyond_the_workers_memory_cap_fails_before_it_is_allocated(spawn, connect):
    """Finding (session 43): a result is charged to the session's quota once it exists, so a session with a
    1 MiB quota had the worker allocate 1 GiB for ``torch.zeros(2**27)`` before refusing it (several such
    requests at once could exhaust the machine and get the worker killed). Without a session quota,
    ``--max-memory-mb`` makes the allocation itself fail: a one-line error, nothing allocated, the worker
    serves on. With one (session 44, veil/workers/output_bounds.py), every op is sized first: the quota
    refuses it unallocated, and an op whose size would depend on values is not run at all."""
    wp = spawn("alice", base_args(["--max-memory-mb", "1800"]))
    alice = connect(wp)
    me = alice.hook.local_worker
    before = _peak_rss_mb(wp.pid)
    with pytest.raises(Exception, match="allocate") as info:  # 2 GiB: over the process cap
        me.send_msg(m.CommandMessage("torch.zeros", ([1 << 29],), {}, [new_id()]), alice)
    assert "\n" not in str(info.value).strip()
    assert _peak_rss_mb(wp.pid) < before + 256  # the 2 GiB were never touched
    x = torch.arange(6.0).send(alice)
    assert torch.equal((x * 2).get(), torch.arange(6.0) * 2)

    wp = spawn("bob", base_args(["--max-session-mb", "1", "--max-memory-mb", "1800"]))
    bob = connect(wp)
    before = _peak_rss_mb(wp.pid)
    one, count = torch.ones(1).send(bob), torch.tensor([1 << 29]).send(bob)
    with pytest.raises(Exception, match="cannot size this op") as info:  # its size would depend on values
        me.send_msg(m.CommandMessage("torch.repeat_interleave", (m.ObjectRef(one.id_at_location),
                                                                  m.ObjectRef(count.id_at_location)), {}, [new_id()]), bob)
    assert "\n" not in str(info.value).strip()
    for n in (1 << 28, 1 << 20):  # over the process cap, and within it: the session quota refuses both first
        with pytest.raises(Exception, match="limit of 1.0 MiB"):
            me.send_msg(m.CommandMessage("torch.zeros", ([n],), {}, [new_id()]), bob)
    assert _peak_rss_mb(wp.pid) < before + 256
    x = torch.arange(6.0).send(bob)
    assert torch.equal((x * 2).get(), torch.arange(6.0) * 2)


def test_refused_connections_are_audited_in_aggregate(spawn, tmp_path):
    wp = spawn("alice", base_args(["--data-dir", str(tmp_path)]))
    for i in range(120):  # (past one source's free failures, refused as throttled: audited the same way)
        assert _http_get(wp.port, handshake_headers("not-a-valid-token")) == (401 if i <= FREE_FAILURES else 429)
    assert wp.stop() == 0
    rows = [r for r in OwnerDB.in_dir(tmp_path).audit_entries() if r["action"] == "connect"]
    assert len(rows) <= 10, len(rows)
    singles = [r for r in rows if "more refused" not in r["detail"]]
    summaries = [r for r in rows if "more refused" in r["detail"]]
    counted = len(singles) + sum(int(r["detail"].split()[0]) for r in summaries)
    assert counted == 120  # nothing hidden: every refusal is counted


@pytest.mark.parametrize("argv", [
    ["worker", "--id", "a", "--token", "short"],
    ["worker", "--id", "a", "--token", "long-enough-token", "--port", "99999"],
    ["worker", "--id", "a", "--token", "long-enough-token", "--cert", "/nonexistent.pem", "--key", "/x"],
    ["worker", "--id", "a", "--token", "long-enough-token", "--max-command-seconds", "-1"],
    ["worker", "--id", "a", "--token", "long-enough-token", "--max-memory-mb", "10"],
    ["serve", "/nonexistent-model.pt", "--auto", "1,2,3"],
])
def test_cli_input_errors_are_one_line(argv):
    # in the shared runner (tests/cli_batch.py): a fresh process per case imported torch again (~3 s)
    out = run_veil(argv, env=dict(os.environ), cwd=os.getcwd(), timeout=120)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr + out.stdout
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_cli_help_does_not_promise_future_subcommands(capsys):
    from veil.cli import main

    with pytest.raises(SystemExit) as done:  # in this process: the help is argparse's, a process adds nothing
        main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "land" not in out and "worker" in out
