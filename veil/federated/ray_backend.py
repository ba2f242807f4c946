"""Federated clients in Ray actors: each client's data, model state and object store live in an actor.

The coordinator holds one :class:`RayClientWorker` per client: a worker handle
whose ``_recv_msg`` ships the already-serialized veil request (the same bytes a
websocket would carry) to the actor hosting that client and returns the reply
bytes. Inside the actor each client is an ordinary worker that deserializes,
checks the allowlist and answers exactly as a ``VirtualWorker`` or a
``veil worker`` process does, so ``fl.train``, training plans, FedAvg/FedProx,
secure aggregation (client-to-client shares go actor to actor) and owner-side
DP queries run unchanged. The coordinator holds only pointers.

When there are more clients than actors (the usual case: 10,000 clients on a
few cores), clients are *virtual*: one actor hosts many of them and keeps each
one's store (data, plan, model state, secure-aggregation inbox) in its memory
between rounds, as Flower's simulation engine does with its virtual clients.

Ray itself: with no address, a small local Ray starts embedded in this process
(``num_cpus`` = the machine's cores, no dashboard, a small object store). With
``address=`` or ``$VEIL_RAY_ADDRESS`` (``ray start --head`` elsewhere) the actors
go to that cluster; see docs/scaling.md. Ray's own transport pickles its call
arguments: it is the simulation's trusted cluster fabric, while what a client
executes is decided only by the veil message it decodes and checks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from veil.exceptions import ConnectionLostError, WorkerNotFoundError
from veil.workers.base import BaseWorker

# A small local Ray: Ray's default object store takes 30% of RAM, far more than a simulation needs.
LOCAL_OBJECT_STORE_BYTES = 128 * 2**20


def _ray() -> Any:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        raise RuntimeError("the Ray backend needs ray: pip install 'ray>=2.40,<3'") from None
    return ray


def init(address: str | None = None, num_cpus: int | None = None, **ray_kwargs: Any) -> Any:
    """Connects to Ray: the cluster at ``address`` / ``$VEIL_RAY_ADDRESS`` / ``$RAY_ADDRESS``, else a
    new small local one.

    Does nothing if Ray is already initialized in this process. Returns the ``ray`` module.
    """
    ray = _ray()
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("VEIL_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS")
    # Ray's workers import veil as this process does (an editable install or PYTHONPATH).
    env = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}} if os.environ.get("PYTHONPATH") else None
    kwargs: dict[str, Any] = {"log_to_driver": False, "runtime_env": env, **ray_kwargs}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # address="local": always a new local Ray, never a stale cluster a past `ray start` left on record.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, **kwargs)
    return ray


def shutdown() -> None:
    """Disconnects from Ray (and stops the local Ray this process started)."""
    ray = _ray()
    if ray.is_initialized():
        ray.shutdown()


class RayClientWorker(BaseWorker):
    """The coordinator's handle on one client hosted in a Ray actor (used like any worker)."""

    def __init__(self, hook: Any, id: str, actor: Any, pipelining: bool = True, timeout: float = 600.0,
                 **kwargs: Any) -> None:
        # Pipelining: commands whose result ids the caller names (e.g. fl.train's losses.mean())
        # ride on the next message instead of costing an actor round trip of their own.
        super().__init__(hook, id=id, pipelining=pipelining, **kwargs)
        self.actor, self.timeout = actor, timeout  # a hung actor raises ConnectionLostError, never hangs

    def _recv_msg(self, data: bytes) -> bytes:
        ray = _ray()
        try:
            return ray.get(self.actor.recv.remote(self.id, data), timeout=self.timeout)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError,
                ray.exceptions.GetTimeoutError) as e:
            raise ConnectionLostError(f"client {self.id!r} (Ray actor) failed: {type(e).__name__}: {e}") from None

    def __repr__(self) -> str:
        return f"<RayClientWorker id:{self.id}>"


