"""HTML pages: Jinja2 templates (autoescaped) with Plotly figures embedded as JSON data blocks."""

from __future__ import annotations

from pathlib import Path as FsPath
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape

from autotune.dashboard import figures
from autotune.dashboard.api import StudyName, TrialNumber, store
from autotune.dashboard.data import (
    KNOBS,
    NotFound,
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


def make_templates() -> Jinja2Templates:
    """Templates with autoescape on for every file (Starlette's default is by extension; force it)."""
    templates = Jinja2Templates(directory=str(WEB / "templates"))
    templates.env.autoescape = True
    templates.env.filters["num"] = _fmt
    templates.env.filters["pathq"] = lambda v: quote(str(v), safe="")
    return templates


def _td(value: float | None, digits: int = 1) -> str:
    """A numeric cell carrying its raw value for client-side sorting."""
    raw = "" if value is None else repr(float(value))
    return f'<td class="n" data-v="{raw}">{_fmt(value, digits)}</td>'


def trial_rows(study: str, rows: list[dict[str, Any]], latency_col: str, best: int | None) -> Markup:
    """The trials table body, built in Python: 1,000 rows through Jinja cost most of the page's time.

    Every string from the database goes through ``escape``; numbers are formatted here.
    """
    base = "/studies/" + quote(study, safe="") + "/trials/"
    out = []
    for t in rows:
        note: str
        if t["failure_reason"]:
            note = escape(f"{t['failure_kind'] or 'failed'}: {t['failure_reason']}")
        elif t["duplicate_of"] is not None:
            note = escape(f"repeat of trial {t['duplicate_of']}")
        elif t["missed"]:
            note = escape(f"misses {t['missed']}")
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


@router.get("/studies/{name:path}/trials/{number}", response_class=HTMLResponse)
def trial_page(request: Request, name: StudyName, number: TrialNumber) -> HTMLResponse:
    """Every metric of one trial, its latency distribution, its setup times and its log."""
    try:
        detail = store(request).trial(name, number)
    except NotFound as err:
        return not_found_page(request, str(err))
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


@router.get("/studies/{name:path}", response_class=HTMLResponse)
def study_page(request: Request, name: StudyName) -> HTMLResponse:
    """Best config card, Pareto front, history, importance, parallel coordinates, trials table."""
    try:
        view = store(request).study(name)
    except NotFound as err:
        return not_found_page(request, str(err))
    latency, limit = slo_latency(view.spec)
    best = view.best
    slo_rows = []
    for c in slo_clauses(view.spec):
        measured = clause_value(best, c) if best else None
        slo_rows.append({**c, "measured": measured, "ok": clause_ok(c, measured)})
    figs = {
        "pareto": figures.pareto(view.trials, latency, limit),
        "history": figures.history(view.trials),
        "importance": figures.importance(view.trials),
        "parallel": figures.parallel(view.trials, latency),
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
        trial_rows=trial_rows(name, view.trials, latency_column(latency), best["number"] if best else None),
        figs=figs,
        n_points=len(figures.plotted(view.trials, latency)),
        overhead=view.overhead,
    )


@router.get("/compare", response_class=HTMLResponse)
def compare_page(
    request: Request,
    study: Annotated[list[str] | None, Query(description="studies to compare (up to 20)")] = None,
) -> HTMLResponse:
    """Two or more studies' Pareto fronts on one plot (each against its own SLO latency)."""
    st = store(request)
    names = [s["name"] for s in st.study_summaries()]
    chosen = [n for n in dict.fromkeys(study or []) if len(n) <= 512][:20]
    missing = [n for n in chosen if n not in names]
    series = []
    for n in chosen:
        if n in missing:
            continue
        view = st.study(n)
        latency, limit = slo_latency(view.spec)
        series.append((n, view.trials, latency, limit))
    fig = figures.compare(series) if series else None
    return _render(request, "compare.html", names=names, chosen=chosen, missing=missing, fig=fig)
