"""PySyft's ``sy.create_sandbox(globals())``: a hook, six virtual workers and tagged data.

The data are veil's bundled datasets (Boston Housing, Pima diabetes), split
row-wise across the workers and loaded by each worker as its owner's data
(clients compute on them through pointers and cannot delete them).
"""

from __future__ import annotations

import torch

#: PySyft's sandbox worker names
WORKER_NAMES = ("bob", "theo", "jason", "alice", "andy", "jon")


def _load_split(workers: list, values: torch.Tensor, tags: tuple, description: str) -> None:
    for worker, part in zip(workers, torch.tensor_split(values, len(workers))):
        worker.load(part.clone(), tags=tags, description=description)


def create_sandbox(gbs: dict, verbose: bool = True, download_data: bool = True) -> None:
    """Fills ``gbs`` (your ``globals()``) with ``hook``, ``workers``, one name per worker and ``grid``.

    ``download_data`` loads the bundled datasets (nothing is downloaded).
    """
    from veil.compat.grid import PrivateGridNetwork
    from veil.hook import TorchHook
    from veil.workers.virtual import VirtualWorker

    def say(msg: str) -> None:
        if verbose:
            print(msg)

    say("Setting up Sandbox...")
    hook = TorchHook(torch)
    workers = [VirtualWorker(hook, id=name) for name in WORKER_NAMES]
    if download_data:
        from veil.datasets import load_boston, load_pima

        say("\t- Boston Housing Dataset")
        x, y, _ = load_boston()
        _load_split(workers, x, ("#boston", "#housing", "#boston_housing", "#data"),
                    "Boston Housing: 13 features per house (standardized)")
        _load_split(workers, y, ("#boston", "#housing", "#boston_housing", "#target"),
                    "Boston Housing: median house value (in $1000)")
        say("\t- Pima Indians Diabetes Dataset")
        pima = load_pima()
        _load_split(workers, pima["x_train"], ("#diabetes", "#pima", "#data"), "Pima diabetes: 7 features")
        _load_split(workers, pima["y_train"], ("#diabetes", "#pima", "#target"), "Pima diabetes: 1.0 = diabetic")
    gbs["hook"] = hook
    gbs["workers"] = workers
    for w in workers:
        gbs[w.id] = w
    gbs["grid"] = PrivateGridNetwork(*workers)
    say("Done!")
