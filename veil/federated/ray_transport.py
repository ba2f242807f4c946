"""Ray as the federated clients' transport: connecting to a Ray (:func:`init`, :func:`shutdown`) and the
coordinator's handle on one client hosted in an actor (:class:`RayClientWorker`: a veil request is one Ray call,
and Ray's failures are one-line ConnectionLostErrors). The clients and their actors:
:mod:`veil.federated.ray_backend`.

Ray itself: with no address, a small local Ray starts embedded in this process
(``num_cpus`` = the machine's cores, no dashboard, a small object store). With
``address=`` or ``$VEIL_RAY_ADDRESS`` (``ray start --head`` elsewhere) the actors
go to that cluster; see docs/scaling.md. Ray's own transport pickles its call
arguments: it is the simulation's trusted cluster fabric, while what a client
executes is decided only by the veil message it decodes and checks.
"""

from __future__ import annotations

import os
from typing import Any

from veil.exceptions import ConnectionLostError
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
        try:  # submitting to an actor of a Ray since shut down raises a bare Exception ("Can't find actor")
            ref = self.actor.recv.remote(self.id, data)
        except Exception as e:  # noqa: BLE001 - any submit failure means the client is gone
            raise ConnectionLostError(f"client {self.id!r} (Ray actor) is gone: {_first_line(e)}") from None
        try:
            return ray.get(ref, timeout=self.timeout)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError,
                ray.exceptions.GetTimeoutError) as e:  # (Ray's text is a traceback: its last line is kept)
            raise ConnectionLostError(f"client {self.id!r} (Ray actor) failed: {type(e).__name__}: "
                                      f"{_first_line(e)}") from None

    def __repr__(self) -> str:
        return f"<RayClientWorker id:{self.id}>"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else ""
