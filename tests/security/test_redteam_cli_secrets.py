"""Red team: veil's command line tools (``veil worker``, ``veil serve``, ``veil requests``, ``veil db migrate``)
and the files they leave on the owner's machine.

The standards probed: bad input is one line on stderr (no traceback) and exit status 2 (README: "A bad flag
prints one line (`veil worker: error: ...`) and exits with status 2"); secrets (tokens, database passwords)
never reach output, command lines or files other local users can read; the owner's state (audit log, review
queue, privacy ledger: "owner only" in the README) is readable by the owner only.

Every test asserts the safe behaviour. The "Attack"/"Slip" tests were holes when written, fixed in veil/ since,
except the last (a wrong token is not echoed), which held from the start like the "Defence" tests.
"""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from veil.workers.websocket_launcher import start_worker

from tests.cli_batch import run_veil

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "redteam-cli-scientist-token"
SECRET = "redteam-cli-SECRET-peer-token-4f1d"
PASSWORD = "redteam-cli-SECRET-db-password-9c2e"


#: ``worker`` and ``db`` commands that fail at start-up run in the one process this test process shares
#: (tests/cli_batch.py: each a fresh ``python -m veil.cli`` imports torch again, ~3 s); ``serve`` starts a
#: cluster, in a process of its own
_SHARED_PROCESS_COMMANDS = ("worker", "db")


