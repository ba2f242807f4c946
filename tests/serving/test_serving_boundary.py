"""Serving trust-boundary leftovers, over real ``veil worker`` processes (red team, third pass).

* Rows: one request of up to 64 MiB of rows was computed in one batch. A service has ``max_rows``
  (``veil serve --max-batch-rows``): the parties refuse a larger request at submit (nothing is queued),
  the client refuses it before sending, and the owner batches requests up to that many rows.
* Ids: ``submit`` answered "request id already in use" for another client's id (which ids were live).
  Ids are per session now: the same answer whether or not another session holds the id, and each
  session gets its own result.
* Half-submitted requests: a request queued at one party only made every ``pending`` answer at once
  (the owner polled for up to ``partial_timeout``). A waiting ``pending`` now answers early only for
  ids the owner has not already set aside.
* Peer tokens: one token per link, so a party (which must know the token the crypto provider
  presents to it) cannot pose as the crypto provider to another party.

Each test compares with the plaintext torch model and ends with an honest query answered correctly.
"""

from __future__ import annotations

import copy
import os
import threading
import time

import pytest
import torch
from torch import nn

from veil.exceptions import PermissionDeniedError, VeilError
from veil.ids import new_id
from veil.mpc.sharing import split
from veil.serving import ServingError, protocol
from veil.serving import client as client_mod
from veil.serving.service import service_of
from veil.workers.registry import HookContext
from veil.workers.websocket_client import WebsocketClientWorker

from serving_helpers import assert_query_ok, client_for, cluster, served_small_model  # noqa: F401  (fixtures)


