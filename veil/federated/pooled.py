"""``fl.train`` over a client pool: every round's clients dispatched in batches, aggregated as they report.

Per client and round the coordinator builds one serialized veil request (two
in the round that first stores the training plan on the client):

- prelude: free last round's loss objects; ``veil.plan.load_state`` (the
  global weights); ``veil.plan.fit`` -> L; ``L.mean()`` -> M; free L;
- message: ``GetObjects([M, *state])`` (FedAvg/FedProx), or, with secure or
  encrypted aggregation, ``veil.plan.fit`` itself (nothing leaves the client;
  the aggregation protocol then runs as in the one-client-at-a-time path).

These are the worker functions, allowlist checks and reference-monitor
decisions of the one-client-at-a-time path (``plans/remote.py``), in fewer
transport calls: the pool carries many clients' requests per call and keeps a
bounded number of calls in flight (see ``ray_backend.RayClients.exchange``).

Memory: the coordinator stores nothing per client. Every object id it uses on
client ``i`` (plan, state, losses) is derived from a per-training random
secret and ``i`` (SHAKE-256), so ids stay unguessable and differ between
clients without a table of them; FedAvg aggregates as a running weighted sum
(``Strategy.aggregator``). Secure and encrypted aggregation hold one input
per surviving client for their protocol (which is quadratic in the clients
anyway).
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
import warnings
from typing import Any

import torch

from veil.exceptions import RemoteExecutionError, VeilError, error_from_reply
from veil.federated import client_pool
from veil.federated.strategies import ClientUpdate, Strategy
from veil.messaging import messages as m
from veil.messaging.allowlist import ALLOWLIST
from veil.messaging.serde import deserialize, serialize
from veil.tensors.pointer import PointerTensor

#: what a client that failed raises at the coordinator (its own error, a lost connection): the client is dropped
#: from the round, never the round failed (training, secure and encrypted aggregation all catch these)
CLIENT_FAILURES = (VeilError, ConnectionError, OSError)
#: per round, clients dropped with a warning each; the rest are summed up in one warning
WARN_EACH = 5
_REF = m.ObjectRef
#: characters of a client's error text kept (history, warnings): a hostile client's MBs stay with it
ERROR_CHARS = 1024
#: the most samples a client may state (2^40 rows): a count is the client's own word, and FedAvg weighs its
#: update by it; past any real dataset it could only make the average that one client's update
MAX_CLIENT_SAMPLES = 2**40
#: bytes a client's reply may exceed the model's state by (ids, loss, framing; an error's text): a reply
#: beyond the state's size plus this is refused before it is decoded
REPLY_SLACK_BYTES = 1 << 20


def error_text(e: BaseException) -> str:
    """``"Type: message"`` of a client's failure, cut to ``ERROR_CHARS``."""
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= ERROR_CHARS else f"{text[:ERROR_CHARS]}... ({len(text)} characters)"


def loss_value(t: Any) -> float:
    """A client's mean loss: one real floating number, else the reply is refused (RemoteExecutionError)."""
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or not t.dtype.is_floating_point:
        raise RemoteExecutionError("the client's mean loss is not one real floating-point number")
    value = float(t)
    if not math.isfinite(value):  # (one NaN/inf loss would make the round's weighted loss NaN/inf)
        raise RemoteExecutionError("the client's mean loss is not finite")
    return value


def client_weight(n: Any) -> int:
    """A client's sample count as its FedAvg weight: a whole number from 0 to ``MAX_CLIENT_SAMPLES``, else
    RemoteExecutionError (a negative, NaN or huge count would stop the round, poison or replace the model)."""
    if type(n) is not int or not 0 <= n <= MAX_CLIENT_SAMPLES:
        raise RemoteExecutionError(f"the client's sample count {repr(n)[:40]} is not a whole number from 0 to "
                                   f"{MAX_CLIENT_SAMPLES}")
    return n


def reply_limit(meta: list) -> int:
    """The most bytes a client's reply to a round may take: its state tensors' size plus ``REPLY_SLACK_BYTES``."""
    return REPLY_SLACK_BYTES + sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                                   for shape, dtype, _ in meta)


