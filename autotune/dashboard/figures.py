"""Plotly figures as plain ``{"data", "layout"}`` dicts, drawn by the locally served plotly.js.

Plain dicts instead of ``plotly.graph_objects``: a 10,000-trial study page must render in well under
300 ms, and the graph objects' validation would cost more than the whole page. A plot draws at most
:data:`MAX_POINTS` trials (every Pareto-front trial, the best, and an even sample of the rest), so a
page's weight does not grow with the study; the front, the best-so-far line and the importance are
computed from every trial.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from autotune.dashboard.data import KNOBS, latency_column

FEASIBLE, INFEASIBLE, FRONT = "#1b9e77", "#d95f02", "#444"
#: Trials one plot draws at most (each carries its config as hover text: about 200 bytes).
MAX_POINTS = 1000
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")


def plotly_text(text: str) -> str:
    """Plotly draws a few HTML-like tags in names and hovers: give it database strings as entities."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _layout(title: str, x: str, y: str, **extra: Any) -> dict[str, Any]:
    return {
        "title": {"text": title},
        "xaxis": {"title": {"text": x}, "zeroline": False},
        "yaxis": {"title": {"text": y}, "zeroline": False},
        "margin": {"l": 60, "r": 20, "t": 40, "b": 50},
        "hovermode": "closest",
        "legend": {"orientation": "h", "y": -0.2},
        **extra,
    }


def plotted(rows: list[dict[str, Any]], latency: str) -> list[dict[str, Any]]:
    """Trials with a measurement of their own (repeats and OOM/timeout placeholders have none)."""
    col = latency_column(latency)
    return [
        r for r in rows if r["state"] == "measured" and r["output_tokens_per_s"] is not None and r.get(col) is not None
    ]


def front(points: list[dict[str, Any]], latency: str) -> list[dict[str, Any]]:
    """Points no other point beats on both tokens/s (higher) and latency (lower), by latency."""
    col = latency_column(latency)
    out: list[dict[str, Any]] = []
    best = -1.0
    for r in sorted(points, key=lambda r: (r[col], -r["output_tokens_per_s"])):
        if r["output_tokens_per_s"] > best:
            out.append(r)
            best = r["output_tokens_per_s"]
    return out


