"""The JSON API under ``/api``: typed response models, so the OpenAPI schema says what comes back."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, Field

from autotune.checkpoint import servable
from autotune.dashboard import figures
from autotune.dashboard.data import (
    SORT_KEYS,
    TABLE_STATES,
    Store,
    TableQuery,
    clean_json,
    latency_column,
    latency_names,
    slo_latency,
)
from autotune.translate import FILENAMES, FORMATS, TRITON_ARCHIVE_FILENAME, triton_archive

#: Page size cap: a client asking for a million rows gets at most this many.
MAX_PAGE = 500
#: No minimum length: Starlette's ``{name:path}`` matches an empty name before a trailing newline
#: (``/api/studies/%0A``), which is then a study that does not exist (404), not a bad request.
StudyName = Annotated[str, Path(max_length=512, description="study name")]
TrialNumber = Annotated[int, Path(ge=0, le=10_000_000, description="trial number")]
Latency = Literal[
    "e2e_ms.p50", "e2e_ms.p90", "e2e_ms.p95", "e2e_ms.p99",
    "ttft_ms.p50", "ttft_ms.p90", "ttft_ms.p95", "ttft_ms.p99",
    "tpot_ms.p50", "tpot_ms.p90", "tpot_ms.p95", "tpot_ms.p99",
    "queue_ms.p50", "queue_ms.p90", "queue_ms.p95", "queue_ms.p99",
]  # fmt: skip
assert set(Latency.__args__) == set(latency_names())  # type: ignore[attr-defined]
SortKey = Literal[
    "number", "value", "output_tokens_per_s", "e2e_p95_ms", "ttft_p95_ms", "tpot_p95_ms", "peak_memory_mb"
]
#: autotune's trial states, then Optuna's for trials autotune holds no row of (running now, queued
#: for a retry) and for studies autotune did not make (complete, pruned).
State = Literal[
    "measured", "infeasible", "failed", "rejected", "duplicate", "running", "waiting", "complete", "pruned"
]  # fmt: skip
assert set(State.__args__) == set(TABLE_STATES)  # type: ignore[attr-defined]
assert set(SortKey.__args__) == set(SORT_KEYS)  # type: ignore[attr-defined]


class Error(BaseModel):
    """Every error the API gives: one line, never a traceback."""

    error: str


class StudySummary(BaseModel):
    name: str
    kind: Literal["autotune", "optuna"] = Field(description="optuna: a study plain Optuna made in this database")
    model: str
    hardware: str
    device: str | None
    slo: list[str]
    objective: str | None
    budget_trials: int | None
    trials_done: int
    trials_spent: int
    trials_failed: int
    trials_by_state: dict[str, int]
    best_trial: int | None
    best_output_tokens_per_s: float | None
    directions: list[str] = Field(default_factory=list, description="an Optuna study's objective directions")
    best_values: list[float | None] | None = Field(None, description="an Optuna study's best trial's values")
    status: str
    created_at: str | None
    updated_at: str | None


class StudyDetail(StudySummary):
    spec: dict[str, Any]
    hardware_info: dict[str, Any]
    pareto_latency: str
    slo_limit_ms: float | None


class StudyStatus(BaseModel):
    name: str
    status: str
    trials_done: int
    updated_at: str | None


class TrialRow(BaseModel):
    number: int
    state: State
    feasible: bool | None
    config: dict[str, Any]
    label: str
    config_key: str
    output_tokens_per_s: float | None
    requests_per_s: float | None
    peak_memory_mb: float | None
    failure_kind: str | None
    failure_reason: str | None
    duplicate_of: int | None
    worker: str | None
    device: str | None
    finished_at: str | None
    confirmed_failed: bool
    constraints: list[float | None] = Field(default_factory=list, description="(measured - bound) / bound per clause")
    quality: dict[str, float | None] = Field(default_factory=dict, description="fidelity against the reference")
    missed: str = Field("", description="the SLO clauses an infeasible trial broke, with what it measured")
    values: list[float | None] | None = Field(None, description="an Optuna study's trial values")
    params: dict[str, Any] = Field(default_factory=dict, description="an Optuna study's trial params")
    e2e_p50_ms: float | None
    e2e_p90_ms: float | None
    e2e_p95_ms: float | None
    e2e_p99_ms: float | None
    ttft_p50_ms: float | None
    ttft_p90_ms: float | None
    ttft_p95_ms: float | None
    ttft_p99_ms: float | None
    tpot_p50_ms: float | None
    tpot_p90_ms: float | None
    tpot_p95_ms: float | None
    tpot_p99_ms: float | None
    queue_p50_ms: float | None
    queue_p90_ms: float | None
    queue_p95_ms: float | None
    queue_p99_ms: float | None


class TrialPage(BaseModel):
    total: int
    offset: int
    limit: int
    items: list[TrialRow]


class TrialDetail(TrialRow):
    latency: dict[str, dict[str, float | None]]
    requests: int | None
    output_tokens: int | None
    duration_s: float | None
    mean_batch_rows: float | None
    stopped_by: str | None
    memory_kind: str | None
    timings: dict[str, Any]
    metrics: dict[str, Any]
    latency_histogram: dict[str, Any]
    e2e_samples_ms: list[float | None]
    log_excerpt: str | None
    started_at: str | None
    user_attrs: dict[str, Any] = Field(default_factory=dict, description="an Optuna study's trial attributes")


class ParetoPoint(BaseModel):
    number: int
    feasible: bool | None
    label: str
    config: dict[str, Any]
    output_tokens_per_s: float
    latency_ms: float


class ParetoFront(BaseModel):
    study: str
    latency: str
    slo_limit_ms: float | None
    points: list[ParetoPoint]


NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Error}, 422: {"model": Error}}


def store(request: Request) -> Store:
    st: Store = request.app.state.store
    return st


router = APIRouter(prefix="/api", tags=["api"])


@router.get("/studies", response_model=list[StudySummary])
def list_studies(request: Request) -> list[dict[str, Any]]:
    """Every study in the storage, newest first."""
    return store(request).study_summaries()


@router.get("/studies/{name:path}/status", response_model=StudyStatus, responses=NOT_FOUND)
def get_status(request: Request, name: StudyName) -> dict[str, Any]:
    """Cheap to poll: pages re-render when ``trials_done`` or ``status`` changes."""
    return store(request).status(name)


@router.get("/studies/{name:path}/trials", response_model=TrialPage, responses=NOT_FOUND)
def list_trials(
    request: Request,
    name: StudyName,
    state: Annotated[State | None, Query(description="only trials in this state")] = None,
    feasible: Annotated[bool | None, Query(description="only (in)feasible trials")] = None,
    sort: Annotated[
        SortKey, Query(description="value: Optuna's first objective (autotune's: output tokens/s)")
    ] = "number",
    order: Annotated[Literal["asc", "desc"], Query()] = "asc",
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"page size, at most {MAX_PAGE}")] = 100,
    q: Annotated[
        str, Query(max_length=200, description="only trials whose config, state or failure has this text")
    ] = "",
) -> dict[str, Any]:
    """A page of the study's trials, filtered and sorted (missing values last): every trial Optuna
    holds, with its state, including one running now or failed by a worker that stopped."""
    query = TableQuery(state=state, feasible=feasible, sort=sort, order=order, offset=offset, limit=limit, q=q.strip())
    return store(request).trials(name, query)


@router.get("/studies/{name:path}/trials/{number}", response_model=TrialDetail, responses=NOT_FOUND)
def get_trial(request: Request, name: StudyName, number: TrialNumber) -> dict[str, Any]:
    """Everything stored about one trial (metrics, histogram, samples, timings, log excerpt)."""
    return store(request).trial(name, number)


@router.get("/studies/{name:path}/pareto", response_model=ParetoFront, responses=NOT_FOUND)
def get_pareto(
    request: Request,
    name: StudyName,
    latency: Annotated[Latency | None, Query(description="default: the study's SLO latency")] = None,
) -> dict[str, Any]:
    """Measured trials no other beats on both output tokens/s and the latency, by latency."""
    spec, lat, points = store(request).points(name, latency)
    slo_name, limit = slo_latency(spec)
    col = latency_column(lat)
    pts = figures.front(figures.plotted(points, lat), lat)
    return {
        "study": name,
        "latency": lat,
        "slo_limit_ms": limit if lat == slo_name else None,
        "points": [
            {
                "number": r["number"],
                "feasible": r["feasible"],
                "label": r["label"],
                "config": r["config"],
                "output_tokens_per_s": r["output_tokens_per_s"],
                "latency_ms": r[col],
            }
            for r in pts
        ],
    }


_BEST_CONTENT: dict[str, dict[str, Any]] = {"application/json": {}, "text/plain": {}, "application/gzip": {}}


@router.get("/studies/{name:path}/best", responses={**NOT_FOUND, 200: {"content": _BEST_CONTENT}})
def get_best(
    request: Request,
    name: StudyName,
    format: Annotated[
        Literal["json", "vllm", "tgi", "triton"],
        Query(description="json: the export document; vllm / tgi / triton: a deployment config as text"),
    ] = "json",
    download: Annotated[bool, Query(description="as a file attachment")] = False,
) -> Response:
    """The best feasible config: the export document (what ``autotune best NAME --json`` prints), or its
    translation (what ``autotune export NAME --format vllm|tgi|triton`` writes)."""
    doc = store(request).export(name)
    filename = FILENAMES[format].format(name=_safe_filename(name))
    if format == "triton" and download:  # the whole model repository entry: config.pbtxt, model.py, the export
        filename = TRITON_ARCHIVE_FILENAME.format(name=_safe_filename(name))
    headers = {"Content-Disposition": f'attachment; filename="{filename}"'} if download else {}
    if format == "json":
        return JSONResponse(clean_json(doc), headers=headers)  # NaN (not measured) as null: strict JSON
    if format == "triton" and download:
        return Response(triton_archive(doc), media_type="application/gzip", headers=headers)
    # A builtin: model's shipped folder, or a preset's folder an earlier `autotune export` wrote (the
    # dashboard starts no process to write one): what vLLM and TGI can load.
    return PlainTextResponse(FORMATS[format](servable(doc, write=False)), headers=headers)


@router.get("/studies/{name:path}", response_model=StudyDetail, responses=NOT_FOUND)
def get_study(request: Request, name: StudyName) -> dict[str, Any]:
    """One study: its summary, spec and hardware (registered last: names may contain '/')."""
    return store(request).summary(name)


def _safe_filename(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:100] or "study"
