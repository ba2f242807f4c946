"""Red team of the owner console, third pass (veil/governance/console/): what the first two passes left.

The first pass (test_redteam_console.py) covered escaping, origins, Host headers and admin-token gating; the
second (test_redteam_console_second_pass.py) the revoke form, log-in and session handling, static files,
oversized form bodies, idle and half-sent request heads, and the secret ``*.localhost`` name. This one
attacks, as anyone who reaches the port (every local user on loopback) or a scientist who fills the ledger:

- a request head sent whole, then its body a byte at a time (the head deadline was over; nothing else
  bounded the request), or a huge body to a route that answers without reading it;
- a scientist's many tiny DP charges against the Budgets page (read whole into the console per request);
- the console served off loopback, where the admin token and the session cookie went over plain HTTP;
- and, as guards, every POST route of the app behind its session's CSRF token and a same-origin check.
"""

from __future__ import annotations

import socket
import time
import tracemalloc
import types

import pytest
import torch

import veil as sy
from veil.governance.console import connections, svg, views
from veil.governance.console.auth import COOKIE
from veil.governance.console.server import ConsoleServer
from veil.governance.state import policy_of
from veil.workers.websocket_server import WebsocketServerWorker

from network_helpers import TOKEN, self_signed_cert
from tests.scale import conftest as scale_fixtures

testclient = pytest.importorskip("starlette.testclient")
httpx = pytest.importorskip("httpx")

postgres_server, pg_url = scale_fixtures.postgres_server, scale_fixtures.pg_url  # fixtures: a real PostgreSQL

ADMIN = "redteam3-console-admin"
MALLORY = "redteam3-console-mallory"


@pytest.fixture
def served(hook, request):
    """An in-process serving worker with an owner and two scientists; its console is built, not started."""
    tokens = sy.TokenTable()
    tokens.add(ADMIN, "owner", "admin")
    tokens.add(MALLORY, "mallory", "scientist")
    tokens.add(TOKEN, "scientist", "scientist")
    w = WebsocketServerWorker(hook, id=f"rt-console3-{request.node.name[:16]}-{time.monotonic_ns() % 10**6}",
                              port=0, tokens=tokens)
    w.load(torch.tensor([[1.5, 2.5], [101.0, 202.0]]), tags=("#ward",), description="ward data", policy="review")
    return w


def _client(console, scheme: str = "http"):
    return testclient.TestClient(console.app, base_url=f"{scheme}://{console.host_name}:8780",
                                 follow_redirects=False)


def _login(client, origin: str | None = None):
    page = client.get("/login")
    csrf = page.text.split('name="login_csrf" value="', 1)[1].split('"', 1)[0]
    r = client.post("/login", data={"login_csrf": csrf, "token": ADMIN},
                    headers={"origin": origin or str(client.base_url).rstrip("/")})
    assert r.status_code == 303 and r.headers["location"] == "/requests", r.text
    return r


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"", answer: bytearray | None = None) -> bool:
    """Whether the console closes ``sock`` within ``seconds`` (sending ``trickle`` every 0.1 s meanwhile;
    what it answers goes into ``answer``)."""
    sock.settimeout(0.1)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if trickle:
                sock.sendall(trickle)
            got = sock.recv(65536)
            if got == b"":
                return True
            if answer is not None:
                answer += got
        except socket.timeout:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return True
    return False


def _shown_text(body: str) -> str:
    """What a browser shows of ``body``: its text nodes (attribute values, such as a form field's, are not)."""
    from html.parser import HTMLParser

    parts: list[str] = []
    parser = HTMLParser()
    parser.handle_data = parts.append
    parser.feed(body)
    return "".join(parts)


# ------------------------------------------------------------------ holes of the third pass, now fixed


