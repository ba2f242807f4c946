"""Command line: ``veil demo``, ``veil worker`` (serve data), ``veil serve`` (serve a model), ``veil db``
(owner state in PostgreSQL), ``veil requests`` (the owner's review queue) and ``veil users`` (revoke or
restore a user).

Input errors (bad flags, short tokens, unreadable or damaged files, a port in use)
print one line and exit with status 2; set VEIL_TRACEBACK=1 to see the full traceback.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from typing import Callable

from veil.cli_args import whole_number

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help_: str, configure: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    def deco(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (help_, configure, fn)
        return fn

    return deco


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=whole_number(1), default=10, help="training epochs (and FedAvg rounds)")
    p.add_argument("--out", default="demo-out", help="folder for the training-curve plot")
    p.add_argument("--review", action="store_true",
                   help="only the data-owner review demo: a release request approved, another denied")


@command("demo", "train on Boston Housing held by two data owners, through pointers", _demo_args)
def _demo(args: argparse.Namespace) -> int:
    if args.review:
        from veil.governance.demo import run_review_demo

        return run_review_demo()
    from veil.demo import run_demo

    os.makedirs(args.out, exist_ok=True)  # a folder it cannot write is refused now, not after the training
    if not os.access(args.out, os.W_OK):
        raise PermissionError(f"cannot write into the --out folder {args.out!r}")
    return run_demo(epochs=args.epochs, out_dir=args.out)


def _worker_args(p: argparse.ArgumentParser) -> None:
    from veil.workers.websocket_cli import configure

    configure(p)


@command("worker", "serve this machine's data as a network worker (websockets)", _worker_args)
def _worker(args: argparse.Namespace) -> int:
    from veil.workers.memory_policy import keep_freed_memory, limit_address_space
    from veil.workers.websocket_cli import run

    keep_freed_memory()  # before the server starts its threads
    limit_address_space(args.max_memory_mb)

    return run(args)


def _db_args(p: argparse.ArgumentParser) -> None:
    from veil.workers.db_migrate import configure

    configure(p)


@command("db", "owner state in PostgreSQL: `veil db migrate --from DATA_DIR --to postgresql://...`", _db_args)
def _db(args: argparse.Namespace) -> int:
    from veil.workers.db_migrate import run

    return run(args)


def _serve_args(p: argparse.ArgumentParser) -> None:
    from veil.serving.cli import configure

    configure(p)


@command("serve", "serve a saved model (.pt, .keras, .h5) secret-shared on a cluster of workers", _serve_args)
def _serve(args: argparse.Namespace) -> int:
    from veil.serving.cli import run

    return run(args)


def _requests_args(p: argparse.ArgumentParser) -> None:
    from veil.governance.cli import configure

    configure(p)


@command("requests", "the owner's review queue: list, show, approve or deny release requests", _requests_args)
def _requests(args: argparse.Namespace) -> int:
    from veil.governance.cli import run

    return run(args)


def _users_args(p: argparse.ArgumentParser) -> None:
    from veil.governance.users_cli import configure

    configure(p)


@command("users", "the worker's users: list them, revoke one's tokens at run time, or restore it", _users_args)
def _users(args: argparse.Namespace) -> int:
    from veil.governance.users_cli import run

    return run(args)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with a safe reader for ``@FILE`` argument files (one argument a line): UTF-8 text of
    at most :attr:`MAX_ARGS_FILE` bytes, else one ``error:`` line (status 2) instead of a UnicodeDecodeError
    traceback; a line starting with ``@`` inside a file is an argument, not another file to read (argparse
    reads those too, so a file naming itself recursed until RecursionError)."""

    MAX_ARGS_FILE = 1 << 20

    def error(self, message: str) -> None:  # type: ignore[override]
        """Exactly one line, ``PROG: error: ...``, and exit status 2, like every other input error (the
        usage argparse prints first is a dozen lines for ``veil worker``; ``-h`` shows it)."""
        self.exit(2, f"{self.prog}: error: {message}\n")

    def _read_args_from_files(self, arg_strings: list[str]) -> list[str]:
        expanded: list[str] = []
        for arg in arg_strings:
            if not arg or not self.fromfile_prefix_chars or arg[0] not in self.fromfile_prefix_chars:
                expanded.append(arg)
                continue
            path = arg[1:]
            try:
                with open(path, "rb") as f:
                    data = f.read(self.MAX_ARGS_FILE + 1)
            except OSError as e:
                self.error(str(e))
            if len(data) > self.MAX_ARGS_FILE:
                self.error(f"argument file {path} is larger than {self.MAX_ARGS_FILE // 2**20} MiB")
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                self.error(f"argument file {path} is not UTF-8 text (one argument a line)")
            lines = text.split("\n")  # one argument a line, as start_worker writes them (not splitlines, which
            if lines[-1] == "":  # also breaks on \x1c, \x85, \u2028...: a value holding one became two arguments)
                lines.pop()
            for line in lines:
                line = line[:-1] if line.endswith("\r") else line
                expanded.extend(self.convert_arg_line_to_args(line))
        return expanded


def main(argv: list[str] | None = None) -> int:
    # "@FILE" reads arguments from FILE, one per line: secrets (tokens) stay off the command line, which
    # every local user can read in ps (start_worker, and so Cluster, passes worker arguments this way)
    parser = ArgumentParser(prog="veil", description=__doc__, fromfile_prefix_chars="@")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {}
    for name, (help_, configure, _) in COMMANDS.items():
        configure(commands.setdefault(name, sub.add_parser(name, help=help_)))
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the command they were given to ("veil demo: error: ..."), not by "veil"
        commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return run_command(f"veil {args.command}", COMMANDS[args.command][2], args)


def _spare_the_exit_collection() -> None:
    """The program is done: collect what is garbage now (its finalizers run), then freeze the rest. The
    interpreter's exit otherwise walks every object torch allocated again, 1-2 s of a loaded 2-core host in
    every CLI call and worker stop; what is still alive is freed by reference counting as before (Python
    never promised finalizers of objects alive at exit: veil's cleanup is explicit, ``close``/``stop``).
    Only for the ``veil`` command and ``python -m veil.cli`` (:func:`entry`): a program that calls :func:`main`
    keeps its collector as it was."""
    import gc

    gc.collect()
    gc.freeze()


#: what a command raises for bad input or environment; reported in one line. sqlite3.DatabaseError: a damaged
#: or truncated state file (veil.workers.database names the file in its message; the file is left untouched)
INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError, LookupError, OverflowError,
                                                 sqlite3.DatabaseError)


def run_command(prog: str, fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Runs a command; input errors become one line on stderr and exit status 2 (no traceback)."""
    from veil.exceptions import CommandLineError, VeilError

    try:
        return fn(args)
    except CommandLineError as e:  # exits with status 2 (its code) where nobody catches it
        print(f"{prog}: error: {_first_line(e)}", file=sys.stderr)
        raise
    except (VeilError, *INPUT_ERRORS) as e:
        if os.environ.get("VEIL_TRACEBACK") == "1":
            raise
        print(f"{prog}: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def entry() -> int:
    """The installed ``veil`` command (and ``python -m veil.cli``): :func:`main`, with the exit collection spared."""
    import atexit

    atexit.register(_spare_the_exit_collection)  # (exit handlers the command registers run before it)
    return main()


if __name__ == "__main__":
    sys.exit(entry())
