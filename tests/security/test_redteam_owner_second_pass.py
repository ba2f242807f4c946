"""Red team, second pass on the owner-state and CLI fixes (commits 9f30c53, f579d7f): what ``redact`` still
prints, and whose folder the owner's state ends up in.

Every test asserts the safe behaviour: an ``xfail(strict=True)`` one is a hole today and passes once fixed.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from veil.workers.database import Database, redact
from veil.workers.persistence import OwnerDB

from tests.cli_batch import run_veil
from tests.scale.conftest import pg_url, postgres_server  # noqa: F401  (fixtures: a real PostgreSQL)

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cretPW"

#: URLs whose password libpq reads (checked below with psycopg's own parser) that redact leaves readable
USERINFO_WITH_QUERY_OR_HASH = (f"postgresql://alice:{SECRET}?x@db.internal/alice_state",
                               f"postgresql://alice:{SECRET}#1@db.internal/alice_state")


def _unreachable(url_tail: str) -> str:
    """The same credentials on a port nothing listens on (connect fails at once)."""
    return url_tail.replace("db.internal", "127.0.0.1:1")


@pytest.mark.parametrize("url", USERINFO_WITH_QUERY_OR_HASH)
def test_a_userinfo_password_holding_a_question_mark_or_hash_is_never_printed(url):
    """Attack: the owner's PostgreSQL password holds ``?`` or ``#`` (a generated password; libpq's URL parser
    takes everything up to the last ``@`` as user info, so it works unencoded). A local user reads the worker's
    start-up summary (``owner state: <redact(--db)>``), its log, or the one-line error of an unreachable
    database. Must hold: the password appears in none of them (redact's user-info pattern stops at ``?``/``#``
    and so masks nothing)."""
    assert conninfo_to_dict(url)["password"].startswith(SECRET)  # libpq reads it as the password
    assert SECRET not in redact(url), redact(url)
    with pytest.raises(ConnectionError) as info:
        Database(_unreachable(url), timeout=2)  # (port 1: refused at once, no connect_timeout needed)
    assert "cannot connect" in str(info.value) and SECRET not in str(info.value), str(info.value)


@pytest.mark.parametrize("query, parameter", [(f"sslmode=prefer&connect_timeout=2&sslpassword={SECRET}", "sslpassword"),
                                              (f"connect_timeout=2&%70assword={SECRET}", "password")],
                         ids=["sslpassword", "percent-encoded-name"])
def test_a_password_parameter_is_never_printed(query, parameter):
    """Attack: the URL carries a secret as a query parameter redact did not recognise: the client key's
    passphrase as ``sslpassword`` (a documented libpq parameter, as secret as ``password``; ``[?&]password=``
    does not match inside ``&sslpassword=``), or the password under a percent-encoded name (``?%70assword=``:
    libpq decodes parameter names as well as values). A local user reads the start-up summary, the worker's
    log or the unreachable-database error line. Must hold: the secret appears in neither ``redact``'s output
    nor the error."""
    url = f"postgresql://alice@127.0.0.1:1/alice_state?{query}"
    assert conninfo_to_dict(url)[parameter] == SECRET  # libpq reads it as that parameter
    assert SECRET not in redact(url), redact(url)
    with pytest.raises(ConnectionError) as info:
        Database(url, timeout=2)
    assert SECRET not in str(info.value), str(info.value)


def _cli_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VEIL_TOKEN", "VEIL_ADMIN_TOKEN", "VEIL_DB")}
    env["VEIL_TRACEBACK"] = ""
    return env


#: ``veil worker --db URL`` against an unreachable server, the password in the forms below
UNREACHABLE_WITH_PASSWORD = (f"postgresql://alice:{SECRET}%40x%26y%20z@127.0.0.1:1/db?connect_timeout=2",
                             f"postgresql://alice:{SECRET}@x@127.0.0.1:1/db?connect_timeout=2",
                             f"postgresql://alice@127.0.0.1:1/db?connect_timeout=2&password={SECRET}%23")
#: state URLs copied from other tools' configs, which veil refuses
REFUSED_URLS = (f"postgresql+psycopg://alice:{SECRET}@db.internal/alice_state",  # SQLAlchemy form
                f"'postgresql://alice:{SECRET}@db.internal/alice_state'",  # quoted in an env file
                f"PostgreSQL://alice:{SECRET}@db.internal/alice_state")


def _refused_commands(url: str, state: Path) -> list[list[str]]:
    return [["worker", "--id", "alice", "--port", "0", "--db", url],
            ["db", "migrate", "--from", str(state), "--to", url]]


@pytest.fixture(scope="module")
def failed_commands(tmp_path_factory) -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    """Every command below that fails at start-up, run in one shared Python process (tests/cli_batch.py: each a fresh
    ``python -m veil.cli`` would cost another import of torch), by its arguments."""
    state = tmp_path_factory.mktemp("second_pass") / "state"
    state.mkdir()
    commands = [["worker", "--id", "alice", "--port", "0", "--db", url] for url in UNREACHABLE_WITH_PASSWORD]
    commands += [argv for url in REFUSED_URLS for argv in _refused_commands(url, state)]
    return {tuple(argv): run_veil(argv, env=_cli_env(), cwd=ROOT) for argv in commands} | {"state": state}


def test_worker_start_error_line_masks_the_common_password_forms(failed_commands):
    """Defence: ``veil worker --db URL`` against an unreachable server, with the password as user info
    holding ``@``, ``&`` and spaces (percent-encoded) and as a ``password=`` parameter. Must hold: one line,
    status 2, and the password is on neither stream."""
    for url in UNREACHABLE_WITH_PASSWORD:
        out = failed_commands[("worker", "--id", "alice", "--port", "0", "--db", url)]
        text = out.stdout + out.stderr
        assert out.returncode == 2 and "Traceback" not in text, text[-1500:]
        assert text.strip().count("\n") == 0 and "cannot connect" in text, text[-1500:]
        assert SECRET not in text, text[-1500:]


def test_the_batched_cli_runs_report_what_a_veil_process_prints(tmp_path):
    """The check above runs its commands in one process (tests/cli_batch.py): that process must report
    a command's own status and streams, so a password printed there would be seen: one real process for
    comparison, and a missing option (argparse's SystemExit: status 2, one line on stderr)."""
    url = UNREACHABLE_WITH_PASSWORD[0]
    argv = ["worker", "--id", "alice", "--port", "0", "--db", url]
    real = subprocess.run([sys.executable, "-m", "veil.cli", *argv], cwd=ROOT, env=_cli_env(),
                          capture_output=True, text=True, timeout=180)
    batched, missing = (run_veil(a, env=_cli_env(), cwd=ROOT) for a in (argv, ["worker"]))
    assert (batched.returncode, batched.stdout, batched.stderr) == (real.returncode, real.stdout, real.stderr)
    assert (missing.returncode, missing.stdout) == (2, "")
    assert missing.stderr == "veil worker: error: the following arguments are required: --id\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make files another user owns")
