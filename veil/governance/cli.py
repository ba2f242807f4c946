"""``veil requests list|show|approve|deny``: the owner's review queue from the terminal.

Example::

    veil requests list --worker 127.0.0.1:8777
    veil requests show req-1a2b... --worker 127.0.0.1:8777
    veil requests approve req-1a2b... --worker 127.0.0.1:8777
    veil requests deny req-1a2b... --message "too close to raw records" --worker 127.0.0.1:8777

The admin token comes from ``$VEIL_ADMIN_TOKEN`` (or ``--admin-token`` in an ``@FILE`` of
arguments): never write it on the command line, where every local user sees it in ``ps``.
Errors are one line (no tracebacks); the exit status is 1 for a refused or failed
request and 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import unicodedata
from typing import Any, Callable


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("list", "show", "approve", "deny"))
    p.add_argument("request_id", nargs="?", default=None, help="the request (show, approve, deny)")
    p.add_argument("--worker", required=True, metavar="HOST:PORT", help="the worker (ws:// or wss:// optional)")
    p.add_argument("--admin-token", default=os.environ.get("VEIL_ADMIN_TOKEN"),
                   help="the owner's admin token (default: $VEIL_ADMIN_TOKEN)")
    p.add_argument("--state", default=None, choices=("pending", "approved", "denied", "released", "lapsed"),
                   help="list only requests in this state")
    p.add_argument("--message", default="", help="the owner's message (deny: shown to the scientist)")
    p.add_argument("--cafile", default=None, help="CA bundle / self-signed certificate for wss://")


def _fail(text: str, code: int = 1) -> int:
    print(f"veil requests: error: {text}", file=sys.stderr)
    return code


def _when(ts: Any) -> str:
    return "-" if not ts else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


#: Unicode categories shown escaped: controls (C0, DEL, C1), format characters (bidi controls such as U+202E and
#: U+061C, zero-width ones, U+FEFF), line/paragraph separators (U+2028/9: a new line in editors and pagers) and
#: lone surrogates (unprintable): a scientist's reason or plan name must not forge lines or hide the real ones
_UNPRINTABLE = frozenset(("Cc", "Cf", "Zl", "Zp", "Cs"))


def _escaped(c: str) -> str:
    if unicodedata.category(c) not in _UNPRINTABLE:
        return c
    return f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}"


def shown(value: object) -> str:
    """``value`` as text safe for the owner's terminal: one line, no escape sequences, no bidi reordering."""
    text = str(value)
    return text if text.isprintable() else "".join(map(_escaped, text))


def print_request(r: dict) -> None:
    from veil.governance.graphtext import render_graph

    print(f"request  {shown(r['id'])}  [{shown(r['state'])}]")
    print(f"user     {shown(r['principal'])} (session {shown(r['session'])})  filed {_when(r['ts'])}")
    print(f"object   {r['object_id']}  shape {shown(r['shape'])} {shown(r['dtype'])}")
    print(f"reason   {shown(r['reason'] or '(none given)')}")
    if r.get("decided_ts"):
        print(f"decided  {_when(r['decided_ts'])} by {shown(r['decided_by'])}"
              + (f": {shown(r['message'])}" if r['message'] else ""))
    if "preview" in r:
        print(f"preview  {shown(r['preview'])}")
    print("computation:")
    for line in render_graph(r["graph"], r["root"]):
        print(f"  {shown(line)}")


def ask_worker(args: argparse.Namespace, msg: object, fail: Callable[[str, int], int]) -> list | int:
    """Sends one admin message to ``args.worker`` (HOST:PORT, ws:// or wss://) with ``args.admin_token``;
    the reply's objects, or the exit status after ``fail`` printed one line (2: bad arguments, 1: refused or
    failed). Shared by ``veil requests`` and ``veil users``."""
    import torch

    import veil as sy
    from veil.exceptions import VeilError

    if not args.admin_token:
        return fail("needs --admin-token (or $VEIL_ADMIN_TOKEN)", 2)
    address = args.worker
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        return fail(f"--worker expects HOST:PORT, got {address!r}", 2)
    try:
        hook = sy.TorchHook(torch)
        client = sy.WebsocketClientWorker(hook, id=f"{host}:{port}", host=host, port=int(port),
                                          token=args.admin_token, secure=address.startswith("wss://"),
                                          cafile=args.cafile, timeout=30)
        try:
            return hook.local_worker.send_msg(msg, client).objects
        finally:
            client.close()
    except (VeilError, OSError) as e:
        return fail(f"{type(e).__name__}: {e}".splitlines()[0], 1)


def run(args: argparse.Namespace) -> int:
    from veil.governance.wire import AdminRequestsMessage

    if args.action != "list" and not args.request_id:
        return _fail(f"{args.action} needs a request id (see `veil requests list`)", 2)
    found = ask_worker(args, AdminRequestsMessage(args.action, args.request_id, args.message, args.state), _fail)
    if isinstance(found, int):
        return found
    if args.action == "list":
        if not found:
            print("no requests" + (f" in state {args.state}" if args.state else ""))
        for r in found:
            reason = shown((r["reason"] or "-").replace("\n", " "))[:50]
            print(f"{shown(r['id'])}  {shown(r['state']):<8}  {shown(r['principal']):<12}  {_when(r['ts'])}  "
                  f"{shown(r['shape']):<12} {shown(r['dtype']):<8}  {reason}")
        return 0
    if args.action == "show":
        print_request(found[0])
        return 0
    r = found[0]
    print(f"{shown(r['id'])} {shown(r['state'])} for {shown(r['principal'])}"
          + (f": {shown(r['message'])}" if r["message"] else ""))
    return 0
