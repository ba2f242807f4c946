"""``veil worker``: run a data owner's network worker from the command line.

Example::

    veil worker --id alice --port 8777 --data-dir ./alice-state \\
        --dataset boston=boston.csv:target=MEDV --tags "#boston,#housing" \\
        --allow hospital=#target \\
        --dp-clip 1.0 --dp-noise 1.1 --budget scientist=3.0,1e-5

Datasets are loaded as the owner's *private* objects (data and target tensors,
tagged ``#<name>``, ``#data`` / ``#target`` and ``--tags``): anyone connected can
find them with ``search`` and compute on them, nobody can ``.get()`` them except
users named by an ``--allow USER=TAG`` rule for a tag the object carries.
With ``--dp-clip``/``--dp-noise`` the datasets are open to owner-side DP
training (``veil.dp.train_remote_dp``); ``--budget`` gives each data scientist a
privacy budget for DP training and queries, kept under ``--data-dir``.
"""

from __future__ import annotations

import argparse
import csv
import os
import ssl
import sys
from pathlib import Path

import torch

from veil.cli_args import limit, whole_number
from veil.exceptions import CommandLineError
from veil.workers.audit_retention import DEFAULT_MAX_ROWS, AuditRetention
from veil.workers.failure_budget import DEFAULT_BUDGET
from veil.workers.failure_budget import set_budget as set_failure_budget
from veil.workers.heap_freeze import freeze_startup_heap
from veil.workers.persistence import OwnerDB
from veil.workers.scheduling import POLICIES, set_policy
from veil.workers.auth_throttle import FAILURE_WINDOW, FREE_FAILURES, UNGUESSABLE_CHARS, FailureThrottle
from veil.workers.websocket_auth import TokenTable, new_token


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--id", required=True, help="the worker's name (clients use the same id)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=port_number, default=8777, help="TCP port (0: any free port)")
    p.add_argument("--token", default=None,
                   help="data scientists' access token (default: $VEIL_TOKEN, else a new one is printed)")
    p.add_argument("--token-user", default="scientist", help="user name of --token holders (for --allow rules)")
    p.add_argument("--user", action="append", default=[], metavar="NAME=TOKEN",
                   help="another data scientist with their own token (repeatable)")
    p.add_argument("--client", action="append", default=[], metavar="NAME=TOKEN",
                   help="a serving client's token: it may only submit queries and fetch its results (repeatable)")
    p.add_argument("--client-issuer", action="append", default=[], metavar="NAME=SECRET",
                   help="accept every client token made from SECRET (veil.serving Cluster.issue_client_token): "
                        "each client is its own principal NAME/HOLDER, with its own session cap (repeatable)")
    p.add_argument("--ping-interval", type=limit(), default=30.0,
                   help="seconds between keepalive pings; clients silent for twice that are disconnected")
    p.add_argument("--admin-token", default=os.environ.get("VEIL_ADMIN_TOKEN"),
                   help="the owner's token: owner view of the store (default: $VEIL_ADMIN_TOKEN)")
    p.add_argument("--dataset", action="append", default=[], metavar="NAME=PATH[:target=COLUMN]",
                   help="CSV file to serve as private data (repeatable); reloaded at every start")
    p.add_argument("--tags", default="", help="comma-separated tags added to every dataset tensor")
    p.add_argument("--allow", action="append", default=[], metavar="USER=TAG",
                   help="user USER may .get() dataset tensors tagged TAG (repeatable; default: nobody)")
    p.add_argument("--peer", action="append", default=[], metavar="NAME=HOST:PORT",
                   help="another worker this one may send objects to (moves, pointer chains)")
    p.add_argument("--peer-token", action="append", default=[], metavar="NAME=TOKEN",
                   help="token this worker presents to peer NAME (default: $VEIL_PEER_TOKEN)")
    p.add_argument("--accept-peer", action="append", default=[], metavar="NAME=TOKEN",
                   help="token peer worker NAME presents to this one (repeatable)")
    p.add_argument("--data-dir", default=None, help="folder for the audit log and owner state (SQLite)")
    p.add_argument("--db", default=os.environ.get("VEIL_DB"), metavar="postgresql://...",
                   help="keep the audit log, privacy ledger and owner state in PostgreSQL instead of --data-dir "
                        "(shared by all of one owner's worker processes; default: $VEIL_DB)")
    p.add_argument("--max-message-mb", type=limit(), default=256, help="largest accepted request, in MiB")
    p.add_argument("--max-command-seconds", type=limit(zero_means_none=True), default=600.0, metavar="S",
                   help="per-command time limit; long commands (plan fit) stop past it (0: no limit)")
    p.add_argument("--max-session-mb", type=limit(), default=None,
                   help="most memory one client session may hold on this worker, in MiB (default: no limit)")
    p.add_argument("--max-sessions-per-principal", type=whole_number(1), default=None, metavar="N",
                   help="connections one principal (token) may hold at once (default: 16, a quarter of the "
                        "worker's 64): one token cannot take every slot; the admin token is not limited")
    p.add_argument("--max-sessions-per-client", type=whole_number(1), default=4, metavar="N",
                   help="connections one client with its own issued token (--client-issuer) may hold at once")
    p.add_argument("--auth-free-failures", type=whole_number(0), default=FREE_FAILURES, metavar="N",
                   help=f"failed authentications (port and console) one source (loopback, an IPv4 /24, an IPv6 /64) "
                        f"may make in {FAILURE_WINDOW / 60:g} minutes before it is refused for a while, longer with "
                        f"each further failure (default: {FREE_FAILURES}); a valid token of {UNGUESSABLE_CHARS}+ "
                        "characters, as generated ones, is never refused")
    p.add_argument("--review-failures", type=whole_number(1), default=DEFAULT_BUDGET, metavar="N",
                   help="failures on its values a user's commands may have on a dataset under review before the "
                        f"user's further commands on it are refused (default: {DEFAULT_BUDGET})")
    p.add_argument("--audit-max-rows", type=whole_number(0), default=DEFAULT_MAX_ROWS, metavar="N",
                   help=f"most audit rows of requests kept (default: {DEFAULT_MAX_ROWS:,}; 0: no cap): past it the "
                        "oldest are deleted; the owner's decisions, release requests, releases and DP charges never")
    p.add_argument("--max-memory-mb", type=limit(zero_means_none=True), default=None, metavar="MB",
                   help="most memory this worker process may map, in MiB (default: the machine's memory; 0: no "
                        "cap): a request for a larger result fails with a one-line error instead of the machine "
                        "running out of memory")
    p.add_argument("--dp-clip", type=float, default=None, metavar="C",
                   help="open the --dataset files to DP training: per-record gradient clipping bound")
    p.add_argument("--dp-noise", type=float, default=None, metavar="SIGMA",
                   help="the least noise multiplier DP training requests may use (with --dp-clip)")
    p.add_argument("--dp-delta", type=float, default=1e-5, help="delta at which DP training is accounted")
    p.add_argument("--dp-hide-count", action="store_true",
                   help="pointers to the datasets report 0 records (the exact count stays private; see README)")
    p.add_argument("--dp-nominal-count", type=int, default=None, metavar="N",
                   help="with --dp-hide-count: the public record count DP training divides by (a rounded or noisy "
                        "count you are willing to publish); without it DP training is refused")
    p.add_argument("--dp-max-records", type=int, default=None, metavar="N",
                   help="with --dp-hide-count: a public bound on the record count; sums, means, histograms and "
                        "DP training compute over N rows so their time does not show the count (without it "
                        "they are refused; a DP count is answered)")
    p.add_argument("--dp-max-bins", type=whole_number(1), default=10_000, metavar="N",
                   help="most bins a DP histogram may ask for (bounds the work a query can cause)")
    p.add_argument("--budget", action="append", default=[], metavar="USER=EPS,DELTA",
                   help="privacy budget of data scientist USER (repeatable); kept under --data-dir")
    p.add_argument("--policy", action="append", default=[], metavar="POLICY|NAME=POLICY",
                   help="data policy of the --dataset files: open (derived results may be fetched), review "
                        "(each release of a derived result waits for the owner's approval) or dp-only; "
                        "NAME=POLICY for one dataset (repeatable; default: open)")
    p.add_argument("--console-port", type=port_number, default=None, metavar="PORT",
                   help="serve the owner's web console on this port (admin token login; 0: any free port)")
    p.add_argument("--console-host", default="127.0.0.1",
                   help="interface of the console (default: loopback only; any other needs --cert and --key: "
                        "the console is then served as https)")
    p.add_argument("--cert", default=None, help="TLS certificate (PEM) to serve wss://")
    p.add_argument("--key", default=None, help="TLS private key (PEM)")
    p.add_argument("--sched", choices=POLICIES, default="normal",
                   help="kernel scheduling of this worker's threads: batch where it shares cores with the process that "
                        "drives it (a local cluster): its woken threads never preempt that process mid-round")