def test_a_trickled_body_does_not_hold_a_console_connection(served, monkeypatch):
    """Attack: anyone who can reach the port (any local user on loopback) opens as many connections as
    the console takes (32), sends each a whole ``POST /login`` head with ``Content-Length: 4000``, then one
    byte of body every 100 ms. The 10 s head deadline ended with the head, and nothing bounded the rest:
    every slot stayed taken for as long as the bytes kept coming, and the owner could not load the console.
    Must hold: a body not all in within ``BODY_SECONDS`` of its head closes its connection, and the owner
    then gets the log-in page (limits shortened here: 4 connections, 0.5 s)."""
    monkeypatch.setattr(connections, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(connections, "BODY_SECONDS", 0.5, raising=False)
    console = ConsoleServer(served, host="127.0.0.1", port=0).start()
    head = (f"POST /login HTTP/1.1\r\nHost: {console.host_name}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 4000\r\n\r\nlogin_csrf=").encode()
    try:
        held = [socket.create_connection(("127.0.0.1", console.port), timeout=5) for _ in range(4)]
        for s in held:
            s.sendall(head)
        started = time.monotonic()
        # (a body left unbounded trickles on for the whole 30 s; one cut at BODY_SECONDS closes them all in
        # about 0.5 s: the bound's slack is for a loaded machine)
        assert all(_closed_within(s, 30.0, trickle=b"a") for s in held)
        assert time.monotonic() - started < 10
        with httpx.Client(base_url=f"http://127.0.0.1:{console.port}", headers={"host": console.host_name},
                          timeout=10) as owner:
            assert owner.get("/login").status_code == 200
        for s in held:
            s.close()
    finally:
        console.stop()


def test_connections_held_open_by_slow_clients_do_not_lock_the_owner_out(served, monkeypatch):
    """Attack: the same local user, now within every deadline: it keeps all the console's slots taken
    with connections that send their heads slowly, opening a new one as soon as one is closed. A slot
    came free only when a deadline ran out, and the console closed every connection beyond its cap at
    once, the owner's browser's included: the owner could not load a page for as long as the attacker
    kept at it. Must hold: a new connection takes the place of the one that has waited longest on its
    client, so the owner's browser (which sends its request at once) gets its page; and a connection whose
    request is being answered is never the one closed (deadlines set long here: 4 slots, 30 s)."""
    monkeypatch.setattr(connections, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(connections, "HEAD_SECONDS", 30.0)
    monkeypatch.setattr(views, "datasets", lambda worker: time.sleep(1.0) or [])
    console = ConsoleServer(served, host="127.0.0.1", port=0).start()
    held: list[socket.socket] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{console.port}", headers={"host": console.host_name},
                          timeout=10) as owner:
            _login(owner, origin=f"http://{console.host_name}")
            sid = owner.cookies.get(COOKIE)
        slow = socket.create_connection(("127.0.0.1", console.port), timeout=5)  # the owner's slow page
        slow.sendall(f"GET /datasets HTTP/1.1\r\nHost: {console.host_name}\r\nCookie: {COOKIE}={sid}\r\n"
                     "Connection: close\r\n\r\n".encode())
        time.sleep(0.2)
        for _ in range(8):  # a head never finished, on every slot there is (and more)
            s = socket.create_connection(("127.0.0.1", console.port), timeout=5)
            s.sendall(f"GET /login HTTP/1.1\r\nHost: {console.host_name}\r\n".encode())
            held.append(s)
            time.sleep(0.05)
        with httpx.Client(base_url=f"http://127.0.0.1:{console.port}", headers={"host": console.host_name},
                          timeout=10) as owner:
            assert owner.get("/login").status_code == 200
        answer = bytearray()
        assert _closed_within(slow, 5.0, answer=answer) and bytes(answer).startswith(b"HTTP/1.1 200 ")
        slow.close()
    finally:
        for s in held:
            s.close()
        console.stop()


def test_a_request_not_answered_in_time_is_closed(served, monkeypatch):
    """Behind the previous test: the whole request is bounded too (``REQUEST_SECONDS`` from its head to the
    end of its answer): a page that is not answered in time, or not read by its client, frees its slot."""
    monkeypatch.setattr(connections, "BODY_SECONDS", 0.2, raising=False)
    monkeypatch.setattr(connections, "REQUEST_SECONDS", 0.5, raising=False)
    monkeypatch.setattr(views, "datasets", lambda worker: time.sleep(1.5) or [])
    console = ConsoleServer(served, host="127.0.0.1", port=0).start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{console.port}", headers={"host": console.host_name},
                          timeout=10) as owner:
            _login(owner, origin=f"http://{console.host_name}")
            sid = owner.cookies.get(COOKIE)
        s = socket.create_connection(("127.0.0.1", console.port), timeout=5)
        s.sendall(f"GET /datasets HTTP/1.1\r\nHost: {console.host_name}\r\nCookie: {COOKIE}={sid}\r\n\r\n".encode())
        answer = bytearray()
        assert _closed_within(s, 4.0, answer=answer)
        assert bytes(answer) == b""  # closed at the deadline, before the slow page's answer
        s.close()
    finally:
        console.stop()


