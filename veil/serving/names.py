"""Which service a serving action names, on one party worker: each user's service names are its own.

Services are kept per (owner user, name). An owner's actions (``open``, ``pending``, ``claim``, ...) look up
only the sender's own names, so another user's service of the same name is invisible to it: ``open`` of a
name another user holds opens the sender's own service, exactly as for a name nobody holds, and
``pending``/``close``/... on another user's name get the answer of a name nobody holds. (With one name per
worker, ``open`` answered "belongs to another user" and ``pending`` "only the owner may": a scientist
listed which names other users served by guessing; and opening a *closed* service's name replaced it, its
clients' unfetched results gone.) A name is its owner's until the owner's room for new services reclaims it
(closed, nothing left to fetch): no other user can touch it.

A client names a service by name alone (``ModelClient.connect_to_model(name=...)``): among the services of
that name it may query, the one holding its request (``fetch``), else the first opened that still serves,
else the first opened. A second owner opening a name a first owner serves to the same clients therefore
does not take the first owner's clients from it (first come, as before), nor learns that it exists. A client
that must reach one owner's service whoever else serves that name names it ``@OWNER/NAME`` (``OWNER``: the
owner's user, e.g. ``@model-owner/model`` on a ``Cluster``): that finds only that user's service, so a
scientist who opened the name first (squatting it) does not get the client's queries. No service's own name
starts with ``@`` (``open`` refuses one, whoever holds what), so a qualified name cannot be squatted either;
nor one that reads as qualified (``＠alice/model``, `` @alice/model``: :func:`check_own_name`). A qualified
name splits at its *last* ``/``: principal names may hold ``/`` (``lab/alice``), and split at the first,
``@lab/alice/model`` found user ``lab``'s service ``alice/model`` (a service whose own name holds ``/``
is reached by its plain name only, or by :func:`qualified`'s escaped form, ``%2F`` for each ``/`` and ``%25`` for
each ``%`` of the name). ``ModelClient`` pins the owner *before* its first query (:func:`qualified`): the one
its cluster names (``Cluster.owners``, recorded by the owner's ``ModelService`` from the parties' ``open``
reply and written by ``Cluster.save``; else the cluster's ``owner_user``, the user the owner's token has),
or ``owner=``. A plain name sent as is went, at connect, to whichever user opened it first: a scientist who
opened it on every party before the owner got the client's pin, and so its first and later queries.
"""

from __future__ import annotations

import re
import unicodedata
import weakref
from typing import Any, Callable, Iterator, Optional

from veil.serving.errors import ServingError

#: a client's service name of this form names its owner too: ``@OWNER/NAME``
QUALIFIED = "@"

#: worker -> (owner user, service name) -> its service state (weak: an in-process worker's services go with it)
SERVICES: "weakref.WeakKeyDictionary[Any, dict[tuple[str, str], Any]]" = weakref.WeakKeyDictionary()


def table(worker: Any) -> dict:
    """The worker's services, (owner, name) -> state (created empty on first use)."""
    return SERVICES.setdefault(worker, {})


def owned_by(worker: Any, user: str, name: str) -> Optional[Any]:
    """``user``'s own service ``name``, or None (another user's service of that name is not looked at)."""
    return SERVICES.get(worker, {}).get((user, name))


def of_user(worker: Any, user: str) -> Iterator[tuple[tuple[str, str], Any]]:
    """``user``'s services on the worker, as ((owner, name), state)."""
    return iter([(key, svc) for key, svc in SERVICES.get(worker, {}).items() if key[0] == user])


def for_client(worker: Any, name: str, may_query: Callable[[Any], bool],
               holds: Callable[[Any], bool] = lambda svc: False) -> Optional[Any]:
    """The service ``name`` a client means: of those it may query, one that ``holds`` its request, else the
    first opened still serving, else the first opened; None when it may query none."""
    owner, slash, rest = name[len(QUALIFIED):].rpartition("/") if name.startswith(QUALIFIED) else (None, "/", name)
    if owner is not None:
        rest = _ESCAPED.sub(lambda m: "/" if m.group(1) == "2F" else "%", rest)  # (qualified's escapes, one pass)
    candidates = [svc for (o, n), svc in SERVICES.get(worker, {}).items()
                  if slash and n == rest and (owner is None or o == owner) and may_query(svc)]
    for prefer in (holds, lambda svc: not svc.closed, lambda svc: True):
        for svc in candidates:
            if prefer(svc):
                return svc
    return None


#: the escapes of a qualified name's NAME part (its ``/`` and ``%``), decoded in one left-to-right pass
_ESCAPED = re.compile(r"%(2F|25)")


def qualified(name: str, owner: "str | None") -> str:
    """``name`` of ``owner``'s service, as a client sends it: ``@OWNER/NAME``, the NAME's ``%`` and ``/`` escaped
    (so the split at the last ``/`` finds exactly this owner); ``name`` itself when already qualified.

    Raises:
        ServingError: A plain name and no owner (sent as is, it went to whichever user opened it first).
    """
    if not isinstance(name, str) or not name:
        raise ServingError("a service name is a non-empty string")
    if name.startswith(QUALIFIED):
        if owner and owner_of(name) != owner:
            raise ServingError(f"service {name!r} names another owner than owner={owner!r}")
        return name
    if not isinstance(owner, str) or not owner:
        raise ServingError(f"no owner is known for service {name!r}: pass owner=... (the model owner's user) or "
                           f"name it {QUALIFIED}OWNER/{name}, or use the owner's cluster file (Cluster.save); a "
                           "plain name goes to whichever user opened it first")
    return f"{QUALIFIED}{owner}/{name.replace('%', '%25').replace('/', '%2F')}"


def owner_of(name: str) -> "str | None":
    """The owner a qualified name names (None for a plain name)."""
    return name[len(QUALIFIED):].rpartition("/")[0] if name.startswith(QUALIFIED) else None


def check_own_name(name: str) -> None:
    """Refuses (one line) a service name that reads as a client's qualified one, ``@OWNER/NAME``: it starts
    with ``@`` once folded (NFKC: a fullwidth or small ``@``) and its spaces and invisible characters dropped."""
    folded = "".join(c for c in unicodedata.normalize("NFKC", name) if not c.isspace()
                     and unicodedata.category(c) not in ("Cc", "Cf", "Zs", "Zl", "Zp"))
    if folded.startswith(QUALIFIED):
        raise ServingError(f"a service name may not start with {QUALIFIED!r} (nor read as if it did): {name!r}")


def every(worker: Any) -> list:
    """Every service state of the worker (a copy: callers may change the table meanwhile)."""
    return list(SERVICES.get(worker, {}).values())
