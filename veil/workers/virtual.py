"""VirtualWorker: an in-process worker whose messages still cross the wire format."""

from __future__ import annotations

from veil.workers.base import BaseWorker


class VirtualWorker(BaseWorker):
    """A worker living in this Python process (simulations, tests, tutorials).

    Every request is serialized and deserialized exactly as for a network worker,
    so anything that works here exercises the same wire format and checks.
    """