def test_a_huge_body_is_cut_off_at_the_connection(served, monkeypatch):
    """Attack: ``POST /users/revoke`` without a session, declaring a 1 GiB body, then sending it at full
    speed. The console answers 403 without reading the body, and uvicorn then read and dropped whatever
    followed for as long as the connection lived: one client kept the console's loop busy with bytes nobody
    wanted. Must hold: past ``MAX_REQUEST_BYTES`` (256 KiB) the connection is closed (head deadline set long
    here, so that only this bound can close it)."""
    monkeypatch.setattr(connections, "HEAD_SECONDS", 30.0)
    console = ConsoleServer(served, host="127.0.0.1", port=0).start()
    try:
        s = socket.create_connection(("127.0.0.1", console.port), timeout=5)
        s.sendall(f"POST /users/revoke HTTP/1.1\r\nHost: {console.host_name}\r\n"
                  f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {1 << 30}\r\n\r\n".encode())
        cut = False
        try:
            for _ in range(64):  # 4 MiB
                s.sendall(b"x" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            cut = True
        assert cut or _closed_within(s, 3.0)
        s.close()
        assert "mallory" not in served.tokens.revoked
    finally:
        console.stop()


def _old_budget_points(ledger, user):
    """The Budgets page's curve as the console computed it before: the user's whole charge history."""
    running, points = 0.0, []
    for e, _d, reason, at in ledger.history(user):
        running += e
        points.append((at, running, reason))
    return points


def test_budgets_page_sums_a_large_ledger_in_the_database(served, monkeypatch):
    """Attack: a scientist with a DP budget makes a great many tiny releases (epsilon down to 1e-6: a budget
    of 1 allows a million charges). ``views.budgets`` read every charge of every user into the console's
    memory on each load of the Budgets page (a tuple, two floats and a string per charge), on the worker's
    own handler thread. Must hold: the page's Python memory stays small whatever the ledger holds (summed
    and bucketed in the database), and it shows the same numbers and the same curve as the old
    computation (the whole history downsampled by ``svg._downsample``), for a large history, a short one
    (every charge its own point) and none."""
    from veil.dp.worker_owner import enable_dp

    ledger = enable_dp(served, budgets={"mallory": (1.0, 1e-5), "scientist": (2.0, 1e-5),
                                        "idle": (0.5, 0.0)}).ledger
    base = time.time() - 7200
    big = [("mallory", 2.0**-20 * (1 + i % 7), 1e-12 * (i % 3), f"DP mean #{i}", base + i * 0.07 + (i % 5) * 0.001)
           for i in range(60_000)]
    small = [("scientist", 0.01 * (i + 1), 0.0, f"DP sum #{i}", base + 100 * i) for i in range(40)]
    with ledger._lock:
        ledger._db._conn.executemany('INSERT INTO charges("user", epsilon, delta, reason, at) VALUES (?, ?, ?, ?, ?)',
                                     big + small)
        ledger._db._conn.commit()

    tracemalloc.start()
    try:
        views.budgets(served)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"the Budgets page took {peak / 2**20:.1f} MiB of Python memory"

    now = time.time()
    fixed_clock = types.SimpleNamespace(time=lambda: now, strftime=time.strftime, localtime=time.localtime)
    monkeypatch.setattr(svg, "time", fixed_clock)
    rows = {r["user"]: r for r in views.budgets(served, now=now)}
    assert sorted(rows) == ["idle", "mallory", "scientist"]
    for user, r in rows.items():
        old = _old_budget_points(ledger, user)
        assert (r["spent_epsilon"], r["spent_delta"]) == ledger.spent(user)
        assert len(r["points"]) <= svg.MAX_CURVE_POINTS
        expected_span = (min(p[0] for p in old), max(now, min(p[0] for p in old) + 1)) if old else (now, now + 1)
        assert r["span"] == expected_span
        expected = svg._downsample(old, *expected_span, svg.MAX_CURVE_POINTS)
        assert [(t, label) for t, _, label in r["points"]] == [(t, label) for t, _, label in expected], user
        assert [v for _, v, _ in r["points"]] == pytest.approx([v for _, v, _ in expected], rel=1e-12), user
        # the picture the page draws is the picture the old computation drew
        assert svg.budget_svg(r["points"], r["epsilon"], span=r["span"]) == svg.budget_svg(old, r["epsilon"]), user
    assert 100 < len(rows["mallory"]["points"]) <= svg.MAX_CURVE_POINTS and len(rows["scientist"]["points"]) == 40
    assert rows["idle"]["points"] == []

    console = ConsoleServer(served, host="127.0.0.1", port=0)
    owner = _client(console)
    _login(owner)
    page = owner.get("/budgets")
    assert page.status_code == 200 and "mallory" in page.text and len(page.content) < 400_000


def test_the_audit_page_reads_a_bounded_part_of_a_long_log(served, monkeypatch):
    """Attack: a scientist grows the owner's audit log (every refused command is a row: a million in well
    under an hour). Each load of the Audit page offered its filter's choices from ``SELECT DISTINCT`` over
    the whole log, three times (~2.5 s at a million rows on this machine), on the console's event loop and
    under the owner database's lock, which the worker's own audit writes wait for. Must hold: the choices
    come from the latest rows (``AUDIT_CHOICE_ROWS``, shortened here to 2,000) and the token table, so the
    work no longer grows with the log (counted in SQLite VM steps: deterministic); a user only older rows
    name can still be filtered on, and stays selected."""
    from veil.governance.state import governance

    monkeypatch.setattr(views, "AUDIT_CHOICE_ROWS", 2_000, raising=False)
    owner_db = governance(served).db
    conn = owner_db._db._conn

    def add(rows: int, who: str) -> None:
        with owner_db._lock:
            conn.executemany("INSERT INTO audit (ts, worker, action, principal, session, object_ids, outcome, "
                             "detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             [(time.time(), served.id, "CommandMessage", who, "s-1", "[7]", "refused",
                               f"refused #{i}") for i in range(rows)])
            conn.commit()

    def steps() -> int:
        count = [0]
        conn.set_progress_handler(lambda: count.__setitem__(0, count[0] + 1), 100)
        try:
            choices = views.audit_choices(served)
        finally:
            conn.set_progress_handler(None, 0)
        steps.choices = choices
        return count[0]

    add(1, "ghost")  # a user only the oldest row names
    add(4_000, "mallory")
    short = steps()
    add(60_000, "mallory")
    long = steps()
    assert long < 1.5 * short, f"{long} VM steps for the choices of a 64k-row log, {short} for 4k rows"
    assert {"mallory", "owner", "scientist"} <= set(steps.choices["principal"]), steps.choices  # (token holders)

    console = ConsoleServer(served, host="127.0.0.1", port=0)
    owner = _client(console)
    _login(owner)
    page = owner.get("/audit", params={"user": "ghost"})
    assert page.status_code == 200 and '<option value="ghost" selected>ghost</option>' in page.text
    assert page.text.count("refused #0<") == 1 and "refused #1<" not in page.text


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7"])
def test_off_loopback_the_console_is_refused_without_tls(served, host):
    """Attack: the owner serves the console beyond loopback (``--console-host 0.0.0.0``) to reach it from
    their laptop. It spoke plain HTTP there: the admin token posted at log-in, and the session cookie with
    every page, crossed the network in clear for anyone on the path to read and then act as the owner
    (approve releases, revoke users); nor was the session bound to a secret host name as on loopback.
    Must hold: off loopback the console does not start without TLS, with one line that says what to do."""
    with pytest.raises(ValueError) as refused:
        ConsoleServer(served, host=host, port=0)
    message = str(refused.value)
    assert "\n" not in message and "--cert" in message and "loopback" in message
    for loopback in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):  # loopback: plain, on the secret name
        assert ConsoleServer(served, host=loopback, port=0).host_name.endswith(".localhost"), loopback


