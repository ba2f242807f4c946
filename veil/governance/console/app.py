"""The console's routes (Starlette). Pages render on the server; forms POST with a CSRF token."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from urllib.parse import parse_qsl, quote
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from veil.dp.bound_note import warn_past_bound
from veil.exceptions import VeilError
from veil.governance.console import views
from veil.governance.console.auth import COOKIE, LOGIN_COOKIE, ConsoleAuth, ConsoleSession
from veil.governance.console.connections import SessionHostMark, mark_owner_request
from veil.governance.console.lifecycle import ConsoleStopping, InFlight, TrackRequests
from veil.governance.console.svg import budget_svg, graph_svg
from veil.governance.cli import shown
from veil.governance.graphtext import render_graph
from veil.governance.policy import set_policy
from veil.governance.revocation import revocable_users
from veil.governance.requests import STATES, ReviewQueue
from veil.governance.state import POLICIES
from veil.workers.auth_throttle import Throttled

HERE = Path(__file__).parent
#: the largest form the console reads (its forms carry a token, an id, a policy or a short message)
MAX_FORM_BYTES = 16 * 1024
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' data:; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",  # no-referrer would make browsers send "Origin: null"
    "cache-control": "no-store",
}

Handler = Callable[[Request, ConsoleSession], Awaitable[Response]]
LOG = logging.getLogger("veil.console")


class StaticAssets(StaticFiles):
    """StaticFiles, with a path the file system cannot take (a NUL byte makes ``os.path.realpath`` raise) or
    a Windows separator answered as a plain 404."""

    def lookup_path(self, path: str) -> tuple[str, Any]:
        if "\x00" in path or "\\" in path:
            return "", None
        return super().lookup_path(path)


class OneLineErrors:
    """An unexpected exception becomes a plain 500 (inside SecurityHeaders, so it has them) and one log line
    naming its type: no traceback per request for anyone who can reach the port to flood the log with."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except ConsoleStopping:  # (a wait for the client cut by the stop: TrackRequests answers it)
            raise
        except Exception as e:  # noqa: BLE001 - answered and logged in one line below
            LOG.error("owner console: %s %s failed (%s)", scope.get("method"), ascii(scope.get("path", ""))[:200],
                      type(e).__name__)
            if not started:
                await PlainTextResponse("internal error\n", status_code=500)(scope, receive, send)


