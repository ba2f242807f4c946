"""Federated training rounds: send weights, train remotely with a plan, aggregate.

Per round and client: load the global weights into the client's plan state (1
message), run ``local_epochs`` of the training plan over the client's data (1
message), then either fetch the new weights (1 message) or take part in secure
aggregation. A client that fails is dropped from the round with a warning; the
round goes on while at least ``min_workers`` clients succeed.

Two ways to reach the clients, same messages and results: one client at a time
through its worker handle (any ``FederatedDataset``: virtual, network or Ray
workers), or, when the dataset is a client pool's (``sy.ray.federated_clients(...)
.federated_dataset()``), many clients per transport call with a bounded number
in flight, aggregating as they report (``veil/federated/pooled.py``).
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from veil.federated import pooled, secure_agg
from veil.federated.client_pool import ClientIds
from veil.federated.pooled import client_seed
from veil.federated.dataset import FederatedDataset
from veil.federated.strategies import ClientUpdate, FedAvg, Strategy
from veil.plans import training_plan
from veil.plans.plan import _module_state


@dataclass
class RoundRecord:
    round: int
    clients: list
    train_loss: float
    eval_loss: float | None = None
    dropped: list = field(default_factory=list)
    errors: dict = field(default_factory=dict)  # dropped client -> why
    seconds: float = 0.0  # from the round's start to the new global state (evaluation excluded)


@dataclass
class TrainingHistory:
    rounds: list = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{'round':>5} {'clients':>7} {'train loss':>11} {'eval loss':>10} dropped"]
        for r in self.rounds:
            ev = f"{r.eval_loss:10.3f}" if r.eval_loss is not None else f"{'-':>10}"
            lines.append(f"{r.round:>5} {len(r.clients):>7} {r.train_loss:11.3f} {ev} {','.join(r.dropped) or '-'}")
        return "\n".join(lines)

    def plot(self, path: str, title: str = "federated training") -> str:
        import os

        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        xs = [r.round for r in self.rounds]
        ax.plot(xs, [r.train_loss for r in self.rounds], label="train (clients' mean)")
        if any(r.eval_loss is not None for r in self.rounds):
            ax.plot(xs, [r.eval_loss for r in self.rounds], label="evaluation")
        ax.set_xlabel("round")
        ax.set_ylabel("loss (log scale)")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _trainable(model: nn.Module) -> list[bool]:
    return [t.requires_grad for _, _, t in _module_state(model)]


def train(
    model: nn.Module,
    federated_dataset: FederatedDataset,
    rounds: int = 10,
    local_epochs: int = 1,
    lr: float = 0.01,
    batch_size: int = 8,
    loss_fn: Callable[..., torch.Tensor] = F.mse_loss,
    strategy: Strategy | None = None,
    secure_aggregation: bool = False,
    min_workers: int = 1,
    eval_data: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = True,
    steps_per_round: int | None = None,
    seed: int | None = None,
    encrypted_aggregation: Any = None,
    client_metrics: bool = False,
    review_wait: float = 0.0,
    round_seconds: float | None = None,
) -> TrainingHistory:
    """Federated training of ``model`` (updated in place) over the datasets' workers.

    Args:
        strategy: FedAvg (default) or FedProx(mu) or any Strategy.
        secure_aggregation: the coordinator sees only the weighted sum of the
            clients' weights (additive sharing between the clients).
        min_workers: fewest clients that must finish a round.
        eval_data: ``(x, y)`` evaluated locally with ``loss_fn`` after each round.
        steps_per_round: at most this many local batches per client and round
            (partial-epoch rounds: more frequent averaging for the same data budget).
        seed: makes the clients' shuffling reproducible (tests, benchmarks): client k of
            the dataset shuffles with ``client_seed(seed, round, k)`` on either dispatch path.
        encrypted_aggregation: a ``federated.he_agg.EncryptedAggregation``: clients
            encrypt their updates under the coordinator's key and commit to them, two
            randomly picked clients check the commitments (a client whose copy does
            not match is dropped) and add the ciphertexts, and the coordinator
            decrypts only the sum, and only when both sums are identical (else
            EncryptedAggregationError).
        client_metrics: with secure or encrypted aggregation, also fetch each
            client's mean loss in the clear (opt-in: it is a function of that
            client's data). Otherwise secure aggregation sums the losses masked,
            and with encrypted aggregation the round's train loss is NaN.
        review_wait: with secure aggregation over data under its owner's ``review``
            policy, seconds each round waits for the owners to approve the clients'
            updates (each masked input is a release); then ReviewPendingError.
        round_seconds: the most one round may take from its start: clients not yet asked to train
            by then are dropped (with a pool, those that have not answered: one request already sent
            still runs on its client), and the time left bounds the secure or encrypted aggregation
            (``secure_aggregate(round_seconds=)``, ``EncryptedAggregation.round_seconds``, whichever is
            shorter). None: no limit of its own.
    """
    if secure_aggregation and encrypted_aggregation is not None:
        raise ValueError("choose secure_aggregation or encrypted_aggregation, not both")
    if round_seconds is not None and not (type(round_seconds) in (int, float) and 0 < round_seconds < math.inf):
        raise ValueError("round_seconds must be a positive number of seconds (or None)")
    strategy = strategy or FedAvg()
    if getattr(strategy, "max_update_norm", None) is not None and (secure_aggregation or
                                                                   encrypted_aggregation is not None):
        raise ValueError("max_update_norm bounds each client's update, which secure and encrypted aggregation "
                         "keep from the coordinator (it sees only their sum): use one or the other")
    history = TrainingHistory()
    prox_mu = strategy.client_config(0).get("prox_mu", 0.0)
    pool = getattr(federated_dataset, "client_pool", None)
    if pool is not None:
        if not len(pool):
            raise ValueError("the client pool has no clients")
        x_tail, x_dtype, y_tail, y_dtype = pool.example()
    else:
        first = next(iter(federated_dataset.datasets.values()))
        x_tail, x_dtype = tuple(first.data.shape[1:]), first.data.dtype
        y_tail, y_dtype = tuple(first.targets.shape[1:]), first.targets.dtype
    plan = training_plan(model, loss_fn, lr, args_shape=[(-1, *x_tail), (-1, *y_tail)],
                         args_dtype=[x_dtype, y_dtype], prox_mu=prox_mu)
    global_state = [t.detach().clone() for t in plan.state_tensors()]
    trainable = _trainable(model)
    options = dict(batch_size=batch_size, local_epochs=local_epochs, steps_per_round=steps_per_round, seed=seed,
                   prox_mu=prox_mu, trainable=trainable, secure_aggregation=secure_aggregation,
                   encrypted_aggregation=encrypted_aggregation, client_metrics=client_metrics)
    if pool is not None:
        runner: Any = pooled.PooledTraining(pool, plan, pool_owner(pool), **options)
    else:
        runner = _Sequential(federated_dataset, plan, **options)
    runner.review_wait = float(review_wait)  # both runners: seconds a secure round waits for owners' reviews
    runner.round_seconds = round_seconds
    bar = tqdm(range(1, rounds + 1), desc=f"{strategy.name} rounds", unit="round", disable=not progress)
    try:
        for r in bar:
            start = time.perf_counter()
            if pool is not None:
                global_state, record = _pooled_round(runner, r, global_state, strategy, min_workers)
            else:
                global_state, record = runner.round(r, global_state, strategy, min_workers)
            record.seconds = time.perf_counter() - start
            record.eval_loss = _evaluate(model, global_state, eval_data, loss_fn)
            history.rounds.append(record)
            bar.set_postfix(train=f"{record.train_loss:.3f}",
                            eval=f"{record.eval_loss:.3f}" if record.eval_loss is not None else "-")
    finally:
        if pool is not None:
            runner.clean_up(round_seconds)
    _load(model, global_state)
    return history


def pool_owner(pool: Any) -> Any:
    """The coordinator's worker that sends a pool's requests (the one owning its pointers)."""
    hook = getattr(pool, "hook", None)
    if hook is None:
        from veil.workers.registry import default_hook_context

        hook = default_hook_context()
    return hook.local_worker


class _Sequential:
    """One client at a time through its worker handle (plan pointers kept between rounds)."""

    def __init__(self, federated_dataset: FederatedDataset, plan: Any, *, batch_size: int, local_epochs: int,
                 steps_per_round: int | None, seed: int | None, prox_mu: float, trainable: list[bool],
                 secure_aggregation: bool, encrypted_aggregation: Any, client_metrics: bool) -> None:
        self.federated_dataset, self.plan = federated_dataset, plan
        self.batch_size, self.local_epochs, self.steps_per_round, self.seed = \
            batch_size, local_epochs, steps_per_round, seed
        self.prox_mu, self.trainable = prox_mu, trainable
        self.secure, self.encrypted, self.client_metrics = secure_aggregation, encrypted_aggregation, client_metrics
        self.plans: dict[str, Any] = {}
        self.state_meta = [(tuple(t.shape), t.dtype, t.requires_grad) for t in plan.state_tensors()]

    def round(self, r: int, global_state: list, strategy: Strategy, min_workers: int) -> tuple[list, RoundRecord]:
        updates: list[ClientUpdate] = []
        done: dict[str, Any] = {}
        loss_ptrs: dict[str, Any] = {}
        dropped: list[str] = []
        errors: dict[str, str] = {}
        hidden = self.secure or self.encrypted is not None
        extra = [g for g, tr in zip(global_state, self.trainable) if tr] if self.prox_mu else []
        deadline = _deadline(self.round_seconds)
        for k, (wid, ds) in enumerate(self.federated_dataset.datasets.items()):
            if _past(deadline):  # (a stalling client holds the round no longer than round_seconds)
                errors[wid] = _late(self.round_seconds)
                dropped.append(wid)
                continue
            try:
                n = pooled.client_weight(len(ds))  # (a network client states its row count: checked first)
                if wid not in self.plans:
                    self.plans[wid] = self.plan.send(ds.location)
                pp = self.plans[wid]
                fit = dict(batch_size=self.batch_size, epochs=self.local_epochs, extra=extra,
                           max_batches=self.steps_per_round, seed=client_seed(self.seed, r, k))
                if not hidden:  # load, fit, mean loss and new state: one request
                    mean, state = pp.train_round(global_state, ds.data, ds.targets, **fit)
                    mean_loss = pooled.loss_value(mean)  # a malformed reply drops this client (VeilError)
                    pooled.check_state(state, self.state_meta)
                    updates.append(ClientUpdate(wid, state, n, mean_loss))
                    done[wid] = pp
                    continue
                pp.load_state(global_state)
                losses = pp.fit(ds.data, ds.targets, **fit)
                if not self.client_metrics:
                    # A client's own loss is not sent in the clear; secure aggregation sums it masked.
                    mean_loss, loss_ptrs[wid] = float("nan"), losses
                else:
                    mean_loss = pooled.loss_value(losses.mean().get()) if losses.shape[0] else float("nan")
                state = None
                updates.append(ClientUpdate(wid, state, n, mean_loss))
                done[wid] = pp
            except pooled.CLIENT_FAILURES as e:
                errors[wid] = pooled.error_text(e)  # (cut short: a client's error text is its to size)
                warnings.warn(f"round {r}: worker {wid!r} dropped out ({errors[wid]})", stacklevel=3)
                self.plans.pop(wid, None)
                dropped.append(wid)
        _weighed(r, updates)  # (before any protocol: an all-zero weight sum has nothing to average)
        secure_loss = None
        if self.secure and updates:
            inputs = {u.worker_id: secure_agg.ClientInput(done[u.worker_id].state[0].location, done[u.worker_id].state,
                                                          float(u.num_samples), loss_ptrs.get(u.worker_id))
                      for u in updates}
            updates, global_candidate, secure_loss = _secure_round(updates, inputs, dropped, r, self.review_wait,
                                                                       errors, deadline)
        elif self.encrypted is not None and updates:
            updates, global_candidate = _encrypted_round(self.encrypted, updates,
                                                         {u.worker_id: done[u.worker_id].state for u in updates},
                                                         dropped, errors, r, deadline)
            for wid in dropped:
                self.plans.pop(wid, None)  # (sent again next round, as after a failed training)
        else:
            global_candidate = None
        if len(updates) < min_workers:
            raise RuntimeError(_too_few(r, len(updates), min_workers, errors))
        _weighed(r, updates)  # (the survivors of a protocol round)
        if global_candidate is not None:
            global_state = strategy.apply_secure(global_candidate, global_state, len(updates))
        else:
            global_state = strategy.aggregate(updates, global_state)
        total = sum(u.num_samples for u in updates)
        train_loss = secure_loss if secure_loss is not None else \
            sum(u.mean_loss * u.num_samples for u in updates) / total
        return global_state, RoundRecord(r, [u.worker_id for u in updates], train_loss, None, dropped, errors)


def _pooled_round(runner: "pooled.PooledTraining", r: int, global_state: list, strategy: Strategy,
                  min_workers: int) -> tuple[list, RoundRecord]:
    """A round over a client pool: batched training, then FedAvg/FedProx as the updates arrive, or the
    secure/encrypted aggregation protocol over the clients that trained."""
    pool = runner.pool
    deadline = _deadline(runner.round_seconds)
    out = runner.train_round(r, global_state, strategy, deadline, _late(runner.round_seconds))
    dropped = [pool.client_id(i) for i in sorted(out["dropped"])]  # (dataset order, not completion order)
    errors = {pool.client_id(i): out["dropped"][i] for i in sorted(out["dropped"])}
    if out["finished"] < min_workers:
        raise RuntimeError(_too_few(r, out["finished"], min_workers, errors))
    if out["finished"] and not out["samples"]:
        raise RuntimeError(_no_samples(r, out["finished"]))
    if not runner.hidden:
        global_state = out["aggregator"].result()
        return global_state, RoundRecord(r, ClientIds(pool, out["dropped"]), out["loss_sum"] / out["samples"], None,
                                         dropped, errors)
    updates = [ClientUpdate(pool.client_id(i), None, pool.num_samples(i), out["means"][i]) for i in out["ok"]]
    held = runner.hidden_inputs(out["ok"])
    secure_loss = None
    if runner.secure:
        inputs = {wid: secure_agg.ClientInput(worker, state, float(n), losses)
                  for wid, (worker, state, n, losses) in held.items()}
        updates, candidate, secure_loss = _secure_round(updates, inputs, dropped, r, runner.review_wait, errors,
                                                        deadline)
    else:
        updates, candidate = _encrypted_round(runner.encrypted, updates, {wid: h[1] for wid, h in held.items()},
                                              dropped, errors, r, deadline)
        runner.resend.update(pool.index_of(wid) for wid in dropped)  # (as after a failed training)
    if len(updates) < min_workers:
        raise RuntimeError(_too_few(r, len(updates), min_workers, errors))
    _weighed(r, updates)  # (the survivors of the protocol round)
    global_state = strategy.apply_secure(candidate, global_state, len(updates))
    total = sum(u.num_samples for u in updates)
    train_loss = secure_loss if secure_loss is not None else sum(u.mean_loss * u.num_samples for u in updates) / total
    survivors = [u.worker_id for u in updates]
    return global_state, RoundRecord(r, survivors, train_loss, None, dropped, errors)


def _encrypted_round(encrypted_aggregation: Any, updates: list[ClientUpdate], states: dict, dropped: list,
                     errors: dict, r: int, deadline: float | None = None) -> tuple[list, list | None]:
    """Encrypted sum of the clients' n_k/N-weighted states; a client failing in it is dropped (the sum is
    renormalised over the survivors). Returns the surviving updates and their weighted average."""
    total = sum(u.num_samples for u in updates)
    candidate, failed = encrypted_aggregation.aggregate({u.worker_id: states[u.worker_id] for u in updates},
                                                        {u.worker_id: u.num_samples / total for u in updates},
                                                        started=len(updates) + len(dropped), deadline=deadline)
    for wid, why in failed.items():
        warnings.warn(f"round {r}: worker {wid!r} dropped out ({why})", stacklevel=4)
        dropped.append(wid)
        errors[wid] = why
    return [u for u in updates if u.worker_id not in failed], candidate


def _deadline(round_seconds: float | None) -> float | None:
    return None if round_seconds is None else time.monotonic() + round_seconds


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


def _late(round_seconds: float | None) -> str:
    return f"not asked to train: the round ran past round_seconds={round_seconds:g}" if round_seconds else ""


def _too_few(r: int, finished: int, min_workers: int, errors: dict) -> str:
    """The error of a round with fewer than ``min_workers`` clients left, naming one dropped client's reason."""
    text = f"round {r}: only {finished} workers finished, {min_workers} required"
    if errors:
        wid, why = next(reversed(errors.items()))
        text += f" ({len(errors)} dropped; {wid!r}: {why})"
    return text