def test_veil_worker_refuses_an_off_loopback_console_without_tls_in_one_line(tmp_path):
    """Behind the previous test, from the command line: ``veil worker --console-host 0.0.0.0`` without
    ``--cert``/``--key`` exits with status 2 and one ``error:`` line (no traceback), the admin token never in it.
    (In the shared runner, tests/cli_batch.py: no process start of its own, so no longer with the slow tests.)"""
    import os

    from tests.cli_batch import run_veil

    admin = "cli-console3-admin-token"
    done = run_veil(["worker", "--id", "rt3", "--port", "0", "--token", TOKEN, "--admin-token", admin,
                     "--console-port", "0", "--console-host", "0.0.0.0", "--data-dir", str(tmp_path)],
                    cwd=os.getcwd(), timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "error:" in lines[0] and "--cert" in lines[0], done.stderr
    assert admin not in done.stderr + done.stdout and "listening" not in done.stdout


def test_off_loopback_the_console_serves_https_with_secure_cookies(served, tmp_path):
    """Behind the previous test: with the worker's certificate the console serves https only; its session
    cookie is ``Secure`` (never sent to a plain-HTTP port of the host), and a plain-HTTP request gets no
    page."""
    try:
        cert, key = self_signed_cert(tmp_path)
    except (OSError, __import__("subprocess").CalledProcessError):
        pytest.skip("needs the openssl command")
    console = ConsoleServer(served, host="0.0.0.0", port=0, certfile=str(cert), keyfile=str(key)).start()
    try:
        assert console.url == f"https://0.0.0.0:{console.port}"
        with httpx.Client(base_url=f"https://127.0.0.1:{console.port}", verify=False, timeout=10,
                          follow_redirects=False) as owner:
            r = _login(owner)
            assert r.status_code == 303 and r.headers["location"] == "/requests"
            cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith(COOKIE + "="))
            assert "secure" in {f.strip().lower() for f in cookie.split(";")[1:]}
            assert owner.get("/requests").status_code == 200
        with httpx.Client(base_url=f"http://127.0.0.1:{console.port}", timeout=10) as plain:
            with pytest.raises(httpx.HTTPError):
                plain.get("/login")
    finally:
        console.stop()


