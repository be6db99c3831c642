"""Errors in OpenAI's shape, so every client library reports them properly."""

from __future__ import annotations

import re
from typing import Optional

from pydantic import ValidationError
from quart import jsonify


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: Optional[str] = None, param: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        resp = jsonify(self.body())
        resp.status_code = self.status
        resp.headers.update(self.headers)
        return resp


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
