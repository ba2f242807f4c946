"""The data scientist's side of owner-side DP on workers: training, queries, budgets.

The model's architecture travels as a plan (``sy.Plan(model)``: a traced,
allowlist-checked op list, never code) and is stored on each worker once;
every step then sends only the current parameter values and receives one
sanitized gradient. The loss is named from :data:`veil.dp.plan_grads.LOSSES`.

Example::

    owners = [RemoteDPOwner(w, "boston", model, loss="mse", example=x[:2]) for w in workers]
    result = train_federated_dp(model, owners, "mse", steps=500, sample_rate=0.04,
                                optimizer=torch.optim.SGD(model.parameters(), lr=0.05), delta=1e-5)
"""

from __future__ import annotations

import secrets
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from veil.dp.federated import FederatedDPResult, train_federated_dp
from veil.dp.queries import DPResult
from veil.ids import new_id
from veil.messaging.allowlist import ALLOWLIST
from veil.messaging.messages import ObjectMessage, StoredObject
from veil.plans.plan import Plan, _module_state
from veil.tensors import remote_ops
from veil.tensors.handle import RemoteHandle, fetch_all
from veil.tensors.pointer import PointerTensor


def _request_id() -> str:
    """A fresh id per release: the owner's ledger charges and answers each id once (replays are refused)."""
    return secrets.token_hex(16)


def _fetch(pointers: Sequence[PointerTensor]) -> list[torch.Tensor]:
    """Values of several pointers to one worker in one round trip (freed there)."""
    return fetch_all(pointers, delete=True)


class RemoteDPOwner(RemoteHandle):
    """A worker-backed data owner for :func:`veil.dp.train_federated_dp`.

    Args:
        worker: the owner's worker (``VirtualWorker`` or ``WebsocketClientWorker``);
            its owner must have called ``enable_dp`` for ``dataset``.
        dataset: the dataset name the owner opened to DP training.
        model: the model to train; its forward pass is traced into a plan and
            stored on the worker (its parameter values are sent at every step).
        example: an example input batch for tracing (values are not sent).
        loss: a loss name the worker computes (``"mse"``, ``"cross_entropy"``, ...).

    A :class:`~veil.tensors.handle.RemoteHandle` to the stored forward plan: never fetched (values leave
    only through DP releases); its pointer-shaped stand-in ``_plan`` frees it.
    """

    HANDLE_KIND = "dp"

    def __init__(self, worker: Any, dataset: str, model: nn.Module, example: torch.Tensor, loss: str = "mse") -> None:
        self.worker, self.dataset, self.loss = worker, dataset, loss
        # Traced on one record: the worker runs the plan on one record at a time, so a size taken from the
        # batch while tracing (torch.zeros(x.shape[0], 1)) must be that of one record.
        plan = Plan(model, name=f"dp_{type(model).__name__}").build(example[:1], fixed_batch=True)
        owner = worker.hook.local_worker
        plan_id = new_id()
        owner.send_msg(ObjectMessage([StoredObject(plan_id, plan.spec)]), worker)
        self._init_handle(worker, plan_id, owner, garbage_collect_data=False)
        # A pointer-shaped handle, so the plan can be named in commands (freed with this object).
        self._plan = PointerTensor(worker, plan_id, owner, (), torch.float32)

    def sanitized_gradient(self, model: nn.Module, params: Any, loss_fn: Any, sample_rate: float,
                           noise_multiplier: Optional[float] = None) -> dict[str, torch.Tensor]:
        """One owner-side DP-SGD release for ``model``'s current parameters.

        ``params`` and ``loss_fn`` are accepted for :func:`train_federated_dp`'s
        interface; the values sent are ``model``'s state, the loss is ``self.loss``.

        Raises:
            NoiseTooLowError: ``noise_multiplier`` is below the owner's.
            BudgetExceededError: the requesting user's budget on this worker is spent.
        """
        state = [t for _, _, t in _module_state(model)]
        trainable = [bool(t.requires_grad) for t in state]
        ptr = remote_ops.call(
            ALLOWLIST.by_name("veil.dp.sanitized_gradient"),
            (self._plan, self.dataset, [t.detach() for t in state], trainable, self.loss, float(sample_rate),
             None if noise_multiplier is None else float(noise_multiplier), _request_id()),
            {}, location=self.worker)
        flat = ptr.get()
        names = {id(p): n for n, p in model.named_parameters()}
        grads, offset = {}, 0
        for t, tr in zip(state, trainable):
            if tr:
                grads[names[id(t)]] = flat[offset:offset + t.numel()].view_as(t).to(t.dtype)
                offset += t.numel()
        return grads

    def epsilon(self, delta: float) -> float:
        """Epsilon the requesting user has spent on this worker (all releases, the owner's ledger)."""
        return remaining_budget(self.worker, spent=True)[0]


def train_remote_dp(model: nn.Module, workers: Sequence[Any], dataset: str, example: torch.Tensor, *,
                    loss: str = "mse", steps: int, sample_rate: float, optimizer: torch.optim.Optimizer,
                    delta: float = 1e-5, noise_multiplier: Optional[float] = None,
                    generator: Optional[torch.Generator] = None,
                    progress: Optional[Callable[[int], None]] = None) -> FederatedDPResult:
    """Federated DP-SGD over workers whose owners sanitize: one random worker per step.

    Workers refusing with ``BudgetExceededError`` are not asked again;
    ``result.epsilons`` are the user's spends on each worker's ledger.
    """
    owners = [RemoteDPOwner(w, dataset, model, example, loss) for w in workers]
    return train_federated_dp(model, owners, loss, steps=steps, sample_rate=sample_rate, optimizer=optimizer,
                              delta=delta, noise_multiplier=noise_multiplier, generator=generator,
                              progress=progress)


def remote_query(ptr: PointerTensor, name: str, epsilon: float, delta: float = 0.0, mechanism: str = "laplace",
                 bounds: Optional[tuple[float, float]] = None, bins: Optional[int] = None) -> DPResult:
    """A DP count / sum / mean / histogram of the tensor ``ptr`` points to, computed by its worker.

    The worker clips to ``bounds``, adds noise and charges (epsilon, delta) to
    the requesting user's budget before answering; only the noisy value comes back.

    Raises:
        BudgetExceededError: the user's budget on that worker cannot pay for it.
    """
    lower, upper = bounds if bounds is not None else (None, None)
    value, cost = remote_ops.call(
        ALLOWLIST.by_name("veil.dp.query"),
        (ptr, name, float(epsilon), float(delta), mechanism,
         None if lower is None else float(lower), None if upper is None else float(upper), bins, _request_id()), {})
    value, cost = _fetch([value, cost])
    return DPResult(value, float(cost[0]), float(cost[1]), mechanism, float(cost[2]))


def remaining_budget(worker: Any, spent: bool = False) -> tuple[float, float]:
    """The requesting user's unspent (or, with ``spent=True``, spent) (epsilon, delta) on ``worker``."""
    values = remote_ops.call(ALLOWLIST.by_name("veil.dp.budget"), (), {}, location=worker).get()
    return (float(values[2]), float(values[3])) if spent else (float(values[0]), float(values[1]))
