"""The files the pages load, all from installed packages (these machines are offline: no CDN).

plotly.js and its stylesheet from the ``plotly`` package, Swagger UI from ``fastapi-offline``.
"""

from __future__ import annotations

import ast
import logging
import re
from functools import lru_cache
from pathlib import Path

log = logging.getLogger("autotune.dashboard")


@lru_cache(maxsize=1)
def plotly_js() -> Path:
    """plotly.js from the installed plotly package: these machines are offline, no CDN."""
    import plotly

    return Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"


#: plotly.js's own stylesheet, as its bundle writes it: ``{"X .modebar": "position:absolute;...", ...}``
#: (X: the plot, Y: the notifier), rules it injects as an inline <style> unless the page has
#: ``#plotly.js-style-global.no-inline-styles``, which a Content-Security-Policy without
#: 'unsafe-inline' needs.
_RULES_START = '{"X,X div":'
_STRING = r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\''
_RULE = re.compile(rf"({_STRING})\s*:\s*({_STRING})\s*[,}}]")


@lru_cache(maxsize=1)
def plotly_css() -> str:
    """plotly.js's stylesheet, read from the installed bundle (empty, logged, if its shape changed:
    the plots still draw, only the mode bar and hover labels lose their styling)."""
    js = plotly_js().read_text(encoding="utf-8")
    start = js.find(_RULES_START)
    end = js.find("};", start)
    if start < 0 or end < 0:
        log.warning("plotly.js %s: its stylesheet was not found in the bundle; plots are drawn unstyled", plotly_js())
        return ""
    out = []
    for key, value in _RULE.findall(js[start : end + 1]):
        selector = ast.literal_eval(key).replace("X", ".js-plotly-plot .plotly").replace("Y", ".plotly-notifier")
        selector = " ," + selector[1:] if selector.startswith(",") else selector
        out.append(f"{selector} {{{ast.literal_eval(value)}}}")
    return "\n".join(out) + "\n"


_STYLE_IDS = re.compile(r'getElementById\("([0-9a-f]{32,64})"\)\)\{var (\w+)=document\.createElement\("style"\)')


@lru_cache(maxsize=1)
def plotly_style_ids() -> list[str]:
    """Ids of the stylesheets plotly.js injects for its map traces (maplibre's) unless an element
    with that id exists: the pages carry such an element, since they draw no maps and the CSP
    would block the inline <style> anyway."""
    return sorted(set(m[0] for m in _STYLE_IDS.findall(plotly_js().read_text(encoding="utf-8"))))


def swagger_ui() -> Path:
    """Swagger UI's files (bundle, stylesheet) from the installed fastapi-offline package: no CDN."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).resolve().parent / "static"
