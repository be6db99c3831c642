"""The Quart application: routes, auth, and errors in the shape of the API each route belongs to."""

from __future__ import annotations

import hmac
import time

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Quart, g, jsonify, request
from werkzeug.exceptions import HTTPException

from .actions import bp as actions_bp
from .anthropic import bp as anthropic_bp
from .cache import bp as cache_bp
from .console import bp as console_bp, is_public
from .deadline import with_write_deadline
from .embeddings import bp as embeddings_bp
from .errors import APIError, shape_of
from .guard import install as install_guard, warn_wildcard
from .keepalive import with_unread_bodies_closing
from .lifetime import with_runs_closed
from .limits import RateLimiter
from .openai import bp as openai_bp
from .ollama import bp as ollama_bp
from .openapi import bp as openapi_bp
from .responses import Store, bp as responses_bp
from .ollama_chat import bp as ollama_chat_bp


def create_app(supervisor, host: str | None = None, port: int | None = None) -> Quart:
    """`host`/`port`: the address mlxd is bound to (default: the config's), which Host headers must name."""
    app = Quart("mlxd")
    app.config["SUPERVISOR"] = supervisor
    server = supervisor.config.server
    install_guard(app, lambda: supervisor.config.server, host or server.host, server.port if port is None else port,
                  lambda code: supervisor.metrics.refused.labels(code).inc())
    limiter = app.config["LIMITER"] = RateLimiter(None, None)

    def apply_server_settings(server) -> None:
        """At start and after every reload: the limits in force are the config's."""
        app.config["MAX_CONTENT_LENGTH"] = server.max_body_bytes
        limiter.configure(server.rate_limit.requests_per_minute, server.rate_limit.tokens_per_minute)
    apply_server_settings(supervisor.config.server)
    supervisor.listeners.append(apply_server_settings)
    supervisor.listeners.append(warn_wildcard)
    warn_wildcard(supervisor.config.server)
    app.config["RESPONSES"] = Store(lambda: supervisor.config.server.responses_store)
    app.asgi_app = with_unread_bodies_closing(with_write_deadline(
        with_runs_closed(app.asgi_app), lambda: supervisor.config.server.stream_write_timeout,
        lambda model: supervisor.metrics.write_timeouts.labels(model).inc()))

    def render(e: APIError):
        return e.response(shape_of(request.path))

    @app.before_request
    async def authenticate():
        """Keys as `Authorization: Bearer` or `x-api-key`, compared in constant time; /health stays open for
        probes, the console's page to ask for a key."""
        auth = supervisor.config.server.auth
        if not auth.api_keys or request.path == "/health" or is_public(request.path) or (request.path == "/metrics" and not auth.protect_metrics):
            return None
        header = request.headers.get("Authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        ok = False
        for k in auth.api_keys:      # no early exit: timing does not tell which key matched
            ok |= hmac.compare_digest(k.encode(), given.encode())
        if not ok:
            msg = "Incorrect API key provided." if given else \
                "Missing API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'."
            return render(APIError(401, msg, code="invalid_api_key"))
        g.api_key = given
        return None
    app.register_blueprint(openai_bp)
    app.register_blueprint(anthropic_bp)
    app.register_blueprint(responses_bp)
    app.register_blueprint(embeddings_bp)
    app.register_blueprint(ollama_bp)
    app.register_blueprint(cache_bp)
    app.register_blueprint(openapi_bp)
    app.register_blueprint(actions_bp)
    app.register_blueprint(console_bp)
    app.register_blueprint(ollama_chat_bp)

    @app.get("/health")
    async def health():
        """200 once every preloaded model is ready; 503 with the states before, and while stopping."""
        states = {h.name: h.state for h in supervisor.handles.values()}
        ok = supervisor.healthy()
        failed = any(h.state == "failed" for h in supervisor.handles.values() if h.cfg.preload)
        status = "stopping" if supervisor.draining else "ok" if ok else "failed" if failed else "loading"
        resp = jsonify({"status": status, "models": states})
        resp.status_code = 200 if ok else 503
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
        return render(e)

    @app.errorhandler(HTTPException)
    async def http_error(e: HTTPException):
        kind = "not_found_error" if e.code == 404 else "invalid_request_error"
        return render(APIError(e.code or 500, e.description or e.name, type_=kind))

    @app.errorhandler(Exception)
    async def internal_error(e: Exception):
        app.logger.exception("unhandled error")
        return render(APIError(500, f"internal error: {type(e).__name__}", type_="server_error"))

    return app