def test_a_data_dir_another_user_prepared_is_not_used_for_the_owners_state(tmp_path):
    """Attack: the owner starts ``veil worker --data-dir /tmp/veil-state`` (a shared /tmp, or any folder another
    local user can create first). That user made the folder beforehand, mode 0777, and planted an empty
    ``veil-worker.sqlite3`` of theirs, mode 0666. ``private_dir`` and ``_owner_only`` only tighten what the
    owner owns, so they leave both as they are and sqlite writes the audit log (who fetched what), review
    queue and kv store into the other user's file. Must hold: either the worker refuses the folder (as ssh
    refuses a key folder others can write), or the state it writes is in a file only the owner can read, in a
    folder no one else can write (where the other user could swap the DP ledger or delete the audit log)."""
    nobody = 65534
    folder = tmp_path / "veil-state"
    folder.mkdir()
    os.chown(folder, nobody, nobody)
    os.chmod(folder, 0o777)
    planted = folder / OwnerDB.FILENAME
    planted.touch()
    os.chown(planted, nobody, nobody)
    os.chmod(planted, 0o666)
    try:
        db = OwnerDB.in_dir(folder)
    except (OSError, ValueError, PermissionError) as e:  # refused: the safe outcome
        assert str(e), "a refusal should say why"
        return
    try:
        db.audit("alice", "get", "ana", "session-1", ["obj-1"])
        state = folder / OwnerDB.FILENAME
        info, dir_info = state.stat(), folder.stat()
        assert info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) & 0o077 == 0, \
            (info.st_uid, oct(stat.S_IMODE(info.st_mode)))
        assert dir_info.st_uid == os.geteuid() and stat.S_IMODE(dir_info.st_mode) & 0o022 == 0, \
            (dir_info.st_uid, oct(stat.S_IMODE(dir_info.st_mode)))
    finally:
        db.close()


@pytest.mark.parametrize("url", REFUSED_URLS)
def test_a_database_url_veil_refuses_is_not_echoed_with_its_password(failed_commands, url):
    """Attack: the owner copies the state URL from another tool's config: the SQLAlchemy spelling
    ``postgresql+psycopg://``, a value an env file kept its quotes on (``VEIL_DB='postgresql://...'``), or an
    upper-case scheme. veil refuses it (good), but the one-line error quotes the whole URL: the password lands
    on stderr, i.e. in the journal or log collector other local users read. Must hold: ``veil worker --db``
    and ``veil db migrate --to`` refuse it without printing the password (``redact`` masks every one of these
    forms already; the refusals do not call it)."""
    for argv in _refused_commands(url, failed_commands["state"]):
        out = failed_commands[tuple(argv)]
        text = out.stdout + out.stderr
        assert out.returncode != 0 and "Traceback" not in text, text[-1500:]
        assert SECRET not in text, text[-1500:]