def _veil(*argv: str, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m veil.cli *argv`` to completion (no traceback switch: VEIL_TRACEBACK cleared)."""
    full_env = {**os.environ, "VEIL_TRACEBACK": "", **(env or {})}
    for name in ("VEIL_TOKEN", "VEIL_ADMIN_TOKEN", "VEIL_PEER_TOKEN", "VEIL_DB"):
        full_env.pop(name, None)
    if argv[0] in _SHARED_PROCESS_COMMANDS:
        return run_veil(list(argv), env=full_env, cwd=ROOT, timeout=timeout)
    return subprocess.run([sys.executable, "-m", "veil.cli", *argv], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _assert_one_line_error(out: subprocess.CompletedProcess) -> None:
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-1500:]
    assert "Traceback" not in text, text[-1500:]
    lines = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith("usage:")]
    assert len(lines) == 1, lines


# ------------------------------------------------------------------ @FILE argument files


def test_binary_argument_file_is_a_one_line_error(tmp_path):
    """Attack: the owner points ``veil worker @FILE`` at the wrong file (a key, a .pt, a damaged copy of the
    arguments file): bytes that are not UTF-8. Must hold: one line on stderr, exit status 2, no traceback."""
    args = tmp_path / "worker.args"
    args.write_bytes(b"--id\nalice\n--token\n\xff\xfe\x00\xb2garbage\x80\n")
    out = _veil("worker", f"@{args}")
    _assert_one_line_error(out)
    assert out.returncode == 2


def test_recursive_argument_file_is_a_one_line_error(tmp_path):
    """Attack: an arguments file whose line starts with ``@`` naming itself (or two files naming each other;
    argparse expands ``@`` lines inside files too). Must hold: one line on stderr, exit status 2, no
    traceback (when written: RecursionError with a thousand repeated frames)."""
    a, b = tmp_path / "a.args", tmp_path / "b.args"
    a.write_text(f"--id\nalice\n@{b}\n")
    b.write_text(f"@{a}\n")
    out = _veil("worker", f"@{a}")
    _assert_one_line_error(out)
    assert out.returncode == 2


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_missing_or_directory_argument_file_is_one_line(tmp_path, kind):
    """Defence: ``@FILE`` naming no file or a folder is argparse's one-line error, status 2."""
    path = tmp_path / "nope.args"
    if kind == "directory":
        path.mkdir()
    out = _veil("worker", f"@{path}")
    _assert_one_line_error(out)
    assert out.returncode == 2


# ------------------------------------------------------------------ secrets echoed in errors


@pytest.mark.parametrize("flag", ["--peer-token", "--user", "--client", "--accept-peer"])
def test_malformed_token_flag_does_not_echo_the_token(tmp_path, flag):
    """Attack/slip: the owner forgets ``NAME=`` (``--peer-token TOKEN`` or ``--user alice:TOKEN``). The error
    goes to stderr, which for a service lands in the journal / a log collector other people read. Must hold:
    the error is one line and does not contain the token (naming the flag and the NAME part is enough)."""
    args = tmp_path / "worker.args"  # tokens stay off the command line, as the README asks
    args.write_text("\n".join(["--id", "alice", "--port", "0", "--token", TOKEN,
                               "--peer", "bob=127.0.0.1:9", flag, f"bob:{SECRET}"]) + "\n")
    out = _veil("worker", f"@{args}")
    _assert_one_line_error(out)
    assert SECRET not in out.stdout + out.stderr, out.stderr


def test_database_password_in_url_query_is_never_printed(tmp_path):
    """(A hole when written: ``redact`` masked ``user:PASSWORD@`` only; fixed in the working tree while this
    file was being written.) Attack/slip: libpq URLs may carry the password as a query parameter
    (``postgresql://veil@db/veil?password=...``); ``veil db migrate`` and ``veil worker --db`` print the URL
    on errors (and the worker in its start summary) through ``redact``. Must hold: the password never
    appears in the output, whichever URL form carried it."""
    from veil.workers.persistence import OwnerDB

    OwnerDB.in_dir(tmp_path / "state").close()
    url = f"postgresql://veil@127.0.0.1:1/veil?sslmode=disable&password={PASSWORD}"
    out = _veil("db", "migrate", "--from", str(tmp_path / "state"), "--to", url)
    assert out.returncode != 0 and "cannot connect" in out.stderr, out.stderr  # the path that prints the URL
    assert PASSWORD not in out.stdout + out.stderr, out.stderr


def test_database_password_in_userinfo_is_redacted(tmp_path):
    """Defence: the usual ``user:PASSWORD@host`` form is shown as ``user:***@host`` in the error."""
    from veil.workers.persistence import OwnerDB

    OwnerDB.in_dir(tmp_path / "state").close()
    out = _veil("db", "migrate", "--from", str(tmp_path / "state"),
                "--to", f"postgresql://veil:{PASSWORD}@127.0.0.1:1/veil")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert PASSWORD not in out.stdout + out.stderr and "veil:***@" in out.stderr, out.stderr


@pytest.mark.parametrize("command", ["worker", "migrate"])
def test_unreachable_database_is_a_one_line_error(tmp_path, command):
    """Slip: ``--db``/``--to`` names a server that is down. Must hold: exactly one line on stderr (scripts and
    log collectors read the first line as the whole error; the second line was psycopg's hint)."""
    url = "postgresql://veil@127.0.0.1:1/veil"
    if command == "worker":
        out = _veil("worker", "--id", "alice", "--port", "0", "--token", TOKEN, "--db", url)
    else:
        from veil.workers.persistence import OwnerDB

        OwnerDB.in_dir(tmp_path / "state").close()
        out = _veil("db", "migrate", "--from", str(tmp_path / "state"), "--to", url)
    _assert_one_line_error(out)


# ------------------------------------------------------------------ malformed values


@pytest.mark.parametrize("port", ["-1", "99999"])
def test_bad_console_port_is_a_one_line_error(port):
    """Slip: ``--console-port`` out of range. Must hold: no traceback, one line on stderr."""
    out = _veil("worker", "--id", "alice", "--port", "0", "--token", TOKEN,
                "--admin-token", TOKEN + "-admin", "--console-port", port)
    _assert_one_line_error(out)


@pytest.mark.parametrize("flag,value", [
    pytest.param("--ping-interval", "nan", marks=pytest.mark.slow),  # keepalive never fires: silent clients are never disconnected
    pytest.param("--ping-interval", "-1", marks=pytest.mark.slow),
    ("--max-command-seconds", "nan"),     # no command ever times out, though the owner set a limit
    pytest.param("--max-session-mb", "-1", marks=pytest.mark.slow),
    pytest.param("--max-message-mb", "-1", marks=pytest.mark.slow),
])
def test_nonsense_limits_are_refused_at_start(flag, value):
    """Slip: a templated config expands a limit to NaN or a negative number. Must hold: the worker refuses
    to start with a one-line error naming the flag or its setting (as ``--max-command-seconds -1`` already
    does), instead of listening with a limit that is silently off."""
    try:
        wp = start_worker("alice", ["--token", TOKEN, flag, value], port=0, ready_timeout=90)
    except RuntimeError as e:  # did not start: its output is in the message
        named = (flag, flag.lstrip("-").replace("-", "_"), flag.lstrip("-").split("-")[-2])  # the flag, or its setting
        assert any(n in str(e) for n in named) and "Traceback" not in str(e), str(e)[-1500:]
        return
    wp.stop()
    pytest.fail(f"veil worker started with {flag} {value}")


@pytest.mark.parametrize("extra", [
    ["--dataset", "d=/nonexistent/redteam.csv"],
    ["--budget", "scientist=lots"],
    ["--policy", "strict"],
])
def test_bad_worker_flags_exit_with_status_2(extra):
    """Slip: a missing dataset, a malformed budget or policy. Must hold (README, cli.py docstring): one line
    ``veil worker: error: ...`` and exit status 2, like every other input error (scripts tell bad input
    from a crash by it)."""
    out = _veil("worker", "--id", "alice", "--port", "0", "--token", TOKEN, *extra)
    _assert_one_line_error(out)
    assert out.returncode == 2 and out.stderr.startswith("veil worker: error:"), (out.returncode, out.stderr)


def test_damaged_state_file_is_one_line_and_left_untouched(tmp_path):
    """Defence: a damaged ``veil-worker.sqlite3`` under --data-dir is one line naming the file (status 2),
    and its bytes are left as they were for the owner to inspect."""
    state = tmp_path / "state"
    state.mkdir()
    damaged = state / "veil-worker.sqlite3"
    damaged.write_bytes(b"SQLite format 3\x00" + b"\x13" * 300)
    before = damaged.read_bytes()
    out = _veil("worker", "--id", "alice", "--port", "0", "--token", TOKEN, "--data-dir", str(state))
    _assert_one_line_error(out)
    assert out.returncode == 2 and str(damaged) in out.stderr
    assert damaged.read_bytes() == before


@pytest.mark.slow  # starts a serving cluster (~10 s)
def test_serve_auto_port_in_use_is_a_one_line_error(tmp_path):
    """Slip: ``veil serve model.pt --auto P1,P2,P3`` where P1 is taken (another service, a previous run). Must
    hold: one line naming the worker and the cause, no traceback (when written cli.INPUT_ERRORS lacked the
    RuntimeError that websocket_launcher._launch raises, so the whole stack is printed)."""
    import socket

    from torch import nn

    from veil.serving.model_file import save_model
    from veil.workers.websocket_launcher import free_port

    model = save_model(nn.Sequential(nn.Linear(4, 2)), tmp_path / "m.pt", (1, 4))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = [busy.getsockname()[1], free_port(), free_port()]
        out = _veil("serve", str(model), "--auto", ",".join(map(str, ports)),
                    "--cluster-file", str(tmp_path / "cluster.json"), timeout=300)
    _assert_one_line_error(out)
    assert "in use" in out.stderr
    assert not (tmp_path / "cluster.json").exists()


def test_debug_logging_never_writes_presented_tokens(hook):
    """Attack: the owner turns on DEBUG logging to chase a problem (an embedding program's
    ``logging.basicConfig(level=DEBUG)``, shipped to a log collector). Must hold: neither a valid token nor
    a wrong one a client presented (maybe another service's real secret) appears in the worker's log; the
    library's handshake header dump must be redacted or kept off."""
    import threading
    import time

    import torch

    import veil as sy
    from veil.exceptions import PermissionDeniedError

    wrapper = ("import logging, sys; logging.basicConfig(level=logging.DEBUG, stream=sys.stdout); "
               "from veil.cli import main; sys.exit(main())")
    proc = subprocess.Popen([sys.executable, "-c", wrapper, "worker", "--id", "alice", "--port", "0",
                             "--token", TOKEN], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "VEIL_TRACEBACK": ""})
    lines, port = [], []

    def drain():
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line and not port:
                port.append(int(line.rsplit(":", 1)[1]))

    threading.Thread(target=drain, daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        while not port and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert port, "".join(lines[-30:])
        c = sy.WebsocketClientWorker(hook, id="alice", host="127.0.0.1", port=port[0], token=TOKEN)
        try:
            assert (torch.tensor([1.0, 2.0]).send(c) * 2).get().tolist() == [2.0, 4.0]
        finally:
            c.close()
        with pytest.raises(PermissionDeniedError):
            sy.WebsocketClientWorker(hook, id="alice", host="127.0.0.1", port=port[0], token=SECRET).close()
        time.sleep(1)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    log = "".join(lines)
    assert "DEBUG" in log  # the logging really was on
    assert TOKEN not in log and SECRET not in log, [l for l in lines if TOKEN in l or SECRET in l][:4]
    # nor payload bytes: the frame dump shows each frame's first and last 8 bytes, here the float32 values
    # 1.0 and 2.0 sent (on an SMPC party: shares and Beaver triples, whole when a tensor has few elements)
    assert "00 00 80 3f 00 00 00 40" not in log


# ------------------------------------------------------------------ secrets on disk and in ps


def test_owner_state_files_are_readable_by_the_owner_only(tmp_path):
    """Attack: another local user (no owner rights) reads the worker's ``--data-dir``. The state holds what the
    README lists as owner only: the audit log (who fetched what), the review queue (who asked, why, the
    op graph, and a SHA-256 digest of the unreleased value: a count or a rounded mean is recovered from it by
    trying every candidate) and the DP ledger. Must hold: under the common umask 022 the folder and every
    file in it (-wal/-shm too) give group and others no access."""
    old = os.umask(0o022)
    try:
        wp = start_worker("alice", ["--token", TOKEN, "--data-dir", str(tmp_path / "state"),
                                    "--budget", "scientist=1.0,1e-5"], port=0, ready_timeout=90)
    finally:
        os.umask(old)
    try:
        made = [tmp_path / "state", *sorted((tmp_path / "state").iterdir())]
        assert any(p.name == "veil-worker.sqlite3" for p in made) and any("dp-budget" in p.name for p in made)
        modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in made}
        assert all(int(m, 8) & 0o077 == 0 for m in modes.values()), modes
    finally:
        wp.stop()


