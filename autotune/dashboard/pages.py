"""HTML pages: Jinja2 templates (autoescaped) with Plotly figures embedded as JSON data blocks.

No inline script or style anywhere (the Content-Security-Policy allows only this origin's files):
figures travel as ``application/json`` blocks that web/static/dashboard.js draws.
"""

from __future__ import annotations

from pathlib import Path as FsPath
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape

from autotune.dashboard import figures
from autotune.dashboard.api import StudyName, TrialNumber, store
from autotune.dashboard.assets import plotly_style_ids
from autotune.dashboard.data import (
    KNOBS,
    PAGE_ROWS,
    SORT_KEYS,
    TABLE_STATES,
    NotFound,
    TableQuery,
    clause_ok,
    clause_value,
    hardware_summary,
    latency_column,
    slo_clauses,
    slo_latency,
)

WEB = FsPath(__file__).resolve().parents[1] / "data" / "web"
TIMINGS = ("load_s", "precision_s", "quantize_s", "compile_s", "warmup_s", "first_batch_s")


def _fmt(value: Any, digits: int = 1) -> str:
    """Numbers for people: fixed decimals, a dash for 'not measured'."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return str(value)


def _value(value: Any) -> str:
    """An Optuna objective value: six significant digits."""
    return "–" if value is None else f"{value:.6g}"


def make_templates() -> Jinja2Templates:
    """Templates with autoescape on for every file (Starlette's default is by extension; force it)."""
    templates = Jinja2Templates(directory=str(WEB / "templates"))
    templates.env.autoescape = True
    templates.env.filters["num"] = _fmt
    templates.env.filters["value"] = _value
    templates.env.filters["pathq"] = lambda v: quote(str(v), safe="")
    templates.env.globals["plotly_style_ids"] = plotly_style_ids()
    return templates


def _td(value: float | None, digits: int = 1) -> str:
    """A numeric cell carrying its raw value."""
    raw = "" if value is None else repr(float(value))
    return f'<td class="n" data-v="{raw}">{_fmt(value, digits)}</td>'


def trial_rows(study: str, rows: list[dict[str, Any]], latency_col: str, best: int | None) -> Markup:
    """The trials table body of an autotune study, built in Python (rows through Jinja cost most of a
    page's time). Every string from the database goes through ``escape``; numbers are formatted here.
    """
    base = "/studies/" + quote(study, safe="") + "/trials/"
    out = []
    for t in rows:
        note: Any
        if t["failure_reason"]:
            note = escape(f"{t['failure_kind'] or 'failed'}: {t['failure_reason']}")
        elif t["duplicate_of"] is not None:
            note = escape(f"repeat of trial {t['duplicate_of']}")
        elif t["missed"]:
            note = escape(f"misses {t['missed']}")
        elif t.get("retry_of") is not None:
            note = escape(f"retry of trial {t['retry_of']}")
        else:
            note = "failed re-measurement" if t["confirmed_failed"] else ""
        feasible = "–" if t["feasible"] is None else ("yes" if t["feasible"] else "no")
        cls = escape(t["state"]) + (" best" if t["number"] == best else "")
        out.append(
            f'<tr data-state="{escape(t["state"])}" class="{cls}">'
            f'<td class="n" data-v="{t["number"]}"><a href="{base}{t["number"]}">{t["number"]}</a></td>'
            f'<td>{escape(t["state"])}</td><td>{feasible}</td><td class="cfg">{escape(t["label"])}</td>'
            f"{_td(t['output_tokens_per_s'])}{_td(t[latency_col])}{_td(t['ttft_p95_ms'])}"
            f'{_td(t["tpot_p95_ms"], 2)}{_td(t["peak_memory_mb"], 0)}<td class="reason">{note}</td></tr>'
        )
    return Markup("\n".join(out))


def optuna_rows(study: str, rows: list[dict[str, Any]], best: int | None) -> Markup:
    """The trials table body of a study autotune did not make: state, values, params, finish time."""
    base = "/studies/" + quote(study, safe="") + "/trials/"
    out = []
    for t in rows:
        values = ", ".join(_value(v) for v in t["values"] or []) or "–"
        cls = escape(t["state"]) + (" best" if t["number"] == best else "")
        first = (t["values"] or [None])[0]
        finished = escape((t["finished_at"] or "–")[:19].replace("T", " "))
        out.append(
            f'<tr data-state="{escape(t["state"])}" class="{cls}">'
            f'<td class="n" data-v="{t["number"]}"><a href="{base}{t["number"]}">{t["number"]}</a></td>'
            f'<td>{escape(t["state"])}</td><td class="n" data-v="{"" if first is None else repr(first)}">'
            f'{escape(values)}</td><td class="cfg">{escape(t["label"])}</td><td>{finished}</td></tr>'
        )
    return Markup("\n".join(out))


router = APIRouter(include_in_schema=False)


def _render(request: Request, name: str, status_code: int = 200, **ctx: Any) -> HTMLResponse:
    templates: Jinja2Templates = request.app.state.templates
    return templates.TemplateResponse(request, name, ctx, status_code=status_code)


def not_found_page(request: Request, message: str) -> HTMLResponse:
    return _render(request, "error.html", status_code=404, message=message)


@router.get("/", response_class=HTMLResponse)
def studies_page(request: Request) -> HTMLResponse:
    """The list of studies."""
    return _render(request, "studies.html", studies=store(request).study_summaries())


@router.get("/docs", response_class=HTMLResponse)
def docs_page(request: Request) -> HTMLResponse:
    """Swagger UI for the JSON API, from the installed fastapi-offline package (no CDN)."""
    return _render(request, "docs.html")


@router.get("/studies/{name:path}/trials/{number}", response_class=HTMLResponse)
def trial_page(request: Request, name: StudyName, number: TrialNumber) -> HTMLResponse:
    """Every metric of one trial, its latency distribution, its setup times and its log."""
    try:
        detail = store(request).trial(name, number)
    except NotFound as err:
        return not_found_page(request, str(err))
    if detail["kind"] == "optuna":
        return _render(request, "optuna_trial.html", study_name=name, t=detail)
    timings = [(k, detail["timings"].get(k)) for k in TIMINGS if k in detail["timings"]]
    timings += [(k, v) for k, v in detail["timings"].items() if k not in TIMINGS and k != "engine_reused"]
    return _render(
        request,
        "trial.html",
        study_name=name,
        t=detail,
        timings=timings,
        reused=bool(detail["timings"].get("engine_reused")),  # a flag, not seconds: said in the header
        fig=figures.latency_distribution(detail),
    )


def _table(
    name: str, query: TableQuery, page: dict[str, Any], kind: str, latency: str, best: int | None
) -> dict[str, Any]:
    """The trials table's context: one page of rows, the pager and the links that re-sort it."""
    if kind == "optuna":
        rows = optuna_rows(name, page["items"], best)
    else:
        rows = trial_rows(name, page["items"], latency_column(latency), best)
    base = "/studies/" + quote(name, safe="")

    def link(**change: Any) -> str:
        params = {
            "state": query.state or "",
            "q": query.q,
            "sort": query.sort,
            "order": query.order,
            "offset": query.offset,
            **change,
        }
        kept = {k: v for k, v in params.items() if v not in ("", None) and (k, v) not in DEFAULTS}
        return base + ("?" + urlencode(kept) if kept else "")

    def sort_link(key: str) -> str:
        return link(sort=key, order="desc" if query.sort == key and query.order == "asc" else "asc", offset=0)

    total, offset, limit = page["total"], query.offset, query.limit
    return {
        "rows": rows,
        "total": total,
        "first": offset + 1 if total else 0,
        "last": min(offset + limit, total),
        "prev": link(offset=max(offset - limit, 0)) if offset > 0 else None,
        "next": link(offset=offset + limit) if offset + limit < total else None,
        "sort_links": {k: sort_link(k) for k in SORT_KEYS},
        "query": query,
        "states": OPTUNA_STATES if kind == "optuna" else [s for s in TABLE_STATES if s not in OPTUNA_ONLY],
        "self": link(),
        "kind": kind,
        "latency": latency,
    }


DEFAULTS = {("sort", "number"), ("order", "asc"), ("offset", 0)}
#: The states of a study autotune did not make (Optuna's), and those only such a study has.
OPTUNA_STATES = ("complete", "pruned", "failed", "running", "waiting")
OPTUNA_ONLY = ("complete", "pruned")


@router.get("/studies/{name:path}", response_class=HTMLResponse)
def study_page(
    request: Request,
    name: StudyName,
    state: Annotated[str | None, Query(max_length=16)] = None,
    sort: Annotated[str, Query(max_length=32)] = "number",
    order: Annotated[str, Query(max_length=4)] = "asc",
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    q: Annotated[str, Query(max_length=200)] = "",
    part: Annotated[str | None, Query(max_length=8, description="'table': only the trials table")] = None,
) -> HTMLResponse:
    """Best config card, Pareto front, history, importance, parallel coordinates and one page of the
    trials table (``?part=table``: that table alone, for the page's script to swap in)."""
    query = TableQuery(
        state=state if state in TABLE_STATES else None,
        sort=sort if sort in SORT_KEYS else "number",
        order="desc" if order == "desc" else "asc",
        offset=offset,
        limit=PAGE_ROWS,
        q=q.strip(),
    )
    st = store(request)
    try:
        if part == "table":
            page = st.trials(name, query)
            table = _table(name, query, page, page["kind"], page["latency"], page["best_trial"])
            return _render(request, "trials_table.html", study={"name": name}, table=table)
        view = st.study(name, query=query)
    except NotFound as err:
        return not_found_page(request, str(err))
    assert view.table is not None
    if view.kind == "optuna":
        direction = view.directions[0] if view.directions else "minimize"
        return _render(
            request,
            "optuna_study.html",
            study=view.summary,
            best=view.best,
            table=_table(name, query, view.table, "optuna", "", view.summary["best_trial"]),
            figs={"history": figures.values_history(view.points, direction)},
            n_points=len(view.points),
            n_shown=len(figures.thin(view.points, set())),
        )
    latency, limit = slo_latency(view.spec)
    best = view.best
    slo_rows = []
    for c in slo_clauses(view.spec):
        measured = clause_value(best, c) if best else None
        slo_rows.append({**c, "measured": measured, "ok": clause_ok(c, measured)})
    drawn = figures.shown(view.points, latency)
    figs = {
        "pareto": figures.pareto(view.points, latency, limit, drawn),
        "history": figures.history(view.points),
        "importance": figures.importance(view.points),
        "parallel": figures.parallel(view.points, latency, drawn),
    }
    return _render(
        request,
        "study.html",
        study=view.summary,
        spec=view.spec,
        hardware=hardware_summary(view.hardware),
        best=best,
        slo_rows=slo_rows,
        knobs=KNOBS,
        latency=latency,
        table=_table(name, query, view.table, "autotune", latency, best["number"] if best else None),
        figs=figs,
        n_points=len(figures.plotted(view.points, latency)),
        n_shown=len(drawn),
        overhead=view.overhead,
    )


@router.get("/compare", response_class=HTMLResponse)
def compare_page(
    request: Request,
    study: Annotated[list[str] | None, Query(description="studies to compare (up to 20)")] = None,
) -> HTMLResponse:
    """Two or more studies' Pareto fronts on one plot (each against its own SLO latency)."""
    st = store(request)
    names = st.autotune_names()
    chosen = [n for n in dict.fromkeys(study or []) if len(n) <= 512][:20]
    missing = [n for n in chosen if n not in names]
    series = []
    for n in chosen:
        if n in missing:
            continue
        spec, latency, points = st.points(n)
        series.append((n, points, latency, slo_latency(spec)[1]))
    fig = figures.compare(series) if series else None
    return _render(request, "compare.html", names=names, chosen=chosen, missing=missing, fig=fig)
