"""The one per-sample gradient engine: every record differentiated alone, with ``torch.func``.

Local DP-SGD (:class:`GradSampleModule`), federated owner-side DP
(:class:`veil.dp.DPDataOwner`) and the worker's DP releases
(:mod:`veil.dp.plan_grads`, over a plan) all call :func:`record_gradients`:
the gradient of a *per-record* scalar function, where each record is run
through the model as a batch of one. Whatever the model does (a custom
layer, an op that averages over the batch), one record's gradient cannot
depend on another record, which is what the clipping bound and so the
privacy proof need; no per-layer rules exist to get wrong.

Two strategies compute the same numbers:

- ``"vmap"``: ``torch.func.vmap(torch.func.grad(f))``, all records at once.
- ``"loop"``: plain autograd, record by record. Used where an op has no vmap
  batching rule (recurrent layers' fused kernels) and for small lots, where
  it is faster on CPU.

The strategy is chosen from the model and the lot *size* (:func:`choose_strategy`,
a dry run on a dummy record), never from the data: whether a record's
gradient is NaN/inf or its forward pass fails changes neither the path nor the
amount of work (see :func:`record_gradients`).

Local training keeps the usual loop (``loss = criterion(model(x), y);
loss.backward()``). :class:`GradSampleModule`'s forward runs the records
alone under vmap; the backward receives each record's output gradient and
re-runs the per-record function under ``vmap(grad)``, which costs one extra
forward pass. Passing the criterion to :class:`GradSampleModule` (or to
``PrivacyEngine.make_private``) fuses loss and per-record gradients into one
``vmap(grad_and_value)`` and saves that forward pass (see :class:`DPLoss`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
from torch.func import grad, grad_and_value, vmap

from veil.dp.errors import BatchNormNotPrivateError, PrivacyParameterError

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

#: Lots up to this size are differentiated record by record (faster than vmap on CPU for them).
LOOP_MAX = 32

# A per-record scalar: (params tuple, *one record's arguments without batch dim) -> scalar tensor.
RecordFn = Callable[..., torch.Tensor]


# -- the engine ---------------------------------------------------------------------------------

def _vmap_grads(fn: RecordFn, params: tuple, batched: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    in_dims = (None,) + (0,) * len(batched)
    return list(vmap(grad(fn), in_dims=in_dims, randomness="different")(params, *batched))


def _loop_record(fn: RecordFn, leaves: list[torch.Tensor], record: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out = fn(tuple(leaves), *record)
    res = torch.autograd.grad(out, leaves, allow_unused=True)
    return [torch.zeros_like(p) if r is None else r for r, p in zip(res, leaves)]


def _loop_grads(fn: RecordFn, params: tuple, batched: Sequence[torch.Tensor], strict: bool,
                dummy: Optional[Sequence[torch.Tensor]], on_failure: Optional[Callable[[BaseException], None]]
                ) -> list[torch.Tensor]:
    leaves = [p.detach().requires_grad_(True) for p in params]
    rows = []
    for i in range(len(batched[0])):
        record, ok = [a[i] for a in batched], True
        try:
            row = _loop_record(fn, leaves, record)
        except PrivacyParameterError:
            raise  # about the plan's structure (checked on the dummy input too), not the data
        except Exception as e:  # noqa: BLE001 - any failure on a record is handled the same way
            if strict or dummy is None:
                raise
            if on_failure is not None:
                on_failure(e)
            # The failed record then runs a normal one's forward and backward, on the
            # dummy record (known to succeed), zeroed below: its failed attempt comes on
            # top, so a lot's time grows with its failing records (on data whose count
            # is hidden, plans whose ops may raise on values are refused: worker_functions).
            row, ok = _loop_record(fn, leaves, dummy), False
        keep = torch.tensor(ok)  # the same ops for every record: only this flag differs
        rows.append([torch.where(keep, g, torch.zeros_like(g)) for g in row])
    return [torch.stack([r[k] for r in rows]) for k in range(len(params))]


def record_gradients(fn: RecordFn, params: Sequence[torch.Tensor], batched: Sequence[torch.Tensor], *,
                     strategy: str, strict: bool = False, dummy: Optional[Sequence[torch.Tensor]] = None,
                     on_failure: Optional[Callable[[BaseException], None]] = None) -> list[torch.Tensor]:
    """Per-record gradients of ``fn(params, *record)`` w.r.t. ``params``: one ``[B, *p.shape]`` each.

    Args:
        fn: the per-record scalar; ``record`` is one slice of each ``batched`` tensor.
        batched: tensors whose first dimension indexes the records.
        strategy: ``"vmap"`` or ``"loop"`` (from :func:`choose_strategy`).
        strict: re-raise a record's failure (the dry run on a dummy record).
        dummy: one record (arguments without batch dim) known to succeed. In the
            loop, a record whose forward or backward raises is recomputed on it
            and contributes zeros: a normal record's work after its failed partial
            attempt (more time per failing record). Without ``dummy`` failures raise.
        on_failure: told about each failure (the owner's log; never the requester).

    NaN/inf gradients are returned as they are; :func:`veil.dp.core.clip_and_sum`
    replaces them with ``torch.where`` in the same pass for every record.
    """
    params = tuple(p.detach() for p in params)
    if len(batched[0]) == 0:
        return [p.new_zeros((0, *p.shape)) for p in params]
    # The worker runs commands under the caller's grad mode; gradients need it on.
    with torch.enable_grad():
        if strategy == "vmap":
            try:
                return _vmap_grads(fn, params, batched)
            except PrivacyParameterError:
                raise
            except Exception:  # noqa: BLE001
                if strict or dummy is None:
                    raise
                # Some record raised (vmap cannot tell which): redo the lot record by
                # record, so the release still treats each record alone. This costs
                # more time than a clean lot (the one data-dependent timing left; the
                # loop strategy, used for lots <= LOOP_MAX, has none).
                return _loop_grads(fn, params, batched, strict, dummy, on_failure)
        if strategy == "loop":
            return _loop_grads(fn, params, batched, strict, dummy, on_failure)
    raise ValueError(f"unknown per-sample strategy {strategy!r}")


def choose_strategy(fn: RecordFn, params: Sequence[torch.Tensor], dummy: Sequence[torch.Tensor],
                    lot_size: Optional[int] = None) -> str:
    """``"loop"`` for small lots or models vmap cannot batch, else ``"vmap"``.

    Decided on two copies of a dummy record (public shape, zeros), so the
    choice never depends on a protected value.
    """
    if lot_size is not None and lot_size <= LOOP_MAX:
        return "loop"
    pair = [d.unsqueeze(0).expand(2, *d.shape) for d in dummy]
    try:
        with torch.enable_grad():
            _vmap_grads(fn, tuple(p.detach() for p in params), pair)
    except PrivacyParameterError:
        raise
    except Exception:  # noqa: BLE001 - no batching rule for some op: record by record
        return "loop"
    return "vmap"


# -- models ---------------------------------------------------------------------------------------

def validate(module: nn.Module) -> None:
    """Raises if the model cannot be trained with per-sample gradients.

    Any layer works (every record runs alone through the model), except
    BatchNorm: in training mode it needs the statistics of a batch and
    updates running buffers from the data, neither of which a record alone has.

    Raises:
        BatchNormNotPrivateError: the model contains BatchNorm.
    """
    for name, sub in module.named_modules():
        if isinstance(sub, _BATCHNORMS):
            raise BatchNormNotPrivateError(
                f"layer {name or type(sub).__name__!r} is {type(sub).__name__}, which mixes the samples of a "
                "batch, so per-sample gradients (and DP-SGD's guarantee) do not exist. Replace it with "
                "GroupNorm: `model = veil.dp.fix_module(model)`."
            )


def fix_module(module: nn.Module, max_groups: int = 32) -> nn.Module:
    """Replaces every BatchNorm with a GroupNorm over the same channels, in place.

    The number of groups is the largest divisor of the channel count that is
    at most ``max_groups`` (GroupNorm needs it to divide the channels).

    Returns:
        The same module (for chaining).
    """
    for name, child in list(module.named_children()):
        if isinstance(child, _BATCHNORMS):
            c = child.num_features
            groups = max(d for d in range(1, min(c, max_groups) + 1) if c % d == 0)
            setattr(module, name, nn.GroupNorm(groups, c, eps=child.eps, affine=child.affine))
        else:
            fix_module(child, max_groups)
    return module


def _parameter_slots(module: nn.Module, names: Sequence[str]) -> list[list[tuple[nn.Module, str]]]:
    """For each named parameter, every (submodule, attribute) that holds it (shared layers hold one twice)."""
    by_id = {id(p): i for i, (n, p) in enumerate(module.named_parameters()) if n in names}
    order = {n: i for i, n in enumerate(names)}
    slots: list[list[tuple[nn.Module, str]]] = [[] for _ in names]
    seen = set()
    for full, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in by_id:
            continue
        owner_name, _, attr = full.rpartition(".")
        owner = module.get_submodule(owner_name)
        if (id(owner), attr) in seen:
            continue
        seen.add((id(owner), attr))
        name = next(n for n, q in module.named_parameters() if q is p)
        slots[order[name]].append((owner, attr))
    return slots


def module_record_fn(module: nn.Module, names: Sequence[str], batch_dim: int = 0,
                     output_batch_dim: int = 0) -> Callable[..., torch.Tensor]:
    """``(params, *one record's inputs) -> one record's output``, the record run as a batch of one.

    The parameters are swapped into the module for the call (``torch.func.functional_call``
    restores a layer used twice wrongly, so veil swaps by (submodule, attribute) itself).
    """
    slots = _parameter_slots(module, names)

    def forward(params: tuple, *record: torch.Tensor) -> torch.Tensor:
        saved = []
        try:
            for where, value in zip(slots, params):
                for owner, attr in where:
                    saved.append((owner, attr, owner._parameters[attr]))
                    owner._parameters[attr] = value
            out = module(*(r.unsqueeze(batch_dim) for r in record))
        finally:
            for owner, attr, original in reversed(saved):
                owner._parameters[attr] = original
        if not isinstance(out, torch.Tensor):
            raise PrivacyParameterError("a private model must return one tensor (reduce tuple outputs inside it)")
        return out.squeeze(output_batch_dim)

    return forward


class _PerRecordOutput(torch.autograd.Function):
    """Forward: each record alone. Backward: each record's gradient, from its output gradient."""

    @staticmethod
    def forward(ctx, gsm: "GradSampleModule", n_inputs: int, *tensors: torch.Tensor) -> torch.Tensor:
        inputs, params = tensors[:n_inputs], tensors[n_inputs:]
        ctx.gsm, ctx.n_inputs = gsm, n_inputs
        ctx.rng = torch.get_rng_state()  # the backward replays dropout masks exactly
        ctx.save_for_backward(*inputs)
        ctx.params = params
        with torch.no_grad():
            return gsm._batched_forward(params, inputs)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gsm, inputs = ctx.gsm, ctx.saved_tensors
        gb = grad_out.movedim(gsm.output_batch_dim, 0) if grad_out.dim() else grad_out
        forward = gsm._record_fn

        def scalar(params: tuple, g: torch.Tensor, *record: torch.Tensor) -> torch.Tensor:
            return (forward(params, *record) * g).sum()

        batched = [gb] + [x.movedim(gsm.batch_dim, 0) for x in inputs]
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(ctx.rng)
            per_sample = record_gradients(scalar, ctx.params, batched, strategy=gsm._strategy(inputs))
        gsm._set_grad_samples(per_sample)
        return (None, None, *([None] * ctx.n_inputs), *(g.sum(0) for g in per_sample))


class DPLoss:
    """A criterion fused with the per-record gradients: ``vmap(grad_and_value)`` in one pass.

    ``loss = dp_criterion(model(x), y); loss.backward()`` as with any
    criterion, where ``model`` is the :class:`GradSampleModule` it came from
    (its forward then returns a :class:`PendingOutput`). Saves the second
    forward pass of the unfused path. ``criterion(output [1, ...], target
    [1, ...])`` must reduce one record to a scalar (``nn.CrossEntropyLoss()``,
    ``nn.MSELoss()``, ...); its batch mean or sum follows ``reduction``.
    ``backward`` leaves ``.grad`` alone and sets ``.grad_sample`` (for the
    :class:`veil.dp.DPOptimizer`, which builds ``.grad`` from it).
    """

    def __init__(self, gsm: "GradSampleModule", criterion: Callable, reduction: str = "mean") -> None:
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.gsm, self.criterion, self.reduction = gsm, criterion, reduction

    def __call__(self, output: "PendingOutput", target: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, PendingOutput):
            raise TypeError("a DPLoss takes the output of its GradSampleModule (model(x)), not a tensor")
        gsm, forward, crit = self.gsm, self.gsm._record_fn, self.criterion

        def scalar(params: tuple, y: torch.Tensor, *record: torch.Tensor) -> torch.Tensor:
            out = forward(params, *record)
            return crit(out.unsqueeze(gsm.output_batch_dim), y.unsqueeze(0))

        params = tuple(p.detach() for p in gsm.trainable_parameters())
        inputs = [x.movedim(gsm.batch_dim, 0) for x in output.inputs]
        b = len(target)
        if b == 0:
            per_sample, losses = [p.new_zeros((0, *p.shape)) for p in params], torch.zeros(0)
        else:
            with torch.enable_grad():
                fused = vmap(grad_and_value(scalar), in_dims=(None, 0) + (0,) * len(inputs), randomness="different")
                per_sample, losses = fused(params, target, *inputs)
            per_sample = list(per_sample)
        gsm._set_grad_samples(per_sample)  # gradients of each record's own loss (no 1/B factor)
        scale = 1.0 / max(b, 1) if self.reduction == "mean" else 1.0
        value = losses.sum() * scale if b else torch.zeros(())
        return _FusedLoss.apply(value.detach(), scale, per_sample, *gsm.trainable_parameters())


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: torch.Tensor, scale: float, per_sample: list, *params: torch.Tensor) -> torch.Tensor:
        ctx.scale, ctx.per_sample = scale, per_sample
        return value.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        # No summed .grad: the DPOptimizer builds .grad from grad_sample (summing
        # the per-sample gradients here would be a wasted pass over them).
        return (None, None, None, *(None for _ in ctx.per_sample))


class PendingOutput:
    """What a :class:`GradSampleModule` with a criterion returns: the inputs, for its :class:`DPLoss`.

    The model's output is computed inside the fused loss. ``.materialize()``
    runs the forward pass without gradients, for looking at predictions.
    """

    def __init__(self, gsm: "GradSampleModule", inputs: tuple) -> None:
        self.gsm, self.inputs = gsm, inputs

    def materialize(self) -> torch.Tensor:
        with torch.no_grad():
            return self.gsm._module(*self.inputs)


class GradSampleModule(nn.Module):
    """A model wrapper whose backward pass also yields per-sample gradients (``param.grad_sample``).

    Args:
        module: the model; validated with :func:`validate` (no BatchNorm).
        loss_reduction: ``"mean"`` if the loss averages over the batch (the
            per-sample gradients are then rescaled by the batch size so that
            each is the gradient of that sample's own loss) or ``"sum"``.
        batch_dim: the batch dimension of the inputs (1 for sequence-first
            recurrent models); ``output_batch_dim`` the one of the output.
        criterion: fuse this per-record criterion with the gradients; the
            forward then returns a :class:`PendingOutput` for :attr:`dp_loss`.
    """

    def __init__(self, module: nn.Module, loss_reduction: str = "mean", batch_dim: int = 0,
                 output_batch_dim: int = 0, criterion: Optional[Callable] = None) -> None:
        super().__init__()
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        validate(module)
        self._module = module
        self.loss_reduction = loss_reduction
        self.batch_dim, self.output_batch_dim = batch_dim, output_batch_dim
        self._names = [n for n, p in module.named_parameters() if p.requires_grad]
        self._record_fn = module_record_fn(module, self._names, batch_dim, output_batch_dim)
        self._strategies: dict[tuple, str] = {}
        self.dp_loss = None if criterion is None else DPLoss(self, criterion, loss_reduction)

    def forward(self, *inputs: Any):
        if not all(isinstance(x, torch.Tensor) for x in inputs):
            raise TypeError("a GradSampleModule takes tensor inputs (batched along batch_dim)")
        if self.dp_loss is not None and torch.is_grad_enabled():
            return PendingOutput(self, inputs)
        params = tuple(self.trainable_parameters())
        if not torch.is_grad_enabled() or not params:
            return self._module(*inputs)
        return _PerRecordOutput.apply(self, len(inputs), *inputs, *params)

    @property
    def module(self) -> nn.Module:
        """The wrapped model."""
        return self._module

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that receive per-sample gradients."""
        return (p for p in self._module.parameters() if p.requires_grad)

    def zero_grad_sample(self) -> None:
        """Forgets per-sample gradients (call between steps)."""
        for p in self._module.parameters():
            p.grad_sample = None

    def remove_hooks(self) -> None:
        """Kept for compatibility: this engine installs no hooks."""

    # -- engine plumbing ---------------------------------------------------------------------------
    def _strategy(self, inputs: Sequence[torch.Tensor]) -> str:
        shapes = tuple((tuple(x.shape[:self.batch_dim] + x.shape[self.batch_dim + 1:]), x.dtype) for x in inputs)
        if shapes not in self._strategies:
            dummy = [torch.zeros(s, dtype=d) for s, d in shapes]
            params = tuple(self.trainable_parameters())
            # Decided once per record shape on a dummy record; the output gradient is a dummy too.
            probe = lambda p, *rec: self._record_fn(p, *rec).sum()  # noqa: E731
            strategy = choose_strategy(probe, params, dummy)
            if strategy == "vmap":  # the no-grad forward may take other kernels (LSTM does)
                try:
                    pair = [d.unsqueeze(0).expand(2, *d.shape) for d in dummy]
                    with torch.no_grad():
                        vmap(self._record_fn, in_dims=(None,) + (0,) * len(pair), randomness="different")(params, *pair)
                except Exception:  # noqa: BLE001
                    strategy = "loop"
            self._strategies[shapes] = strategy
        return self._strategies[shapes]

    def _batched_forward(self, params: tuple, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Each record alone (so the output cannot mix records), all at once when vmap can."""
        moved = [x.movedim(self.batch_dim, 0) for x in inputs]
        if len(moved[0]) == 0:
            return self._module(*inputs)
        if self._strategy(inputs) == "vmap":
            out = vmap(self._record_fn, in_dims=(None,) + (0,) * len(moved), randomness="different")(params, *moved)
        else:
            out = torch.stack([self._record_fn(params, *(x[i] for x in moved)) for i in range(len(moved[0]))])
        return out.movedim(0, self.output_batch_dim) if out.dim() else out

    def _set_grad_samples(self, per_sample: Sequence[torch.Tensor]) -> None:
        for p, gs in zip(self.trainable_parameters(), per_sample):
            if self.loss_reduction == "mean" and self.dp_loss is None:
                gs = gs * gs.shape[0]  # the output gradient carried the 1/B of the mean
            prev = getattr(p, "grad_sample", None)
            # Several forward/backward passes before a step add up, as .grad does.
            p.grad_sample = gs if prev is None or prev.shape != gs.shape else prev + gs
