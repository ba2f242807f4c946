"""Red team: guessing access tokens at the worker port's handshake and the owner console's log-in.

Before: nothing limited how fast one source could try tokens at either door (only the audit rows were
aggregated), the minimum token length is 8 characters, ``TokenTable.lookup`` compared the raw tokens (so
``hmac.compare_digest`` returned early on a length mismatch: the time told a token's length), a handshake
with several tokens stopped at the first unknown one (the time told which one failed), and an issued client
token naming an unknown issuer skipped the MAC (the time told which issuer names exist).

Must hold (veil/workers/auth_throttle.py): failures count per source (loopback one, IPv4 /24, IPv6 /64) at
both doors together; past the free ones a source is refused with one answer whatever it presents (a right
guess is not told apart), except a valid token long enough to be unguessable (the owner's generated token
is never locked out); the counters are bounded however many sources an attacker has; throttled attempts
are audited in aggregate.
"""

from __future__ import annotations

import hmac
import socket
import time

import pytest
import torch

import veil as sy
from veil.workers import client_tokens, websocket_auth
from veil.workers.auth_throttle import FailureThrottle, source_of
from veil.workers.websocket_server import WebsocketServerWorker

from local_links import read_head
from worker_processes import serve_in_thread, stop_served

testclient = pytest.importorskip("starlette.testclient")

WEAK = "rt-at-scientist"  # an owner-chosen token, as the tests' (15 characters)
WEAK_ADMIN = "rt-at-owner-token"
STRONG_ADMIN = sy.new_token()  # what `veil worker` and the clusters generate (43 characters)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server(hook):
    """An in-process worker served from a thread: a scientist with a short token, the owner with a short and
    a generated admin token; its throttle lets 3 failures through."""
    tokens = sy.TokenTable()
    tokens.add(WEAK, "scientist")
    tokens.add(WEAK_ADMIN, "owner", "admin")
    tokens.add(STRONG_ADMIN, "owner", "admin")
    w = WebsocketServerWorker(hook, id=f"rt-at-{time.monotonic_ns()}", port=0, tokens=tokens)
    w.auth_throttle = FailureThrottle(free=3, first_block=60.0)
    thread = serve_in_thread(w)
    yield w
    stop_served(w, thread)


