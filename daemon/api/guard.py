"""Browser-origin protection, app-wide: no web page the user visits can drive or read mlxd.

A page can reach a localhost server without a preflight (`fetch` in no-cors mode with a
text/plain body, `navigator.sendBeacon`, `<form enctype="text/plain">`, an empty POST), and
with DNS rebinding (a hostname of the attacker's that resolves to 127.0.0.1) even read the
answers. So, before any route runs (auth included):

- bound to a loopback address, a `Host` that does not name it is refused (rebinding);
- a present `Origin` that is neither the page's own (the console) nor in
  `server.allowed_origins` is refused; CORS headers and preflight answers go to allowed
  origins only;
- a route that takes a JSON body requires `Content-Type: application/json` (415): no
  simple request, which is all a page can send without a preflight, reaches it. A client
  that is not a browser (neither `Origin` nor `Sec-Fetch-Site`: browsers send one or both
  on every request that can cross sites) may also leave the type out or send curl `-d`'s
  `application/x-www-form-urlencoded`: the body is read as JSON. That opens nothing to
  pages: a browser percent-encodes a form of that type, which never parses as JSON, and
  the other types a page can send unpreflighted (text/plain, multipart) are always 415;
- an action route (load/unload/pin/unpin, reload, clearing a cache) also refuses a request
  a browser marks cross-site (`Sec-Fetch-Site`), even with an empty body.

Routes are classed by `kind` (method and path), not by surface, so new routes are covered.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Callable, Optional
from urllib.parse import urlsplit

from quart import Quart, request

from .errors import APIError, shape_of

log = logging.getLogger("mlxd.api")

# Route kinds: "read" (no body, no effect), "action" (an effect, no body), "json" (a JSON body).
_ACTIONS = (re.compile(r"^/v1/models/.+/(load|unload|pin|unpin)$"), re.compile(r"^/admin/reload$"))
_ACTION_DELETES = ("/v1/cache",)
_READ_METHODS = ("GET", "HEAD", "OPTIONS")


def kind(method: str, path: str) -> str:
    """What a request can do, by method and path: every body-carrying route not listed as an
    action is a JSON route, so a route added later is covered by default."""
    if method in _READ_METHODS:
        return "read"
    if any(p.match(path) for p in _ACTIONS) or (method == "DELETE" and path in _ACTION_DELETES):
        return "action"
    return "json"


# What non-browser clients send when their user names no type: nothing (httpx `content=`,
# urllib) or curl -d's default. Read as JSON from those clients only.
_UNLABELLED = ("", "application/x-www-form-urlencoded")


def body_type_ok(mimetype: str, browser: bool) -> bool:
    """Whether a JSON route may read this body as JSON (see the module's docstring)."""
    return mimetype == "application/json" or (not browser and mimetype in _UNLABELLED)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _split_host(value: str) -> tuple[str, Optional[int]]:
    """`Host` as (lowercase name, port or None); IPv6 literals keep their brackets."""
    value = value.strip().lower()
    m = re.fullmatch(r"(\[[0-9a-f:.]+\]|[^:\[\]]*)(?::(\d{1,5}))?", value)
    if not m:
        return "", None
    return m.group(1), int(m.group(2)) if m.group(2) else None


def allowed_hosts(host: str) -> set[str]:
    """The names a loopback-bound daemon answers to."""
    names = {"127.0.0.1", "localhost", "[::1]"}
    h = host.strip().lower()
    names.add(f"[{h.strip('[]')}]" if ":" in h else h)
    return names


def normalize_origin(origin: str) -> str:
    """`scheme://host[:port]`, lowercase, the default port dropped (as browsers send it)."""
    parts = urlsplit(origin.strip().lower())
    default = {"http": 80, "https": 443}.get(parts.scheme)
    try:
        port = parts.port
    except ValueError:
        port = None
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


class Guard:
    """The checks, reading the live config (allowed_origins applies at a reload)."""

    def __init__(self, server: Callable, host: str, port: int):
        self.server, self.host, self.port = server, host, port
        self.loopback = is_loopback(host)
        self.hosts = allowed_hosts(host)

    def refuse(self, status: int, message: str, code: str) -> APIError:
        return APIError(status, message, type_="invalid_request_error" if status == 415 else "permission_error",
                        code=code)

    def host_ok(self, value: str) -> bool:
        name, port = _split_host(value)
        if name not in self.hosts:
            return False
        if self.port == 0:           # an ephemeral port: the name is what rebinding changes
            return True
        return port == self.port if port is not None else self.port == 80

    def origin_allowed(self, origin: str) -> bool:
        allowed = self.server().allowed_origins
        return "*" in allowed or normalize_origin(origin) in allowed

    def own_origin(self, origin: str) -> bool:
        """The console's page: the origin the browser addressed this daemon by (its Host, checked above)."""
        return normalize_origin(origin) == normalize_origin(f"{request.scheme}://{request.host}")

    def check(self) -> Optional[APIError]:
        """None when the request may proceed; else the refusal."""
        if self.loopback and not self.host_ok(request.headers.get("Host", "")):
            return self.refuse(403, f"Host {request.headers.get('Host', '')!r} is not this daemon's address; "
                                    "mlxd bound to loopback answers only to 127.0.0.1, localhost or [::1] "
                                    f"on port {self.port} (DNS rebinding).", "host_not_allowed")
        origin = request.headers.get("Origin")
        k = kind(request.method, request.path)
        trusted = origin is not None and (self.own_origin(origin) or self.origin_allowed(origin))
        if origin is not None and not trusted:
            return self.refuse(403, f"Origin {origin!r} is not allowed; add it to server.allowed_origins "
                                    "to let that web page use mlxd.", "origin_not_allowed")
        site = request.headers.get("Sec-Fetch-Site", "").lower()
        if k != "read" and site in ("cross-site", "same-site") and not trusted:
            return self.refuse(403, "Cross-site requests are not allowed; add the page's origin to "
                                    "server.allowed_origins.", "origin_not_allowed")
        browser = origin is not None or bool(site)
        if k == "json" and not body_type_ok(request.mimetype, browser):
            return self.refuse(415, f"Content-Type must be application/json, got {request.mimetype or 'none'!r}.",
                               "unsupported_media_type")
        if k == "action" and not (request.mimetype == "" or body_type_ok(request.mimetype, browser)):
            return self.refuse(415, f"This action takes no body or a JSON one, got {request.mimetype!r}.",
                               "unsupported_media_type")
        return None

    def cors(self, resp) -> None:
        """An allowed origin (not the page's own) may read the answer."""
        origin = request.headers.get("Origin")
        if origin is None or self.own_origin(origin) or not self.origin_allowed(origin):
            return
        resp.headers["Access-Control-Allow-Origin"] = origin
        resp.headers.add("Vary", "Origin")
        if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
            resp.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
            asked = request.headers.get("Access-Control-Request-Headers")
            resp.headers["Access-Control-Allow-Headers"] = asked or "Authorization, Content-Type, x-api-key"
            resp.headers["Access-Control-Max-Age"] = "600"


def install(app: Quart, server: Callable, host: str, port: int, refused: Callable[[str], None]) -> Guard:
    """Register the guard before every other hook (a refusal runs no route, no auth); `refused(code)`
    counts each refusal."""
    guard = Guard(server, host, port)

    async def before():
        err = guard.check()
        if err is not None:
            refused(err.code)
            log.info("refused %s %s (Host %r, Origin %r): %s", request.method, request.path,
                     request.headers.get("Host"), request.headers.get("Origin"), err.code)
            resp = err.response(shape_of(request.path))
            # A refused client's connection is not kept, with a body or without (`keepalive` closes
            # only those whose body had not arrived in full).
            resp.headers["Connection"] = "close"
            return resp
        if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
            return "", 204       # a preflight from an allowed origin; `after` adds its headers
        return None

    async def after(resp):
        guard.cors(resp)
        return resp

    app.before_request_funcs.setdefault(None, []).insert(0, before)
    app.after_request(after)
    return guard


def warn_wildcard(server) -> None:
    if "*" in server.allowed_origins:
        log.warning("server.allowed_origins contains \"*\": every web page the user visits can use mlxd "
                    "(and read its answers). List the origins you trust instead.")
