"""The Quart application: routes, and errors turned into OpenAI's shape."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Quart, jsonify
from werkzeug.exceptions import HTTPException

from .errors import APIError
from .cache import bp as cache_bp
from .openai import bp as openai_bp


def create_app(supervisor) -> Quart:
    app = Quart("mlxd")
    app.config["SUPERVISOR"] = supervisor
    app.config["MAX_CONTENT_LENGTH"] = 32 * 1024 * 1024
    app.register_blueprint(openai_bp)
    app.register_blueprint(cache_bp)

    @app.get("/health")
    async def health():
        states = {h.name: h.state for h in supervisor.handles.values()}
        resp = jsonify({"status": "stopping" if supervisor.draining else "ok", "models": states})
        resp.status_code = 503 if supervisor.draining else 200
        return resp

    @app.get("/metrics")
    async def metrics():
        return generate_latest(supervisor.metrics.registry), 200, {"Content-Type": CONTENT_TYPE_LATEST}

    @app.get("/v1/status")
    async def status():
        return jsonify({
            "uptime_seconds": round(time.time() - supervisor.started, 3),
            "config": supervisor.status(),
            "draining": supervisor.draining,
            "models": [h.status() for h in supervisor.handles.values()],
            "loading": [h.status() for h in supervisor.pending.values()],
        })

    @app.post("/admin/reload")
    async def admin_reload():
        result = await supervisor.reload()
        resp = jsonify(result)
        resp.status_code = 200 if result["applied"] else 400
        return resp

    @app.errorhandler(APIError)
    async def api_error(e: APIError):
        return e.response()

    @app.errorhandler(HTTPException)
    async def http_error(e: HTTPException):
        kind = "not_found_error" if e.code == 404 else "invalid_request_error"
        return APIError(e.code or 500, e.description or e.name, type_=kind).response()

    @app.errorhandler(Exception)
    async def internal_error(e: Exception):
        app.logger.exception("unhandled error")
        return APIError(500, f"internal error: {type(e).__name__}", type_="server_error").response()

    return app