#: flags whose value carries a token: an error about one never shows the value (stderr goes to journals and
#: log collectors other people read)
TOKEN_FLAGS = ("--user", "--client", "--accept-peer", "--peer-token", "--client-issuer")


def _pair(spec: str, flag: str) -> tuple[str, str]:
    name, sep, value = spec.partition("=")
    if not sep or not name or not value:
        if flag in TOKEN_FLAGS:
            raise CommandLineError(f"{flag} expects NAME=TOKEN (value not shown)")
        raise CommandLineError(f"{flag} expects NAME=VALUE, got {spec!r}")
    return name, value


def port_number(text: str) -> int:
    """argparse type of a TCP port flag: an integer from 0 (any free port) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a port number (0-65535), got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expects a port number (0-65535), got {port}")
    return port


def parse_dataset(spec: str) -> tuple[str, Path, str | None]:
    """``NAME=PATH[:target=COLUMN]`` -> (name, path, target column or None)."""
    name, rest = _pair(spec, "--dataset")
    path, sep, target = rest.rpartition(":target=")
    if not sep:
        path, target = rest, None
    return name, Path(path), target


def read_csv(path: Path, target: str | None) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """A numeric CSV with a header row -> (features float32, target [n, 1] or None, feature names)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise CommandLineError(f"cannot read dataset {path}: {e.strerror}") from None
    except (csv.Error, UnicodeDecodeError) as e:  # e.g. a field over csv's 128 KiB limit: one line, no traceback
        raise CommandLineError(f"cannot read dataset {path}: {e}") from None
    if len(rows) < 2:
        raise CommandLineError(f"dataset {path} needs a header row and at least one data row")
    header, body = rows[0], [r for r in rows[1:] if r]
    widths = {len(r) for r in body}
    if widths != {len(header)}:  # (a short row gave an empty target, a long one lost columns, silently)
        raise CommandLineError(f"dataset {path} has rows of {', '.join(map(str, sorted(widths)))} fields "
                               f"for a header of {len(header)}")
    try:
        values = torch.tensor([[float(v) for v in r] for r in body], dtype=torch.float32)
    except ValueError as e:
        raise CommandLineError(f"dataset {path} has a non-numeric value: {e}") from None
    if target is None:
        return values, None, header
    if target not in header:
        raise CommandLineError(f"dataset {path} has no column {target!r} (columns: {', '.join(header)})")
    t = header.index(target)
    keep = [i for i in range(len(header)) if i != t]
    return values[:, keep], values[:, t:t + 1], [header[i] for i in keep]