@pytest.mark.slow  # a 12 s statement on a live PostgreSQL
def test_a_slow_statement_on_a_live_server_is_not_severed_by_the_watchdog(pg_url):
    """Attack: a scientist makes one of the owner's statements slow on a live server (a long scan, a row lock
    another replica holds) past the watchdog's ``STALL_S`` (10 s), hoping the watchdog takes the live server for
    a frozen one and cuts the connection mid-transaction (a charge committed whose answer is lost, or an owner
    transaction killed). Must hold: the liveness probe answers, so the statement runs to its end (the server's
    own statement_timeout is its limit) on the same connection, and the connection stays usable."""
    db = Database(pg_url, timeout=30)
    try:
        conn = db._conn
        with db.write_transaction():
            db.execute("CREATE TABLE slow (x INTEGER)")
            assert db.execute("SELECT pg_sleep(12), 7").fetchone()[1] == 7
            db.execute("INSERT INTO slow VALUES (1)")
        assert db._conn is conn and not conn.closed  # never severed nor reconnected
        assert db.execute("SELECT COUNT(*) FROM slow").fetchone()[0] == 1
    finally:
        db.close()


@pytest.mark.parametrize("sep", ["\x0b", "\x0c", "\x1c", "\x85", "\u2028"])
def test_a_worker_argument_reaches_the_worker_as_one_argument_or_is_refused(monkeypatch, sep):
    """Attack: a value ``start_worker`` (and ``Cluster``, ``veil serve --auto``) passes to a worker holds a line
    separator other than ``\\n``/``\\r`` (a token or a path read from a file or another system). The launcher
    writes one argument a line and refuses only ``\\n``/``\\r``; veil's ``@FILE`` reader splits with
    ``str.splitlines``, which also breaks at these: the rest of the value becomes arguments of its own, e.g.
    ``--admin-token`` with a token of the writer's choosing. Must hold: either ``start_worker`` refuses the
    value (ValueError) or the worker's parser reads back exactly the arguments given."""
    from veil.cli import ArgumentParser
    from veil.workers import websocket_launcher

    args = ["--token", f"scientist-token{sep}--admin-token{sep}chosen-admin-token", "--data-dir", "/tmp/x"]
    seen: list = []

    def fake_launch(worker_id, launch_args, port, env, ready_timeout):
        (at,) = launch_args
        parser = ArgumentParser(prog="veil", fromfile_prefix_chars="@")
        seen.append(parser._read_args_from_files([at]))
        return None

    monkeypatch.setattr(websocket_launcher, "_launch", fake_launch)
    try:
        websocket_launcher.start_worker("alice", args)
    except ValueError:
        return  # refused: safe
    assert seen == [args], seen


def test_a_read_only_state_database_tells_the_scientist_only_that_it_is_unavailable(pg_url, spawn):
    """Attack: the owner's PostgreSQL fails over and the worker's reconnect lands on a server that takes no
    writes (a standby, or a database set read-only during maintenance): a common outage mode. A scientist keeps
    sending DP releases and gets, and reads the error text. Must hold, as for a server that is down: every
    refusal is veil's generic "the owner's state database is unavailable" (no driver class, no SQL, nothing
    that tells the scientist how the owner's state is stored), and nothing is released."""
    import psycopg

    import veil as sy
    from tests.security.test_redteam_postgres_replicas import _scientist, _worker_args

    wp = spawn("alice-ro", _worker_args(pg_url), ready_timeout=120)
    ana = _scientist(wp)
    try:
        (target,) = ana.search(["#boston", "#target"])
        sy.dp.remote_query(target, "count", epsilon=0.05)  # served while the server takes writes
        database = pg_url.rsplit("/", 1)[1]
        with psycopg.connect(pg_url, autocommit=True) as conn:  # the failover: writes refused, sessions cut
            conn.execute(f"ALTER DATABASE {database} SET default_transaction_read_only = on")
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        errors = []
        for call in [lambda: sy.dp.remote_query(target, "count", epsilon=0.05)] * 3 + [lambda: target.mean().get()]:
            try:
                call()
            except Exception as e:  # noqa: BLE001 - the text is what is checked
                errors.append(f"{type(e).__name__}: {e}")
            else:
                errors.append("released without its audit row or charge")
        for text in errors:
            assert "unavailable" in text, errors
            assert "ReadOnly" not in text and "read-only" not in text and "INSERT" not in text, errors
    finally:
        ana.close()
