"""ASGI middleware: request body size limit (413) and bearer-key authentication (401, 403).

Plain ASGI rather than Starlette's BaseHTTPMiddleware, so streaming responses and client
disconnects pass through untouched.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError

HEALTH_PATHS = ("/health", "/ready", "/version")
METRICS_PATHS = ("/metrics", "/v1/dashboard/summary")
# The dashboard page and its static assets hold no data (the page asks for a key when its summary needs one).
DASHBOARD_PATHS = ("/dashboard",)
DASHBOARD_PREFIXES = ("/dashboard/",)
DOC_PATHS = ("/openapi.json", "/docs", "/redoc")
ADMIN_PATHS = ("/v1/adapters", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")


def is_admin_path(path: str) -> bool:
    return path in ADMIN_PATHS or path.startswith("/v1/adapters/")


def bearer_matches(scope: Scope, keys: list[bytes]) -> bool:
    """Whether the request's `Authorization: Bearer` token is one of `keys`."""
    header = dict(scope.get("headers", [])).get(b"authorization", b"")
    scheme, _, token = header.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    token = token.strip()
    # compare against every key so timing does not reveal which one nearly matched
    return any([hmac.compare_digest(token, key) for key in keys])


def is_admin_request(scope: Scope, admin_key: str | None) -> bool:
    return admin_key is not None and bearer_matches(scope, [admin_key.encode()])


class BodyLimitMiddleware:
    """Refuse bodies over `max_bytes`: by Content-Length up front, or while the body streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"the request body exceeds {self.max_bytes} bytes", code="request_too_large")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await APIError(400, "invalid Content-Length").response()(scope, receive, send)
                if declared > self.max_bytes:
                    return await too_large.response()(scope, receive, send)
        # Read the body here (bounded), then replay it; later receives (disconnects) go straight through.
        chunks: list[Message] = []
        size = 0
        while True:
            message = await receive()
            chunks.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await too_large.response()(scope, receive, send)
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return chunks.pop(0) if chunks else await receive()

        await self.app(scope, replay, send)


class AuthMiddleware:
    """With keys configured, every path but the open ones needs `Authorization: Bearer <key>`.

    Open: the API docs, the dashboard's page, health/ready/version with `open_health`, and /metrics
    with the dashboard's data with `public_metrics`. The adapter management paths take the admin key
    only (never an API key), and answer 403 when the server has no admin key.
    """

    def __init__(self, app: ASGIApp, api_keys: list[str], open_health: bool, admin_key: str | None = None,
                 public_metrics: bool = False) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys]
        self.admin_keys = [admin_key.encode()] if admin_key else []
        self.open_paths = (DOC_PATHS + DASHBOARD_PATHS + (HEALTH_PATHS if open_health else ())
                           + (METRICS_PATHS if public_metrics else ()))
        self.open_prefixes = DASHBOARD_PREFIXES

    def _is_open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(self.open_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if is_admin_path(scope["path"]):
            error = self._admin_error(scope)
        elif not self.keys or self._is_open(scope["path"]) or bearer_matches(scope, self.keys):
            error = None
        else:
            error = APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if error is None:
            return await self.app(scope, receive, send)
        await error.response()(scope, receive, send)

    def _admin_error(self, scope: Scope) -> APIError | None:
        if not self.admin_keys:
            return APIError(403, "adapter management is disabled: start the server with --admin-key (or "
                            "MALORA_ADMIN_KEY) to enable it", code="admin_disabled")
        if bearer_matches(scope, self.admin_keys):
            return None
        return APIError(401, "missing or invalid admin key (send 'Authorization: Bearer <admin key>')",
                        code="invalid_admin_key", headers={"WWW-Authenticate": "Bearer"})
