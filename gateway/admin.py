"""The admin listener (aiohttp): ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz``."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


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

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