def parse_policies(specs: list[str], names: list[str]) -> dict[str, str]:
    """``--policy review`` / ``--policy NAME=review`` -> dataset name -> policy."""
    from veil.governance.state import POLICIES

    default, per_name = "open", {}
    for spec in specs:
        name, sep, policy = spec.rpartition("=")
        if policy not in POLICIES:
            raise CommandLineError(f"--policy expects one of {', '.join(POLICIES)} (or NAME=POLICY), "
                                   f"got {spec!r}")
        if not sep:
            default = policy
        elif name not in names:
            raise CommandLineError(f"--policy {spec!r} names no --dataset (datasets: {', '.join(names)})")
        else:
            per_name[name] = policy
    return {n: per_name.get(n, default) for n in names}


def load_datasets(worker, specs: list[str], tags: list[str], allow: list[tuple[str, str]],
                  policies: dict[str, str] | None = None) -> list[str]:
    """Loads every ``--dataset`` as private owner data; returns one summary line per tensor."""
    lines = []
    for spec in specs:
        name, path, target = parse_dataset(spec)
        policy = (policies or {}).get(name, "open")
        data, labels, columns = read_csv(path, target)
        for kind, tensor in (("data", data), ("target", labels)):
            if tensor is None:
                continue
            obj_tags = tuple(dict.fromkeys([f"#{name}", *tags, f"#{kind}"]))
            allowed = tuple(sorted({user for user, tag in allow if tag in obj_tags}))
            worker.load(tensor, tags=obj_tags, description=f"{name} {kind}: {path.name}", private=True,
                        allowed_users=allowed, policy=policy)
            lines.append(f"  {name} {kind} {list(tensor.shape)} tags={' '.join(obj_tags)} "
                         f"get allowed for: {', '.join(allowed) or 'nobody'}; policy {policy}")
    return lines