def check_state(state: list, meta: list) -> None:
    """Refuses (RemoteExecutionError) a client's trained state that must not enter the average: another
    shape or dtype than the plan's state, or a NaN/inf entry (one bad update must not spoil the model)."""
    for t, (shape, dtype, _) in zip(state, meta, strict=True):
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise RemoteExecutionError(f"the client returned a {tuple(t.shape)} {t.dtype} state tensor "
                                       f"for a {shape} {dtype} one")
        if not torch.isfinite(t).all():
            raise RemoteExecutionError("the client returned a state tensor with NaN or infinite entries")


def client_seed(seed: int | None, round_index: int, client_index: int) -> int | None:
    """The shuffling seed of the ``client_index``-th client (dataset order) in round ``round_index``."""
    return None if seed is None else seed * 1_000_003 + round_index * 1009 + client_index


def derive_ids(key: bytes, index: int, count: int) -> list[int]:
    """``count`` 64-bit object ids for client ``index``: unguessable without ``key``, never 0."""
    raw = hashlib.shake_256(key + index.to_bytes(8, "little")).digest(8 * count)
    return [int.from_bytes(raw[j:j + 8], "little") or 1 for j in range(0, 8 * count, 8)]


class PooledTraining:
    """The rounds of one ``fl.train`` call over a pool (built and driven by ``trainer.train``)."""

    def __init__(self, pool: client_pool.ClientPool, plan: Any, owner: Any, *, batch_size: int, local_epochs: int,
                 steps_per_round: int | None, seed: int | None, prox_mu: float, trainable: list[bool],
                 secure_aggregation: bool, encrypted_aggregation: Any, client_metrics: bool) -> None:
        self.pool, self.plan, self.owner = pool, plan, owner
        self.batch_size, self.local_epochs, self.steps_per_round, self.seed = \
            batch_size, local_epochs, steps_per_round, seed
        self.prox_mu, self.trainable = prox_mu, trainable
        self.secure, self.encrypted, self.client_metrics = secure_aggregation, encrypted_aggregation, client_metrics
        self.hidden = secure_aggregation or encrypted_aggregation is not None
        self.key = secrets.token_bytes(32)
        self.state_meta = [(tuple(t.shape), t.dtype, t.requires_grad) for t in plan.state_tensors()]
        self.n_slots = len(self.state_meta) + 3  # plan, state..., losses, mean
        self.reply_limit = reply_limit(self.state_meta)
        self.plan_sent = False
        self.resend: set[int] = set()  # clients whose plan must be stored again (they failed)
        self.op_load = ALLOWLIST.by_name("veil.plan.load_state").name
        self.op_fit = ALLOWLIST.by_name("veil.plan.fit").name
        self.op_mean = ALLOWLIST.by_func(torch.Tensor.mean).name

    # ------------------------------------------------------------ messages

    def _ids(self, i: int) -> tuple[int, list[int], int, int]:
        ids = derive_ids(self.key, i, self.n_slots)
        return ids[0], ids[1:-2], ids[-2], ids[-1]

    def _plan_request(self, i: int) -> bytes:
        plan_id, state_ids, _, _ = self._ids(i)
        objects = [m.StoredObject(plan_id, self.plan.spec)] + [
            m.StoredObject(sid, t.detach().clone().requires_grad_(t.requires_grad))
            for sid, t in zip(state_ids, self.plan.state_tensors())]
        # (a client that failed earlier may still hold its old plan: freed first)
        return serialize(m.ObjectMessage(objects), sender=self.owner.id, prelude=[plan_id, *state_ids])

    def _round_request(self, i: int, values: list, extra: list, r: int) -> bytes:
        plan_id, state_ids, loss_id, mean_id = self._ids(i)
        data_id, target_id = self.pool.data_ids(i)
        state = [_REF(s) for s in state_ids]
        grad = torch.is_grad_enabled()
        fit_args = [_REF(plan_id), _REF(data_id), _REF(target_id), state, self.batch_size, self.local_epochs,
                    True, False, extra, self.steps_per_round, client_seed(self.seed, r, i)]
        prelude: list = [loss_id, mean_id, [self.op_load, [state, values], {}, [], grad]]
        if self.hidden and not self.client_metrics:  # the losses stay on the client (secure sum of them)
            return serialize(m.CommandMessage(self.op_fit, fit_args, {}, [loss_id], grad), sender=self.owner.id,
                             prelude=prelude)
        prelude += [[self.op_fit, fit_args, {}, [loss_id], grad], [self.op_mean, [_REF(loss_id)], {}, [mean_id], grad]]
        if not self.hidden:
            prelude.append(loss_id)
        fetch = [mean_id] if self.hidden else [mean_id, *state_ids]
        return serialize(m.GetObjectsMessage(fetch, delete=False), sender=self.owner.id, prelude=prelude)

    def _decode(self, replies: list, expected: int) -> list:
        """The objects the client's last reply carries (none when nothing was fetched); raises the first
        error reply as the local exception, and a RemoteExecutionError for any reply out of protocol."""
        reply = None
        for data in replies:
            if len(data) > self.reply_limit:  # (decoding it would cost what the client chose)
                raise RemoteExecutionError(f"the client's reply of {len(data)} bytes exceeds the {self.reply_limit} "
                                           "bytes a round's reply of this model may take")
            reply, _, _ = deserialize(data, self.owner._decode_ctx)
            if type(reply) is m.ErrorReply:
                raise error_from_reply(reply.error, reply.message)
        if len(replies) != expected:
            raise RemoteExecutionError(f"the client answered {len(replies)} of {expected} requests")
        if self.hidden and not self.client_metrics:
            if type(reply) is not m.OkReply:
                raise RemoteExecutionError(f"unexpected {type(reply).__name__} to the training request")
            return []
        wanted = 1 if self.hidden else 1 + len(self.state_meta)
        objects = reply.objects if type(reply) is m.ObjectsReply and isinstance(reply.objects, list) else None
        if objects is None or len(objects) != wanted or not all(isinstance(t, torch.Tensor) for t in objects):
            raise RemoteExecutionError(f"the client's reply is not the {wanted} tensors asked for")
        loss_value(objects[0])
        if not self.hidden:
            check_state(objects[1:], self.state_meta)
        return objects

    # ------------------------------------------------------------ rounds

    def train_round(self, r: int, global_state: list, strategy: Strategy, deadline: float | None = None,
                    late: str = "") -> dict:
        """Runs round ``r``'s local training on every client; returns what the aggregation needs.

        ``deadline`` (``time.monotonic()``): past it, the clients that have not answered are dropped with
        ``late`` as their error (requests already sent still run on their clients; none more is sent)."""
        send_plan_to_all = not self.plan_sent
        resend, self.resend = self.resend, set()
        values = [t.detach() for t in global_state]
        extra = [g.detach() for g, tr in zip(global_state, self.trainable) if tr] if self.prox_mu else []
        stats = self.owner.stats

        def build(i: int) -> list:
            jobs = [self._plan_request(i)] if send_plan_to_all or i in resend else []
            jobs.append(self._round_request(i, values, extra, r))
            stats.messages += len(jobs)
            stats.bytes_sent += sum(len(j) for j in jobs)
            return jobs

        aggregator = None if self.hidden else strategy.aggregator(global_state)
        # (per client only for secure/encrypted aggregation, whose protocols address every survivor)
        out: dict = {"finished": 0, "ok": [], "means": {}, "dropped": {}, "loss_sum": 0.0, "samples": 0,
                     "aggregator": aggregator}
        answered = bytearray(len(self.pool)) if deadline is not None else None  # (one byte a client)
        replies = self.pool.exchange(build) if deadline is None else self.pool.exchange(build, deadline=deadline)
        for i, result in replies:
            if answered is not None:
                answered[i] = 1
            self._take(i, result, out, aggregator, 2 if send_plan_to_all or i in resend else 1)
            if deadline is not None and time.monotonic() > deadline:
                break  # (closes the exchange: nothing more is sent; what is in flight is not waited for)
        if answered is not None:
            for i in (k for k, seen in enumerate(answered) if not seen):  # (the exchange stopped at the deadline)
                out["dropped"][i] = late
                self.resend.add(i)  # (its plan may be missing or stale)
        self.plan_sent = True
        _warn_dropped(r, self.pool, out["dropped"])
        return out

    def _take(self, i: int, result: Any, out: dict, aggregator: Any, expected: int) -> None:
        """Client ``i``'s replies to this round (or the transport's exception): added to the round, or the
        client dropped."""
        if isinstance(result, BaseException):  # the transport could not reach the client
            out["dropped"][i] = error_text(result)
            self.resend.add(i)
            return
        try:
            self.owner.stats.bytes_received += sum(len(b) for b in result)
            objects = self._decode(result, expected)
            n = client_weight(self.pool.num_samples(i))
        except CLIENT_FAILURES as e:
            out["dropped"][i] = error_text(e)
            self.resend.add(i)
            return
        mean_loss = float(objects[0]) if objects else float("nan")  # (a real one-element tensor: _decode)
        if self.hidden:
            out["ok"].append(i)
            out["means"][i] = mean_loss
        else:
            aggregator.add(ClientUpdate(self.pool.client_id(i), [t.detach() for t in objects[1:]], n, mean_loss))
        out["finished"] += 1
        out["loss_sum"] += mean_loss * n
        out["samples"] += n

    def hidden_inputs(self, indices: list[int]) -> dict:
        """worker id -> (worker handle, state pointers, rows, losses pointer) of clients whose trained state
        stayed on them (secure or encrypted aggregation)."""
        out = {}
        for i in indices:
            _, state_ids, loss_id, _ = self._ids(i)
            worker, n = self.pool.worker(i), self.pool.num_samples(i)
            state = [PointerTensor(worker, sid, self.owner, shape, dtype, rg, garbage_collect_data=False)
                     for sid, (shape, dtype, rg) in zip(state_ids, self.state_meta)]
            n_batches = _batches(n, self.batch_size, self.local_epochs, self.steps_per_round)
            losses = None if self.client_metrics else PointerTensor(
                worker, loss_id, self.owner, (n_batches,), torch.float32, garbage_collect_data=False)
            out[self.pool.client_id(i)] = (worker, state, n, losses)
        return out

    def clean_up(self, seconds: float | None = None) -> None:
        """Frees what this training stored on the clients (plan, state, losses); with ``seconds`` (fl.train's
        round_seconds), waits no longer than that for clients still busy (their objects stay until their
        actor ends)."""
        if not self.plan_sent:
            return

        def build(i: int) -> list:
            plan_id, state_ids, loss_id, mean_id = self._ids(i)
            return [serialize(m.DeleteMessage([plan_id, *state_ids, loss_id, mean_id]), sender=self.owner.id)]

        if seconds is None:
            replies = self.pool.exchange(build)
        else:
            replies = self.pool.exchange(build, deadline=time.monotonic() + seconds)
        reached, failed = 0, 0
        for _, result in replies:
            reached += 1
            failed += isinstance(result, BaseException)
        failed += len(self.pool) - reached
        if failed:
            warnings.warn(f"could not free the training plan on {failed} clients (unreachable)", stacklevel=3)


def _batches(n: int, batch_size: int, epochs: int, max_batches: int | None) -> int:
    total = math.ceil(n / batch_size) * epochs
    return min(total, max_batches) if max_batches is not None else total


def _warn_dropped(r: int, pool: client_pool.ClientPool, dropped: dict) -> None:
    for k, i in enumerate(sorted(dropped)):
        error = dropped[i]
        if k == WARN_EACH:
            warnings.warn(f"round {r}: {len(dropped) - WARN_EACH} more clients dropped out (RoundRecord.errors "
                          "has every client's error)", stacklevel=5)
            break
        warnings.warn(f"round {r}: worker {pool.client_id(i)!r} dropped out ({error})", stacklevel=5)