#: a token flag whose value the shell expands from a variable: the token itself lands in the process's argv
_TOKEN_ON_ARGV = re.compile(r"""--(?:admin-|peer-|owner-|client-)?token[ =]+["']?\$""")


def test_documented_commands_keep_tokens_off_the_command_line():
    """Attack: another local user runs ``ps`` (or reads /proc/PID/cmdline) while the owner's ``veil worker``
    runs as the README shows it, ``--admin-token "$VEIL_ADMIN_TOKEN"``: the shell expands the variable, so the
    admin token (the owner's full view: get of every private dataset) sits in the long-running process's
    command line. The flag already defaults to $VEIL_ADMIN_TOKEN. Must hold: no documented command passes a
    token flag its value on the command line (use the environment variable alone, or ``@FILE``)."""
    docs = [ROOT / "README.md", ROOT / "veil" / "governance" / "cli.py", ROOT / "veil" / "governance" / "users_cli.py",
            ROOT / "veil" / "workers" / "websocket_cli.py", ROOT / "veil" / "serving" / "cli.py"]
    found = [f"{p.name}:{n}: {line.strip()}" for p in docs if p.exists()
             for n, line in enumerate(p.read_text().splitlines(), 1) if _TOKEN_ON_ARGV.search(line)]
    assert not found, found


