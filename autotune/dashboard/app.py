"""The dashboard's FastAPI app: pages, the JSON API, static files; read-only, never imports torch.

Everything a page loads comes from this server: plotly.js from the installed plotly package, Swagger
UI (``/docs``) from the installed fastapi-offline package. Every response carries the security
headers of :mod:`autotune.security` (a Content-Security-Policy allowing only this origin).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from autotune import __version__
from autotune.dashboard import api, pages
from autotune.dashboard.assets import plotly_css, plotly_js, swagger_ui
from autotune.dashboard.data import NotFound, Store
from autotune.errors import StorageError
from autotune.security import SecurityHeaders, security_headers

log = logging.getLogger("autotune.dashboard")


def _wants_html(request: Request) -> bool:
    return not request.url.path.startswith("/api") and "text/html" in request.headers.get("accept", "")


def create_app(storage_url: str) -> FastAPI:
    """An app reading ``storage_url``; raises StorageError now (not per request) if it cannot be read."""
    app = FastAPI(
        title="autotune dashboard",
        version=__version__,
        description="Read-only view of autotune studies (and plain Optuna studies in the same database): "
        "best configs, Pareto fronts, trials.",
        docs_url=None,  # /docs is a page of ours (no CDN, no inline script); no ReDoc
        redoc_url=None,
    )
    app.add_middleware(SecurityHeaders)
    app.state.store = Store(storage_url)
    app.state.templates = pages.make_templates()

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=404)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404 and _wants_html(request):
            return pages.not_found_page(request, "no such page")
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_input(request: Request, exc: RequestValidationError) -> Response:
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()))
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(SQLAlchemyError)
    @app.exception_handler(StorageError)
    async def storage_down(request: Request, exc: Exception) -> Response:
        """The database went away or is busy: say so in one line; the page's next poll tries again."""
        log.warning("storage error on %s: %s", request.url.path, exc)
        first = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
        return JSONResponse({"error": f"storage unavailable: {first[:300]}"}, status_code=503)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("dashboard error on %s", request.url.path)  # the server log has it; the client never does
        # Answered outside the middleware stack (Starlette's ServerErrorMiddleware): headers set here.
        return JSONResponse(
            {"error": f"internal error ({type(exc).__name__})"}, status_code=500, headers=security_headers()
        )

    @app.get("/static/plotly.min.js", include_in_schema=False)
    def plotly_bundle() -> FileResponse:
        return FileResponse(plotly_js(), media_type="text/javascript")

    @app.get("/static/plotly.css", include_in_schema=False)
    def plotly_stylesheet() -> Response:
        return Response(plotly_css(), media_type="text/css")

    app.include_router(api.router)
    app.include_router(pages.router)
    app.mount("/static/swagger-ui", StaticFiles(directory=str(swagger_ui())), name="swagger-ui")
    app.mount("/static", StaticFiles(directory=str(pages.WEB / "static")), name="static")
    return app