# --------------------------------------------------------------------------------------------- what holds


def test_the_requests_page_does_not_parse_every_requests_op_graph(hook, monkeypatch):
    """Attack: a scientist files the most pending requests allowed (100), each on a value computed by a
    long plan run many times: its stored op graph is ~400 KB of JSON (64 nodes of up to 200 plan steps).
    The Requests page, the owner's first page, which reloads itself every 5 s, read every listed request
    whole (``ReviewQueue.list``: up to 500) and parsed each graph, on the console's event loop, only to
    name the datasets in its "From" column. Must hold: the page's Python memory stays small however big
    the graphs (40 requests here), and "From" still names the datasets as the graph's source boxes do."""
    from veil.governance.state import governance
    from veil.plans.plan import Plan
    from veil.workers.persistence import db_execute
    from veil.workers.websocket_auth import TokenTable

    w = sy.VirtualWorker(hook, id="rt-console3-graphs")
    w.tokens = TokenTable()
    w.tokens.add(ADMIN, "owner", "admin")
    w.load(torch.ones(4, 3), tags=("#ward",), description="ward data", policy="review")

    def steps(a):
        for _ in range(200):
            a = a + 1.0
        return a

    plan = Plan(steps, args_shape=[(4, 3)], name="p" * 64)
    plan.build(torch.zeros(4, 3))
    run = plan.send(w)
    y = w.search(["#ward"])[0]
    for _ in range(70):
        out = run(y)
        y = out[0] if isinstance(out, (list, tuple)) else out
    rid = y.request(reason="the means")["id"]
    db = governance(w).db
    columns = [d[0] for d in db._db.execute("SELECT * FROM release_requests LIMIT 0").description]
    copied = ", ".join("? || id" if c == "id" else c for c in columns)
    for i in range(39):
        db_execute(db, f"INSERT INTO release_requests ({', '.join(columns)}) SELECT {copied} FROM release_requests "
                       "WHERE id = ?", (f"copy{i}-", rid))
    (size,) = db_execute(db, "SELECT SUM(LENGTH(graph)) FROM release_requests")[0]
    assert size > 8 << 20  # the graphs: more than 8 MB of JSON in all

    console = ConsoleServer(w, host="127.0.0.1", port=0)
    owner = _client(console)
    _login(owner)
    owner.get("/requests")  # (warm: templates compiled)
    tracemalloc.start()
    try:
        page = owner.get("/requests")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert page.status_code == 200 and page.text.count("the means") == 40
    assert peak < 4 << 20, f"the Requests page took {peak / 2**20:.1f} MiB of Python memory"
    labels = [n["label"] for n in w.release_requests.get(rid).graph.values() if n["op"] == "dataset"]
    assert labels == ["#ward (ward data)"] and page.text.count("<td>#ward (ward data)</td>") == 40