def enable_dp_from_args(worker, args: argparse.Namespace) -> str | None:
    """Applies the --dp-* and --budget flags; returns a summary line (None when DP is off)."""
    if args.dp_clip is None and args.dp_noise is None and not args.budget:
        return None
    budgets = {}
    for spec in args.budget:
        user, value = _pair(spec, "--budget")
        try:
            eps, delta = (float(v) for v in value.split(","))
        except ValueError:
            raise CommandLineError(f"--budget expects USER=EPS,DELTA, got {spec!r}") from None
        budgets[user] = (eps, delta)
    names = [parse_dataset(s)[0] for s in args.dataset] if args.dp_clip is not None else []
    try:
        worker.enable_dp(names, max_grad_norm=args.dp_clip, noise_multiplier=args.dp_noise, budgets=budgets,
                         delta=args.dp_delta, hide_count=args.dp_hide_count, max_bins=args.dp_max_bins,
                         nominal_count=args.dp_nominal_count, max_records=args.dp_max_records)
    except ValueError as e:  # PrivacyParameterError is a ValueError
        raise CommandLineError(str(e)) from None
    training = f"C={args.dp_clip} sigma>={args.dp_noise} on {', '.join(names) or 'no dataset'}" \
        if args.dp_clip is not None else "off"
    hidden = "; record counts hidden" if args.dp_hide_count else ""
    if args.dp_hide_count and args.dp_max_records is not None:
        hidden += f" (releases over {args.dp_max_records} rows)"
    return f"  differential privacy: training {training}; budgets for {', '.join(budgets) or 'nobody'}{hidden}"


def _token_table(args: argparse.Namespace) -> tuple[TokenTable, str | None]:
    table = TokenTable()
    token, generated = args.token or os.environ.get("VEIL_TOKEN"), None
    if not token:
        token = generated = new_token()
    table.add(token, args.token_user, "scientist")
    for spec in args.user:
        table.add(*reversed(_pair(spec, "--user")), "scientist")
    for spec in args.client:
        table.add(*reversed(_pair(spec, "--client")), "client")
    for spec in args.client_issuer:
        name, secret = _pair(spec, "--client-issuer")
        try:
            table.add_issuer(secret, name)
        except ValueError as e:  # (the message never shows the secret)
            raise CommandLineError(f"--client-issuer: {e}") from None
    for spec in args.accept_peer:
        name, tok = _pair(spec, "--accept-peer")
        table.add(tok, name, "peer")
    if args.admin_token:
        table.add(args.admin_token, "owner", "admin")
    return table, generated


def _peers(args: argparse.Namespace, hook) -> list:
    from veil.workers.websocket_client import WebsocketClientWorker

    tokens = dict(_pair(s, "--peer-token") for s in args.peer_token)
    peers = []
    for spec in args.peer:
        name, address = _pair(spec, "--peer")
        secure = address.startswith("wss://")
        host, _, port = address.split("://")[-1].rpartition(":")
        token = tokens.get(name) or os.environ.get("VEIL_PEER_TOKEN")
        if not token or not port.isdigit():
            raise CommandLineError(f"peer {name!r} needs HOST:PORT and a --peer-token {name}=TOKEN")
        peers.append(WebsocketClientWorker(hook, id=name, host=host, port=int(port), token=token,
                                           secure=secure, lazy=True, local_socket=True))
    return peers


