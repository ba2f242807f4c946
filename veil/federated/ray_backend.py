"""Federated clients in Ray actors: each client's data, model state and object store live in an actor.

The coordinator reaches a client with serialized veil requests (the same
bytes a websocket would carry); inside the actor each client is an ordinary
worker that deserializes, checks the allowlist and answers exactly as a
``VirtualWorker`` or a ``veil worker`` process does, so ``fl.train``, training
plans, FedAvg/FedProx, secure aggregation (client-to-client shares go actor to
actor) and owner-side DP queries run unchanged. Two ways in:

- :class:`RayClientWorker`, a worker handle on one client (one Ray call per
  request): pointers, ``.get()``, DP queries, any veil API;
- :class:`RayClients` as a client pool (``veil/federated/client_pool.py``):
  ``fl.train`` hands it every client's round request and it sends many
  clients' requests per Ray call (``ClientHost.recv_batch``), keeping a few
  calls in flight per actor so that every actor works while the coordinator
  prepares the next batches and aggregates the last.

The coordinator keeps a client as an index: its id is ``prefix + index``, its
actor ``actors[index % len(actors)]``, and the ids of its data and targets and
its row count sit in flat arrays (20 bytes per client); handles and pointers
are made on demand.

When there are more clients than actors (the usual case: 10,000 clients on a
few cores), clients are *virtual*: one actor hosts many of them and keeps each
one's store (data, plan, model state, secure-aggregation inbox) in its memory
between rounds, as Flower's simulation engine does with its virtual clients.

Ray itself (connecting, and a request to a client as one Ray call): :mod:`veil.federated.ray_transport`.
"""

from __future__ import annotations

import math
import time
from array import array
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from veil.exceptions import CommandTimeoutError, ConnectionLostError, WorkerNotFoundError
from veil.federated import client_memory
from veil.federated.client_pool import ClientPool, JobBuilder, PooledFederatedDataset
from veil.federated.pooled import MAX_CLIENT_SAMPLES
from veil.federated.ray_transport import RayClientWorker, _first_line, _ray, init
from veil.workers import cancellation
from veil.workers.base import BaseWorker

#: most clients per Ray call when fl.train dispatches a round (default: a quarter of an actor's share)
MAX_CLIENTS_PER_CALL = 256