def test_every_recorded_string_is_shown_escaped_as_the_cli_prints_it(served):
    """Attack: text that reaches the owner's pages from a record, not from a form: an op graph's node
    arguments and labels (a plan's name, an op's keyword names), the audit log's details and object ids (a
    refused command's error text). ``veil requests show`` prints every op line through ``shown`` (bidi,
    zero-width and line-separator characters as ``\\u202e``); the console escaped only the request's
    reason: the op lines, the graph's boxes and tooltips and every audit cell were HTML-escaped but shown
    raw, so U+202E could reorder what the owner reads ("sum" that reads as a harmless op). The graph and the
    audit row are written into the owner's database here, standing for any path a scientist's text finds
    into them. Must hold: no such character reaches any page raw, and markup stays text."""
    import json

    from veil.governance.state import audit, governance
    from veil.workers.persistence import db_execute

    hostile = "mean\u202e)0=mid(mus\u2028<b>x</b>\u200b"
    rid = (served.search(["#ward"])[0] * 2).request(reason="means")["id"]
    db = governance(served).db
    (stored,) = db_execute(db, "SELECT graph FROM release_requests WHERE id = ?", (rid,))[0]
    graph = json.loads(stored)
    for nid, node in graph.items():
        if nid != "__root__":
            node["args"] = hostile
            node["label"] = hostile
    db_execute(db, "UPDATE release_requests SET graph = ? WHERE id = ?", (json.dumps(graph), rid))
    audit(served, "CommandMessage", "mallory", "s-1", [hostile], "refused", hostile)

    console = ConsoleServer(served, host="127.0.0.1", port=0)
    owner = _client(console)
    _login(owner)
    for path in (f"/requests/{rid}", "/requests", "/audit", "/audit?q=mean"):
        page = owner.get(path)
        assert page.status_code == 200, path
        assert not any(c in page.text for c in "\u202e\u2028\u200b"), path
        assert "<b>x</b>" not in page.text, path
    assert "\\u202e" in owner.get(f"/requests/{rid}").text and "\\u2028" in owner.get("/audit").text


def test_crafted_filter_links_are_answered_not_failed(served, caplog):
    """Attack: a link handed to the owner (pasted into the address bar: the SameSite cookie goes with it)
    with filter values the pages do not expect. ``/audit?since=²`` passed the page's ``isdigit`` check and
    failed ``float``: a 500 and an error line in the worker's log per click. Must hold: every such link
    gets its page (the odd filter ignored), and nothing is logged as a failure."""
    console = ConsoleServer(served, host="127.0.0.1", port=0)
    owner = _client(console)
    _login(owner)
    links = [("/audit", {"since": "\u00b2"}), ("/audit", {"since": "\u0661\u0662"}), ("/audit", {"since": "9" * 400}),
             ("/audit", {"since": "1.5.2"}), ("/audit", {"q": "\x00%_\\"}), ("/requests", {"state": "'; --"}),
             ("/audit", {"user": "<b>x</b>", "action": "\u202e", "outcome": "x" * 5000})]
    with caplog.at_level("ERROR", logger="veil.console"):
        for path, params in links:
            page = owner.get(path, params=params)
            assert page.status_code == 200, (path, params)
            assert "<b>x</b>" not in page.text, (path, params)
            assert "\u202e" not in _shown_text(page.text), (path, params)  # (a form's value attribute keeps it)
    assert not caplog.records


