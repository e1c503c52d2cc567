"""Security headers for autotune's web apps (the dashboard and ``autotune serve``): a small ASGI middleware.

    from autotune.security import SecurityHeaders
    app.add_middleware(SecurityHeaders)                 # the defaults below
    app.add_middleware(SecurityHeaders, csp=None)       # an API with no pages: no CSP, the other headers

Every HTTP response gets the headers below unless the endpoint set that header itself (a page that
needs a wider policy sets its own ``Content-Security-Policy``). The default policy lets a page load
scripts, styles, fonts, images and data only from its own origin: no inline script, no ``eval``, no
third-party host, no framing.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Only the page's own origin. ``img-src data:``: Plotly's "download plot as PNG" draws the SVG
#: through a data: image, and stylesheets inline small icons as data: images (neither can run code).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def security_headers(csp: str | None = CSP) -> dict[str, str]:
    """The headers :class:`SecurityHeaders` adds (``csp=None``: all but the Content-Security-Policy)."""
    headers = {
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",  # frame-ancestors' equivalent for browsers that predate CSP 2
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cross-Origin-Resource-Policy": "same-origin",
    }
    if csp:
        headers["Content-Security-Policy"] = csp
    return headers


class SecurityHeaders:
    """ASGI middleware adding :func:`security_headers` to every HTTP response (errors included),
    leaving alone any header the response already has."""

    def __init__(self, app: ASGIApp, csp: str | None = CSP, headers: Mapping[str, str] | None = None) -> None:
        self.app = app
        self.headers = list((dict(headers) if headers is not None else security_headers(csp)).items())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                for name, value in self.headers:
                    out.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
