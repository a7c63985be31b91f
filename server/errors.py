"""Every error the API returns, in OpenAI's JSON shape, mapped to its status in one place."""

from __future__ import annotations

import logging
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from malora_runtime.adapters.errors import AdapterError, AdapterMemoryError
from malora_runtime.adapters.manager import AdapterConflictError
from malora_runtime.adapters.sources import AdapterSourceError
from malora_runtime.engine.errors import (
    EngineRequestError,
    EngineShutdownError,
    RequestFailedError,
    UnknownAdapterError,
)

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 409: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable_error"}


class APIError(Exception):
    """A failure to report to the client as `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        error_type = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def not_ready() -> APIError:
    return APIError(503, "the server is not ready yet (the model is loading or the engine stopped)",
                    code="not_ready", headers={"Retry-After": "1"})


def from_sampling_error(exc: ValueError) -> APIError:
    """`SamplingParams` messages start with the parameter's name."""
    message = str(exc)
    return invalid(message, param=message.split(" ", 1)[0] or None)


def to_api_error(exc: BaseException) -> APIError:
    """The API error for an exception raised while serving a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, UnknownAdapterError):
        return APIError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, EngineRequestError):
        return invalid(str(exc), param=exc.param)
    if isinstance(exc, RequestFailedError):
        return APIError(500, str(exc), code="request_failed")
    if isinstance(exc, AdapterConflictError):
        return APIError(409, str(exc), code="adapter_exists")
    if isinstance(exc, AdapterMemoryError):
        return APIError(503, str(exc), code="adapter_memory_full", headers={"Retry-After": "5"})
    if isinstance(exc, AdapterSourceError):
        return APIError(503, str(exc), code="adapter_source_unavailable", headers={"Retry-After": "5"})
    if isinstance(exc, AdapterError):
        return APIError(400, str(exc), code="invalid_adapter")
    if isinstance(exc, EngineShutdownError):
        return APIError(503, str(exc), code="shutting_down", headers={"Retry-After": "5"})
    log.error("unexpected error while serving a request", exc_info=exc)
    return APIError(500, "internal server error", code="internal_error")


_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.+\]|dict\[.+\]|[A-Z]\w+)$")


def _param(loc: tuple) -> str | None:
    """`body.stop.list[str].0` -> `stop.0`: the request's own path, without pydantic's union member tags."""
    parts = [str(p) for p in loc[1:] if not (isinstance(p, str) and _UNION_TAG.match(p))] if loc else []
    return ".".join(parts) or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}", None
    param = _param(tuple(first.get("loc", ())))
    details = "; ".join(f"{_param(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg', 'invalid')}"
                        for e in exc.errors()[:5])
    return details or "invalid request body", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(AdapterError)
    async def _adapter_error(_: Request, exc: AdapterError) -> JSONResponse:
        return to_api_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return invalid(message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        phrase = HTTPStatus(exc.status_code).phrase if exc.status_code in HTTPStatus._value2member_map_ else ""
        message = exc.detail if isinstance(exc.detail, str) else phrase
        return APIError(exc.status_code, message or phrase, headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()
