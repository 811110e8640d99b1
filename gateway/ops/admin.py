"""The admin listener (aiohttp): ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz``, and
the token-protected admin API (``/api/...``) that the ``gateway`` CLI is a client of."""

from __future__ import annotations

import asyncio
import hmac
import re

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.ops import audit
from gateway.policy.rates import Rate, parse_duration
from gateway.state import StoreError
from gateway.ops.status_page import StatusPage
from gateway.policy.throttles import GLOBAL
from gateway.ops.trace import DECISIONS

log = structlog.get_logger("gateway.ops.admin")


_ACTOR = re.compile(r"[^A-Za-z0-9._@:+-]")


def actor_of(request: web.Request) -> str:
    """Who made an API call: ``api`` (the bearer token), with the OS user the ``gateway`` CLI
    names in X-Gateway-Actor (printable, bounded; the token is what authorizes)."""
    named = _ACTOR.sub("?", request.headers.get("X-Gateway-Actor", ""))[:64]
    return f"api:{named}" if named else "api"


def admin_app(app_state) -> web.Application:
    """``app_state`` is the running Gateway: its metrics registry, store and listeners."""

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(app_state.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        problems = await app_state.readiness_problems()
        if problems:
            return web.json_response({"status": "unready", "problems": problems}, status=503)
        return web.json_response({"status": "ready"})

    def token_actor(request: web.Request) -> dict | None:
        """Who calls: the name of the bearer token given (``[admin] token_file`` or one of
        ``[admin] token_dir``), as audit actor fields; None if it is none of them."""
        given = request.headers.get("Authorization", "").encode()
        tokens = getattr(app_state, "api_tokens", None) or {"admin": app_state.admin_token}
        name = None
        for candidate, token in tokens.items():  # every one compared: constant time
            if hmac.compare_digest(given, f"Bearer {token}".encode()):
                name = candidate
        if name is None:
            return None
        return audit.api_actor(name, request.headers.get("X-Gateway-OS-User"))

    @web.middleware
    async def api_auth(request: web.Request, handler):
        if request.path.startswith("/api/"):
            if token_actor(request) is None:
                return web.json_response({"error": "missing or wrong bearer token"}, status=401)
            try:
                return await handler(request)
            except StoreError as exc:
                return web.json_response({"error": f"state store unavailable: {exc}"}, status=503)
        return await handler(request)

    async def audited(request: web.Request, action: str, **changed) -> None:
        """The audit event of an API action (gateway.ops.audit), in the trail and in this log."""
        actor = token_actor(request)
        path = getattr(app_state, "audit_file", None)
        if path is None:
            return
        try:
            await asyncio.to_thread(audit.record, path, action, actor, **changed)
        except OSError as exc:  # the action is done: the log keeps the event, and says why
            log.error("audit_write_failed", path=str(path), error=exc.strerror)
        log.warning("audit", action=action, **actor, **changed)

    def target_of(request: web.Request) -> str:
        target = request.match_info["target"]
        if target != GLOBAL and target not in app_state.registry.by_id:
            raise web.HTTPNotFound(text=f'{{"error": "no sender {target!r}"}}',
                                   content_type="application/json")
        return target

    async def throttles_list(request: web.Request) -> web.Response:
        throttles = await app_state.throttles.list()
        return web.json_response({"throttles": [t.to_json() for t in throttles]})

    async def throttle_set(request: web.Request) -> web.Response:
        target = target_of(request)
        try:
            body = await request.json()
            rate = Rate.parse(str(body["rate"]))
            duration = parse_duration(str(body["for"])) if body.get("for") else None
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": f"bad request: {exc}"}, status=400)
        throttle = await app_state.throttles.set(target, rate, duration)
        log.warning("throttle_set", target=target, rate=str(rate), seconds=duration)
        await audited(request, "throttle_set", target=target, rate=str(rate), seconds=duration)
        return web.json_response(throttle.to_json())

    async def throttle_clear(request: web.Request) -> web.Response:
        target = target_of(request)
        existed = await app_state.throttles.clear(target)
        log.warning("throttle_cleared", target=target, existed=existed)
        await audited(request, "throttle_clear", target=target, cleared=existed)
        return web.json_response({"target": target, "cleared": existed})

    async def reload(request: web.Request) -> web.Response:
        """Re-read gateway.toml and the sender files (gateway.ops.reload): 200 with what changed
        and what needs a restart, or 422 naming the file, key and reason of the refusal."""
        result = await app_state.reload(actor_of(request), token_actor(request))
        return web.json_response(result.to_json(), status=200 if result.applied else 422)

    async def trace(request: web.Request) -> web.Response:
        """Decisions kept in the state store (gateway.ops.trace): one of queue_id, message_id or
        sender, then since (e.g. 2h), decision, recipient (hashed here to match)."""
        q = request.query
        try:
            since = parse_duration(q["since"]) if q.get("since") else None
            if q.get("decision") and q["decision"] not in DECISIONS:
                raise ValueError(f"decision must be one of {', '.join(DECISIONS)}")
            records = await app_state.trace.query(
                queue_id=q.get("queue_id"), message_id=q.get("message_id"),
                sender=q.get("sender"), since=since, decision=q.get("decision"),
                recipient=q.get("recipient"))
        except ValueError as exc:
            return web.json_response({"error": f"bad request: {exc}"}, status=400)
        return web.json_response({"decisions": records, "days": app_state.config.trace.days})

    status = StatusPage(app_state)
    app = web.Application(middlewares=[api_auth, status.auth])
    status.add_routes(app)  # /status: read-only HTML for administrators (token required)
    app.router.add_post("/api/reload", reload)
    app.router.add_get("/api/trace", trace)
    app.router.add_get("/api/throttles", throttles_list)
    app.router.add_put("/api/throttles/{target}", throttle_set)
    app.router.add_delete("/api/throttles/{target}", throttle_clear)
    unsubscribe = getattr(app_state, "unsubscribe", None)
    if unsubscribe is not None:  # /u/{token}: public one-click unsubscribes (no token needed)
        unsubscribe.add_routes(app)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
