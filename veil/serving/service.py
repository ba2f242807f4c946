"""The model owner's side: share a model on a cluster, answer requests, stop.

``model.share(cluster)`` encodes the model in fixed precision and
secret-shares it on the cluster's parties (the crypto provider deals the
multiplication material). ``model.serve(num_requests=...)`` then loops:
list the requests pending on every party, claim a batch of them (one client
connection's requests: each request comes with an opaque label per party of the
connection that sent it, and the parties refuse a mixed claim; the connection served
longest ago goes first, so a client that queued many requests holds others back
for one batch, not all of its own; each party
concatenates its input shares into one object of this session), run the
model on the shared batch through pointers, and hand each party's output
share back to the queue for the requesting client. The owner's process holds
only pointers: it never sees inputs, outputs or weight shares (with fixed weights,
:mod:`veil.serving.fixed_weights`, it sees each weight minus its fixed mask once, at load).

A failure while computing a batch (a protocol error) marks that batch's
requests failed on every reachable party, so clients get a
:class:`~veil.serving.errors.RequestFailedError` instead of waiting or
receiving a wrong answer, and serving goes on; only an unreachable worker
stops the service. A malformed request fails alone: one whose shares differ in
batch size between parties, or that reached only some parties and stayed
incomplete for ``partial_timeout`` seconds, is failed before any batch is
claimed; meanwhile the parties' ``pending`` waits do not count it as news, so it
does not turn the loop's waits into polls. A batch holds at most ``max_batch``
requests and ``max_rows`` rows; the parties refuse a larger request at submit.
A request that leaves one party between ``pending`` and ``claim`` (its client
disconnected there) puts the batch back instead of failing it.
:meth:`ModelService.stop` waits (bounded) until clients fetched the results
already computed, so ``model.serve(num_requests=3); model.stop()`` lets the
third client finish.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any, Optional

import torch
from torch import nn

from veil.exceptions import ConnectionLostError, VeilError
from veil.ids import new_id
from veil.tensors.mpc_glue.module import fix_precision_module, share_module
from veil.serving import protocol
from veil.serving.cluster import CLIENT_USER, Cluster
from veil.serving.errors import RequestGoneError, ServingError, WorkerUnavailableError
from veil.serving.fixed_weights import fix_weights
from veil.serving.fuse import fuse_linear_layers
from veil.serving.inputs import as_count, as_shape
from veil.serving.party_replies import agreed_opener

DEFAULT_SERVICE = "model"
#: seconds of the first idle poll after serving a batch (doubling up to ``poll_interval``)
IDLE_POLL_START = 0.0005
#: seconds a partial batch may wait for requests that keep arriving (see ModelService.step)
BATCH_LINGER = 0.02
#: batch groups (client sessions) whose last turn the serving loop remembers, past those with requests ready
MAX_REMEMBERED_GROUPS = 4096
#: seconds an idle serving loop's ``pending`` waits on each party for a submit (the parties answer
#: as soon as one arrives: no polling delay; also the most a ``stop`` waits for the loop to notice)
PENDING_WAIT = 0.2


class ModelService:
    """A model secret-shared on a cluster, and the loop that serves it.

    Args:
        model: A torch module built from the SMPC layer set (see ``veil.tensors.mpc_glue.module``).
        cluster: A started :class:`~veil.serving.cluster.Cluster`.
        input_shape: One request's input shape, batch dimension first (e.g. ``(1, 1, 28, 28)``).
        name: Service name (several models may share a cluster).
        max_batch: Most requests computed together.
        max_rows: Most rows computed together, and so the most one request may have: the parties refuse
            a larger request at submit (its client splits it), so one client cannot make a batch of any size.
        clients: Users allowed to query (default: the cluster's client user).
        partial_timeout: Seconds a request may stay submitted to only some
            parties before it is failed (a client that died mid-submit, or an attacker).
        fuse: Rewrite Conv2d -> AvgPool2d pairs of ``nn.Sequential`` containers into one
            convolution first (:mod:`veil.serving.fuse`: the same function, one round fewer per pair).
        fixed_weights: Open each weight's Beaver mask once, at load (:mod:`veil.serving.fixed_weights`), so that
            a query's products open only its activations.
    """

    def __init__(self, model: nn.Module, cluster: Cluster, input_shape: tuple, name: str = DEFAULT_SERVICE,
                 max_batch: int = 16, clients: tuple = (CLIENT_USER,), hook: Any = None,
                 partial_timeout: float = 30.0, fuse: bool = True, fixed_weights: bool = True,
                 max_rows: int = protocol.DEFAULT_MAX_ROWS) -> None:
        self.hook = hook or default_hook()
        self.model, self.cluster, self.name = model.eval(), cluster, name
        self.max_batch = as_count(max_batch, "max_batch")
        self.max_rows = as_count(max_rows, "max_rows")
        if self.max_rows is None or self.max_rows < 1:
            raise ServingError("max_rows must be a positive whole number")
        self.input_shape = as_shape(input_shape, "input_shape")
        self.partial_timeout = partial_timeout
        self.failed_requests = 0  # malformed or failed requests (each failed alone)
        self._partial: dict[int, float] = {}  # request id -> when first seen on only some parties
        self._known: list[list[int]] = []  # per party: its incomplete ids, not news to its next pending
        self._requeued: frozenset = frozenset()  # the batch last put back after a failed claim
        self._turns = 0  # batches served; the batch group -> the turn it was last served in (round robin)
        self._last_turn: dict[tuple, int] = {}
        self.backoffs = 0  # idle rounds the parties answered at once with nothing to compute (the loop slept)
        self._linger: tuple[Optional[float], int] = (None, 0)  # (first seen, ready count) of a partial batch
        self._waited = False  # the last step's parties waited for a submit and none came
        self._stopped = False
        self.connections = cluster.connect(self.hook, cluster.owner_token)
        self.parties = self.connections[:-1]
        self.provider = self.connections[-1]
        self.served = 0
        self.error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self.fused = fuse_linear_layers(model) if fuse else 0
        with torch.no_grad():  # output shape from a plaintext dry run on zeros, before encoding
            self.output_shape = tuple(model(torch.zeros(self.input_shape)).shape)
        fix_precision_module(model)
        share_module(model, *self.parties, crypto_provider=self.provider)
        self.fixed_weights = fix_weights(model) if fixed_weights else 0
        self.encoding = next(p for p in model.parameters()).encoding
        self.crypto = next(p for p in model.parameters()).child.crypto_provider
        info = {"input_shape": list(self.input_shape), "output_shape": list(self.output_shape),
                "base": self.encoding.base, "precision_fractional": self.encoding.precision_fractional,
                "parties": [w.id for w in self.parties], "max_rows": self.max_rows}
        opened = self._call_all("open", [[list(clients), info]] * len(self.parties))
        try:  # (the user every party knows this owner as: clients pin it; parties that disagree pin nobody)
            opener = agreed_opener([w.id for w in self.parties], opened)
        except ServingError:
            cluster.owners.pop(name, None)
            self._close("the cluster's parties disagree on who opened the service")
            raise
        if opener is not None:
            cluster.owners[name] = opener
        cluster.services.append(self)  # cluster.stop() stops this service first

    def holds_only_pointers(self) -> bool:
        """True when the owner's process keeps no share of the model: every weight is
        fixed precision -> additive sharing -> one PointerTensor per party."""
        from veil.tensors.pointer import PointerTensor

        return all(all(type(s) is PointerTensor for s in p.child.child.values()) for p in self.model.parameters())

    # ------------------------------------------------------------ loop

    def serve(self, num_requests: Optional[int] = None, background: bool = False,
              poll_interval: float = 0.01) -> "ModelService":
        """Answers requests until ``num_requests`` were served or :meth:`stop` is called.

        Args:
            num_requests: Stop (and close the service) after this many; None: until stopped.
            background: Serve from a thread and return at once.
            poll_interval: Seconds between polls when no request is pending.

        Raises:
            WorkerUnavailableError: A worker could not be reached (foreground only;
                in the background the error is kept in :attr:`error`).
        """
        num_requests = as_count(num_requests, "num_requests")
        if background:
            self._thread = threading.Thread(target=self._run, args=(num_requests, poll_interval),
                                            name=f"veil-serve-{self.name}", daemon=True)
            self._thread.start()
            return self
        self._run(num_requests, poll_interval, raise_errors=True)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stops serving, closes the service (queued requests fail) and waits for outstanding fetches.

        Args:
            timeout: Most seconds to wait for the serving thread, and then for
                clients to fetch the results already computed.
        """
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._close()
        self.wait_fetched(timeout)

    def wait_fetched(self, timeout: float = 30.0, poll_interval: float = 0.05) -> bool:
        """Waits until clients fetched every computed output (before the cluster shuts down).

        Returns:
            True if nothing is left to fetch, False after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                left = sum(r[0] for r in self._call_all("unfetched", [[]] * len(self.parties)))
            except (VeilError, OSError):
                return False
            if left == 0:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(poll_interval)

    def _run(self, num_requests: Optional[int], poll_interval: float, raise_errors: bool = False) -> None:
        try:
            idle = IDLE_POLL_START  # poll fast right after work, back off to poll_interval when idle
            while not self._stop.is_set() and (num_requests is None or self.served < num_requests):
                left = None if num_requests is None else num_requests - self.served
                wait = 0.0 if self._linger[0] is not None else PENDING_WAIT
                if self.step(min(self.max_batch, left or self.max_batch), linger=BATCH_LINGER, wait=wait):
                    idle = IDLE_POLL_START
                elif self._linger[0] is not None:
                    time.sleep(IDLE_POLL_START)  # a partial batch is filling up: look again soon
                elif self._waited:
                    continue  # the parties waited for a submit themselves: ask again at once
                else:  # a new incomplete request, or parties that answer at once: back off
                    self.backoffs += 1
                    time.sleep(min(idle, poll_interval))
                    idle *= 2
        except BaseException as e:
            self.error = e
            self._close(f"serving stopped after an error ({type(e).__name__})")
            if raise_errors:
                raise
        finally:
            self._close()

    def step(self, max_batch: int, linger: float = 0.0, wait: float = 0.0) -> int:
        """Serves at most ``max_batch`` pending requests; returns how many.

        Args:
            linger: Seconds a partial batch may wait while more requests keep
                arriving (a client submitting several at once gets one batch,
                not one per poll); 0 serves what is ready now.
            wait: Seconds each party may wait for a submit when it has none queued
                (network workers; they answer as soon as one arrives).
        """
        sizes: dict[int, list[int]] = {}
        started = time.monotonic()
        known = self._known if len(self._known) == len(self.parties) else [[] for _ in self.parties]
        listings = self._call_all("pending", [[wait, k] for k in known])  # one round to every party
        groups: dict[int, list[str]] = {}
        for listed in listings:  # a request is ready once every party has its share, of one batch size
            for rid, size, group in listed:
                sizes.setdefault(rid, []).append(size)
                groups.setdefault(rid, []).append(group)
        n = len(self.parties)
        complete = {r: s for r, s in sizes.items() if len(s) == n}
        self._waited = wait > 0 and not complete and time.monotonic() - started >= wait / 2
        self._fail_malformed(sizes, complete)
        self._known = [[r for r, *_ in listed if r in self._partial] for listed in listings]
        rids, rows, full = [], 0, False
        batch_group = self._next_group([tuple(groups[r]) for r, s in complete.items()
                                        if len(set(s)) == 1 and s[0] <= self.max_rows])
        for r, s in complete.items():  # in queue order, up to max_batch requests and max_rows rows
            if len(set(s)) != 1 or s[0] > self.max_rows:
                continue  # failed above
            if tuple(groups[r]) != batch_group:
                full = True  # one client session per batch (the parties refuse a mixed claim): this one waits
                continue
            if len(rids) == max_batch or rows + s[0] > self.max_rows:
                full = True
                break
            rids.append(r)
            rows += s[0]
        if not rids or self._lingers(len(rids), full or len(rids) >= max_batch, linger):
            return 0
        try:
            if not self._compute(rids):  # a request left a party between pending and claim: the rest go again
                return 0
        except (ConnectionLostError, OSError, WorkerUnavailableError) as e:
            self._fail(rids, "a cluster worker became unreachable")
            raise WorkerUnavailableError(f"serving stopped: a cluster worker is unreachable ({e})") from e
        except VeilError as e:  # this batch fails; the service goes on
            self._settle()
            self._fail(rids, f"{type(e).__name__} while computing")
            self.failed_requests += len(rids)
            return 0
        except BaseException as e:  # a bug or an interrupt stops the service: the claimed clients hear it now
            try:                    # (closing fails only the queued requests; these were already claimed)
                self._fail(rids, f"serving stopped ({type(e).__name__} on the model owner's side)")
                self.failed_requests += len(rids)
            except Exception:  # noqa: BLE001 (the original error is the one to report)
                pass
            raise
        self.served += len(rids)
        self._requeued = frozenset()
        self._turns += 1
        self._last_turn[batch_group] = self._turns
        return len(rids)

    def _next_group(self, ready: list) -> Optional[tuple]:
        """The client session whose requests make the next batch: of those with ready requests (``ready``: each
        request's group, in queue order), the one served longest ago (never served first), ties in queue order.
        In queue order alone, a client that queued many requests first held every later client back for all
        of its batches; now each waits for at most one batch per other session with requests ready."""
        if not ready:
            return None
        first = {g: i for i, g in reversed(list(enumerate(ready)))}
        if len(self._last_turn) > MAX_REMEMBERED_GROUPS:  # (sessions that left: forgotten, keeping it bounded)
            self._last_turn = {g: t for g, t in self._last_turn.items() if g in first}
        return min(first, key=lambda g: (self._last_turn.get(g, 0), first[g]))

    def _lingers(self, ready: int, full: bool, linger: float) -> bool:
        """True to wait one more poll: the batch is partial and grew since the last poll, within ``linger``."""
        now = time.monotonic()
        since, seen = self._linger
        if full or linger <= 0 or (since is not None and (ready <= seen or now - since > linger)):
            self._linger = (None, 0)
            return False
        self._linger = (now if since is None else since, ready)
        return True

    def _fail_malformed(self, sizes: dict, complete: dict) -> None:
        """Fails requests whose parties disagree on the batch size, or that stayed on only some parties."""
        now = time.monotonic()
        bad = [r for r, s in complete.items() if len(set(s)) > 1]
        big = [r for r, s in complete.items() if len(set(s)) == 1 and s[0] > self.max_rows]  # (parties refuse these)
        for r in list(self._partial):
            if r not in sizes or r in complete:
                del self._partial[r]
        for r in sizes:
            if r not in complete:
                self._partial.setdefault(r, now)
        stale = [r for r, since in self._partial.items() if now - since > self.partial_timeout]
        if bad:
            self._fail(bad, "the request's shares differ in batch size between parties")
        if big:
            self._fail(big, f"the request has more than the service's {self.max_rows} rows")
        if stale:
            self._fail(stale, f"the request reached only some parties within {self.partial_timeout:.0f} s")
            for r in stale:
                del self._partial[r]
        self.failed_requests += len(bad) + len(big) + len(stale)

    def _compute(self, rids: list[int]) -> bool:
        """Computes and answers the batch ``rids``; False when it was put back in the queue instead."""
        from veil.tensors.additive import AdditiveSharingTensor
        from veil.tensors.fixed_precision import FixedPrecisionTensor
        from veil.tensors.pointer import PointerTensor

        oids = [new_id() for _ in self.parties]
        claimed = self._call_all("claim", [[rids, oid] for oid in oids], return_errors=True)  # one round
        failed = [r for r in claimed if isinstance(r, BaseException)]
        if failed:  # free the batches the other parties stored, then report the first failure
            took = [w for w, r in zip(self.parties, claimed) if not isinstance(r, BaseException)]
            for w, oid, r in zip(self.parties, oids, claimed):
                if not isinstance(r, BaseException):
                    self.hook.local_worker.schedule_delete(w, oid)
            # a request that left one party (its client disconnected there) must not fail the batch's
            # others: put them back where they were claimed, once per batch (a claim that fails again
            # fails them, as any other error)
            if all(isinstance(e, RequestGoneError) for e in failed) and frozenset(rids) != self._requeued:
                self._requeued = frozenset(rids)
                if took:
                    protocol.call_all(self.hook.local_worker, took, "requeue", self.name, [[rids]] * len(took),
                                      return_errors=True)
                return False
            raise failed[0]
        shares = {w.id: PointerTensor(w, oid, self.hook.local_worker, torch.Size((sum(got), *self.input_shape[1:])),
                                      torch.int64) for w, oid, got in zip(self.parties, oids, claimed)}
        sizes = claimed[0]
        if any(got != sizes for got in claimed):  # (the pointers above free the batches when dropped)
            raise ServingError("parties disagree on the requests' batch sizes")
        x = FixedPrecisionTensor(AdditiveSharingTensor(shares, self.crypto), self.encoding)
        with torch.no_grad():
            out = self.model(x)
        # one round; each respond also carries that party's last deferred protocol steps
        self._call_all("respond", [[rids, sizes, _ref(out.child.child[w.id])] for w in self.parties])
        return True

    # ------------------------------------------------------------ helpers

    def _call(self, worker: Any, action: str, *args: Any) -> list:
        return protocol.call(self.hook.local_worker, worker, action, self.name, *args)

    def _call_all(self, action: str, per_party_args: list, return_errors: bool = False) -> list:
        return protocol.call_all(self.hook.local_worker, self.parties, action, self.name, per_party_args,
                                 return_errors=return_errors)

    def _broadcast(self, action: str, *args: Any) -> None:
        self._call_all(action, [list(args)] * len(self.parties))

    def _settle(self) -> None:
        """After a failed batch: delivers (or drops) the protocol steps still queued for each party.

        A step of the failed batch may fail again on its party; it must not take the
        next request (the ``fail`` below, the next query's ``pending``) down with it.
        """
        from veil.messaging import messages as m
        from veil.tensors.mpc_glue.runtime import one_round

        local = self.hook.local_worker
        one_round([(local, m.DeleteMessage([]), w) for w in self.parties], "settling a failed batch",
                  return_errors=True)

    def _fail(self, rids: list[int], message: str) -> None:
        # a worker that fails here is the one that failed: its clients see it gone
        self._call_all("fail", [[rids, message]] * len(self.parties), return_errors=True)

    def _close(self, reason: str = "the model owner stopped the service") -> None:
        if self._closed:
            return
        self._closed = True
        self._call_all("close", [[reason]] * len(self.parties), return_errors=True)


def _ref(ptr: Any) -> Any:
    from veil.messaging import messages as m

    return m.ObjectRef(ptr.id_at_location)


def default_hook() -> Any:
    """The process's TorchHook (one is made if the program has none yet)."""
    from veil.hook import TorchHook
    from veil.workers.registry import default_hook_context

    ctx = default_hook_context()
    return ctx if isinstance(ctx, TorchHook) else TorchHook(torch)


#: served modules -> their service (weak: a dropped model takes its service handle along)
_SERVICES: "weakref.WeakKeyDictionary[nn.Module, ModelService]" = weakref.WeakKeyDictionary()


def share_on_cluster(model: nn.Module, cluster: Cluster, input_shape: Optional[tuple] = None,
                     **options: Any) -> nn.Module:
    """``model.share(cluster)``: secret-shares ``model`` on the cluster for serving.

    A Keras 3 model (``keras.Model``) is converted first (``keras_to_torch``);
    the Keras model then stands for its service (``.serve()``, ``.stop()``).

    Args:
        input_shape: One request's input shape (default: guessed from the first
            layer for Linear/Conv2d models with batch size 1, or the Keras input).
    """
    input_shape = as_shape(input_shape, "input_shape")
    module = model
    if _is_keras(model):
        from veil.serving.keras_convert import keras_to_torch

        module = keras_to_torch(model)
    if input_shape is None:
        input_shape = guess_input_shape(module)
    _SERVICES[model] = ModelService(module, cluster, input_shape, **options)
    return model


def _is_keras(model: Any) -> bool:
    return any(c.__module__.startswith("keras.") and c.__name__ == "Model" for c in type(model).__mro__)


def service_of(model: nn.Module) -> ModelService:
    service = _SERVICES.get(model)
    if service is None:
        raise ServingError("this model is not shared on a cluster: call model.share(cluster) first")
    return service


def serve_model(model: nn.Module, num_requests: Optional[int] = None, background: bool = False,
                **options: Any) -> nn.Module:
    """``model.serve(...)``: see :meth:`ModelService.serve`."""
    service_of(model).serve(num_requests, background=background, **options)
    return model


def stop_model(model: nn.Module) -> nn.Module:
    """``model.stop()``: stops serving; the model's shares stay on the cluster until it is dropped."""
    service_of(model).stop()
    return model


def guess_input_shape(model: nn.Module) -> tuple:
    """A batch-1 input shape from the first layer, or an error asking for ``input_shape=``."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    shape = getattr(model, "veil_input_shape", None)
    if shape is not None:
        return tuple(shape)
    if isinstance(first, nn.Linear):
        return (1, first.in_features)
    raise ServingError("cannot guess the model's input shape: pass model.share(cluster, input_shape=(1, ...))")