def test_started_worker_keeps_tokens_off_argv_and_removes_its_argument_file(tmp_path):
    """Defence: ``start_worker`` (and so ``Cluster``) passes tokens in a private ``@FILE``: no token in the
    child's /proc/PID/cmdline (readable by every local user), and the file is gone once it listens."""
    wp = start_worker("alice", ["--token", TOKEN, "--accept-peer", f"bob={SECRET}", "--admin-token",
                                PASSWORD], port=0, ready_timeout=90)
    try:
        cmdline = Path(f"/proc/{wp.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert "veil.cli" in cmdline
        for secret in (TOKEN, SECRET, PASSWORD):
            assert secret not in cmdline
        arg_file = Path(cmdline.split("@", 1)[1].strip())
        assert arg_file.name.startswith("veil-worker-") and not arg_file.exists()
    finally:
        wp.stop()


def test_wrong_token_is_not_echoed_to_the_client_or_the_owner_log(tmp_path, hook):
    """Attack: a client presents a wrong token (maybe another service's real secret, or a near miss of the
    owner's). Must hold: the refusal the client sees, the worker's output and the audit table never contain
    the presented token."""
    import veil as sy
    from veil.exceptions import PermissionDeniedError

    wp = start_worker("alice", ["--token", TOKEN, "--data-dir", str(tmp_path / "state")], port=0,
                      ready_timeout=90)
    try:
        with pytest.raises(PermissionDeniedError) as refused:
            c = sy.WebsocketClientWorker(hook, id="alice", host="127.0.0.1", port=wp.port, token=SECRET)
            c.close()
        assert SECRET not in str(refused.value)
    finally:
        wp.stop()
    assert SECRET not in "\n".join(wp.output)
    db = sqlite3.connect(tmp_path / "state" / "veil-worker.sqlite3")
    try:
        rows = db.execute("SELECT * FROM audit").fetchall()
    finally:
        db.close()
    assert rows and SECRET not in repr(rows)
