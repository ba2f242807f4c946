"""Unguessable object ids.

Ids are 64 random bits from the OS CSPRNG, carried as msgpack unsigned
integers. They cannot be enumerated by a client, so knowing an id is the
capability to use the object.

Training loops allocate two ids per remote op; one ``os.urandom`` call per id
cost ~1-2 us, so ids are drawn 512 at a time from one call (the same source,
read in bulk). The pool is emptied in a forked child, so parent and child never
hand out the same ids.
"""

import os
import struct

ID_BITS = 64
_BATCH = 512
_UNPACK = struct.Struct(f"<{_BATCH}Q").unpack
_pool: list[int] = []


def _refill() -> None:
    _pool.extend(v for v in _UNPACK(os.urandom(8 * _BATCH)) if v)


def new_id() -> int:
    """A fresh random object id (never 0, which is reserved as 'no id')."""
    while True:
        try:
            return _pool.pop()  # atomic under the GIL: two threads never get the same id
        except IndexError:
            _refill()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_pool.clear)
