"""PySyft's ``sy.Protocol``: plans chained across workers.

``Protocol([("worker1", plan1), ("worker2", plan2)])`` names roles;
``deploy(alice, bob)`` sends each plan to the worker taking its role, and
``run(x)`` feeds ``x`` through the plans in order, moving each intermediate
result straight from one worker to the next. The caller holds only pointers.
"""

from __future__ import annotations

from typing import Any


class Protocol:
    """An ordered list of ``(role, plan)`` pairs."""

    def __init__(self, plans: list) -> None:
        if not plans or not all(isinstance(p, tuple) and len(p) == 2 for p in plans):
            raise ValueError("Protocol takes a list of (role name, plan) pairs")
        self.plans = list(plans)
        self.tags: tuple = ()
        self.description = ""
        self.deployed: list | None = None  # (worker, plan pointer) per step

    def tag(self, *tags: str) -> "Protocol":
        self.tags = tuple(dict.fromkeys(self.tags + tags))
        return self

    def describe(self, description: str) -> "Protocol":
        self.description = description
        return self

    def deploy(self, *workers: Any) -> "Protocol":
        """Assigns the workers to the roles (in order of first appearance) and sends each plan."""
        roles = list(dict.fromkeys(role for role, _ in self.plans))
        if len(workers) != len(roles):
            raise ValueError(f"this protocol has {len(roles)} roles {roles}; deploy() got {len(workers)} workers")
        by_role = dict(zip(roles, workers))
        self.deployed = [(by_role[role], plan.send(by_role[role])) for role, plan in self.plans]
        return self

    def run(self, *args: Any) -> Any:
        """Runs the chain; returns a pointer to the last plan's result (on the last worker)."""
        if self.deployed is None:
            raise RuntimeError("deploy the protocol first: protocol.deploy(*workers)")
        values = args
        for worker, plan_ptr in self.deployed:
            values = tuple(_to(v, worker) for v in values)
            out = plan_ptr(*values)
            values = out if isinstance(out, tuple) else (out,)
        return values[0] if len(values) == 1 else values

    def send(self, worker: Any) -> Any:
        raise NotImplementedError(
            "veil does not store protocols on workers (PySyft's protocol.send): keep the Protocol object and "
            "deploy() it; plans alone can be sent with plan.send(worker)"
        )

    def __repr__(self) -> str:
        steps = ", ".join(f"{role}: {getattr(plan, 'name', plan)}" for role, plan in self.plans)
        return f"<Protocol [{steps}]{' tags=' + ' '.join(self.tags) if self.tags else ''}>"


def _to(value: Any, worker: Any) -> Any:
    from veil.tensors.pointer import PointerTensor

    if isinstance(value, PointerTensor):
        return value if value.location is worker else value.move(worker)
    return value.send(worker) if hasattr(value, "send") else value
