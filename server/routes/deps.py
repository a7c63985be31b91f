"""What routes take from the app: its state and serving objects."""

from __future__ import annotations

from fastapi import Request

from ..protocol import ErrorResponse
from ..serving import ServerState

ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in ((400, "Invalid parameters"), (401, "Missing or wrong API key"),
                         (404, "Unknown model or adapter"), (413, "Request body too large"),
                         (429, "Queue full (see Retry-After)"), (503, "Not ready"))
}


def state(request: Request) -> ServerState:
    return request.app.state.server
