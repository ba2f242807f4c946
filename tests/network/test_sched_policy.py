"""``veil worker --sched batch``: every thread of the worker, those it starts later included, runs under
SCHED_BATCH (a woken worker thread never preempts the orchestrator sharing its core); the default stays
the normal policy, and auto-managed clusters ask for batch (their workers share the orchestrator's machine)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from veil.serving.cluster import Cluster, NetworkWorker
from veil.workers.scheduling import set_policy

from network_helpers import base_args

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_BATCH is Linux's")


def _policies(pid: int) -> set[int]:
    return {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


@linux_only
@pytest.mark.parametrize("sched", ["batch", "normal"])
def test_every_worker_thread_runs_under_the_chosen_policy(spawn, connect, sched):
    wp = spawn("alice", base_args(["--sched", sched]))
    alice = connect(wp)
    # a frame past the inline lane's size runs on a handler thread started for it (small requests are
    # served on the event loop's own thread)
    x = torch.arange(200_000.0).send(alice)
    assert torch.equal((x * 2).get(), torch.arange(200_000.0) * 2)
    assert len(os.listdir(f"/proc/{wp.pid}/task")) > 1
    assert _policies(wp.pid) == {os.SCHED_BATCH if sched == "batch" else os.SCHED_OTHER}


def test_only_auto_managed_cluster_workers_ask_for_batch_scheduling():
    def workers():
        return [NetworkWorker(f"127.0.0.1:{9000 + i}", id=f"w{i}") for i in range(3)]

    managed = Cluster(*workers(), auto_managed=True)
    for w in managed.workers:
        args = managed.worker_args(w)
        assert args[args.index("--sched") + 1] == "batch"
    remote = Cluster(*workers(), owner_token="o" * 20, client_token="c" * 20, peer_token="p" * 20)
    assert not any("--sched" in remote.worker_args(w) for w in remote.workers)


def test_an_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="normal"):
        set_policy("realtime")
    assert set_policy("normal")
