"""Errors as data: one record per failure, rendered in the shape of the API that was called.

A route raises `APIError` (status, OpenAI-style type, message, code, param); the app's
error handler and each stream render it as OpenAI's `{"error": {...}}` or Anthropic's
`{"type": "error", "error": {...}}` or Ollama's `{"error": "..."}`, so every client library
reports it properly.
"""

from __future__ import annotations

import re
from typing import Optional

from pydantic import ValidationError
from quart import jsonify

# Anthropic's error types by status; 529 is its "overloaded"
_ANTHROPIC = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
              429: "rate_limit_error", 504: "timeout_error", 529: "overloaded_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: Optional[str] = None, param: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_status(self) -> int:
        """A full model is Anthropic's 529 `overloaded_error`, which its SDKs retry."""
        return 529 if self.code == "model_at_capacity" else self.status

    def anthropic_body(self) -> dict:
        status = self.anthropic_status()
        kind = _ANTHROPIC.get(status, "api_error" if status >= 500 else "invalid_request_error")
        message = f"{self.param}: {self.message}" if self.param and self.param not in self.message else self.message
        return {"type": "error", "error": {"type": kind, "message": message}}

    def ollama_body(self) -> dict:
        """Ollama's clients read {"error": "..."} and the status."""
        return {"error": f"{self.param}: {self.message}" if self.param and self.param not in self.message
                else self.message}

    def response(self, shape: str = "openai"):
        if shape == "ollama":
            resp = jsonify(self.ollama_body())
            resp.status_code = self.status
        elif shape == "anthropic":
            resp = jsonify(self.anthropic_body())
            resp.status_code = self.anthropic_status()
        else:
            resp = jsonify(self.body())
            resp.status_code = self.status
        resp.headers.update(self.headers)
        return resp


def shape_of(path: str) -> str:
    """Which API a path belongs to, so that even a 404 or 401 reads as that API's error."""
    if path.startswith("/api/"):
        return "ollama"
    return "anthropic" if path == "/v1/messages" or path.startswith("/v1/messages/") else "openai"


# Union branches and validators appear in pydantic's locations; clients never spelled them.
_NOT_A_FIELD = re.compile(r"^(function-.*|str|int|float|bool|none|list\[.*\]|dict\[.*\]|[A-Z]\w*)$")


def from_validation(e: ValidationError) -> APIError:
    """The first field with a problem, named the way the client spelled it. For a union
    (`prompt`: text or token ids) the branch that got furthest says what is wrong."""
    errors = e.errors()
    err = max((x for x in errors if x["loc"][:1] == errors[0]["loc"][:1]), key=lambda x: len(x["loc"]))
    loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and _NOT_A_FIELD.match(p)))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        msg = f"'{loc}' is a required property"
    elif loc:
        msg = f"Invalid value for '{loc}': {msg}"
    return APIError(400, msg, param=loc or None, code="invalid_value" if err["type"] != "missing" else None)


def model_not_found(name: str) -> APIError:
    return APIError(404, f"The model '{name}' does not exist or you do not have access to it.",
                    code="model_not_found", param="model")