def _no_samples(r: int, finished: int) -> str:
    return (f"round {r}: the {finished} clients that finished hold 0 samples in all: nothing to average (FedAvg "
            "weighs each client's update by its sample count)")


def _weighed(r: int, updates: list[ClientUpdate]) -> None:
    """Refuses a round whose clients hold no sample at all: their weights sum to 0, and a secure or encrypted
    round divided by it (ZeroDivisionError after the protocol ran, its average NaN)."""
    if updates and not sum(u.num_samples for u in updates):
        raise RuntimeError(_no_samples(r, len(updates)))


def _secure_round(updates: list[ClientUpdate], inputs: dict, dropped: list,
                  r: int, review_wait: float = 0.0, errors: dict | None = None,
                  deadline: float | None = None) -> tuple[list, list, float | None]:
    """Secure sum of n_k * state_k, n_k and n_k * loss_k (Bonawitz et al. 2017, with dropout recovery).

    Clients that die at any protocol stage are dropped; the survivors'
    weighted average is recovered without any state leaving a client in the clear.
    """
    try:
        # (the time left of the round; secure_aggregate's own default limit without one)
        limit = {} if deadline is None else {"round_seconds": max(deadline - time.monotonic(), 1e-3)}
        result = secure_agg.secure_aggregate(inputs, secrets.randbits(62), review_wait=review_wait, **limit)
    except secure_agg.SecureAggregationError as e:
        warnings.warn(f"round {r}: secure aggregation failed ({e})", stacklevel=4)
        dropped.extend(u.worker_id for u in updates)
        if errors is not None:
            errors.update((u.worker_id, f"secure aggregation failed: {pooled.error_text(e)}") for u in updates)
        return [], [], None
    if result.dropped:
        dropped.extend(result.dropped)
        if errors is not None:
            errors.update((wid, "dropped out during secure aggregation") for wid in result.dropped)
        warnings.warn(f"round {r}: secure aggregation completed without {result.dropped}", stacklevel=4)
    survivors = [u for u in updates if u.worker_id in result.survivors]
    mean_loss = result.mean_loss if all(inputs[u.worker_id].losses is not None for u in survivors) else None
    return survivors, result.average(), mean_loss


def _load(model: nn.Module, state: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for (_, _, t), v in zip(_module_state(model), state):
            t.copy_(v)


def _evaluate(model: nn.Module, state: list, eval_data: Any, loss_fn: Callable) -> float | None:
    if eval_data is None:
        return None
    _load(model, state)
    with torch.no_grad():
        return float(loss_fn(model(eval_data[0]), eval_data[1]))