class _ClientTimeLimit(cancellation.CancelToken):
    """A hosted client's per-command limit (plan ``fit`` checks it between batches), named as it is set."""

    def check(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise CommandTimeoutError(f"{self.what} ran past client_seconds={self.seconds:g} (the limit "
                                      "sy.ray.federated_clients sets on each command of a hosted client)")


class ClientHost:
    """The Ray actor: hosts many clients, each an ordinary veil worker with its own store.

    ``client_seconds``: the most one command of a hosted client may run (its local training stops at the
    next batch past it, with a one-line CommandTimeoutError): one client's endless training holds neither
    its actor nor the clients batched with it.

    ``client_memory_mb``: the most a hosted client's objects (its owner's data aside) may hold after a request
    (:mod:`veil.federated.client_memory`: past it, one-line QuotaExceededError, what it stored freed; None: none).
    """

    def __init__(self, threads: int = 1, client_seconds: float | None = None,
                 client_memory_mb: float | None = None) -> None:
        import veil  # noqa: F401  (registers every wire type and worker function in this process)
        from veil.workers.registry import HookContext

        if client_seconds is not None and not (isinstance(client_seconds, (int, float)) and client_seconds > 0):
            raise ValueError("client_seconds must be a positive number of seconds (or None)")
        self.client_seconds = client_seconds
        self.memory = client_memory.MemoryLimit(client_memory_mb)  # (checks the value first)
        torch.set_num_threads(threads)
        self.hook = HookContext()
        self.clients: dict[str, Any] = {}
        # where the clients of every federation live (for client-to-client messages): prefix -> (n, actors)
        self.layouts: dict[str, tuple[int, list]] = {}
        self.proxies: dict[str, RayClientWorker] = {}

    def add_layout(self, prefix: str, n: int, hosts: list) -> None:
        """Client ``prefix + i`` (i < n) lives on ``hosts[i % len(hosts)]``."""
        clash = [p for p in self.layouts if p.startswith(prefix) or prefix.startswith(p)]
        if clash:  # "ab" + "10" is "ab1" + "0": ids, routing and shutdown would mix two federations' clients
            raise ValueError(f"client prefix {prefix!r} overlaps the prefix {clash[0]!r} of a federation on these "
                             "actors; pick one that neither starts nor is the start of another")
        self.layouts[prefix] = (n, list(hosts))

    def actor_of(self, client_id: str) -> Any:
        for prefix, (n, hosts) in self.layouts.items():
            index = _index(client_id, prefix, n)
            if index is not None:
                return hosts[index % len(hosts)]
        return None

    def add_clients(self, ids: Sequence[str], datasets: Sequence[tuple] | None = None,
                    make_dataset: Callable[[int], tuple] | None = None, indices: Sequence[int] = (),
                    tags: Sequence[str] = (), dp: dict | None = None) -> dict:
        """Creates the clients and loads their data as private owner objects.

        Returns, for these clients in order, flat arrays of data ids, target ids and row counts, the
        first client's data/target shapes after the first dimension and dtypes (``example``), and the
        shapes and dtypes of any client that differs from it (``odd``: position -> 4-tuple).
        """
        taken = [cid for cid in ids if cid in self.clients]
        if taken:  # another federation's client (overlapping prefixes): its owner data must not be replaced
            raise ValueError(f"client ids already hosted on this actor: {taken[:3]}; give each federation its "
                             "own prefix (one that is not a prefix of another's)")
        xids, yids, rows = array("Q"), array("Q"), array("q")
        example, odd = None, {}
        for n, cid in enumerate(ids):
            worker = _HostedWorker(self, cid)
            self.clients[cid] = worker
            x, y = datasets[n] if datasets is not None else make_dataset(indices[n])
            x, y = torch.as_tensor(x), torch.as_tensor(y)
            if len(x) != len(y):
                raise ValueError(f"client {cid!r}: data has {len(x)} rows but targets {len(y)}")
            xids.append(worker.load(x, tags=(*tags, "#data"), private=True))
            yids.append(worker.load(y, tags=(*tags, "#target"), private=True))
            if dp is not None:  # owner-side DP: this client's data opened to DP queries/training, with budgets
                worker.enable_dp({"data": (x, y)}, **dp)
            # a hidden count leaves the client as it does a network worker's search: 0 rows, or the owner's
            # public nominal count as the client's FedAvg weight
            hidden = dp is not None and dp.get("hide_count")
            rows.append((dp.get("nominal_count") or 0) if hidden else len(x))
            meta = (tuple(x.shape[1:]), str(x.dtype), tuple(y.shape[1:]), str(y.dtype))
            if example is None:
                example = meta
            elif meta != example:
                odd[n] = meta
        return {"data_ids": xids, "target_ids": yids, "rows": rows, "example": example, "odd": odd}

    def remove_clients(self, prefix: str, n: int) -> None:
        """Ends the clients ``prefix + i`` (i < n) hosted here."""
        for cid in [c for c in self.clients if _index(c, prefix, n) is not None]:
            self.clients.pop(cid, None)
        for cid in [c for c in self.proxies if _index(c, prefix, n) is not None]:
            self.proxies.pop(cid, None)
        self.layouts.pop(prefix, None)

    def recv(self, client_id: str, data: bytes) -> bytes:
        """One serialized veil request for one hosted client; the serialized reply."""
        worker = self.clients.get(client_id)
        if worker is None:
            from veil.messaging import messages as m
            from veil.messaging.serde import serialize

            return serialize(m.ErrorReply("WorkerNotFoundError", f"no client {client_id!r} on this actor"),
                             sender=client_id)
        return self.memory.serve(worker, lambda: self._timed(worker, client_id, data))

    def _timed(self, worker: Any, client_id: str, data: bytes) -> bytes:
        if not self.client_seconds:
            return worker._recv_msg(data)
        limit = _ClientTimeLimit(f"client {client_id!r}'s command", self.client_seconds)
        limit.start()
        with cancellation.running(limit):
            return worker._recv_msg(data)

    def recv_batch(self, jobs: Sequence[tuple[str, Sequence[bytes]]]) -> list[list[bytes]]:
        """Many clients' requests in one call: for each ``(client id, requests)``, the replies, in order.

        A client's requests are handled one after another as separate messages; after an error reply
        its remaining requests are skipped (its reply list is then shorter). One client's failure never
        affects another's.
        """
        from veil.messaging import messages as m
        from veil.messaging.serde import deserialize

        out = []
        for client_id, requests in jobs:
            replies = []
            for k, data in enumerate(requests):
                reply = self.recv(client_id, data)
                replies.append(reply)
                if k + 1 < len(requests):
                    try:
                        failed = type(deserialize(reply)[0]) is m.ErrorReply
                    except Exception:  # an undecodable reply: the coordinator reports it
                        failed = True
                    if failed:
                        break
            out.append(replies)
        return out

    def stats(self) -> dict:
        """Memory and object counts of this actor (benchmarks, docs/scaling.md)."""
        import psutil

        proc = psutil.Process()
        cpu = proc.cpu_times()
        return {"clients": len(self.clients), "rss": proc.memory_info().rss, "cpu_s": cpu.user + cpu.system,
                "objects": sum(len(w.monitor) for w in self.clients.values())}


def _index(client_id: Any, prefix: str, n: int) -> int | None:
    """i if ``client_id`` is ``prefix + str(i)`` with 0 <= i < n, else None."""
    if not isinstance(client_id, str) or not client_id.startswith(prefix):
        return None
    digits = client_id[len(prefix):]
    if not (digits.isascii() and digits.isdigit()) or (len(digits) > 1 and digits[0] == "0"):
        return None
    index = int(digits)
    return index if index < n else None


class _HostedWorker(BaseWorker):
    """A client inside an actor; reaches clients of other actors through :class:`RayClientWorker`."""

    def __init__(self, host: ClientHost, cid: str) -> None:
        super().__init__(host.hook, id=cid)
        self._host = host

    def _recv_msg(self, data: bytes) -> bytes:  # (reached by another client's request: measured after it too)
        self._host.memory.reached(self)
        return super()._recv_msg(data)

    def resolve_worker(self, worker_id: str) -> BaseWorker:
        local = self._host.clients.get(worker_id) or self.hook.workers.get(worker_id)
        if local is not None:
            return local
        proxy = self._host.proxies.get(worker_id)
        if proxy is None:  # kept by the host: the hook's registry holds workers weakly
            actor = self._host.actor_of(worker_id)
            if actor is None:
                raise WorkerNotFoundError(f"client {self.id!r} does not know how to reach worker {worker_id!r}")
            proxy = self._host.proxies[worker_id] = RayClientWorker(self.hook, worker_id, actor)
        return proxy


class _Lazy(Sequence):
    """A read-only sequence whose items are made on access (handles and pointers of many clients)."""

    def __init__(self, n: int, make: Callable[[int], Any]) -> None:
        self._n, self._make = n, make

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._make(k) for k in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(f"client index {i} out of range ({self._n} clients)")
        return self._make(i % self._n)


class RayClients(ClientPool):
    """What :func:`federated_clients` returns: clients in Ray actors, as a client pool.

    ``clients[i]`` / ``clients.workers[i]`` is a worker handle on client i, ``clients.data[i]`` and
    ``clients.targets[i]`` pointers to its data (made on access); ``federated_dataset()`` is what
    ``fl.train`` takes. ``clients_per_call`` and ``calls_in_flight`` tune the batched dispatch.
    """

    def __init__(self, hook: Any, prefix: str, actors: list, owns_actors: bool, data_ids: array, target_ids: array,
                 rows: array, example: tuple, odd: dict, clients_per_call: int | None = None,
                 calls_in_flight: int = 2, timeout: float = 600.0) -> None:
        self.hook, self.prefix, self.actors, self.owns_actors = hook, prefix, list(actors), owns_actors
        self._data_ids, self._target_ids, self._rows = data_ids, target_ids, rows
        self._example, self._odd = example, odd  # odd: the few clients whose shapes differ from the example
        self.clients_per_call, self.calls_in_flight, self.timeout = clients_per_call, calls_in_flight, timeout
        hook.worker_sources.add(self)  # pointer chains through one client to another reach the other

    # ------------------------------------------------------------ the pool

    def __len__(self) -> int:
        return len(self._rows)

    def client_id(self, i: int) -> str:
        return f"{self.prefix}{i}"

    def index_of(self, client_id: Any) -> int | None:
        return _index(client_id, self.prefix, len(self))

    def handle_for(self, client_id: str) -> RayClientWorker | None:
        """A handle on the client named ``client_id`` while its actors run (the hook's ``find_worker``)."""
        index = self.index_of(client_id)
        return self.worker(index) if index is not None and self.actors else None

    def num_samples(self, i: int) -> int:
        return self._rows[i]

    def data_ids(self, i: int) -> tuple[int, int]:
        return self._data_ids[i], self._target_ids[i]

    def example(self) -> tuple[tuple, torch.dtype, tuple, torch.dtype]:
        xs, xd, ys, yd = self._example
        return xs, _dtype(xd), ys, _dtype(yd)

    def actor_of(self, i: int) -> Any:
        return self.actors[i % len(self.actors)]

    def worker(self, i: int) -> RayClientWorker:
        """The handle on client i (one per client while it is referenced: pointers compare locations)."""
        cid, actor = self.client_id(i), self.actor_of(i)
        known = self.hook.workers.get(cid)
        if isinstance(known, RayClientWorker) and known.actor is actor:
            return known
        return RayClientWorker(self.hook, cid, actor, timeout=self.timeout)

    def exchange(self, build: JobBuilder, indices: Iterable[int] | None = None,
                 deadline: float | None = None) -> Iterator[tuple[int, Any]]:
        ray = _ray()
        n_actors = len(self.actors)
        if not n_actors:
            raise RuntimeError("these clients' actors were shut down")
        if indices is None:
            queues = [iter(range(a, len(self), n_actors)) for a in range(n_actors)]
            todo = len(self)
        else:
            buckets: list[list[int]] = [[] for _ in range(n_actors)]
            for i in indices:
                buckets[i % n_actors].append(i)
            queues, todo = [iter(b) for b in buckets], sum(len(b) for b in buckets)
        per_call = self.clients_per_call or max(1, min(MAX_CLIENTS_PER_CALL, math.ceil(todo / (4 * n_actors))))
        in_flight: dict[Any, tuple[int, list[int]]] = {}
        dead: dict[int, Exception] = {}
        failed: list[tuple[int, Exception]] = []

        def submit(a: int) -> None:
            if a in dead:  # its remaining clients fail without a call
                failed.extend((i, dead[a]) for i in queues[a])
                return
            if deadline is not None and time.monotonic() > deadline:
                return  # (fl.train's round_seconds: the clients not asked yet are the caller's to drop)
            chunk = list(islice(queues[a], per_call))
            if chunk:
                jobs = [(self.client_id(i), build(i)) for i in chunk]
                in_flight[self.actors[a].recv_batch.remote(jobs)] = (a, chunk)

        for _ in range(max(1, self.calls_in_flight)):
            for a in range(n_actors):
                submit(a)
        while in_flight or failed:
            while failed:
                yield failed.pop()
            if not in_flight:
                break
            wait = self.timeout if deadline is None else min(self.timeout, max(0.0, deadline - time.monotonic()))
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=wait)
            if not ready and wait < self.timeout:
                return  # past the deadline: what is in flight is not waited for (the caller drops those clients)
            if not ready:  # no actor answered for `timeout` seconds: what is in flight there is lost
                for a, chunk in in_flight.values():
                    dead[a] = ConnectionLostError(f"client host actor {a} did not answer within {self.timeout:.0f} s")
                    failed.extend((i, dead[a]) for i in chunk)
                    submit(a)
                in_flight.clear()
                continue
            a, chunk = in_flight.pop(ready[0])
            try:
                replies = ray.get(ready[0])
            except ray.exceptions.RayError as e:
                error = ConnectionLostError(f"client host actor {a} failed: {type(e).__name__}: {_first_line(e)}")
                if isinstance(e, ray.exceptions.RayActorError):
                    dead[a] = error
                results: list = [(i, error) for i in chunk]
            else:
                results = list(zip(chunk, replies))
            submit(a)  # the actor's next batch goes out before this one is processed
            yield from results

    # ------------------------------------------------------------ handles and data

    @property
    def workers(self) -> Sequence[RayClientWorker]:
        return _Lazy(len(self), self.worker)

    @property
    def data(self) -> Sequence[Any]:
        return _Lazy(len(self), lambda i: self._pointer(i, 0))

    @property
    def targets(self) -> Sequence[Any]:
        return _Lazy(len(self), lambda i: self._pointer(i, 1))

    def __iter__(self) -> Iterator[RayClientWorker]:
        return iter(self.workers)

    def __getitem__(self, i: int) -> RayClientWorker:
        return self.workers[i]

    def _pointer(self, i: int, which: int) -> Any:
        from veil.tensors.pointer import PointerTensor

        meta = self._odd.get(i, self._example)
        shape, dtype = (meta[0], meta[1]) if which == 0 else (meta[2], meta[3])
        oid = self._data_ids[i] if which == 0 else self._target_ids[i]
        return PointerTensor(self.worker(i), oid, self.hook.local_worker, (self._rows[i], *shape), _dtype(dtype),
                             garbage_collect_data=False)

    def _dataset(self, i: int) -> Any:
        from veil.federated.dataset import BaseDataset

        return BaseDataset(self._pointer(i, 0), self._pointer(i, 1))

    def federated_dataset(self, batched: bool = True) -> Any:
        """What ``fl.train`` takes. ``batched`` (default): many clients per Ray call, nothing kept per
        client on the coordinator; ``batched=False``: a plain FederatedDataset of pointers, trained one
        client at a time through the worker handles (as any workers)."""
        from veil.federated.dataset import FederatedDataset

        if batched:
            return PooledFederatedDataset(self, self._dataset)
        return FederatedDataset(self._dataset(i) for i in range(len(self)))

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
            ray.get([a.remove_clients.remote(self.prefix, len(self)) for a in self.actors])
        self.actors = []

    def __repr__(self) -> str:
        return f"<RayClients {len(self)} clients ({self.prefix}0...) on {len(self.actors)} actors>"


