"""Review-before-release over real ``veil worker`` processes, with the ``veil requests`` CLI."""

from __future__ import annotations

import threading

import pytest
import torch

import veil as sy
from veil.exceptions import PermissionDeniedError, RequestDeniedError, ReviewPendingError
from veil.governance.wire import AdminRequestsMessage
from veil.plans import func2plan
from veil.workers.websocket_cli import read_csv

from conftest import ADMIN, BOSTON, OTHER, PEER, TOKEN, run_cli, worker_args

DATA, TARGET, _ = read_csv(__import__("pathlib").Path(BOSTON), "MEDV")


def _data(client):
    return client.search(["#boston", "#data"])[0]


def test_open_policy_releases_derived_results(spawn, connect):
    alice = connect(spawn("alice", worker_args("open")))
    assert torch.allclose(_data(alice).mean(dim=0).get(), DATA.mean(dim=0))


def test_dp_only_policy_refuses_raw_arithmetic(spawn, connect):
    alice = connect(spawn("alice", worker_args("dp-only")))
    with pytest.raises(PermissionDeniedError, match="differential-privacy"):
        _data(alice) * 1
    assert torch.equal(torch.ones(2).send(alice).get(), torch.ones(2))  # still serves


def test_review_approve_from_the_cli_while_get_waits(spawn, connect, tmp_path):
    wp = spawn("alice", worker_args("review", ["--data-dir", str(tmp_path)]))
    alice = connect(wp)
    means = _data(alice).mean(dim=0)
    with pytest.raises(ReviewPendingError) as info:
        means.get()
    rid = info.value.request_id
    means.request(reason="column means for the report")
    mine = sy.requests(alice)
    assert [(r["id"], r["state"], r["reason"]) for r in mine] == [(rid, "pending", "column means for the report")]
    other = connect(wp, token=OTHER, id="alice")
    assert sy.requests(other) == []  # nobody sees another scientist's requests

    listed = run_cli("requests", "list", "--worker", f"127.0.0.1:{wp.port}", "--admin-token", ADMIN)
    assert listed.returncode == 0 and rid in listed.stdout and "pending" in listed.stdout
    shown = run_cli("requests", "show", rid, "--worker", f"127.0.0.1:{wp.port}", "--admin-token", ADMIN)
    assert shown.returncode == 0, shown.stderr
    assert "dataset: #boston #data" in shown.stdout and "Tensor.mean(d1, dim=0)" in shown.stdout
    assert "preview" in shown.stdout and "column means for the report" in shown.stdout

    got = {}

    def scientist():
        try:
            got["value"] = means.get(wait=60)
        except Exception as e:  # surfaced by the assertion below
            got["error"] = e

    t = threading.Thread(target=scientist)
    t.start()
    approved = run_cli("requests", "approve", rid, "--worker", f"127.0.0.1:{wp.port}", "--admin-token", ADMIN)
    assert approved.returncode == 0 and "approved" in approved.stdout
    t.join(60)
    assert "error" not in got, got.get("error")
    assert torch.allclose(got["value"], DATA.mean(dim=0))

    # decisions persist: after a restart the CLI still lists the released request
    alice.close()
    other.close()
    wp.stop()
    wp2 = spawn("alice", worker_args("review", ["--data-dir", str(tmp_path)]))
    listed = run_cli("requests", "list", "--state", "released", "--worker", f"127.0.0.1:{wp2.port}",
                     "--admin-token", ADMIN)
    assert rid in listed.stdout, listed.stdout + listed.stderr


def test_review_deny_reaches_the_scientist_with_the_message(spawn, connect):
    wp = spawn("alice", worker_args("review"))
    alice = connect(wp)
    raw = _data(alice).copy()
    with pytest.raises(ReviewPendingError) as info:
        raw.get()
    denied = run_cli("requests", "deny", info.value.request_id, "--message", "row-level data stays here",
                     "--worker", f"127.0.0.1:{wp.port}", "--admin-token", ADMIN)
    assert denied.returncode == 0, denied.stderr
    with pytest.raises(RequestDeniedError, match="row-level data stays here"):
        raw.get(wait=5)


def test_cli_errors_are_one_line(spawn):
    wp = spawn("alice", worker_args("review"))
    for token, expected in (("wrong-admin-token", "PermissionDeniedError"), (TOKEN, "admin token")):
        r = run_cli("requests", "list", "--worker", f"127.0.0.1:{wp.port}", "--admin-token", token)
        assert r.returncode == 1 and expected in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli("requests", "approve", "--worker", f"127.0.0.1:{wp.port}", "--admin-token", ADMIN)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = run_cli("requests", "approve", "req-0000", "--worker", f"127.0.0.1:{wp.port}", "--admin-token", ADMIN)
    assert r.returncode == 1 and "no release request" in r.stderr


def test_scientist_cannot_decide_requests(spawn, connect, hook):
    wp = spawn("alice", worker_args("review"))
    alice = connect(wp)
    with pytest.raises(ReviewPendingError) as info:
        (_data(alice) * 1).get()
    with pytest.raises(PermissionDeniedError, match="admin token"):
        hook.local_worker.send_msg(AdminRequestsMessage("approve", info.value.request_id), alice)
    with pytest.raises(ReviewPendingError):
        (_data(alice) * 1).get()


@pytest.fixture(scope="module")
def peered_review_workers():
    """alice (boston under review) peered with bob: one pair for all the leak-path tests."""
    from veil.workers.websocket_launcher import start_worker

    bob_wp = start_worker("bob", ["--token", TOKEN, "--accept-peer", f"alice={PEER}"])
    try:
        wp = start_worker("alice", worker_args("review", ["--peer", f"bob=127.0.0.1:{bob_wp.port}",
                                                          "--peer-token", f"bob={PEER}"]))
    except BaseException:
        bob_wp.kill()
        raise
    yield wp, bob_wp
    wp.kill()
    bob_wp.kill()


@pytest.mark.parametrize("path", ["get", "mul", "copy", "plan", "inplace", "move"])
def test_review_no_network_path_leaks_without_approval(peered_review_workers, connect, path):
    wp, bob_wp = peered_review_workers
    alice, bob = connect(wp), connect(bob_wp)
    x = _data(alice)
    with pytest.raises(PermissionDeniedError) as info:  # review pending, or the raw data's own private rule
        if path == "get":
            x.get()
        elif path == "mul":
            (x * 1).get()
        elif path == "copy":
            x.copy().get()
        elif path == "plan":
            @func2plan(args_shape=[(-1, 13)])
            def plan(a):
                return a.sum(dim=0)

            plan.send(alice)(x).get()
        elif path == "inplace":
            z = torch.zeros(506, 13).send(alice)
            z.add_(x)
            z.get()
        elif path == "move":
            (x * 1).move(bob).get()
    if path != "get":
        assert isinstance(info.value, ReviewPendingError)
    assert torch.equal(torch.ones(3).send(alice).get(), torch.ones(3))  # the worker still serves
    assert torch.equal(torch.ones(3).send(bob).get(), torch.ones(3))