def test_every_post_route_needs_its_sessions_csrf_token_and_the_same_origin(served):
    """Attack: cross-site request forgery on every state-changing route the app has, present and future
    (read from the app's route table, so a route added without ``@page(method_post=True)`` fails here):
    with the owner's cookie but no CSRF field, another session's token, or a foreign Origin. Must hold:
    each is refused with 403 and changes nothing (no revocation, no decision, no policy change, still
    logged in)."""
    w = served
    rid = (w.search(["#ward"])[0] * 2).request(reason="means")["id"]
    console = ConsoleServer(w, host="127.0.0.1", port=0)
    owner, other = _client(console), _client(console)
    _login(owner), _login(other)
    csrf = owner.get("/sessions").text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    other_csrf = other.get("/sessions").text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    oid = next(oid for oid, e in w.monitor.owner_entries() if e.protected)
    posts = [r.path for r in console.app.routes if "POST" in (getattr(r, "methods", None) or ())
             and r.path != "/login"]
    assert len(posts) >= 5, posts
    fill = {"{rid:str}": rid, "{action:str}": "approve", "{sid:str}": "s-1"}
    origin = str(owner.base_url).rstrip("/")
    for path in posts:
        for key, value in fill.items():
            path = path.replace(key, value)
        form = {"name": "mallory", "id": str(oid), "policy": "open"}
        for data, headers in (({**form}, {"origin": origin}), ({**form, "csrf": other_csrf}, {"origin": origin}),
                              ({**form, "csrf": csrf}, {"origin": "http://attacker.example"})):
            assert owner.post(path, data=data, headers=headers).status_code == 403, (path, data, headers)
    assert "mallory" not in w.tokens.revoked and w.release_requests.get(rid).state == "pending"
    assert policy_of(w, oid) == "review" and owner.get("/requests").status_code == 200


def test_budgets_curve_is_the_same_on_postgresql(hook, pg_url, monkeypatch):
    """Behind the budgets test: the ledger of replicas may be on PostgreSQL, whose integer cast rounds where
    SQLite's truncates: the curve summed there is the old computation's too (a history long enough to be
    bucketed, with charges on slice edges)."""
    import psycopg

    from veil.dp.worker_owner import enable_dp

    w = sy.VirtualWorker(hook, id="pg-console3-budgets")
    settings = enable_dp(w, budgets={"ana": (1.0, 1e-5)}, ledger_path=pg_url)
    try:
        base = time.time() - 3000
        rows = [("ana", 2.0**-13 * (1 + i % 3), 0.0, f"DP count #{i}", base + i * 2.5 + (0.4 if i % 4 else 0.0))
                for i in range(1000)]
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.cursor().executemany('INSERT INTO charges("user", epsilon, delta, reason, at) '
                                      'VALUES (%s, %s, %s, %s, %s)', rows)
        now = time.time()
        monkeypatch.setattr(svg, "time", types.SimpleNamespace(time=lambda: now, strftime=time.strftime,
                                                                localtime=time.localtime))
        (row,) = views.budgets(w, now=now)
        old = _old_budget_points(settings.ledger, "ana")
        expected = svg._downsample(old, *row["span"], svg.MAX_CURVE_POINTS)
        assert row["span"] == (old[0][0], now) and 100 < len(expected) <= svg.MAX_CURVE_POINTS
        assert [(t, label) for t, _, label in row["points"]] == [(t, label) for t, _, label in expected]
        assert [v for _, v, _ in row["points"]] == pytest.approx([v for _, v, _ in expected], rel=1e-12)
        assert svg.budget_svg(row["points"], 1.0, span=row["span"]) == svg.budget_svg(old, 1.0)
    finally:
        settings.ledger.close()