def thin(rows: list[dict[str, Any]], keep: set[int], cap: int | None = None) -> list[dict[str, Any]]:
    """At most ``cap`` (default :data:`MAX_POINTS`) of ``rows`` (more only if ``keep`` is larger):
    every row whose number is in ``keep``, then an even sample of the others; in the order given."""
    cap = MAX_POINTS if cap is None else cap
    if len(rows) <= cap:
        return rows
    rest = [r for r in rows if r["number"] not in keep]
    room = max(cap - (len(rows) - len(rest)), 0)
    chosen = {rest[i * len(rest) // room]["number"] for i in range(room)} if room else set()
    return [r for r in rows if r["number"] in keep or r["number"] in chosen]


def shown(rows: list[dict[str, Any]], latency: str, cap: int | None = None) -> list[dict[str, Any]]:
    """The plotted trials a scatter draws: the whole front, the best feasible one, a sample of the rest."""
    pts = plotted(rows, latency)
    keep = {r["number"] for r in front(pts, latency)}
    best = max((r for r in pts if r["feasible"]), key=lambda r: r["output_tokens_per_s"], default=None)
    if best is not None:
        keep.add(best["number"])
    return thin(pts, keep, cap)


def _config_lines(cfg: dict[str, Any], cache: dict[int, str]) -> str:
    """A config's knobs as hover lines (many trials share one config dict: built once per dict)."""
    text = cache.get(id(cfg))
    if text is None:
        text = cache[id(cfg)] = "<br>".join(f"{k}: {cfg.get(k)}" for k in KNOBS if k in cfg)
    return text


def _hover(r: dict[str, Any], latency: str, cache: dict[int, str] | None = None) -> str:
    cfg = _config_lines(r["config"], {} if cache is None else cache)
    lat = r.get(latency_column(latency))
    return (
        f"trial {r['number']} ({'feasible' if r['feasible'] else 'infeasible'})<br>"
        f"{r['output_tokens_per_s']:.1f} tok/s, {latency} {lat:.1f}<br>{cfg}"
    )


def _points(rows: list[dict[str, Any]], latency: str, name: str, color: str) -> dict[str, Any]:
    col = latency_column(latency)
    cache: dict[int, str] = {}
    return {
        "type": "scatter",
        "mode": "markers",
        "name": name,
        "x": [r[col] for r in rows],
        "y": [r["output_tokens_per_s"] for r in rows],
        "customdata": [r["number"] for r in rows],
        "text": [_hover(r, latency, cache) for r in rows],
        "hovertemplate": "%{text}<extra></extra>",
        "marker": {"color": color, "size": 9, "line": {"width": 1, "color": "#fff"}},
    }


def pareto(
    rows: list[dict[str, Any]], latency: str, limit: float | None, pts: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Output tokens/s against the SLO latency: feasible vs infeasible, the front, the SLO line
    (``pts``: :func:`shown` of ``rows`` when already at hand)."""
    col = latency_column(latency)
    fr = front(plotted(rows, latency), latency)
    pts = shown(rows, latency) if pts is None else pts
    data = [
        _points([r for r in pts if r["feasible"]], latency, "feasible", FEASIBLE),
        _points([r for r in pts if not r["feasible"]], latency, "infeasible", INFEASIBLE),
        {
            "type": "scatter",
            "mode": "lines",
            "name": "Pareto front",
            "x": [r[col] for r in fr],
            "y": [r["output_tokens_per_s"] for r in fr],
            "line": {"color": FRONT, "dash": "dot", "shape": "hv"},
            "hoverinfo": "skip",
        },
    ]
    layout = _layout("Output tokens/s vs " + latency, f"{latency} (ms)", "output tokens/s")
    if limit is not None:
        layout["shapes"] = [
            {
                "type": "line",
                "xref": "x",
                "yref": "paper",
                "x0": limit,
                "x1": limit,
                "y0": 0,
                "y1": 1,
                "line": {"color": "#c00", "width": 2, "dash": "dash"},
            }
        ]
        layout["annotations"] = [
            {
                "x": limit,
                "y": 1,
                "xref": "x",
                "yref": "paper",
                "text": f"SLO {limit:g} ms",
                "showarrow": False,
                "xanchor": "left",
                "yanchor": "top",
                "font": {"color": "#c00"},
            }
        ]
    return {"data": data, "layout": layout}


def _steps(points: list[tuple[int, float]], better: Any) -> tuple[list[int], list[float]]:
    """The best-so-far step line through (number, value) points in number order: its corners only
    (where the best changes) and the last number, which draw the same ``hv`` line."""
    xs: list[int] = []
    ys: list[float] = []
    best: float | None = None
    for n, v in points:
        if best is None or better(v, best):
            best = v
            xs.append(n)
            ys.append(v)
    if xs and points and points[-1][0] != xs[-1]:
        xs.append(points[-1][0])
        ys.append(ys[-1])
    return xs, ys


def history(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Measured trials' tokens/s by trial number, and the best feasible so far as a step line."""
    pts = [r for r in rows if r["output_tokens_per_s"] is not None and r["state"] == "measured"]
    ordered = sorted(rows, key=lambda r: r["number"])
    good = [
        (r["number"], r["output_tokens_per_s"])
        for r in ordered
        if r["feasible"] and r["output_tokens_per_s"] is not None and not r.get("confirmed_failed")
    ]
    best_x, best_y = _steps(good, lambda v, b: v > b)
    if best_x and ordered[-1]["number"] != best_x[-1]:
        best_x.append(ordered[-1]["number"])
        best_y.append(best_y[-1])
    pts = thin(pts, set(best_x))
    data = [
        {
            "type": "scatter",
            "mode": "markers",
            "name": name,
            "x": [r["number"] for r in pts if bool(r["feasible"]) == ok],
            "y": [r["output_tokens_per_s"] for r in pts if bool(r["feasible"]) == ok],
            "customdata": [r["number"] for r in pts if bool(r["feasible"]) == ok],
            "marker": {"color": color, "size": 7},
        }
        for name, ok, color in (("feasible", True, FEASIBLE), ("infeasible", False, INFEASIBLE))
    ]
    data.append(
        {
            "type": "scatter",
            "mode": "lines",
            "name": "best feasible so far",
            "x": best_x,
            "y": best_y,
            "line": {"color": FRONT, "shape": "hv"},
        }
    )
    return {"data": data, "layout": _layout("Optimization history", "trial", "output tokens/s")}


def importance(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Share of the throughput variance each knob explains on its own (eta squared), largest first.

    A cheap, explainable stand-in for fANOVA that needs no refit per page view: one pass over the
    trials, then per knob a pass over the distinct configs.
    """
    pts = [r for r in rows if r["output_tokens_per_s"] is not None and r["state"] == "measured"]
    scores: dict[str, float] = {}
    if len(pts) >= 2:
        ys = [r["output_tokens_per_s"] for r in pts]
        mean = sum(ys) / len(ys)
        total = sum((y - mean) ** 2 for y in ys)
        by_config: dict[str, list[Any]] = {}  # key -> [config, count, sum]
        for r in pts:
            key = r.get("config_key") or repr(sorted(r["config"].items()))
            acc = by_config.setdefault(key, [r["config"], 0, 0.0])
            acc[1] += 1
            acc[2] += r["output_tokens_per_s"]
        for knob in KNOBS:
            groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
            for cfg, n, tot in by_config.values():
                g = groups[str(cfg.get(knob))]
                g[0] += n
                g[1] += tot
            if len(groups) < 2 or total <= 0:
                continue
            between = sum(n * (tot / n - mean) ** 2 for n, tot in groups.values())
            scores[knob] = between / total
    ranked = sorted(scores.items(), key=lambda kv: kv[1])
    data = [
        {
            "type": "bar",
            "orientation": "h",
            "x": [v for _, v in ranked],
            "y": [k for k, _ in ranked],
            "marker": {"color": PALETTE[0]},
            "hovertemplate": "%{y}: %{x:.2f}<extra></extra>",
        }
    ]
    layout = _layout("Parameter importance (throughput variance explained)", "share of variance (η²)", "")
    layout["xaxis"]["range"] = [0, 1]
    layout["margin"]["l"] = 140
    return {"data": data, "layout": layout}


def _quartiles(values: list[float], digits: int) -> tuple[list[str], list[str]]:
    """Each value's quartile as a label (``120–340``) and the labels in order."""
    ordered = sorted(values)
    n = len(ordered)
    edges = [ordered[min(n - 1, (n * q) // 4)] for q in range(5)]
    edges[-1] = ordered[-1]
    labels = [f"{edges[i]:,.{digits}f}–{edges[i + 1]:,.{digits}f}" for i in range(4)]
    names = list(dict.fromkeys(labels))

    def label(v: float) -> str:
        for i in range(4):
            if v <= edges[i + 1]:
                return labels[i]
        return labels[-1]

    return [label(v) for v in values], names


def parallel(rows: list[dict[str, Any]], latency: str, pts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Parallel categories: each knob that varied, then tokens/s and the SLO latency in quartiles;
    colour = feasible (``pts``: :func:`shown` of ``rows`` when already at hand). Plotly's parallel
    categories draw as SVG: no WebGL, no ``eval`` (its parallel coordinates need both, which the
    dashboard's Content-Security-Policy does not allow)."""
    pts = shown(rows, latency) if pts is None else pts
    dims: list[dict[str, Any]] = []
    for knob in KNOBS:
        values = [r["config"].get(knob) for r in pts]
        distinct = {v for v in values if v is not None}
        if len(distinct) < 2:
            continue
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in distinct)
        order = sorted(distinct) if numeric else sorted(distinct, key=str)
        cats = [f"{v:g}" if numeric else str(v) for v in order]
        fmt = {v: c for v, c in zip(order, cats, strict=True)}
        dims.append(
            {
                "label": knob,
                "values": [fmt.get(v, "–") for v in values],
                "categoryorder": "array",
                "categoryarray": cats,
            }
        )
    col = latency_column(latency)
    if pts:
        for label, values, digits in (
            ("tokens/s", [r["output_tokens_per_s"] for r in pts], 0),
            (f"{latency} (ms)", [r[col] for r in pts], 0),
        ):
            bins, names = _quartiles(values, digits)
            dims.append({"label": label, "values": bins, "categoryorder": "array", "categoryarray": names})
    data = [
        {
            "type": "parcats",
            "dimensions": dims,
            "line": {
                "color": [1 if r["feasible"] else 0 for r in pts],
                "colorscale": [[0, INFEASIBLE], [1, FEASIBLE]],
                "cmin": 0,
                "cmax": 1,
                "shape": "hspline",
            },
            "hoveron": "color",
            "arrangement": "freeform",
        }
    ]
    return {
        "data": data,
        # The title sits in the page (a Plotly title collides with the axis labels above the bands).
        "layout": {"margin": {"l": 70, "r": 70, "t": 40, "b": 30}},
    }


def values_history(points: list[dict[str, Any]], direction: str) -> dict[str, Any]:
    """A study autotune did not make: each complete trial's first objective value by trial number,
    and the best so far (``direction``: maximize or minimize) as a step line."""
    better = (lambda v, b: v > b) if direction == "maximize" else (lambda v, b: v < b)
    best_x, best_y = _steps([(p["number"], p["value"]) for p in points], better)
    pts = thin(points, set(best_x))
    data = [
        {
            "type": "scatter",
            "mode": "markers",
            "name": "complete trials",
            "x": [p["number"] for p in pts],
            "y": [p["value"] for p in pts],
            "customdata": [p["number"] for p in pts],
            "marker": {"color": PALETTE[0], "size": 7},
        },
        {
            "type": "scatter",
            "mode": "lines",
            "name": "best so far",
            "x": best_x,
            "y": best_y,
            "line": {"color": FRONT, "shape": "hv"},
        },
    ]
    return {"data": data, "layout": _layout("Optimization history", "trial", "objective value")}


def compare(studies: list[tuple[str, list[dict[str, Any]], str, float | None]]) -> dict[str, Any]:
    """Several studies' Pareto fronts (and their points, faint) on one plot."""
    data: list[dict[str, Any]] = []
    shapes: list[dict[str, Any]] = []
    for i, (name, rows, latency, limit) in enumerate(studies):
        color = PALETTE[i % len(PALETTE)]
        label = plotly_text(name)
        cache: dict[int, str] = {}
        pts = shown(rows, latency, max(100, MAX_POINTS // len(studies)))
        col = latency_column(latency)
        fr = front(plotted(rows, latency), latency)
        data.append(
            {
                "type": "scatter",
                "mode": "markers",
                "name": f"{label} trials",
                "x": [r[col] for r in pts],
                "y": [r["output_tokens_per_s"] for r in pts],
                "text": [_hover(r, latency, cache) for r in pts],
                "hovertemplate": "%{text}<extra>" + label + "</extra>",
                "marker": {"color": color, "opacity": 0.35, "size": 7},
                "legendgroup": name,
                "showlegend": False,
            }
        )
        data.append(
            {
                "type": "scatter",
                "mode": "lines+markers",
                "name": f"{label} ({latency})",
                "x": [r[col] for r in fr],
                "y": [r["output_tokens_per_s"] for r in fr],
                "text": [_hover(r, latency, cache) for r in fr],
                "hovertemplate": "%{text}<extra></extra>",
                "line": {"color": color, "shape": "hv"},
                "marker": {"color": color, "size": 9},
                "legendgroup": name,
            }
        )
        if limit is not None:
            shapes.append(
                {
                    "type": "line",
                    "xref": "x",
                    "yref": "paper",
                    "x0": limit,
                    "x1": limit,
                    "y0": 0,
                    "y1": 1,
                    "line": {"color": color, "width": 1, "dash": "dash"},
                }
            )
    layout = _layout("Pareto fronts", "SLO latency (ms)", "output tokens/s", shapes=shapes)
    return {"data": data, "layout": layout}


def latency_distribution(detail: dict[str, Any]) -> dict[str, Any]:
    """A trial's e2e latency histogram (stored bins) with its CDF from the stored samples."""
    hist = detail.get("latency_histogram") or {}
    edges, counts = hist.get("edges") or [], hist.get("counts") or []
    centers = [(edges[i] + edges[i + 1]) / 2 for i in range(len(counts))] if len(edges) == len(counts) + 1 else []
    widths = [edges[i + 1] - edges[i] for i in range(len(counts))] if centers else []
    samples = sorted(x for x in detail.get("e2e_samples_ms") or [] if x is not None)
    n = len(samples)
    data: list[dict[str, Any]] = [
        {
            "type": "bar",
            "name": "requests",
            "x": centers,
            "y": counts,
            "width": widths,
            "marker": {"color": PALETTE[0]},
            "hovertemplate": "%{x:.1f} ms: %{y}<extra></extra>",
        },
        {
            "type": "scatter",
            "mode": "lines",
            "name": "CDF",
            "x": samples,
            "y": [(i + 1) / n for i in range(n)],
            "yaxis": "y2",
            "line": {"color": PALETTE[1], "shape": "hv"},
        },
    ]
    layout = _layout("End-to-end latency distribution", "e2e latency (ms)", "requests")
    layout["yaxis2"] = {"overlaying": "y", "side": "right", "range": [0, 1], "title": {"text": "CDF"}}
    return {"data": data, "layout": layout}
