"""The cluster path of docs/scaling.md: `ray start --head`, then a coordinator joins it by address."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from veil.workers.websocket_launcher import free_port

SCRIPT = textwrap.dedent("""
    import ray, torch, veil as sy
    from veil.federated import trainer as fl
    hook = sy.TorchHook(torch)
    clients = sy.ray.federated_clients([(torch.randn(8, 3), torch.randn(8, 1)) for _ in range(6)], actors=1)
    print("joined", ray.get_runtime_context().gcs_address)
    history = fl.train(torch.nn.Linear(3, 1), clients.federated_dataset(), rounds=1, progress=False)
    print("trained", len(history.rounds[0].clients))
    clients.shutdown()
""")


@pytest.mark.slow
def test_coordinator_joins_a_ray_start_head_cluster(tmp_path):
    ray_bin = str(Path(sys.executable).parent / "ray")
    port = free_port()
    head = subprocess.Popen([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=1",
                             "--include-dashboard=false", "--block"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        for line in head.stdout:  # wait until the head says it is up
            if "block forever" in line or time.monotonic() > deadline:
                break
        # "auto": the cluster this machine's `ray start` runs (a bare 127.0.0.1:PORT may not resolve
        # to the node's address; on other machines use the IP:PORT that `ray start --head` prints)
        env = {**os.environ, "VEIL_RAY_ADDRESS": "auto"}
        done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=240)
        assert f":{port}" in done.stdout and "trained 6" in done.stdout, done.stdout + done.stderr[-3000:]
    finally:
        os.killpg(head.pid, signal.SIGKILL)  # the head and the Ray processes it started (its own group)
        head.wait(10)
        record = Path("/tmp/ray/ray_current_cluster")
        if record.exists() and record.read_text().strip().endswith(f":{port}"):
            record.unlink()
