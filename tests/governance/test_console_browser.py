"""The owner console in a real browser (headless system Chromium driven by Playwright).

Log in with the admin token, see a pending request with its op graph, approve it while
the scientist's ``get(wait=...)`` is blocked, deny another, change a dataset's policy,
filter the audit log, disconnect a session; wrong or missing tokens get nothing.
Screenshots go to ``$VEIL_CONSOLE_SCREENSHOTS`` when set (docs/console/ holds the committed ones).
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from veil.dp.remote import remote_query
from veil.exceptions import RequestDeniedError, ReviewPendingError
from veil.workers.websocket_cli import read_csv

from governance_helpers import ADMIN, BOSTON, OTHER, TOKEN, console_url, worker_args

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DATA, TARGET, _ = read_csv(Path(BOSTON), "MEDV")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs the system chromium (scripts/setup.sh installs it)")


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _shot(page, name: str) -> None:
    folder = os.environ.get("VEIL_CONSOLE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"{name}.png"))


def _shown(locator) -> bool:
    """Whether ``locator``'s element is visible once the page a click navigated to has loaded (``is_visible``
    alone reads the DOM at once: on a busy machine the new page had committed its URL but not yet its body)."""
    from playwright.sync_api import TimeoutError as NotShown

    try:
        locator.wait_for(state="visible", timeout=10_000)
    except NotShown:  # (not shown within the wait: the caller's assertion fails on the answer below)
        pass
    return locator.is_visible()


def _post(context, url: str, path: str, form: dict):
    """A direct POST, with the cookies ``context`` holds for ``url``: sent to loopback with ``url``'s secret
    ``*.localhost`` name as the Host (Chromium resolves that name itself; Playwright's request API asks
    this machine's resolver, which may not)."""
    authority = url.split("://", 1)[1]
    cookie = "; ".join(f"{c['name']}={c['value']}" for c in context.cookies(url))
    return context.request.post(f"http://127.0.0.1:{authority.rsplit(':', 1)[1]}{path}", form=form,
                                headers={"host": authority, **({"cookie": cookie} if cookie else {})})


def test_owner_console_end_to_end(spawn, connect, browser, tmp_path):
    wp = spawn("alice", worker_args("review", ["--data-dir", str(tmp_path), "--console-port", "0",
                                               "--budget", "scientist=3.0,1e-5", "--budget", "other=1.0,1e-6"]))
    url = console_url(wp)
    alice = connect(wp)
    own = torch.rand(100).send(alice)
    for eps in (0.3, 0.5):  # budget history for the chart (DP on the scientist's own tensor)
        remote_query(own, "mean", epsilon=eps, bounds=(0.0, 1.0))
    data = alice.search(["#boston", "#data"])[0]
    means = data.mean(dim=0)
    rid = means.request(reason="column means for the report")["id"]

    page = browser.new_context(viewport={"width": 1280, "height": 760}).new_page()
    page.on("dialog", lambda d: d.accept())

    # ---- no token, a wrong token, a scientist's token: nothing
    page.goto(f"{url}/requests")
    assert page.url.endswith("/login") and rid not in page.content()
    _shot(page, "login")
    for token in ("not-the-admin-token", TOKEN):
        page.fill("#token", token)
        page.click("#login")
        assert _shown(page.locator("#login-failed")) and rid not in page.content()
    for path in ("/datasets", "/audit", f"/requests/{rid}"):
        page.goto(url + path)
        assert page.url.endswith("/login")
    anonymous = browser.new_context().new_page()
    r = _post(anonymous.context, url, f"/requests/{rid}/approve", {"csrf": "x"})
    assert r.status == 403

    # ---- log in; the pending request with its op graph and preview
    page.fill("#token", ADMIN)
    page.click("#login")
    assert page.url.endswith("/requests")
    assert _shown(page.locator(f"a.req:text('{rid}')"))
    assert "Set-Cookie" not in page.content() and ADMIN not in page.url
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["veil_console"]["httpOnly"] and cookies["veil_console"]["sameSite"] == "Strict"
    _shot(page, "requests")
    page.click(f"a.req:text('{rid}')")
    graph = page.inner_text("#opgraph")
    assert "dataset: #boston #data" in graph and "Tensor.mean(d1, dim=0)" in graph and "[13] float32" in graph
    assert page.locator("svg.opgraph g.node").count() == 2
    assert f"{DATA.mean(dim=0)[0].item():.4g}" in page.inner_text("#preview")
    assert "column means for the report" in page.content()
    _shot(page, "request")

    # ---- a forged approve without the CSRF token is refused, even with the session cookie
    forged = _post(page.context, url, f"/requests/{rid}/approve", {"csrf": "wrong"})
    assert forged.status == 403 and "cross-site" in forged.text()  # the session was there; the token was not
    with pytest.raises(ReviewPendingError):
        means.get(delete=False)

    # ---- approve while the scientist waits
    got = {}

    def scientist():
        try:
            got["value"] = means.get(wait=60)
        except Exception as e:
            got["error"] = e

    t = threading.Thread(target=scientist)
    t.start()
    page.click("#approve")
    t.join(60)
    assert "error" not in got, got.get("error")
    assert torch.allclose(got["value"], DATA.mean(dim=0))
    assert page.inner_text("#state") == "approved"

    # ---- deny another; the scientist gets the owner's message
    raw = data.copy()
    with pytest.raises(ReviewPendingError) as info:
        raw.get()
    page.goto(f"{url}/requests/{info.value.request_id}")
    assert "Tensor.copy" in page.inner_text("#opgraph") or "veil.copy" in page.inner_text("#opgraph")
    page.fill("#deny-message", "row-level records stay on this worker")
    page.click("#deny")
    assert page.inner_text("#state") == "denied"
    with pytest.raises(RequestDeniedError, match="row-level records stay on this worker"):
        raw.get()

    # ---- change the target's policy to open: derived target values flow again
    target = alice.search(["#boston", "#target"])[0]
    with pytest.raises(ReviewPendingError):
        (target * 1).get()
    page.goto(f"{url}/datasets")
    row = page.locator("tr", has_text="#target")
    row.locator("select").select_option("open")
    row.locator("button").click()
    assert _shown(page.locator("#policy-changed"))
    assert page.locator("tr", has_text="#target").locator(".policy").inner_text() == "open"
    assert torch.equal((target * 1).get(), TARGET)
    _shot(page, "datasets")

    # ---- budgets page: users, spent/left and a chart
    page.goto(f"{url}/budgets")
    assert page.locator("svg.chart").count() == 2
    assert "2.2" in page.locator("tr", has_text="scientist").inner_text()  # 3.0 - 0.3 - 0.5 left
    _shot(page, "budgets")

    # ---- audit log filtered by action and by user
    page.goto(f"{url}/audit")
    page.select_option("select[name=action]", "deny")
    page.click("#audit-filter button[type=submit]")
    rows = page.locator("#audit tr").all_inner_texts()[1:]
    assert rows and all("\tdeny\t" in r for r in rows) and "row-level records" in rows[0]
    page.goto(f"{url}/audit?user=scientist&outcome=refused")
    rows = page.locator("#audit tr").all_inner_texts()[1:]
    assert rows and all("scientist" in r and "refused" in r for r in rows)
    page.goto(f"{url}/audit")
    _shot(page, "audit")

    # ---- sessions: the scientists are listed; disconnect one
    other = connect(wp, token=OTHER, id="alice")
    torch.ones(1000).send(other)
    page.goto(f"{url}/sessions")
    assert page.locator("#sessions tr", has_text="other").count() == 1
    _shot(page, "sessions")
    page.locator("#sessions tr", has_text="other").locator("button").click()
    assert "disconnected" in page.inner_text("main")
    for _ in range(50):  # the worker frees the session once the connection has closed
        page.goto(f"{url}/sessions")
        if page.locator("#sessions tr", has_text="other").count() == 0:
            break
        page.wait_for_timeout(100)
    assert page.locator("#sessions tr", has_text="other").count() == 0
    assert torch.equal(torch.ones(2).send(alice).get(), torch.ones(2))  # the others keep working

    # ---- log out: the cookie no longer opens anything
    page.click("header .logout button")
    page.goto(f"{url}/requests")
    assert page.url.endswith("/login")
