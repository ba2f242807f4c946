"""``veil users list|revoke|restore``: the owner's principals on a running worker, from the terminal.

Example::

    veil users list --worker 127.0.0.1:8777
    veil users revoke mallory --worker 127.0.0.1:8777     # refused at every later handshake, sessions closed
    veil users restore mallory --worker 127.0.0.1:8777    # let the same tokens in again

A revocation is in force when ``revoke`` returns, whatever the worker is running (the worker answers it
without waiting for its turn): the name's tokens are refused, its connections closed, a command of its that is
running stops at its next checkpoint and its result is never sent, and the worker's own link to a peer of that
name is closed. Replicas sharing the owner database follow within about a second.

The admin token comes from ``$VEIL_ADMIN_TOKEN`` (or ``--admin-token`` in an ``@FILE`` of arguments): never
write it on the command line, where every local user sees it in ``ps``. Errors are one line (no
tracebacks); the exit status is 1 for a refused or failed request and 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys

from veil.governance.cli import ask_worker, shown
from veil.governance.users_wire import ACTIONS


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("name", nargs="?", default=None, help="the user (revoke, restore)")
    p.add_argument("--worker", required=True, metavar="HOST:PORT", help="the worker (ws:// or wss:// optional)")
    p.add_argument("--admin-token", default=os.environ.get("VEIL_ADMIN_TOKEN"),
                   help="the owner's admin token (default: $VEIL_ADMIN_TOKEN)")
    p.add_argument("--cafile", default=None, help="CA bundle / self-signed certificate for wss://")


def _fail(text: str, code: int = 1) -> int:
    print(f"veil users: error: {text}", file=sys.stderr)
    return code


def run(args: argparse.Namespace) -> int:
    from veil.governance.users_wire import AdminUsersMessage

    if args.action != "list" and not args.name:
        return _fail(f"{args.action} needs a user name (see `veil users list`)", 2)
    found = ask_worker(args, AdminUsersMessage(args.action, args.name), _fail)
    if isinstance(found, int):
        return found
    if args.action == "list":
        for u in found:
            print(f"{shown(u['name']):<20}  {shown(u['role']):<9}  {'revoked' if u['revoked'] else 'active'}")
        return 0
    if args.action == "revoke":
        print(f"revoked {shown(args.name)}; {found[0]} open session(s) closed")
    else:
        print(f"{shown(args.name)} may connect again")
    return 0