def _owner_db(args: argparse.Namespace) -> OwnerDB:
    if args.db and args.data_dir:
        raise CommandLineError("choose --db or --data-dir for the owner state, not both")
    try:
        return OwnerDB.in_dir(args.data_dir, db=args.db)
    except (ValueError, ConnectionError) as e:
        raise CommandLineError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    """Builds the worker from the parsed arguments and serves until Ctrl-C / SIGTERM."""
    import veil as sy
    from veil.workers.websocket_server import WebsocketServerWorker

    if not set_policy(args.sched):
        print(f"veil worker: --sched {args.sched} is not available on this platform; scheduling left normal",
              flush=True)
    hook = sy.TorchHook(torch)
    tokens, generated = _token_table(args)
    ssl_context = None
    if args.cert or args.key:
        if not (args.cert and args.key):
            raise CommandLineError("TLS needs both --cert and --key")
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(args.cert, args.key)
    worker = WebsocketServerWorker(
        hook, id=args.id, host=args.host, port=args.port, tokens=tokens, db=_owner_db(args),
        max_message=int(args.max_message_mb * 2**20), ssl_context=ssl_context,
        max_command_seconds=args.max_command_seconds,
        ping_interval=args.ping_interval,
        max_session_bytes=None if args.max_session_mb is None else int(args.max_session_mb * 2**20),
        max_sessions_per_principal=args.max_sessions_per_principal,
        max_sessions_per_client=args.max_sessions_per_client,
    )
    worker.auth_throttle = FailureThrottle(free=args.auth_free_failures)
    set_failure_budget(worker, args.review_failures)
    if args.audit_max_rows:
        worker.refusals.followers.append(AuditRetention(worker.db, args.audit_max_rows))
    for peer in _peers(args, hook):
        worker.add_peer(peer)
    tags = [t.strip() for t in args.tags.split(",") if t.strip()]
    allow = [_pair(s, "--allow") for s in args.allow]
    policies = parse_policies(args.policy, [parse_dataset(s)[0] for s in args.dataset])
    summary = load_datasets(worker, args.dataset, tags, allow, policies)
    if args.db:  # the password, if the URL has one, is never printed
        from veil.workers.database import redact

        summary.append(f"  owner state: {redact(args.db)} (audit log, privacy ledger, key-value)")
    dp_line = enable_dp_from_args(worker, args)
    if dp_line:
        summary.append(dp_line)

    console = None
    if args.console_port is not None:
        if not args.admin_token:
            raise CommandLineError("--console-port needs --admin-token (the console's login)")
        from veil.governance.console.server import ConsoleServer

        console = ConsoleServer(worker, host=args.console_host, port=args.console_port, certfile=args.cert,
                                keyfile=args.key)

    def ready(w: WebsocketServerWorker) -> None:
        freeze_startup_heap()  # before the first request: start-up objects never walked again
        if console is not None:
            console.start()
            summary.append(f"  owner console on {console.url} (log in with the admin token)")
        # The "listening on" line comes last: scripts may treat it as "ready, all printed".
        if generated:  # shown once to the owner who started it; never written to a log
            print(f"access token (user {args.token_user!r}): {generated}", flush=True)
        for line in summary:
            print(line, flush=True)
        if worker.peers:
            print(f"  peers: {', '.join(worker.peers)}", flush=True)
        print(f"veil worker {w.id!r} listening on {w.url}", flush=True)

    def stop_console() -> None:  # before the worker closes its database: the console's last audit rows land
        if console is not None:
            console.stop()

    try:
        worker.serve_forever(on_ready=ready, on_stop=stop_console)
    finally:
        stop_console()  # again if serving failed before its own stop (a second stop does nothing)
    print(f"veil worker {args.id!r} stopped", flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m veil.workers.websocket_cli`
    from veil.cli import ArgumentParser, run_command

    parser = ArgumentParser(prog="veil worker", fromfile_prefix_chars="@")  # @FILE: arguments from FILE
    configure(parser)
    sys.exit(run_command("veil worker", run, parser.parse_args()))
