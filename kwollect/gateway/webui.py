"""The live web view at /ui/: pick a job or devices and metrics, see them plotted.

The page is static (ui/index.html, ui/app.js, ui/app.css) and calls the same /rpc
functions as any client, with the same roles: anonymous visitors read what kwuser_ro
reads, a token pasted in the page is sent as a Bearer header and never stored. The chart
library is plotly.js as shipped inside the `plotly` Python package (a dependency: the
well-kept way to get a charting library from a package index without a JavaScript build),
served from that installation at /ui/plotly.min.js; nothing of it is copied into this
repository. Should it be missing, /ui/ says what to install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).parent / "ui"
FILES = {"app.js": "text/javascript", "app.css": "text/css"}
CACHE = {"Cache-Control": "no-cache"}


def plotly_js() -> Path | None:
    """plotly.min.js from the installed plotly package, if there is one."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "package_data" / "plotly.min.js"
        if candidate.is_file():
            return candidate
    return None


async def index(request: web.Request) -> web.StreamResponse:
    if plotly_js() is None:
        return web.Response(status=503, content_type="text/plain", text=(
            "kwollect's web view needs plotly.js, shipped by the Python package plotly: "
            "install it beside kwollect-api (pip install plotly) and restart kwollect-api.\n"))
    return web.FileResponse(STATIC / "index.html", headers={
        **CACHE, "Content-Type": "text/html; charset=utf-8",
        "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                                   "img-src 'self' data: blob:; frame-ancestors 'none'",
        "X-Content-Type-Options": "nosniff"})


async def static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name == "plotly.min.js":
        path = plotly_js()
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Content-Type": "text/javascript",
                                               "Cache-Control": "max-age=86400"})
    if name not in FILES:
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC / name, headers={**CACHE, "Content-Type": FILES[name],
                                                    "X-Content-Type-Options": "nosniff"})


async def redirect(request: web.Request) -> web.StreamResponse:
    """/ui to /ui/, returned (the gateway's middleware turns raised HTTP errors into JSON
    error bodies); relative, so that it holds behind a proxy's path prefix."""
    return web.Response(status=302, headers={"Location": "ui/"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ui", redirect, allow_head=False)
    app.router.add_get("/ui/", index, allow_head=False)
    app.router.add_get("/ui/{name}", static, allow_head=False)