def _handshake(port: int, *tokens: str, source: str = "127.0.0.1") -> tuple[str, bytes]:
    """(status code, body) of an opening handshake presenting ``tokens`` from local address ``source``."""
    lines = ["GET / HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]
    if tokens:
        lines.append(f"Authorization: Bearer {tokens[0]}")
    if tokens[1:]:
        lines.append("X-Veil-Tokens: " + ",".join(tokens[1:]))
    with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0)) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head, _, body = read_head(s).partition(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 101"):
            return "101", b""
        while True:  # (a refusal closes the connection after its body)
            got = s.recv(65536)
            if not got:
                break
            body += got
    return head.split(b"\r\n")[0].decode().split(" ")[1], body


def test_token_guessing_at_the_port_is_throttled_with_one_answer_for_every_token(server, hook):
    """Attack: a local user (loopback, the same source as the owner's own tools) tries tokens at the handshake
    as fast as it can, its own valid short token and the owner's among them, and several per handshake.
    Must hold: 3 free failures (each unknown token of a handshake is one), then every attempt from the source
    gets the same 429 (a right guess, the owner's short admin token included, looks like a wrong one), the
    refusals are audited through the aggregate refusal log, and the owner's generated token still gets in."""
    w = server
    port = w.bound_port
    audited = []
    refused = w.refusals.refused
    w.refusals.refused = lambda source, reason: audited.append(reason) or refused(source, reason)
    assert _handshake(port, WEAK) == ("101", b"")
    assert _handshake(port, "guess-0001-xxxx")[0] == "401"
    assert _handshake(port, "guess-0002-xxxx", "guess-0003-xxxx")[0] == "401"  # two guesses, two failures
    assert w.auth_throttle.blocked_for("127.0.0.1") == 0.0
    assert _handshake(port, WEAK, "guess-0004-xxxx")[0] == "401"  # the fourth: the source is blocked now
    answers = {name: _handshake(port, *tokens, source=source) for name, (source, tokens) in {
        "guess": ("127.0.0.1", ("guess-0005-xxxx",)), "valid short": ("127.0.0.1", (WEAK,)),
        "owner short": ("127.0.0.1", (WEAK_ADMIN,)), "valid and generated": ("127.0.0.1", (WEAK, STRONG_ADMIN)),
        "owner short, another loopback address": ("127.3.3.3", (WEAK_ADMIN,))}.items()}
    assert {a[0] for a in answers.values()} == {"429"}, answers
    assert len(set(answers.values())) == 1, answers  # byte-identical: nothing tells a right guess apart
    assert b"too many failed authentications" in answers["guess"][1]
    assert _handshake(port, STRONG_ADMIN) == ("101", b"")  # the owner's generated token is never locked out
    assert sum("too many failed authentications" in r for r in audited) == len(answers)
    with pytest.raises(sy.exceptions.PermissionDeniedError, match="too many failed authentications") as caught:
        sy.WebsocketClientWorker(hook, id="rt-at-client", host="127.0.0.1", port=port, token=WEAK)
    assert "\n" not in str(caught.value) and "try again in" in str(caught.value)
    owner = sy.WebsocketClientWorker(hook, id="rt-at-owner", host="127.0.0.1", port=port, token=STRONG_ADMIN)
    try:
        x = torch.tensor([1.0, 2.0, 3.0]).send(owner)
        assert torch.equal(x.get(), torch.tensor([1.0, 2.0, 3.0]))  # the worker still serves
    finally:
        owner.close()


def test_failures_count_per_source_and_blocks_grow_then_end():
    """Per source: loopback (every 127/8 address, IPv6 ::1, v4-mapped) is one source, IPv4 /24s and IPv6 /64s
    are one each; a source's block doubles with each failure past the free ones, ends, and its count is
    forgotten a window after its last failure. Another source is never held up by it."""
    clock = _Clock()
    throttle = FailureThrottle(free=2, window=100.0, first_block=1.0, max_block=8.0, clock=clock)
    assert {source_of(a) for a in ("127.0.0.1", "127.9.8.7", "::1", "::ffff:127.0.0.1")} == {"loopback"}
    assert source_of("203.0.113.5") == source_of("203.0.113.250") != source_of("203.0.114.5")
    assert source_of("2001:db8::1") == source_of("2001:db8::ffff:1") != source_of("2001:db8:0:1::1")
    for address in ("127.0.0.1", "127.1.1.1"):
        throttle.failed(address)
    assert throttle.blocked_for("127.0.0.1") == 0.0
    blocks = []
    for _ in range(5):
        throttle.failed("127.2.2.2")
        blocks.append(throttle.blocked_for("::1"))
    assert blocks == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert throttle.blocked_for("203.0.113.5") == 0.0 and throttle.blocked_for("2001:db8::1") == 0.0
    clock.now += 8.0
    assert throttle.blocked_for("127.0.0.1") == 0.0  # the block ended; the count is still remembered
    throttle.failed("127.0.0.1")
    assert throttle.blocked_for("127.0.0.1") == 8.0
    clock.now += 8.0 + 100.0
    throttle.failed("127.0.0.1")  # forgotten: a fresh allowance
    assert throttle.blocked_for("127.0.0.1") == 0.0


def test_an_attacker_with_many_sources_cannot_grow_the_counters_or_multiply_its_allowance():
    """Attack: spray guesses from 5,000 IPv6 /64s (a /48 holds 65,536 of them), a few each. Must hold: the
    throttle tracks at most its bound of sources, and once full, every further new source shares one
    allowance (blocked after it like one source); sources forgotten later make room again."""
    clock = _Clock()
    throttle = FailureThrottle(free=3, window=50.0, max_sources=128, clock=clock)
    for i in range(5_000):
        throttle.failed(f"2001:db8:{i >> 8:x}:{i & 0xff:x}::1", count=2)
    assert len(throttle) <= 129
    assert throttle.blocked_for("2001:db8:ffff:1::1") > 0  # a new source: the shared allowance is spent
    assert throttle.blocked_for("2001:db8:0:0::1") == 0.0  # one tracked on its own: 2 failures, not blocked
    clock.now += 50.0 + 600.0
    throttle.failed("198.51.100.7")
    assert throttle.blocked_for("198.51.100.7") == 0.0 and len(throttle) <= 129


def test_token_lookup_compares_fixed_length_digests(monkeypatch):
    """Attack: time ``hmac.compare_digest`` (it returns at once when the lengths differ) with guesses of
    every length, to learn how long the owner's short tokens are. Must hold: every comparison is between
    equal-length operands, whatever the length presented, and lookups still find exactly the right entry."""
    table = sy.TokenTable()
    table.add("short-8c", "a")
    table.add(WEAK, "b")
    table.add(STRONG_ADMIN, "owner", "admin")
    lengths = []
    real = hmac.compare_digest
    monkeypatch.setattr(websocket_auth.hmac, "compare_digest", lambda a, b: lengths.append((len(a), len(b)))
                        or real(a, b))
    for guess, expected in (("short-8c", "a"), (WEAK, "b"), (STRONG_ADMIN, "owner"), ("x" * 8, None),
                            ("y" * 15, None), ("z" * 200, None), (WEAK[:-1], None)):
        lengths.clear()
        found = table.lookup(guess)
        assert (found.name if found else None) == expected
        assert len(lengths) == 3 and len(set(lengths)) == 1 and lengths[0][0] == lengths[0][1], lengths


def test_a_handshake_looks_up_every_token_it_presents(monkeypatch):
    """Attack: present (guess, own valid token, ...) and time the refusal: a check that stops at the first
    unknown token takes longer when the guess was right. Must hold: every presented token is looked up
    whichever fails, and the refusal counts each unknown one (one guess each, for the throttle)."""
    table = sy.TokenTable()
    table.add(WEAK, "scientist")
    looked = []
    real = table.lookup
    monkeypatch.setattr(table, "lookup", lambda t: looked.append(t) or real(t))
    for tokens, unknown in (([WEAK, "guess-a-xxxx", WEAK], 1), (["guess-a-xxxx", WEAK, WEAK], 1),
                            (["guess-a-xxxx", "guess-b-xxxx", WEAK], 2)):
        looked.clear()
        with pytest.raises(sy.exceptions.PermissionDeniedError, match="unknown access token") as caught:
            websocket_auth.authenticate(table, tokens)
        assert looked == tokens
        assert getattr(caught.value, "failures", None) == unknown


def test_an_unknown_issuer_costs_the_same_mac_as_a_known_one(monkeypatch):
    """Attack: time issued-client-token checks (``vc1.ISSUER.HOLDER.MAC``) to learn which issuer names a
    worker accepts: an unknown issuer used to be refused before any MAC was computed. Must hold: one MAC
    either way, and only the known issuer's right MAC is accepted."""
    secret = "rt-at-issuer-secret-0123456789"
    keys = {"cluster": secret.encode()}
    good = client_tokens.issue(secret, "cluster", "alice")
    calls = []
    real = client_tokens._mac
    monkeypatch.setattr(client_tokens, "_mac", lambda *a: calls.append(a[1]) or real(*a))
    mac = good.rsplit(".", 1)[1]
    for token, expected in ((good, ("cluster", "alice")), (f"vc1.cluster.alice.{mac[:-1]}A", None),
                            (f"vc1.nosuch.alice.{mac}", None), (f"vc1.other.alice.{'A' * 43}", None)):
        calls.clear()
        assert client_tokens.verify(keys, token) == expected
        assert len(calls) == 1, token


@pytest.fixture
def console(hook):
    """A worker (not listening) and its console app; ``browser(address)`` is a fresh browser at ``address``."""
    from veil.governance.console.server import ConsoleServer

    tokens = sy.TokenTable()
    tokens.add(WEAK, "scientist")
    tokens.add(WEAK_ADMIN, "owner", "admin")
    tokens.add(STRONG_ADMIN, "owner", "admin")
    w = WebsocketServerWorker(hook, id=f"rt-at-console-{time.monotonic_ns()}", port=0, tokens=tokens)
    w.auth_throttle = FailureThrottle(free=3, first_block=60.0)
    w.load(torch.tensor([1.0, 2.0]), tags=("#ward",), description="ward data")
    server = ConsoleServer(w, host="127.0.0.1", port=0)

    def browser(address: str = "127.0.0.1"):
        return testclient.TestClient(server.app, base_url=f"http://{server.host_name}:8780",
                                     follow_redirects=False, client=(address, 50000))

    yield w, server, browser
    server.app.state.auth.flush_failures()


def _login(browser, token: str):
    page = browser.get("/login")
    csrf = page.text.split('name="login_csrf" value="', 1)[1].split('"', 1)[0]
    return browser.post("/login", data={"login_csrf": csrf, "token": token},
                        headers={"origin": str(browser.base_url).rstrip("/")})


def test_console_login_guessing_is_throttled_but_never_locks_out_the_owner(console, monkeypatch):
    """Attack: a local user guesses the admin token at the console's log-in (its own valid scientist token
    among the guesses), after failures at the worker port from the same source. Must hold: the failures of
    both doors count together; past them, every log-in from that source gets one 429 whatever the token (the
    owner's short admin token included), audited with the failed log-ins; the owner still logs in with the
    generated admin token from that source, and with the short one from another address."""
    w, server, browser = console
    w.auth_throttle.failed("127.0.0.1", count=2)  # two guesses at the worker port, from loopback
    attacker = browser("127.0.0.1")
    first = [_login(attacker, token) for token in ("guess-0001-xxxx", WEAK)]
    assert [(r.status_code, r.headers.get("location")) for r in first] == [(303, "/login?failed=1")] * 2
    blocked = {token: _login(attacker, token) for token in ("guess-0002-xxxx", WEAK, WEAK_ADMIN)}
    assert {(r.status_code, r.text) for r in blocked.values()} == \
        {(429, blocked["guess-0002-xxxx"].text)}, {t: (r.status_code, r.text) for t, r in blocked.items()}
    assert "too many failed authentications" in blocked[WEAK_ADMIN].text
    assert _login(browser("127.0.0.1"), STRONG_ADMIN).headers["location"] == "/requests"
    assert _login(browser("198.51.100.7"), WEAK_ADMIN).headers["location"] == "/requests"
    audited = []
    monkeypatch.setattr(server.app.state.auth, "_audit", lambda *a: audited.append(a[3]))
    server.app.state.auth.flush_failures()
    assert sum(int(d.split()[0]) for d in audited if "failed console log-in" in d) >= 4  # blocked ones too


def test_a_blocked_source_gets_no_lookup_of_a_short_token(server, console, monkeypatch):
    """Attack on the throttle itself: attempts from a blocked source are not counted, so any difference
    between a right and a wrong short guess there (even the time a lookup or a session takes) would be an
    oracle without limit. Must hold: while blocked, a short token is refused at both doors without being
    looked up; a long one is looked up (and let in if valid)."""
    looked = []
    for w in (server, console[0]):
        real = w.tokens.lookup
        monkeypatch.setattr(w.tokens, "lookup", lambda t, real=real: looked.append(t) or real(t))
        w.auth_throttle.failed("127.0.0.1", count=10)
    assert _handshake(server.bound_port, WEAK_ADMIN)[0] == "429"
    assert _login(console[2]("127.0.0.1"), WEAK_ADMIN).status_code == 429
    assert looked == []
    assert _handshake(server.bound_port, STRONG_ADMIN)[0] == "101"
    assert _login(console[2]("127.0.0.1"), STRONG_ADMIN).headers["location"] == "/requests"
    assert looked == [STRONG_ADMIN, STRONG_ADMIN]


def test_the_owner_sets_the_free_failures_on_the_command_line():
    """``veil worker --auth-free-failures N`` (a worker behind one NAT with many clients, say) reaches the
    parser with its default the module's."""
    import argparse

    from veil.workers.auth_throttle import FREE_FAILURES
    from veil.workers.websocket_cli import configure

    parser = argparse.ArgumentParser()
    configure(parser)
    assert parser.parse_args(["--id", "w"]).auth_free_failures == FREE_FAILURES
    assert parser.parse_args(["--id", "w", "--auth-free-failures", "100"]).auth_free_failures == 100


def test_a_forwarded_for_header_does_not_give_a_local_guesser_new_sources(console):
    """Attack: a local user guesses at the running console (uvicorn) with a new ``X-Forwarded-For`` address
    on each attempt: uvicorn believes forwarding headers from loopback by default, so each guess came from
    a new "source" and the throttle never held. Must hold: the console counts the connection's own address
    (there is no proxy in front of it), so the guesser is held after its free failures."""
    httpx = pytest.importorskip("httpx")
    w, server, _ = console
    server.start()
    try:
        authority = server.url.split("://", 1)[1]
        with httpx.Client(base_url="http://127.0.0.1:" + authority.rsplit(":", 1)[1], headers={"host": authority},
                          follow_redirects=False, timeout=60) as attacker:
            codes = []
            for i in range(8):
                page = attacker.get("/login")
                csrf = page.text.split('name="login_csrf" value="', 1)[1].split('"', 1)[0]
                r = attacker.post("/login", data={"login_csrf": csrf, "token": f"guess-{i:04d}-xxxx"},
                                  headers={"origin": server.url, "x-forwarded-for": f"198.51.{i}.7",
                                           "x-real-ip": f"198.51.{i}.7", "forwarded": f"for=198.51.{i}.7"})
                codes.append(r.status_code)
    finally:
        server.stop()
    assert codes == [303] * 4 + [429] * 4, codes
    assert w.auth_throttle.blocked_for("127.0.0.1") > 0
