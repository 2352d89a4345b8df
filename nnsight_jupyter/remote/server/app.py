"""The app factory: declared routes and middleware around one :class:`Service`.

Stack, outermost first: Starlette's error middleware (any exception becomes a JSON 500 with a
request id, and the server keeps serving), the API-key middleware (``auth.py``), then the
router, whose ``ApiError`` and HTTP errors are answered as JSON. Creating the app opens nothing;
the lifespan starts the queue and the workers and stops them on shutdown.

    app = create_app(ServerConfig(models=parse_model_specs("smollm2"), data_dir="srv", api_key_file="keys.txt"))
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse

from .auth import ApiKeyMiddleware, ApiKeys
from .config import ServerConfig
from .responses import ApiError, error_response
from .routes import ROUTES
from .service import Service

__all__ = ["create_app"]

log = logging.getLogger("nnsight_jupyter.server")

_HTTP_ERRORS = {404: "not found", 405: "method not allowed"}


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.http_status, exc.error, exc.detail, headers=exc.headers, **exc.extra)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    status = getattr(exc, "status_code", 500)
    if status == 404:
        detail = (
            f"there is no endpoint {request.url.path[:200]!r}; the server offers /health, /models, /jobs, "
            "/jobs/{id}, /jobs/{id}/events, /jobs/{id}/result and /jobs/{id}/cancel"
        )
    elif status == 405:
        detail = f"{request.method} is not allowed on {request.url.path[:200]!r}"
    else:
        detail = getattr(exc, "detail", None)
    return error_response(
        status, _HTTP_ERRORS.get(status, "request failed"), detail, headers=getattr(exc, "headers", None)
    )


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    request_id = secrets.token_hex(6)
    log.exception("request %s (%s %s) failed", request_id, request.method, request.url.path[:200])
    return error_response(
        500,
        "internal server error",
        f"the server hit an unexpected problem and logged it as request {request_id}; "
        "the server keeps running. Tell its operator the request id.",
        request_id=request_id,
    )


def create_app(config: ServerConfig) -> Starlette:
    """A Starlette app serving ``config``; run it with uvicorn (``nnsight-jupyter serve`` does)."""
    keys = ApiKeys(config.api_key_file) if config.auth and config.api_key_file is not None else None
    service = Service(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = Starlette(
        routes=ROUTES,
        middleware=[Middleware(ApiKeyMiddleware, keys=keys)],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _server_error},  # type: ignore[dict-item]
        lifespan=lifespan,
    )
    app.state.service = service
    return app