def _shared(cluster, name, seed=0, **options):
    """A small MLP shared on ``cluster`` but not served (the test drives ``step``); (model, plaintext copy)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    plain = copy.deepcopy(model)
    model.share(cluster, name=name, **options)
    return model, plain


def _answer(plain, x):
    with torch.no_grad():
        return plain(x)


def _listed(service, party_index):
    return [rid for rid, *_ in service._call(service.parties[party_index], "pending")]


def _drain(service, max_batch=16):
    """Steps until nothing is ready; the batch sizes, in order."""
    batches = []
    while (n := service.step(max_batch)) > 0:
        batches.append(n)
    return batches


# ------------------------------------------------------------------ rows per batch


def test_a_request_over_max_rows_is_refused_and_batches_stop_at_max_rows(cluster, client_for):
    model, plain = _shared(cluster, "rows", max_rows=4)
    service = service_of(model)
    try:
        client = client_for(cluster, (1, 4), (1, 2), name="rows")
        assert client.info["max_rows"] == 4
        big = split(torch.zeros(5, 4, dtype=torch.int64), 2)  # a raw client: straight to the parties
        rid = new_id()
        for party, share in zip(client.parties, big):
            with pytest.raises(ServingError, match="at most 4 rows"):
                protocol.call(client.hook.local_worker, party, "submit", "rows", rid, share)
        with pytest.raises(ServingError, match="at most 4 rows"):  # the client says so before sending
            client.submit(torch.zeros(5, 4))
        assert _listed(service, 0) == [] and _listed(service, 1) == []  # nothing was queued
        xs = [torch.randn(2, 4) for _ in range(3)]
        rids = [client.submit(x) for x in xs]
        assert _drain(service) == [2, 1]  # 2 + 2 rows, then the third: never more than 4 rows at once
        for r, x in zip(rids, xs):
            assert torch.allclose(client.result(r), _answer(plain, x), atol=1e-2)
    finally:
        service.stop(timeout=5)


def test_max_rows_must_be_positive(cluster):
    with pytest.raises(ServingError, match="max_rows"):
        _shared(cluster, "rows-bad", max_rows=0)


def test_veil_serve_has_a_max_batch_rows_flag():
    import argparse

    from veil.serving import cli

    p = argparse.ArgumentParser()
    cli.configure(p)
    assert p.parse_args(["m.pt", "--max-batch-rows", "8"]).max_batch_rows == 8
    assert p.parse_args(["m.pt"]).max_batch_rows is None  # the service's default, protocol.DEFAULT_MAX_ROWS
    with pytest.raises(SystemExit):
        p.parse_args(["m.pt", "--max-batch-rows", "0"])


# ------------------------------------------------------------------ request ids


def test_another_sessions_request_id_gets_the_same_answer_and_its_own_result(cluster, client_for, monkeypatch):
    model, plain = _shared(cluster, "ids")
    service = service_of(model)
    try:
        victim = client_for(cluster, (1, 4), (1, 2), name="ids")
        thief = client_for(cluster, (1, 4), (1, 2), name="ids")  # the same client user, its own sessions
        xv, xt = torch.randn(1, 4), torch.randn(1, 4) * 3
        rid = victim.submit(xv)
        monkeypatch.setattr(client_mod, "new_id", lambda: rid)  # the thief submits under the victim's id
        assert thief.submit(xt) == rid  # accepted, as a fresh id is: no "already in use"
        assert thief._call_all("fetch", [[rid]] * 2) == [[], []]  # the victim's id is nothing of the thief's yet
        assert _listed(service, 0) == [rid]  # the owner sees one request per id at a time
        assert _drain(service) == [1, 1]  # the victim's (first), then the thief's
        assert torch.allclose(victim.result(rid), _answer(plain, xv), atol=1e-2)
        assert torch.allclose(thief.result(rid), _answer(plain, xt), atol=1e-2)  # its own input, not the victim's
        monkeypatch.undo()
        x = torch.randn(1, 4)
        r = victim.submit(x)
        assert _drain(service) == [1]
        assert torch.allclose(victim.result(r), _answer(plain, x), atol=1e-2)
    finally:
        service.stop(timeout=5)


def test_a_session_reusing_its_own_live_id_is_refused(cluster, client_for, monkeypatch):
    model, _ = _shared(cluster, "ids-own")
    try:
        client = client_for(cluster, (1, 4), (1, 2), name="ids-own")
        rid = client.submit(torch.ones(1, 4))
        monkeypatch.setattr(client_mod, "new_id", lambda: rid)
        with pytest.raises(ServingError, match="already in use by this connection"):
            client.submit(torch.ones(1, 4))
    finally:
        service_of(model).stop(timeout=5)


# ------------------------------------------------------------------ half-submitted requests


def test_a_known_half_submitted_request_does_not_end_the_owners_wait_but_a_full_query_does(cluster, client_for):
    model, plain = _shared(cluster, "half")
    service = service_of(model)
    try:
        attacker = client_for(cluster, (1, 4), (1, 2), name="half")
        honest = client_for(cluster, (1, 4), (1, 2), name="half")
        x_half = new_id()
        share = split(torch.zeros(1, 4, dtype=torch.int64), 2)[0]
        protocol.call(attacker.hook.local_worker, attacker.parties[0], "submit", "half", x_half, share)
        replies = []
        waiting = threading.Thread(target=lambda: replies.append(
            service._call(service.parties[0], "pending", protocol.MAX_WAIT, [x_half])), daemon=True)
        waiting.start()
        time.sleep(0.3)  # (ordering only: the wait is under way before the honest query arrives)
        x = torch.randn(1, 4)
        rid = honest.submit(x)
        waiting.join(30)
        listed = [r for r, *_ in replies[0]]
        assert rid in listed and x_half in listed  # it answered for the honest query, not for the known one
        assert _drain(service) == [1]  # the honest query alone; the half-submitted one stays queued
        assert torch.allclose(honest.result(rid), _answer(plain, x), atol=1e-2)
        assert _listed(service, 0) == [x_half] and _listed(service, 1) == []
        with pytest.raises(ServingError, match="known ids"):  # malformed known ids are refused
            service._call(service.parties[0], "pending", 0, "not a list")
    finally:
        service.stop(timeout=5)


def test_a_half_submitted_request_does_not_turn_the_serving_loop_into_polling(cluster, client_for):
    model, plain = _shared(cluster, "half-loop", partial_timeout=3600)
    service = service_of(model)
    model.serve(background=True)
    try:
        attacker = client_for(cluster, (1, 4), (1, 2), name="half-loop")
        honest = client_for(cluster, (1, 4), (1, 2), name="half-loop")
        halves = [new_id(), new_id()]  # one at each party: every party has something queued
        shares = split(torch.zeros(1, 4, dtype=torch.int64), 2)
        for rid, party, share in zip(halves, attacker.parties, shares):
            protocol.call(attacker.hook.local_worker, party, "submit", "half-loop", rid, share)
            deadline = time.monotonic() + 30
            while rid not in service._partial and time.monotonic() < deadline:
                time.sleep(0.05)  # until the owner has set it aside
            assert rid in service._partial
        for _ in range(3):
            x = torch.randn(2, 4)
            assert torch.allclose(honest.query_model(x), _answer(plain, x), atol=1e-2)
        assert set(halves) <= set(service._partial) and service.failed_requests == 0  # still queued, not computed
        # the loop waited on the parties meanwhile (at most one quick answer per half's arrival); it polled
        # every 10 ms before, since each party answered its known half at once
        assert service.backoffs <= len(halves)
        assert service.error is None
    finally:
        service.stop(timeout=5)


def test_a_request_that_leaves_one_party_before_the_claim_does_not_fail_the_batch(cluster, client_for):
    """A client that disconnects from one party between the owner's pending and claim made that party's claim
    fail, and the whole batch (every other client's request in it) failed with it. Now the parties that claimed
    put the batch back, and nothing is counted failed. (Since session 45 a batch holds one client session's
    requests, so the others are never in it: the honest one is served in a batch of its own.)"""
    model, plain = _shared(cluster, "gone")
    service = service_of(model)
    try:
        honest = client_for(cluster, (1, 4), (1, 2), name="gone")
        leaving = client_for(cluster, (1, 4), (1, 2), name="gone")
        x = torch.randn(1, 4)
        rid = honest.submit(x)
        gone = leaving.submit(torch.randn(1, 4))
        real_call_all, raced = service._call_all, []

        def call_all(action, per_party_args, return_errors=False):
            if action == "claim" and gone in per_party_args[0][0] and not raced:  # it leaves party 0 right before
                raced.append(per_party_args[0][0])
                leaving.parties[0].close()
                deadline = time.monotonic() + 30
                while gone in _listed(service, 0) and time.monotonic() < deadline:
                    time.sleep(0.05)  # until party 0 dropped its session
            return real_call_all(action, per_party_args, return_errors=return_errors)

        service._call_all = call_all
        assert service.step(16) == 1 and not raced  # the honest one: a batch of its own
        assert torch.allclose(honest.result(rid), _answer(plain, x), atol=1e-2)
        assert service.step(16) == 0 and raced[0] == [gone]  # its claim failed on party 0: put back
        assert service.failed_requests == 0
        assert _listed(service, 0) == [] and _listed(service, 1) == [gone]  # still half there, to expire
    finally:
        service.stop(timeout=5)


# ------------------------------------------------------------------ peer tokens per link


def test_a_party_cannot_pose_as_the_crypto_provider_to_another_party(cluster, client_for):
    model, plain = _shared(cluster, "links")
    service = service_of(model)
    model.serve(background=True)
    try:
        p0, p1, cp = *cluster.parties, cluster.crypto_provider
        known_to_p0 = cluster.peer_token_of(cp, p0)  # p0 must know it to accept the provider
        assert known_to_p0 != cluster.peer_token_of(cp, p1)
        with pytest.raises((PermissionDeniedError, VeilError, OSError)):
            WebsocketClientWorker(HookContext(), id=p1.id, host=p1.host, port=p1.port, token=known_to_p0)
        honest = client_for(cluster, (1, 4), (1, 2), name="links")
        x = torch.randn(1, 4)
        assert torch.allclose(honest.query_model(x), _answer(plain, x), atol=1e-2)
    finally:
        service.stop(timeout=5)


def test_two_sessions_with_one_id_in_process_each_see_only_their_own(hook):
    """The (session, id) queue in-process: the owner sees the id once, the older request first; a
    disconnect of the older one brings the other forward; closing fails each session's own."""
    import veil as sy

    party, owner = sy.VirtualWorker(hook, id="ids_ip_party"), sy.VirtualWorker(hook, id="ids_ip_owner")
    first, second = sy.VirtualWorker(hook, id="ids_ip_first"), sy.VirtualWorker(hook, id="ids_ip_second")
    protocol.call(owner, party, "open", "svc", [first.id, second.id], {"input_shape": [1, 3], "max_rows": 2})
    rid = new_id()
    protocol.call(first, party, "submit", "svc", rid, torch.zeros(1, 3, dtype=torch.int64))
    assert protocol.call(second, party, "submit", "svc", rid, torch.ones(2, 3, dtype=torch.int64)) == []
    with pytest.raises(ServingError, match="at most 2 rows"):
        protocol.call(second, party, "submit", "svc", new_id(), torch.ones(3, 3, dtype=torch.int64))
    assert [r[:2] for r in protocol.call(owner, party, "pending", "svc")] == [[rid, 1]]  # the older one
    protocol.drop_session(party, first.id)  # it disconnects: the other comes forward
    assert [r[:2] for r in protocol.call(owner, party, "pending", "svc")] == [[rid, 2]]
    protocol.call(owner, party, "close", "svc", "stopped")
    with pytest.raises(ServingError, match="stopped"):
        protocol.call(second, party, "fetch", "svc", rid)
    with pytest.raises(ServingError, match="no longer served"):  # nothing of the first's is left
        protocol.call(first, party, "fetch", "svc", rid)


def test_cluster_workers_get_their_tokens_off_the_command_line(cluster, client_for):
    """Every local user can read a process's command line (``ps``, /proc/PID/cmdline): a Cluster passes its
    workers' arguments in a private ``@FILE`` that is gone once they listen, and they still authenticate."""
    tokens = [cluster.owner_token, cluster.client_token, cluster.peer_token]
    tokens += [cluster.peer_token_of(w, o) for w in cluster.workers for o in cluster.workers if o is not w]
    for proc in cluster._processes:
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            argv = f.read().decode().rstrip("\0").split("\0")
        assert not any(t in arg for t in tokens for arg in argv), "a token is on a worker's command line"
        (args_file,) = [arg[1:] for arg in argv if arg.startswith("@")]
        assert not os.path.exists(args_file)
    # the workers still authenticate the owner, the client and each other (the dealer's hand-off, openings)
    _, expected = served_small_model(cluster, "tokens-off-cmdline")
    assert_query_ok(client_for(cluster, (1, 4), (1, 2), name="tokens-off-cmdline"), expected)


def test_start_worker_passes_every_argument_off_the_command_line():
    """``start_worker`` (examples, benchmarks, tests) puts a worker's arguments in a private ``@FILE`` too:
    the token is not on its command line, the file is gone once it listens, and the token still works; an
    argument with a line break (it would become two arguments in the file) is refused before anything runs."""
    import secrets

    import torch

    import veil as sy
    from veil.workers.websocket_launcher import start_worker

    token = "t" + secrets.token_urlsafe(24)
    with pytest.raises(ValueError, match="line break"):
        start_worker("nl", ["--token", token + "\n--admin-token\nx"])
    wp = start_worker("offcmd", ["--token", token])
    try:
        with open(f"/proc/{wp.pid}/cmdline", "rb") as f:
            argv = f.read().decode().rstrip("\0").split("\0")
        assert not any(token in arg for arg in argv)
        (args_file,) = [arg[1:] for arg in argv if arg.startswith("@")]
        assert not os.path.exists(args_file)
        hook = sy.TorchHook(torch)
        client = sy.WebsocketClientWorker(hook, id="offcmd", host="127.0.0.1", port=wp.port, token=token)
        try:
            x = torch.arange(5.0)
            assert torch.equal((x.send(client) * 2).get(), x * 2)
        finally:
            client.close()
    finally:
        wp.stop()