def federated_clients(datasets: Sequence[tuple] | None = None, *, num_clients: int | None = None,
                      make_dataset: Callable[[int], tuple] | None = None, actors: int | Sequence[Any] | None = None,
                      hook: Any = None, address: str | None = None, prefix: str = "client",
                      tags: Sequence[str] = (), dp: dict | None = None, threads_per_actor: int = 1,
                      batch: int = 500, clients_per_call: int | None = None, calls_in_flight: int = 2,
                      timeout: float = 600.0, client_seconds: float | None = 300.0,
                      client_memory_mb: float | None = 1024.0) -> RayClients:
    """Starts clients in Ray actors, each holding its own data; returns them (a client pool).

    Args:
        datasets: one ``(data, targets)`` per client, sent once to the actor that hosts it; or
        num_clients, make_dataset: ``make_dataset(i)`` runs *inside* the actor and returns client
            ``i``'s ``(data, targets)`` (the coordinator never holds the data: large simulations).
        actors: how many Ray actors to spread the clients over (default: the cluster's CPUs), or
            the ``.actors`` of an earlier call to host these clients too (with a ``prefix`` that neither
            starts nor is the start of another's there: refused otherwise); client i goes to actor
            ``i % len(actors)``, and each actor keeps its
            clients' state between rounds.
        hook: the registry the handles join (default: the current one).
        address: a Ray cluster (else ``$VEIL_RAY_ADDRESS``, else a local Ray started here).
        tags: tags added to every client's data and targets (``#data`` / ``#target`` always).
        dp: ``worker.enable_dp`` settings applied on every client (owner-side DP on its data,
            dataset name ``"data"``), e.g. ``{"budgets": {"me": (1.0, 1e-5)}}``; with ``hide_count`` the
            handles state 0 rows (as a network worker's search) and the ``nominal_count`` as the weight.
        batch: clients created per actor call.
        clients_per_call: clients whose round requests travel in one Ray call when ``fl.train``
            dispatches (default: a quarter of each actor's share, at most 256);
        calls_in_flight: such calls queued per actor (2: an actor starts its next batch while the
            coordinator reads the last).
        timeout: seconds without any answer after which an actor's clients count as lost.
        client_seconds: the most one command of a client may run on the actors we start (its local
            training is stopped at the next batch past it and the client dropped from that round);
            None: no limit. (On ``actors`` passed in, the limit they were made with holds.)
        client_memory_mb: the most a client's objects (its owner's data aside) may hold after a request on
            the actors we start; a request leaving more is refused and what it stored freed. None: no limit.

    Example::

        clients = sy.ray.federated_clients(parts, actors=2)
        fl.train(model, clients.federated_dataset(), rounds=5)
    """
    from veil.workers.registry import default_hook_context

    if (datasets is None) == (make_dataset is None):
        raise ValueError("give either datasets or (num_clients, make_dataset)")
    n = len(datasets) if datasets is not None else int(num_clients or 0)
    if n <= 0:
        raise ValueError("federated_clients needs at least one client")
    nominal = (dp or {}).get("nominal_count") or 0
    if type(nominal) is not int or not 0 <= nominal <= MAX_CLIENT_SAMPLES:  # (every client's FedAvg weight)
        raise ValueError(f"dp nominal_count must be a whole number from 0 to {MAX_CLIENT_SAMPLES}")
    ray = init(address)
    hook = hook if hook is not None else default_hook_context()
    owns = not isinstance(actors, (list, tuple))
    if owns:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n_actors = max(1, min(n, actors or cpus))
        remote_host = ray.remote(ClientHost).options(num_cpus=min(1.0, cpus / n_actors), max_concurrency=1)
        hosts = [remote_host.remote(threads_per_actor, client_seconds, client_memory_mb) for _ in range(n_actors)]
    else:
        hosts, n_actors = list(actors), len(actors)
    ray.get([h.add_layout.remote(prefix, n, hosts) for h in hosts])
    calls = []  # (first position in the actor's share, future)
    for a, host in enumerate(hosts):
        mine = range(a, n, n_actors)
        for start in range(0, len(mine), batch):
            chunk = list(mine[start:start + batch])
            part = [datasets[i] for i in chunk] if datasets is not None else None
            calls.append((chunk, host.add_clients.remote([f"{prefix}{i}" for i in chunk], part, make_dataset,
                                                        chunk, tuple(tags), dp)))
    data_ids, target_ids, rows = array("Q", bytes(8 * n)), array("Q", bytes(8 * n)), array("q", bytes(8 * n))
    example, odd = None, {}
    for chunk, future in calls:
        got = ray.get(future)
        for k, i in enumerate(chunk):
            data_ids[i], target_ids[i], rows[i] = got["data_ids"][k], got["target_ids"][k], got["rows"][k]
        example = example or got["example"]
        for k, i in enumerate(chunk):  # shapes unlike the first client's are kept per client
            meta = got["odd"].get(k, got["example"])
            if meta != example:
                odd[i] = meta
    return RayClients(hook, prefix, hosts, owns, data_ids, target_ids, rows, example, odd,
                      clients_per_call=clients_per_call, calls_in_flight=calls_in_flight, timeout=timeout)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unexpected dtype {name!r} from a client actor")
    return dtype