class ClientHost:
    """The Ray actor: hosts many clients, each an ordinary veil worker with its own store."""

    def __init__(self, threads: int = 1) -> None:
        import veil  # noqa: F401  (registers every wire type and worker function in this process)
        from veil.workers.registry import HookContext

        torch.set_num_threads(threads)
        self.hook = HookContext()
        self.clients: dict[str, Any] = {}
        self.directory: dict[str, Any] = {}  # client id -> actor hosting it (for client-to-client messages)
        self.proxies: dict[str, RayClientWorker] = {}

    def set_directory(self, directory: dict[str, Any]) -> None:
        self.directory = directory

    def add_clients(self, ids: Sequence[str], datasets: Sequence[tuple] | None = None,
                    make_dataset: Callable[[int], tuple] | None = None, indices: Sequence[int] = (),
                    tags: Sequence[str] = (), dp: dict | None = None) -> list[tuple]:
        """Creates the clients and loads their data as private owner objects.

        Returns one ``(data id, data shape, data dtype, target id, target shape, target dtype)`` per client.
        """
        out = []
        for n, cid in enumerate(ids):
            worker = _HostedWorker(self, cid)
            self.clients[cid] = worker
            x, y = datasets[n] if datasets is not None else make_dataset(indices[n])
            x, y = torch.as_tensor(x), torch.as_tensor(y)
            xid = worker.load(x, tags=(*tags, "#data"), private=True)
            yid = worker.load(y, tags=(*tags, "#target"), private=True)
            if dp is not None:  # owner-side DP: this client's data opened to DP queries/training, with budgets
                worker.enable_dp({"data": (x, y)}, **dp)
            out.append((xid, tuple(x.shape), str(x.dtype), yid, tuple(y.shape), str(y.dtype)))
        return out

    def remove_clients(self, ids: Sequence[str]) -> None:
        for cid in ids:
            self.clients.pop(cid, None)
            self.proxies.pop(cid, None)

    def recv(self, client_id: str, data: bytes) -> bytes:
        """One serialized veil request for one hosted client; the serialized reply."""
        worker = self.clients.get(client_id)
        if worker is None:
            from veil.messaging import messages as m
            from veil.messaging.serde import serialize

            return serialize(m.ErrorReply("WorkerNotFoundError", f"no client {client_id!r} on this actor"),
                             sender=client_id)
        return worker._recv_msg(data)

    def stats(self) -> dict:
        """Memory and object counts of this actor (benchmarks, docs/scaling.md)."""
        import psutil

        return {"clients": len(self.clients), "rss": psutil.Process().memory_info().rss,
                "objects": sum(len(w.monitor) for w in self.clients.values())}


class _HostedWorker(BaseWorker):
    """A client inside an actor; reaches clients of other actors through :class:`RayClientWorker`."""

    def __init__(self, host: ClientHost, cid: str) -> None:
        super().__init__(host.hook, id=cid)
        self._host = host

    def resolve_worker(self, worker_id: str) -> BaseWorker:
        local = self._host.clients.get(worker_id) or self.hook.workers.get(worker_id)
        if local is not None:
            return local
        actor = self._host.directory.get(worker_id)
        if actor is None:
            raise WorkerNotFoundError(f"client {self.id!r} does not know how to reach worker {worker_id!r}")
        proxy = self._host.proxies.get(worker_id)
        if proxy is None:  # kept by the host: the hook's registry holds workers weakly
            proxy = self._host.proxies[worker_id] = RayClientWorker(self.hook, worker_id, actor)
        return proxy


@dataclass
class RayClients:
    """What :func:`federated_clients` returns: the client handles, their data pointers and the actors."""

    workers: list
    data: list
    targets: list
    actors: list
    owns_actors: bool = True

    def __len__(self) -> int:
        return len(self.workers)

    def __iter__(self):
        return iter(self.workers)

    def __getitem__(self, i: int) -> RayClientWorker:
        return self.workers[i]

    def federated_dataset(self) -> Any:
        """A :class:`~veil.federated.FederatedDataset` over the clients' data, for ``fl.train``."""
        from veil.federated.dataset import BaseDataset, FederatedDataset

        return FederatedDataset(BaseDataset(x, y) for x, y in zip(self.data, self.targets))

    def actor_stats(self) -> list[dict]:
        ray = _ray()
        return ray.get([a.stats.remote() for a in self.actors])

    def shutdown(self) -> None:
        """Ends the actors (the clients' state goes with them); on actors passed in by the caller,
        removes only these clients."""
        ray = _ray()
        if self.owns_actors:
            for a in self.actors:
                ray.kill(a)
        else:
            ray.get([a.remove_clients.remote([w.id for w in self.workers]) for a in self.actors])
        self.actors = []


