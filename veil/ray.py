"""``sy.ray``: federated clients in Ray actors (see :mod:`veil.federated.ray_backend`)."""

from veil.federated.ray_backend import ClientHost, RayClients, federated_clients
from veil.federated.ray_transport import RayClientWorker, init, shutdown

__all__ = ["ClientHost", "RayClients", "RayClientWorker", "federated_clients", "init", "shutdown"]
