"""Unguessable object ids.

Ids are 64 random bits from the OS CSPRNG (``secrets``), carried as msgpack
unsigned integers. They cannot be enumerated by a client, so knowing an id is
the capability to use the object.
"""

import secrets

ID_BITS = 64


def new_id() -> int:
    """A fresh random object id (never 0, which is reserved as 'no id')."""
    while True:
        value = secrets.randbits(ID_BITS)
        if value:
            return value
