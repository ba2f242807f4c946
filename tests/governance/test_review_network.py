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

from governance_helpers import ADMIN, BOSTON, OTHER, PEER, TOKEN, run_cli, worker_args

DATA, TARGET, _ = read_csv(__import__("pathlib").Path(BOSTON), "MEDV")


@pytest.fixture(scope="module")
def shared():
    """alice serves boston under review, the same file as #open (open) and #dpo (dp-only); peered with bob."""
    from veil.workers.websocket_launcher import start_worker

    bob_wp = start_worker("bob", ["--token", TOKEN, "--accept-peer", f"alice={PEER}"])
    try:
        wp = start_worker("alice", worker_args("review", [
            "--dataset", f"open={BOSTON}:target=MEDV", "--dataset", f"dpo={BOSTON}:target=MEDV",
            "--policy", "open=open", "--policy", "dpo=dp-only",
            "--peer", f"bob=127.0.0.1:{bob_wp.port}", "--peer-token", f"bob={PEER}"]))
    except BaseException:
        bob_wp.kill()
        raise
    yield wp, bob_wp
    wp.kill()
    bob_wp.kill()


def _data(client, name: str = "boston"):
    return client.search([f"#{name}", "#data"])[0]


def test_open_policy_releases_derived_results(shared, connect):
    alice = connect(shared[0])
    assert torch.allclose(_data(alice, "open").mean(dim=0).get(), DATA.mean(dim=0))


def test_dp_only_policy_refuses_raw_arithmetic(shared, connect):
    alice = connect(shared[0])
    with pytest.raises(PermissionDeniedError, match="differential-privacy"):
        _data(alice, "dpo") * 1
    assert torch.equal(torch.ones(2).send(alice).get(), torch.ones(2))  # still serves


def test_review_approve_from_the_cli_while_get_waits(spawn, connect, tmp_path, capsys):
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

    from veil.cli import main

    where = ["--worker", f"127.0.0.1:{wp.port}", "--admin-token", ADMIN]
    assert main(["requests", "list", *where]) == 0
    listed = capsys.readouterr().out
    assert rid in listed and "pending" in listed
    assert main(["requests", "show", rid, *where]) == 0
    shown = capsys.readouterr().out
    assert "dataset: #boston #data" in shown and "Tensor.mean(d1, dim=0)" in shown
    assert "preview" in shown and "column means for the report" in shown

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
    assert main(["requests", "list", "--state", "released", "--worker", f"127.0.0.1:{wp2.port}",
                 "--admin-token", ADMIN]) == 0
    assert rid in capsys.readouterr().out


def test_review_deny_reaches_the_scientist_with_the_message(shared, connect):
    wp = shared[0]
    alice = connect(wp)
    raw = _data(alice)[:5].copy()  # (not the whole table: a denial refuses these bytes to alice from now on,
    with pytest.raises(ReviewPendingError) as info:  # and the other tests on this shared worker ask for those)
        raw.get()
    denied = run_cli("requests", "deny", info.value.request_id, "--message", "row-level data stays here",
                     "--worker", f"127.0.0.1:{wp.port}", "--admin-token", ADMIN)
    assert denied.returncode == 0, denied.stderr
    with pytest.raises(RequestDeniedError, match="row-level data stays here"):
        raw.get(wait=5)


def test_cli_errors_are_one_line(shared, capsys):
    from veil.cli import main

    wp = shared[0]
    r = run_cli("requests", "list", "--worker", f"127.0.0.1:{wp.port}", "--admin-token", "wrong-admin-token")
    assert r.returncode == 1 and "PermissionDeniedError" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "wrong-admin-token" not in r.stderr
    where = ["--worker", f"127.0.0.1:{wp.port}"]
    for argv, code, expected in (
        (["list", *where, "--admin-token", TOKEN], 1, "admin token"),  # a scientist's token
        (["approve", *where, "--admin-token", ADMIN], 2, "needs a request id"),
        (["approve", "req-0000", *where, "--admin-token", ADMIN], 1, "no release request"),
        (["list", "--worker", "nowhere", "--admin-token", ADMIN], 2, "HOST:PORT"),
        (["list", *where], 2, "--admin-token"),
    ):
        assert main(["requests", *argv]) == code
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err


def test_scientist_cannot_decide_requests(shared, connect, hook):
    wp = shared[0]
    alice = connect(wp)
    with pytest.raises(ReviewPendingError) as info:
        (_data(alice) * 1).get()
    with pytest.raises(PermissionDeniedError, match="admin token"):
        hook.local_worker.send_msg(AdminRequestsMessage("approve", info.value.request_id), alice)
    with pytest.raises(ReviewPendingError):
        (_data(alice) * 1).get()


@pytest.mark.parametrize("path", ["get", "mul", "copy", "plan", "inplace", "move"])
def test_review_no_network_path_leaks_without_approval(shared, connect, path):
    wp, bob_wp = shared
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


def test_hostile_scientist_cannot_reach_others_requests_or_policies(shared, connect, hook):
    from veil.governance.wire import AdminPolicyMessage, ListRequestsMessage, RequestReleaseMessage
    from veil.exceptions import ObjectNotFoundError

    wp = shared[0]
    alice, other = connect(wp), connect(wp, token=OTHER, id="alice")
    mine = _data(alice) * 3
    with pytest.raises(ReviewPendingError):
        mine.get()
    me = hook.local_worker
    # another session can neither name my object nor file/see requests for it, nor pose as me
    with pytest.raises(ObjectNotFoundError):
        me.send_msg(RequestReleaseMessage(mine.id_at_location, "mine now"), other)
    with pytest.raises(PermissionDeniedError, match="did not authenticate"):
        me.send_msg(ListRequestsMessage("scientist"), other)
    assert sy.requests(other) == []
    # policies are the owner's alone
    with pytest.raises(PermissionDeniedError, match="admin token"):
        me.send_msg(AdminPolicyMessage("#boston", "open"), alice)
    with pytest.raises(ReviewPendingError):
        mine.get()
    admin = connect(wp, token=ADMIN, id="alice")
    with pytest.raises(sy.exceptions.SerializationError, match="unknown data policy"):
        me.send_msg(AdminPolicyMessage("#boston", "anything-goes"), admin)
    assert torch.equal(torch.ones(2).send(alice).get(), torch.ones(2))  # still serves
