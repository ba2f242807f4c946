"""Federated averaging with websocket workers (two ``veil worker`` processes on this machine).

Each worker is a separate process serving authenticated connections: the data
owner starts it with tokens (veil never serves without one) and loads its data;
the data scientist connects with a token, trains a copy of the model on each
worker through pointers (Adam runs on the remote parameters), and averages the
copies with ``federated_avg``.
"""

import copy
import os

import torch
import torch.nn.functional as F
from torch import nn

import veil as sy
from veil.datasets import load_boston
from veil.workers.websocket_launcher import start_worker

SHORT = os.environ.get("VEIL_EXAMPLE_SHORT") == "1"

hook = sy.TorchHook(torch)
scientist_token, owner_token = sy.new_token(), sy.new_token()

# The data owners start their workers (in a deployment: `python -m veil.cli worker --id alice ...`).
processes = [start_worker(name, ["--token", scientist_token, "--admin-token", owner_token])
             for name in ("alice", "bob")]
try:
    workers = [sy.WebsocketClientWorker(hook=hook, id=p.id, host="127.0.0.1", port=p.port,
                                        token=scientist_token, extra_tokens=[owner_token])
               for p in processes]
    x, y, _ = load_boston()
    y = y / 10
    for w, rows in zip(workers, torch.tensor_split(torch.arange(len(x)), len(workers))):
        w.load(x[rows], tags=("#boston", "#data"))  # the owner's data: clients cannot delete or overwrite it
        w.load(y[rows], tags=("#boston", "#target"))
    grid = sy.PrivateGridNetwork(*workers)
    data, target = grid.search("#boston", "#data"), grid.search("#boston", "#target")

    torch.manual_seed(0)
    model = nn.Linear(13, 1)
    for round_ in range(1 if SHORT else 5):
        local_models = {}
        for w in workers:
            m = copy.deepcopy(model)
            opt = torch.optim.Adam(m.parameters(), lr=0.05)
            m.send(w)
            d, t = data[w.id][0], target[w.id][0]
            for _ in range(2 if SHORT else 10):
                opt.zero_grad()
                loss = F.mse_loss(m(d), t)
                loss.backward()
                opt.step()
            print(f"round {round_} {w.id}: loss {loss.get().item():.3f}, objects of mine there: {w.objects_count()}")
            local_models[w.id] = m.get()
        model = sy.frameworks.torch.fl.utils.federated_avg(local_models)
        print(f"round {round_}: full-data MSE {F.mse_loss(model(x), y).item():.3f}")
    for w in workers:
        w.close()
finally:
    for p in processes:
        p.stop()
