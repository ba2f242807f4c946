"""Plans: functions and models traced into op lists that a worker runs in one message.

- ``@sy.func2plan(args_shape=[(-1, 13)])`` traces a tensor function.
- ``sy.Plan(model)`` traces a module's forward pass with its parameters as state.
- ``sy.training_plan(model, loss_fn, lr)`` traces one forward/loss/backward/SGD
  step; ``plan_ptr.fit(data, target, batch_size, epochs)`` runs whole local
  epochs on the worker in a single message.

A plan travels as data (``PlanSpec``), never as code.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from veil.plans import batch, interpreter
from veil.plans.ops import PlanSpec
from veil.plans.trace import TraceTensor, show_warnings, trace
from veil.tensors.pointer import PointerTensor
from veil.tensors.tree import leaves


def _examples(args_shape: list, dtypes: list | None) -> tuple:
    dtypes = dtypes or [torch.float32] * len(args_shape)
    # -1 (any batch size) traces with 2 rows: batch statistics (std, var) are defined for 2.
    return tuple(torch.zeros([2 if d == -1 else d for d in shape], dtype=dt) for shape, dt in zip(args_shape, dtypes))


def _module_state(module: nn.Module) -> list[tuple[dict, str, torch.Tensor]]:
    from veil.module_api import _slots

    return _slots(module)


class Plan:
    """A traced computation. Build it (``plan.build(*examples)``), run it locally, or send it.

    Args:
        fn: a function of tensors (for ``func2plan``), or None with ``module``.
        module: an nn.Module whose forward is traced; its parameters/buffers are the state.
        args_shape: example input shapes (-1 = any batch size); builds at once.
        name: for messages and errors.
    """

    def __init__(self, fn: Callable[..., Any] | nn.Module | None = None, module: nn.Module | None = None,
                 args_shape: list | None = None, args_dtype: list | None = None, name: str | None = None,
                 step: Callable[..., Any] | None = None):
        if isinstance(fn, nn.Module):
            module, fn = fn, None
        self.fn = fn
        self.module = module
        self._step = step  # custom traced body (training plans): step(module_copy, *inputs)
        self._fixed_state: list[torch.Tensor] = []  # state of a plan fetched back with plan_ptr.get()
        # the inputs that carry the batch (args_shape's -1; None: every tensor with as many rows as the first)
        self._batched_inputs: tuple | None = None
        subclassed = fn is None and module is None and type(self).forward is not Plan.forward
        self.name = name or getattr(fn, "__name__", None) or type(module if not subclassed else self).__name__
        self.spec: PlanSpec | None = None
        self._compiled: interpreter.CompiledPlan | None = None
        if args_shape is not None:
            self._batched_inputs = tuple(i for i, shape in enumerate(args_shape) if list(shape[:1]) == [-1])
            self.build(*_examples(args_shape, args_dtype))

    # ------------------------------------------------------------- building

    @property
    def is_built(self) -> bool:
        return self.spec is not None

    def forward(self, *args: Any) -> Any:
        """Override in a subclass (PySyft's ``class Net(sy.Plan)``); layers set in ``__init__`` are the state."""
        raise NotImplementedError

    def parameters(self) -> list[torch.Tensor]:
        return [t for t in self.state_tensors() if t.requires_grad]

    def state_tensors(self) -> list[torch.Tensor]:
        self._adopt_subclass_layers()
        if self.module is None:
            return list(self._fixed_state)
        return [t for _, _, t in _module_state(self.module)]

    def _adopt_subclass_layers(self) -> None:
        # ``class Net(sy.Plan)``: the layers assigned in __init__ become a module whose forward is Net.forward.
        if self.module is None and self.fn is None and type(self).forward is not Plan.forward:
            self.module = _SubclassModule(self)

    @classmethod
    def from_spec(cls, spec: PlanSpec, state: list[torch.Tensor], name: str) -> "Plan":
        """A built plan from its op list and state values (``plan_ptr.get()``)."""
        plan = Plan(name=name)
        plan.spec, plan._compiled = spec, interpreter.compile_plan(spec)
        plan._fixed_state = list(state)
        return plan

    def build(self, *example_args: torch.Tensor, fixed_batch: bool = False) -> "Plan":
        """Traces the computation on the given example tensors; the plan then runs on any batch size
        (veil/plans/batch.py: traced again on one more row, sizes taken from the batch follow it), unless
        ``fixed_batch`` (it will only ever run on its example's batch size: traced once, as it is)."""
        self._adopt_subclass_layers()
        seen: dict = {}
        spec = self._trace(example_args, seen)
        # (a function that read no size cannot depend on the batch's: traced once, its body run once, as PySyft)
        rows = None if fixed_batch or not seen["sizes"] else batch.rows_of(example_args)
        if rows is not None and (self._batched_inputs is None or 0 in self._batched_inputs):
            try:  # (its ops' warnings are the first trace's, on one more row: shown once, from the first)
                again = self._trace(batch.second_examples(example_args, rows, self._batched_inputs), {})
            except Exception:  # noqa: BLE001 - it runs on its example's batch only: another fails at its shapes
                again = None
            if again is not None:
                spec = batch.merge(spec, again, (rows, rows + 1))
        show_warnings(seen["warnings"])  # (under the caller's filters: "error" fails the build, as eager would)
        self.spec = spec
        self._compiled = interpreter.compile_plan(self.spec)
        return self

    def _trace(self, example_args: tuple, seen: dict | None = None) -> PlanSpec:
        if self.module is None:
            return trace(self.fn, example_args, [], self.name, seen=seen)
        twin = copy.deepcopy(self.module)
        slots = _module_state(twin)
        state = [t.detach().clone().requires_grad_(t.requires_grad) for _, _, t in slots]

        def bind(wrapped: list[TraceTensor], *inputs: TraceTensor) -> Any:
            for (table, name, _), w in zip(slots, wrapped):
                table[name] = w
            body = self._step or (lambda m, *xs: m(*xs))
            return body(twin, *inputs)

        return trace(None, example_args, state, self.name, bind_state=bind, seen=seen)

    # ------------------------------------------------------------- running

    def __call__(self, *args: torch.Tensor) -> Any:
        if not self.is_built:
            self.build(*args)
        if leaves(args, PointerTensor):
            raise TypeError(f"plan {self.name!r} got pointers: send it first (plan.send(worker)) and call the pointer")
        return interpreter.run(self._compiled, list(args), self.state_tensors())

    def send(self, worker: Any) -> "Any":
        """Stores the plan and its state on ``worker``; returns a PlanPointer."""
        from veil.plans.remote import send_plan

        if not self.is_built:
            raise RuntimeError(f"plan {self.name!r} is not built: call plan.build(*example_args) first")
        return send_plan(self, worker)

    def __repr__(self) -> str:
        n = len(self.spec.ops) if self.spec else 0
        return f"<Plan {self.name} built={self.is_built} ops={n}>"


class _SubclassModule(nn.Module):
    """The layers of a ``sy.Plan`` subclass, as a module whose forward is the subclass's."""

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self._plan_forward = type(plan).forward
        for name, value in vars(plan).items():
            if isinstance(value, nn.Module):
                self.add_module(name, value)
            elif isinstance(value, nn.Parameter):
                self.register_parameter(name, value)

    def forward(self, *args: Any) -> Any:
        return self._plan_forward(self, *args)


class PlanState:
    """PySyft's plan ``state``: ``state.read()`` gives the state tensors inside the traced function."""

    def __init__(self, module: nn.Module) -> None:
        self._module = module

    def read(self) -> list[torch.Tensor]:
        return [self._module._buffers[f"s{i}"] for i in range(len(self._module._buffers))]


class _StateModule(nn.Module):
    """Holds ``func2plan(state=...)`` tensors as buffers, so plans trace them as state."""

    def __init__(self, fn: Callable[..., Any], state: tuple) -> None:
        super().__init__()
        self._fn = fn
        for i, t in enumerate(state):
            self.register_buffer(f"s{i}", t.detach().clone())

    def forward(self, *args: Any) -> Any:
        return self._fn(*args, PlanState(self))


def func2plan(args_shape: list | None = None, args_dtype: list | None = None,
              state: tuple | list | None = None) -> Callable[[Callable], Plan]:
    """Decorator: ``@sy.func2plan(args_shape=[(-1, 13)])`` turns a tensor function into a Plan.

    With ``state=(t1, t2)`` the function is called as ``fn(*args, state)`` and
    reads its tensors with ``state.read()`` (they travel with the plan).
    """

    def deco(fn: Callable[..., Any]) -> Plan:
        if state is not None:
            return Plan(_StateModule(fn, tuple(state)), args_shape=args_shape, args_dtype=args_dtype,
                        name=fn.__name__)
        return Plan(fn, args_shape=args_shape, args_dtype=args_dtype)

    return deco


def training_plan(model: nn.Module, loss_fn: Callable[..., torch.Tensor], lr: float,
                  args_shape: list | None = None, args_dtype: list | None = None, prox_mu: float = 0.0) -> Plan:
    """One SGD step as a plan: forward, loss, backward, ``p -= lr * p.grad``, clear grads.

    Inputs: ``(data, target)``, plus the global parameters when ``prox_mu > 0``
    (FedProx's proximal term mu/2 * ||w - w_global||^2). Output: the batch loss.
    """
    trainable = [t.requires_grad for _, _, t in _module_state(model)]

    def step(m: nn.Module, data: torch.Tensor, target: torch.Tensor, *global_params: torch.Tensor) -> torch.Tensor:
        state = [t for _, _, t in _module_state(m)]
        loss = loss_fn(m(data), target)
        if prox_mu:
            params = [s for s, tr in zip(state, trainable) if tr]
            prox = sum(((p - g) ** 2).sum() for p, g in zip(params, global_params))
            loss = loss + prox * (prox_mu / 2)
        loss.backward()
        with torch.no_grad():
            for s, tr in zip(state, trainable):
                if tr:
                    s.sub_(s.grad, alpha=lr)  # = SGD's add_(grad, alpha=-lr); no temporary
                    s.grad = None
        return loss.detach()

    plan = Plan(module=model, name=f"train_{type(model).__name__}", step=step)
    plan._batched_inputs = (0, 1)  # data and target (FedProx's global parameters are not batches)
    if args_shape is not None:
        examples = _examples(args_shape, args_dtype)
        if prox_mu:
            examples += tuple(t.detach().clone() for t, tr in zip(plan.state_tensors(), trainable) if tr)
        plan.build(*examples)
    return plan
