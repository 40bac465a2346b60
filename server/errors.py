"""Every error leaves the server in the OpenAI shape:
`{"error": {"message": str, "type": str, "param": str | None, "code": str | None}}`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("msn.server")

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class ClientGone(Exception):
    """The client disconnected before the response was complete (nothing to send)."""


class APIError(Exception):
    """An error the client should see, with its HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, type: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(status, "invalid_request_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_json_bytes(status: int, message: str, code: str | None = None) -> bytes:
    """For the raw ASGI middlewares that answer before FastAPI runs."""
    body = error_body(message, _TYPE_BY_STATUS.get(status, "invalid_request_error"), None, code)
    return json.dumps(body).encode()


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _param_of(loc: tuple) -> str | None:
    # loc is ("body", "messages", 0, "content"): drop the "body" root; stop at pydantic's
    # union member tags ("str", "list[constrained-str]"), which are not request fields.
    if not loc or loc[0] not in ("body", "query"):
        return None
    parts = []
    for part in loc[1:]:
        text = str(part)
        if text in _UNION_TAGS or "[" in text or "-" in text:
            break
        parts.append(text)
    return ".".join(parts) or None


def _describe(err: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """(message, param, code) of one pydantic error."""
    cause = err.get("ctx", {}).get("error")
    param = getattr(cause, "param", None) or _param_of(tuple(err.get("loc", ())))
    if param is not None and getattr(cause, "param", None):
        return str(cause), param, "unsupported_parameter"
    if err.get("type") == "json_invalid":
        return f"request body is not valid JSON: {cause or err.get('msg')}", None, \
            "invalid_json"
    if tuple(err.get("loc", ())) == ("body",) and err.get("type") in (
            "model_attributes_type", "dict_type", "missing"):
        return ("request body must be a JSON object (Content-Type: application/json)",
                None, "invalid_body")
    msg = str(cause) if isinstance(cause, ValueError) else err.get("msg", "invalid value")
    return (f"{param}: {msg}" if param else msg), param, err.get("type")


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    described = [_describe(e) for e in exc.errors()[:5]]
    if not described:
        return JSONResponse(error_body("invalid request", "invalid_request_error"), 400)
    message = "; ".join(d[0] for d in described)
    _, param, code = described[0]
    return JSONResponse(error_body(message, "invalid_request_error", param, code),
                        status_code=400)


async def _on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    return JSONResponse(
        error_body(str(exc.detail), _TYPE_BY_STATUS.get(status, "invalid_request_error")),
        status_code=status,
        headers=getattr(exc, "headers", None),
    )


async def _on_client_gone(request: Request, exc: ClientGone) -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(
        error_body(f"internal server error: {type(exc).__name__}", "server_error", None,
                   "internal_error"),
        status_code=500,
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(ClientGone, _on_client_gone)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
