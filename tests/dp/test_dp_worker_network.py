"""Owner-side DP on a real `veil worker` process: flags, errors over the wire, budgets surviving restarts."""

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import veil as sy
from veil.dp import BudgetExceededError, NoiseTooLowError, RemoteDPOwner
from veil.workers.websocket_launcher import start_worker

TOKEN = "dp-net-scientist-token"
BOSTON = str(Path(sy.__file__).parent / "datasets" / "data" / "boston_housing.csv")


def _args(data_dir):
    return ["--token", TOKEN, "--data-dir", str(data_dir), "--dataset", f"boston={BOSTON}:target=MEDV",
            "--dp-clip", "1.0", "--dp-noise", "1.5", "--budget", "scientist=0.75,1e-5"]


def test_budget_spent_over_the_network_survives_a_killed_worker(hook, tmp_path):
    procs, clients = [], []
    try:
        wp = start_worker("dpnet", _args(tmp_path))
        procs.append(wp)
        assert any("differential privacy: training C=1.0 sigma>=1.5 on boston" in line for line in wp.output)
        w = sy.WebsocketClientWorker(hook, id="dpnet", host="127.0.0.1", port=wp.port, token=TOKEN)
        clients.append(w)
        data, target = w.search(["#boston"])
        model = nn.Linear(13, 1)
        owner = RemoteDPOwner(w, "boston", model, torch.zeros(2, 13))
        with pytest.raises(NoiseTooLowError, match="minimum 1.5"):
            owner.sanitized_gradient(model, None, None, 0.01, noise_multiplier=1.0)
        grads = owner.sanitized_gradient(model, None, None, 0.01)  # one private step, charged to "scientist"
        assert set(grads) == {"weight", "bias"} and grads["weight"].shape == (1, 13)
        spent_after_step = sy.dp.remaining_budget(w, spent=True)
        assert 0 < spent_after_step[0] < 0.5 and spent_after_step[1] == 1e-5
        count = sy.dp.remote_query(target, "count", epsilon=0.25)
        assert abs(count.value.item() - 506) < 60
        with pytest.raises(BudgetExceededError, match="user 'scientist'"):
            sy.dp.remote_query(target, "mean", epsilon=0.5, bounds=(0, 50))
        left = sy.dp.remaining_budget(w)
        w.close()
        wp.kill()  # SIGKILL: no clean shutdown
        wp2 = start_worker("dpnet", _args(tmp_path))
        procs.append(wp2)
        w2 = sy.WebsocketClientWorker(hook, id="dpnet", host="127.0.0.1", port=wp2.port, token=TOKEN)
        clients.append(w2)
        assert sy.dp.remaining_budget(w2) == pytest.approx(left)
        (target2,) = w2.search(["#boston", "#target"])
        with pytest.raises(BudgetExceededError):
            sy.dp.remote_query(target2, "mean", epsilon=0.5, bounds=(0, 50))
        sy.dp.remote_query(target2, "count", epsilon=left[0] / 2)  # what is left can still be used
    finally:
        for c in clients:
            c.close()
        for p in procs:
            p.kill()


def test_hide_count_and_max_bins_flags(hook, tmp_path):
    """--dp-hide-count keeps the record count out of pointer shapes; --dp-max-bins caps histogram work."""
    from veil.dp import PrivacyParameterError

    wp = start_worker("dpflags", ["--token", TOKEN, "--data-dir", str(tmp_path), "--dataset",
                                  f"boston={BOSTON}:target=MEDV", "--budget", "scientist=5,1e-5",
                                  "--dp-clip", "1.0", "--dp-noise", "1.5", "--dp-hide-count", "--dp-max-bins", "4",
                                  "--dp-max-records", "1000"])
    w = None
    try:
        assert any("record counts hidden (releases over 1000 rows)" in line for line in wp.output)
        w = sy.WebsocketClientWorker(hook, id="dpflags", host="127.0.0.1", port=wp.port, token=TOKEN)
        data, target = w.search(["#boston"])
        assert data.shape[0] == 0 and target.shape[0] == 0 and data.shape[1] == 13
        with pytest.raises(PrivacyParameterError, match="bins"):
            sy.dp.remote_query(target, "histogram", epsilon=0.5, bounds=(0, 50), bins=10)
        hist = sy.dp.remote_query(target, "histogram", epsilon=0.5, bounds=(0, 50), bins=4)
        assert hist.value.shape == (4,)
        assert w.search(["#boston"])  # the worker still serves
    finally:
        if w is not None:
            w.close()
        wp.kill()