def federated_clients(datasets: Sequence[tuple] | None = None, *, num_clients: int | None = None,
                      make_dataset: Callable[[int], tuple] | None = None, actors: int | Sequence[Any] | None = None,
                      hook: Any = None, address: str | None = None, prefix: str = "client",
                      tags: Sequence[str] = (), dp: dict | None = None, threads_per_actor: int = 1,
                      batch: int = 500) -> RayClients:
    """Starts clients in Ray actors, each holding its own data; returns their worker handles.

    Args:
        datasets: one ``(data, targets)`` per client, sent once to the actor that hosts it; or
        num_clients, make_dataset: ``make_dataset(i)`` runs *inside* the actor and returns client
            ``i``'s ``(data, targets)`` (the coordinator never holds the data: large simulations).
        actors: how many Ray actors to spread the clients over (default: the cluster's CPUs), or
            the ``.actors`` of an earlier call to host these clients too (client ids must differ:
            ``prefix``); clients are assigned round-robin, and each actor keeps its clients'
            state between rounds.
        hook: the registry the handles join (default: the current one).
        address: a Ray cluster (else ``$VEIL_RAY_ADDRESS``, else a local Ray started here).
        tags: tags added to every client's data and targets (``#data`` / ``#target`` always).
        dp: ``worker.enable_dp`` settings applied on every client (owner-side DP on its data,
            dataset name ``"data"``), e.g. ``{"budgets": {"me": (1.0, 1e-5)}}``.
        batch: clients created per actor call.

    Example::

        clients = sy.ray.federated_clients(parts, actors=2)
        fl.train(model, clients.federated_dataset(), rounds=5)
    """
    from veil.tensors.pointer import PointerTensor
    from veil.workers.registry import default_hook_context

    if (datasets is None) == (make_dataset is None):
        raise ValueError("give either datasets or (num_clients, make_dataset)")
    n = len(datasets) if datasets is not None else int(num_clients or 0)
    if n <= 0:
        raise ValueError("federated_clients needs at least one client")
    ray = init(address)
    hook = hook if hook is not None else default_hook_context()
    owns = not isinstance(actors, (list, tuple))
    if owns:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n_actors = max(1, min(n, actors or cpus))
        remote_host = ray.remote(ClientHost).options(num_cpus=min(1.0, cpus / n_actors), max_concurrency=1)
        hosts = [remote_host.remote(threads_per_actor) for _ in range(n_actors)]
    else:
        hosts, n_actors = list(actors), len(actors)
    ids = [f"{prefix}{i}" for i in range(n)]
    directory = {cid: hosts[i % n_actors] for i, cid in enumerate(ids)}
    ray.get([h.set_directory.remote(directory) for h in hosts])  # (replaces an earlier call's)
    calls = []  # (client indices, future)
    for a, host in enumerate(hosts):
        mine = list(range(a, n, n_actors))
        for start in range(0, len(mine), batch):
            chunk = mine[start:start + batch]
            part = [datasets[i] for i in chunk] if datasets is not None else None
            calls.append((chunk, host.add_clients.remote([ids[i] for i in chunk], part, make_dataset, chunk,
                                                        tuple(tags), dp)))
    workers: list = [None] * n
    data: list = [None] * n
    targets: list = [None] * n
    owner = hook.local_worker
    for chunk, future in calls:
        for i, (xid, xs, xd, yid, ys, yd) in zip(chunk, ray.get(future)):
            w = RayClientWorker(hook, ids[i], directory[ids[i]])
            workers[i] = w
            data[i] = PointerTensor(w, xid, owner, xs, _dtype(xd), garbage_collect_data=False)
            targets[i] = PointerTensor(w, yid, owner, ys, _dtype(yd), garbage_collect_data=False)
    return RayClients(workers, data, targets, hosts, owns)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unexpected dtype {name!r} from a client actor")
    return dtype