class SecurityHeaders:
    """Adds the headers above to every response (ASGI middleware)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.decode().lower() not in SECURITY_HEADERS]
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _minutes(text: str) -> float | None:
    """The audit filter's "last N minutes", or None (not a plain non-negative number: ``"²"`` passes
    ``isdigit`` and then failed ``float`` with a 500)."""
    if not text.isascii() or not text.replace(".", "", 1).isdigit():
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def build_app(worker: Any, allowed_hosts: list[str], session_host: str | None = None) -> Any:
    """``session_host``: the only host name sessions are made and accepted on (ConsoleServer's secret
    ``*.localhost`` name on loopback); None: any of ``allowed_hosts``."""
    auth = ConsoleAuth(worker)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(ago=views.ago, policies=POLICIES, states=STATES)
    templates.env.filters["fmt_time"] = lambda ts: "-" if not ts else time.strftime("%Y-%m-%d %H:%M:%S",
                                                                                     time.localtime(ts))
    # a scientist's text (a request's reason) with bidi, zero-width and line-separator characters escaped as
    # `veil requests` prints it: HTML escaping alone lets U+202E reorder what the owner reads
    templates.env.filters["shown"] = shown

    def render(request: Request, session: ConsoleSession | None, name: str, **ctx: Any) -> Response:
        pending = 0
        if session is not None:
            pending = ReviewQueue(worker).count("pending")
        return templates.TemplateResponse(request, name, {"worker": worker, "session": session,
                                                          "pending_count": pending, **ctx})

    def on_session_host(request: Request) -> bool:
        return session_host is None or (request.url.hostname or "").lower() == session_host

    def same_origin(request: Request) -> bool:
        origin = request.headers.get("origin")
        if origin is None:  # not a browser form post; the CSRF token still has to match
            return True
        return origin == f"{request.url.scheme}://{request.headers.get('host', '')}"

    async def bounded_form(request: Request) -> "dict | Response":
        """A posted form, read only once the request is same-origin and at most MAX_FORM_BYTES long (a
        cross-site page could make the owner's browser post hundreds of MiB, parsed before any check)."""
        if not same_origin(request):
            return PlainTextResponse("cross-site request refused\n", status_code=403)
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_FORM_BYTES):
            return PlainTextResponse("form too large\n", status_code=413)
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_FORM_BYTES:
                    return PlainTextResponse("form too large\n", status_code=413)
        except ClientDisconnect:  # gone, or closed for sending too slowly (connections.py): no one to answer
            return PlainTextResponse("request body incomplete\n", status_code=400)
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=32)
        except (UnicodeDecodeError, ValueError):
            return PlainTextResponse("malformed form\n", status_code=400)
        form: dict = {}
        for key, value in pairs:
            form.setdefault(key, value)
        return form

    def page(method_post: bool = False) -> Callable[[Handler], Callable[[Request], Awaitable[Response]]]:
        def deco(fn: Handler) -> Callable[[Request], Awaitable[Response]]:
            async def endpoint(request: Request) -> Response:
                session = auth.session(request.cookies.get(COOKIE)) if on_session_host(request) else None
                if session is None:
                    if method_post:
                        return PlainTextResponse("log in first\n", status_code=403)
                    return RedirectResponse("/login", status_code=303)
                mark_owner_request(request.scope)  # (its connection keeps its slot: connections.py)
                if method_post:
                    form = await bounded_form(request)
                    if isinstance(form, Response):
                        return form
                    if not auth.csrf_ok(session, form.get("csrf")):
                        return PlainTextResponse("cross-site request refused\n", status_code=403)
                    request.state.form = form
                try:
                    return await fn(request, session)
                except VeilError as e:
                    return render(request, session, "error.html", message=str(e))
            return endpoint
        return deco

    # ------------------------------------------------------------ login

    async def login_form(request: Request) -> Response:
        import secrets

        if not on_session_host(request):  # no cookie for a name every port of the host shares
            return render(request, None, "login.html", wrong_host=True)
        token = secrets.token_urlsafe(24)
        resp = render(request, None, "login.html", login_csrf=token, failed=request.query_params.get("failed"))
        resp.set_cookie(LOGIN_COOKIE, token, httponly=True, samesite="strict", path="/login",
                        secure=request.url.scheme == "https")
        return resp

    async def login(request: Request) -> Response:
        form = await bounded_form(request)
        if isinstance(form, Response):
            return form
        cookie = request.cookies.get(LOGIN_COOKIE, "")
        field = form.get("login_csrf", "")
        import hmac

        if not on_session_host(request):
            return PlainTextResponse("log in at the address the worker printed\n", status_code=403)
        if not same_origin(request) or not cookie or not isinstance(field, str) or \
                not hmac.compare_digest(cookie.encode(), field.encode()):
            return PlainTextResponse("cross-site request refused\n", status_code=403)
        token = form.get("token", "")
        try:
            made = auth.login(token if isinstance(token, str) else "", request.client.host if request.client else "?")
        except Throttled as e:
            return PlainTextResponse(f"{e}\n", status_code=429, headers={"Retry-After": str(e.seconds)})
        if made is None:
            return RedirectResponse("/login?failed=1", status_code=303)
        sid, _ = made
        mark_owner_request(request.scope)  # (the owner's: her connection and source keep their place)
        resp = RedirectResponse("/requests", status_code=303)
        resp.set_cookie(COOKIE, sid, httponly=True, samesite="strict", path="/", secure=request.url.scheme == "https")
        resp.delete_cookie(LOGIN_COOKIE, path="/login")
        return resp

    @page(method_post=True)
    async def logout(request: Request, session: ConsoleSession) -> Response:
        auth.logout(request.cookies.get(COOKIE))
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/")
        return resp

    # ------------------------------------------------------------ pages

    async def home(request: Request) -> Response:
        return RedirectResponse("/requests", status_code=303)

    @page()
    async def datasets(request: Request, session: ConsoleSession) -> Response:
        rows = await run_in_threadpool(views.on_worker, worker, views.datasets, worker)
        return render(request, session, "datasets.html", rows=rows, nav="datasets",
                      changed=request.query_params.get("changed"))

    @page(method_post=True)
    async def change_policy(request: Request, session: ConsoleSession) -> Response:
        form = request.state.form
        try:
            oid = int(form.get("id", ""))
        except ValueError:
            return PlainTextResponse("bad dataset id\n", status_code=400)
        policy = form.get("policy", "")
        if policy not in POLICIES:
            return PlainTextResponse("unknown policy\n", status_code=400)
        # (put in force in the worker's turn: no command runs under a mix of the old and the new policy)
        changed = await run_in_threadpool(views.on_worker, worker, set_policy, worker, oid, policy, session.user,
                                          views.worker_turn(worker))
        # (the owner's log; the datasets page shows it beside the policy)
        await run_in_threadpool(warn_past_bound, worker, changed, policy)
        return RedirectResponse(f"/datasets?changed={oid}", status_code=303)

    @page()
    async def requests_list(request: Request, session: ConsoleSession) -> Response:
        state = request.query_params.get("state", "pending")
        if state not in STATES and state != "all":
            state = "pending"
        rows = await run_in_threadpool(views.request_rows, worker, None if state == "all" else state)
        return render(request, session, "requests.html", rows=rows, state=state, nav="requests")

    @page()
    async def request_detail(request: Request, session: ConsoleSession) -> Response:
        queue = ReviewQueue(worker)
        req = queue.get(request.path_params["rid"])
        preview = await run_in_threadpool(views.on_worker, worker, queue.preview, req.id)
        return render(request, session, "request.html", req=req, preview=preview, nav="requests",
                      svg=graph_svg(req.graph, req.root), lines=render_graph(req.graph, req.root))

    @page(method_post=True)
    async def decide(request: Request, session: ConsoleSession) -> Response:
        rid, action = request.path_params["rid"], request.path_params["action"]
        message = str(request.state.form.get("message", ""))[:2000]
        queue = ReviewQueue(worker)
        # (on the console's pool, not its event loop: a decision whose COMMIT answer was lost is looked up for up
        # to ~10 s, and every page, and the console's stop, waited for it)
        if action == "approve":
            await run_in_threadpool(queue.approve, rid, session.user, message)
        elif action == "deny":
            await run_in_threadpool(queue.deny, rid, message, session.user)
        else:
            return PlainTextResponse("unknown action\n", status_code=404)
        return RedirectResponse(f"/requests/{rid}", status_code=303)

    @page()
    async def budgets(request: Request, session: ConsoleSession) -> Response:
        # the ledger's own lock guards it (not the worker's thread); summed in its database, off the event loop
        rows = await run_in_threadpool(views.budgets, worker)
        for r in rows:
            r["svg"] = budget_svg(r["points"], r["epsilon"], span=r["span"])
        return render(request, session, "budgets.html", rows=rows, nav="budgets")

    @page()
    async def audit(request: Request, session: ConsoleSession) -> Response:
        q = request.query_params
        since_min = q.get("since", "")
        since = time.time() - _minutes(since_min) * 60 if _minutes(since_min) is not None else None
        filters = {"user": q.get("user", ""), "action": q.get("action", ""), "outcome": q.get("outcome", ""),
                   "since": since_min, "q": q.get("q", "")}
        # off the event loop: a search over a long log takes a while, and the console's other pages go on
        rows = await run_in_threadpool(views.audit_search, worker, filters["user"], filters["action"],
                                       filters["outcome"], since, filters["q"])
        choices = await run_in_threadpool(views.audit_choices, worker)
        for key, col in (("user", "principal"), ("action", "action"), ("outcome", "outcome")):
            if filters[key] and filters[key] not in choices[col]:  # (a value only older rows have stays shown)
                choices[col] = sorted([*choices[col], filters[key]])
        return render(request, session, "audit.html", rows=rows, filters=filters, nav="audit", choices=choices)

    @page()
    async def sessions(request: Request, session: ConsoleSession) -> Response:
        rows = await run_in_threadpool(views.on_worker, worker, views.sessions, worker)
        # the confirmations show only what really happened: a crafted link must not fake one in the owner's UI
        gone, revoked = request.query_params.get("disconnected"), request.query_params.get("revoked")
        gone = gone if gone and session.did_disconnect(gone) and gone not in getattr(worker, "sessions", {}) else None
        revoked = revoked if revoked and revoked in getattr(getattr(worker, "tokens", None), "revoked", ()) else None
        return render(request, session, "sessions.html", rows=rows, nav="sessions", gone=gone, revoked=revoked,
                      revocable=revocable_users(worker))

    @page(method_post=True)
    async def disconnect(request: Request, session: ConsoleSession) -> Response:
        sid = request.path_params["sid"]
        close = getattr(worker, "disconnect", None)
        if close is None or not await run_in_threadpool(close, sid, session.user):
            return render(request, session, "error.html", message=f"no connected session {sid}")
        session.note_disconnected(sid)
        return RedirectResponse(f"/sessions?disconnected={quote(sid)}", status_code=303)

    @page(method_post=True)
    async def revoke(request: Request, session: ConsoleSession) -> Response:
        """Revokes a user's tokens and closes its sessions (veil/governance/revocation.py)."""
        name = str(request.state.form.get("name", ""))
        revoke_user = getattr(worker, "revoke", None)
        if revoke_user is None or not name:
            return PlainTextResponse("no such user\n", status_code=400)
        await run_in_threadpool(revoke_user, name, session.user)
        ended = getattr(worker, "wait_sessions_ended", None)
        if ended is not None:  # (the page it redirects to lists no session of theirs, as after a disconnect)
            await run_in_threadpool(ended, name)
        return RedirectResponse(f"/sessions?revoked={quote(name)}", status_code=303)

    in_flight = InFlight()
    routes = [
        Route("/", home),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/datasets", datasets),
        Route("/datasets/policy", change_policy, methods=["POST"]),
        Route("/requests", requests_list),
        Route("/requests/{rid:str}", request_detail),
        Route("/requests/{rid:str}/{action:str}", decide, methods=["POST"]),
        Route("/budgets", budgets),
        Route("/audit", audit),
        Route("/sessions", sessions),
        Route("/sessions/{sid:str}/disconnect", disconnect, methods=["POST"]),
        Route("/users/revoke", revoke, methods=["POST"]),
        Mount("/static", StaticAssets(directory=str(HERE / "static")), name="static"),
    ]
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = Starlette(routes=routes, middleware=[
        Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts),  # no DNS rebinding onto loopback
        *([Middleware(SessionHostMark, session_host=session_host)] if session_host else []),
        Middleware(SecurityHeaders),
        Middleware(TrackRequests, in_flight=in_flight),  # (a stop waits for them: lifecycle.py)
        Middleware(OneLineErrors),
    ])
    app.state.auth = auth  # ConsoleServer.stop() flushes its count of failed log-ins
    app.state.in_flight = in_flight  # ... and waits for these before the worker closes its database
    return app
