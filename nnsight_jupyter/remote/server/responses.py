"""The one shape of every error the server answers with: ``{"error": ..., "detail": ...}``.

``error`` is a short, stable phrase a client can branch on ("unknown model", "request too
large"); ``detail`` says what happened and what to do about it, and may carry structured extras
(the served models, the limit in bytes). Keeping the shape in one place means the auth
middleware, the routes and the catch-all handler cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

__all__ = ["ApiError", "error_response"]


class ApiError(Exception):
    """Raised by a route to answer with a JSON error; caught by the app's exception handler."""

    def __init__(
        self, http_status: int, error: str, detail: Any = None, *, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(f"{http_status} {error}: {detail}")
        self.http_status = http_status
        self.error = error
        self.detail = detail
        self.headers = headers
        self.extra = extra


def error_response(
    http_status: int, error: str, detail: Any = None, *, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body: dict[str, Any] = {"error": error, "detail": detail}
    body.update(extra)
    return JSONResponse(body, status_code=http_status, headers=headers)
