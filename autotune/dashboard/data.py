"""Read-only access to a study store for the dashboard: plain dicts out, nothing written, no torch.

Trials come from autotune's own tables (explicit percentile columns), and from Optuna's for what
autotune's do not hold: a trial running now, one failed by a worker that stopped before recording
it, and every study made by plain Optuna in the same database. The confirmations (which winners
held up when re-measured) and the export document come from Optuna's tables, so "best" here is the
trial ``autotune best`` names.

Pages stay fast at 10,000 trials by never reading every column of every trial: the plots read a
few scalar columns per trial (configs once per distinct config), the table reads one page of rows,
the summary counts in SQL.
"""

from __future__ import annotations

import json
import math
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, String, event, func, inspect, select, type_coerce
from sqlalchemy.engine import make_url

from autotune.dashboard import optuna_db as odb
from autotune.errors import StorageError
from autotune.measure import overhead
from autotune.store import VERSION_TABLE, check_schema, make_engine, measurement_columns
from autotune.store.migrate import safe_url
from autotune.store.models import LATENCY_METRICS, LATENCY_STATS, TRIAL_STATES, Study, Trial

KNOBS = (
    "engine",
    "batch_size",
    "precision",
    "quantization",
    "streams",
    "backend",
    "max_queue_delay_ms",
    "scheduler",
    "pipeline_depth",
    "attention",
    "model",
)
#: Latency used for the Pareto front when a study has no latency SLO clause.
DEFAULT_LATENCY = "e2e_ms.p95"


class NotFound(LookupError):
    """A study or trial that is not in the store (the API answers 404)."""


def _num(value: Any) -> float | None:
    """JSON has no NaN/inf: the dashboard shows 'not measured' as null."""
    if value is None:
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def clean_json(obj: Any) -> Any:
    """NaN and infinities as null, recursively (JSON has neither)."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean_json(v) for v in obj]
    if isinstance(obj, float):
        return _num(obj)
    return obj


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when is not None else None


def latency_column(name: str) -> str:
    """``e2e_ms.p95`` -> the store's column ``e2e_p95_ms`` (``peak_memory_mb`` stays itself)."""
    if "." not in name:
        return name
    metric, stat = name.split(".", 1)
    base = metric.removesuffix("_ms")
    if base not in LATENCY_METRICS or stat not in LATENCY_STATS:
        raise ValueError(f"unknown latency {name!r}")
    return f"{base}_{stat}_ms"


def latency_names() -> list[str]:
    """Every latency a Pareto front can be drawn against (``e2e_ms.p95`` ...)."""
    return [f"{m}_ms.{s}" for m in LATENCY_METRICS for s in ("p50", "p90", "p95", "p99")]


def slo_clauses(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The spec's SLO clauses with their ``name`` (``e2e_ms.p95``), bound, direction and a readable text."""
    out = []
    for c in spec.get("slo") or []:
        name = f"{c['metric']}.{c['percentile']}" if c.get("percentile") else c["metric"]
        floor = c.get("min") is not None
        bound = float(c["min"] if floor else c["max"])
        what = f"{c['percentile']} {c['metric']}" if c.get("percentile") else c["metric"]
        out.append(
            {
                "name": name,
                "metric": c["metric"],
                "percentile": c.get("percentile"),
                "max": None if floor else bound,
                "min": bound if floor else None,
                "op": ">=" if floor else "<=",
                "text": f"{what} {'>=' if floor else '<='} {bound:g}",
            }
        )
    return out


def clause_value(row: dict[str, Any], clause: dict[str, Any]) -> float | None:
    """What a trial row measured for an SLO clause (latency, memory or fidelity), or None."""
    if clause["percentile"]:
        return row.get(latency_column(clause["name"]))
    if clause["metric"] == "peak_memory_mb":
        return row.get("peak_memory_mb")
    return _num((row.get("quality") or {}).get(clause["metric"]))


def clause_ok(clause: dict[str, Any], value: float | None) -> bool:
    if value is None:
        return False
    return value >= clause["min"] if clause["min"] is not None else value <= clause["max"]


def missed_clauses(row: dict[str, Any], clauses: list[dict[str, Any]]) -> str:
    """Why a measured trial is infeasible: each SLO clause it broke (from its stored constraint
    values), with what it measured; empty for feasible or unmeasured trials."""
    if row.get("feasible") is not False or row.get("output_tokens_per_s") is None:
        return ""
    parts = []
    for c, excess in zip(clauses, row.get("constraints") or [], strict=False):
        if excess is not None and excess > 0:
            v = clause_value(row, c)
            parts.append(f"{c['text']} (measured {'–' if v is None else f'{v:,.4g}'})")
    return "; ".join(parts)


def slo_latency(spec: dict[str, Any]) -> tuple[str, float | None]:
    """The latency the Pareto front is drawn against: the first latency SLO clause and its limit."""
    for c in slo_clauses(spec):
        if c["percentile"]:
            return c["name"], float(c["max"])
    return DEFAULT_LATENCY, None


def config_label(cfg: dict[str, Any] | None) -> str:
    """``b8 fp32 none x1 eager 5ms`` (TrialConfig.label without importing the engine's config model)."""
    if not cfg:
        return "-"
    text = (
        f"b{cfg.get('batch_size')} {cfg.get('precision')} {cfg.get('quantization')} x{cfg.get('streams')} "
        f"{cfg.get('backend')} {float(cfg.get('max_queue_delay_ms') or 0):g}ms"
    )
    text += " continuous" if cfg.get("scheduler") == "continuous" else ""
    text += f" attn={cfg['attention']}" if cfg.get("attention", "sdpa") != "sdpa" else ""
    return text + (f" model={cfg['model']}" if cfg.get("model") else "")


#: What a table row needs: everything but the samples, histogram, timings and log (the bulk of a row).
ROW_COLUMNS = [
    Trial.trial_number,
    Trial.state,
    Trial.feasible,
    Trial.config,
    Trial.config_key,
    Trial.output_tokens_per_s,
    Trial.requests_per_s,
    Trial.peak_memory_mb,
    Trial.failure_kind,
    Trial.failure_reason,
    Trial.duplicate_of,
    Trial.worker,
    Trial.device,
    Trial.finished_at,
    Trial.constraints,
    Trial.metrics,
    *(getattr(Trial, f"{m}_{s}_ms") for m in LATENCY_METRICS for s in ("p50", "p90", "p95", "p99")),
]
LATENCY_COLUMNS = [f"{m}_{s}_ms" for m in LATENCY_METRICS for s in ("p50", "p90", "p95", "p99")]
#: States in the trials table: autotune's own, then Optuna's for trials autotune has no row of
#: (a trial running now, queued, or failed by a worker that stopped before it could record it), and
#: Optuna's plain ``complete`` / ``pruned`` for studies autotune did not make.
TABLE_STATES = (*TRIAL_STATES, "running", "waiting", "complete", "pruned")
#: Rows of the trials table a page carries; the rest come a page at a time.
PAGE_ROWS = 100
#: Sortable table columns (``value``: Optuna's first objective, autotune's output tokens/s).
SORT_KEYS = ("number", "value", "output_tokens_per_s", "e2e_p95_ms", "ttft_p95_ms", "tpot_p95_ms", "peak_memory_mb")


def blank_row(number: int, state: str) -> dict[str, Any]:
    """A table row with nothing measured: what a trial autotune holds no row of starts from."""
    row: dict[str, Any] = dict.fromkeys(LATENCY_COLUMNS)
    row.update(
        number=number,
        state=state,
        feasible=None,
        config={},
        label="-",
        config_key="",
        output_tokens_per_s=None,
        requests_per_s=None,
        peak_memory_mb=None,
        failure_kind=None,
        failure_reason=None,
        duplicate_of=None,
        worker=None,
        device=None,
        finished_at=None,
        confirmed_failed=False,
        constraints=[],
        quality={},
        missed="",
        values=None,
        params={},
        kind="autotune",
    )
    return row


def trial_row(
    t: Mapping[Any, Any],
    failed_keys: set[str] | frozenset[str] = frozenset(),
    clauses: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A trial as the table and the plots need it (no samples, no log); ``t``: a row mapping with
    :data:`ROW_COLUMNS`. With the study's SLO ``clauses``, ``missed`` says why an infeasible trial is
    infeasible."""
    row = blank_row(t["trial_number"], t["state"])
    row.update({c: _num(t[c]) for c in LATENCY_COLUMNS})
    cfg = dict(t["config"] or {})
    row.update(
        feasible=t["feasible"],
        config=cfg,
        label=config_label(cfg),
        config_key=t["config_key"],
        output_tokens_per_s=_num(t["output_tokens_per_s"]),
        requests_per_s=_num(t["requests_per_s"]),
        peak_memory_mb=_num(t["peak_memory_mb"]),
        failure_kind=t["failure_kind"],
        failure_reason=t["failure_reason"],
        duplicate_of=t["duplicate_of"],
        worker=t["worker"],
        device=t["device"],
        finished_at=_iso(t["finished_at"]),
        confirmed_failed=t["config_key"] in failed_keys,
        constraints=clean_json(list(t["constraints"] or [])),
        quality=clean_json(dict((t["metrics"] or {}).get("quality") or {})),
    )
    row["missed"] = missed_clauses(row, clauses or [])
    return row


def blank_detail(row: dict[str, Any]) -> dict[str, Any]:
    """The trial page's fields beyond a table row, empty."""
    return {
        **row,
        "latency": {m: dict.fromkeys(LATENCY_STATS) for m in LATENCY_METRICS},
        "requests": None,
        "output_tokens": None,
        "duration_s": None,
        "mean_batch_rows": None,
        "stopped_by": None,
        "memory_kind": None,
        "timings": {},
        "metrics": {},
        "latency_histogram": {},
        "e2e_samples_ms": [],
        "log_excerpt": None,
        "started_at": None,
        "user_attrs": {},
    }


def trial_detail(t: Mapping[Any, Any], clauses: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything stored about one trial (``t``: its full autotune_trials row): every metric, the
    latency histogram and samples, the log."""
    row = blank_detail(trial_row(t, clauses=clauses))
    row["latency"] = {m: {s: _num(t[f"{m}_{s}_ms"]) for s in LATENCY_STATS} for m in LATENCY_METRICS}
    row.update(
        requests=t["requests"],
        output_tokens=t["output_tokens"],
        duration_s=_num(t["duration_s"]),
        mean_batch_rows=_num(t["mean_batch_rows"]),
        stopped_by=t["stopped_by"],
        memory_kind=t["memory_kind"],
        timings=clean_json(dict(t["timings"] or {})),
        metrics=clean_json(dict(t["metrics"] or {})),
        latency_histogram=clean_json(dict(t["latency_histogram"] or {})),
        e2e_samples_ms=clean_json(list(t["e2e_samples"] or [])),
        log_excerpt=t["log_excerpt"],
        started_at=_iso(t["started_at"]),
    )
    return row


def hardware_summary(hw: dict[str, Any]) -> str:
    """``Hardware.summary()`` from the stored dict (the dashboard does not import the probe)."""
    if not hw:
        return "-"
    if hw.get("device_type") == "cuda":
        cc = ".".join(map(str, hw.get("compute_capability") or ()))
        return f"{hw.get('device_name')} (cc {cc}, {hw.get('device_memory_mb')} MB), torch {hw.get('torch_version')}"
    cores, mem = hw.get("cpu_cores"), hw.get("host_memory_mb")
    return f"{hw.get('cpu_model')}, {cores} cores, {mem} MB, torch {hw.get('torch_version')}"


def params_label(params: Mapping[str, Any]) -> str:
    """``x=0.25 kind=a`` for a trial of a study autotune did not make."""
    return " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()) or "-"


@dataclass
class TableQuery:
    """What the trials table shows: a filter, an order and a page."""

    state: str | None = None
    feasible: bool | None = None
    sort: str = "number"
    order: str = "asc"
    offset: int = 0
    limit: int = PAGE_ROWS
    q: str = ""


@dataclass
class StudyRef:
    """A study found by name: autotune's (its ``autotune_studies`` row) or one only Optuna holds."""

    name: str
    kind: str  # "autotune" | "optuna"
    row: Mapping[Any, Any] | None
    osid: int | None  # Optuna's study id, when Optuna holds the study

    @property
    def spec(self) -> dict[str, Any]:
        return dict((self.row or {}).get("spec") or {})


@dataclass
class StudyView:
    """What a study page draws: its summary, best trial and the points of its plots.

    ``points``: for autotune's studies every trial with a throughput (number, state, feasible, tokens/s,
    the latency asked for, its config); for Optuna's, every complete trial's number and values.
    """

    kind: str
    summary: dict[str, Any]
    spec: dict[str, Any]
    hardware: dict[str, Any]
    best: dict[str, Any] | None
    points: list[dict[str, Any]]
    overhead: dict[str, float] | None = None  # :func:`autotune.measure.overhead` of its measured trials
    directions: list[str] = field(default_factory=list)
    table: dict[str, Any] | None = None  # the page of the trials table asked for


#: The columns every scan of an autotune study's trials reads (what counts and ranks them); a request
#: adds what it needs besides: a latency, a sort key, the failure text a filter searches, or the
#: overhead's ``duplicate_of``, ``duration_s``, ``wall_s`` (finished - started) and ``engine_reused``.
SCAN_BASE = ("trial_number", "state", "feasible", "config_key", "output_tokens_per_s")
OVERHEAD_COLUMNS = ("duplicate_of", "duration_s", "wall_s", "engine_reused")
FILTER_COLUMNS = ("failure_kind", "failure_reason", "duplicate_of")
BEST_STATES = ("measured", "duplicate")


@dataclass
class Scan:
    """An autotune study's trials as a few scalars each (``rows``: tuples in trial-number order, column
    positions in ``at``), the rows only Optuna holds, the refuted config keys and the SLO clauses."""

    at: dict[str, int]
    rows: list[tuple[Any, ...]]
    extras: list[dict[str, Any]]
    failed: set[str]
    remeasured: dict[str, float]  # config key -> its re-measured median output tokens/s
    clauses: list[dict[str, Any]]


def _best_number(scan: Scan) -> tuple[int | None, float | None]:
    """(number, output tokens/s shown) of the highest-throughput trial that met every SLO clause and
    was not refuted when re-measured, a re-measured one ranked by its re-measurement:
    :func:`autotune.tuner.best_feasible`'s rule (first of equals by number)."""
    at = scan.at
    n, st, fe, tp, ke = (at[c] for c in ("trial_number", "state", "feasible", "output_tokens_per_s", "config_key"))
    best, top = None, -math.inf
    for r in scan.rows:
        tps = r[tp]
        if tps is None or r[fe] is not True or r[st] not in BEST_STATES or r[ke] in scan.failed:
            continue
        tps = scan.remeasured.get(r[ke], tps)
        if tps > top:
            best, top = r[n], tps
    return (best, float(top)) if best is not None else (None, None)


def _overhead(scan: Scan) -> dict[str, float] | None:
    """:func:`autotune.measure.overhead` of the measured trials (repeats left out)."""
    at = scan.at
    d, w, u, dup = at["duration_s"], at["wall_s"], at["engine_reused"], at["duplicate_of"]
    return overhead(
        (float(r[w]), float(r[d]), bool(r[u]))
        for r in scan.rows
        if r[d] is not None and r[dup] is None and r[w] is not None
    )


def _sorted_page(lean: list[tuple[int, Any, bool]], query: TableQuery) -> tuple[int, list[tuple[int, bool]]]:
    """``lean``: (number, sort value, from Optuna only) of every row that passed the filters: the
    total and the requested page, sorted (missing values last, ties by number)."""
    lean.sort(key=lambda r: r[0])
    if query.sort != "number":
        present = [r for r in lean if r[1] is not None and not (isinstance(r[1], float) and math.isnan(r[1]))]
        missing = [r for r in lean if r[1] is None or (isinstance(r[1], float) and math.isnan(r[1]))]
        present.sort(key=lambda r: r[1], reverse=query.order == "desc")
        lean = present + missing
    elif query.order == "desc":
        lean.reverse()
    page = lean[query.offset : query.offset + query.limit]
    return len(lean), [(n, extra) for n, _, extra in page]


class Store:
    """The dashboard's read-only window on one database (SQLite or PostgreSQL).

    Every connection is put in read-only mode by the database itself (SQLite ``query_only``,
    PostgreSQL ``default_transaction_read_only``), so no code path here can write, whatever it calls.
    It reads autotune's tables and Optuna's, whichever the database has: a database only Optuna
    wrote is shown as it is (no ``autotune db upgrade`` needed, nothing written).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        u = make_url(url)
        if u.get_backend_name() == "sqlite":
            db = u.database or ""
            if not db or db == ":memory:":
                raise StorageError("the dashboard reads a database file: pass a sqlite:///PATH or PostgreSQL URL")
            if not db.startswith("file:") and not Path(db).expanduser().exists():
                raise StorageError(f"no database file at {db}; run `autotune tune` first or pass --storage")
        kwargs: dict[str, Any] = {}
        if u.get_backend_name() == "postgresql":
            kwargs["connect_args"] = {"options": "-c default_transaction_read_only=on"}
        self.engine: Engine = make_engine(url, **kwargs)
        if u.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_read_only)
        self._optuna_storage: Any = None
        self._lock = threading.Lock()
        self.has_autotune = self.has_optuna = False
        self.tables()
        if not (self.has_autotune or self.has_optuna):
            raise StorageError(
                f"{safe_url(url)} holds no study: neither autotune's nor Optuna's tables (run `autotune tune` first)"
            )

    def close(self) -> None:
        self.engine.dispose()
        if self._optuna_storage is not None:
            self._optuna_storage.engine.dispose()

    def tables(self) -> None:
        """Find which of autotune's and Optuna's tables the database has (again, until both are there:
        a study starting up creates them while the dashboard runs). autotune's tables at another
        revision than this code's are refused (:func:`check_schema` says what to run)."""
        if self.has_autotune and self.has_optuna:
            return
        with self.engine.connect() as conn:
            names = set(inspect(conn).get_table_names())
        if not self.has_autotune and VERSION_TABLE in names:
            check_schema(self.url)
            self.has_autotune = True
        if not self.has_optuna and set(odb.REQUIRED) <= names:
            self.has_optuna = True

    def optuna_storage(self) -> Any:
        """Optuna's RDB storage on the same database, never creating tables, read-only connections
        (single trials and the export document go through Optuna's own decoding)."""
        with self._lock:
            if self._optuna_storage is None:
                import optuna

                optuna.logging.set_verbosity(optuna.logging.WARNING)
                u = make_url(self.url)
                kwargs: dict[str, Any] = {}
                if u.get_backend_name() == "postgresql":
                    kwargs["connect_args"] = {"options": "-c default_transaction_read_only=on", "connect_timeout": 5}
                elif u.get_backend_name() == "sqlite":
                    kwargs["connect_args"] = {"timeout": 30}
                st = optuna.storages.RDBStorage(self.url, skip_table_creation=True, engine_kwargs=kwargs)
                if u.get_backend_name() == "sqlite":
                    event.listen(st.engine, "connect", _sqlite_read_only)
                    st.engine.dispose()  # drop the connection made before the listener
                self._optuna_storage = st
            return self._optuna_storage

    # -- finding a study ----------------------------------------------------------------------------
    def _ref(self, conn: Connection, name: str) -> StudyRef:
        self.tables()
        row = None
        if self.has_autotune:
            row = conn.execute(select(Study.__table__).where(Study.name == name)).mappings().first()
        osid = odb.study_id(conn, name) if self.has_optuna else None
        if row is None and osid is None:
            raise NotFound(f"no study named {name!r}")
        return StudyRef(name, "autotune" if row is not None else "optuna", row, osid)

    def _confirmations(self, conn: Connection, ref: StudyRef) -> tuple[set[str], dict[str, float]]:
        """From the winners' re-measurements: the config keys whose re-measurement broke the SLO (never
        'best', as in ``autotune best``) and the re-measured median throughput of the others, which
        ranks them (:func:`autotune.tuner.figure`)."""
        conf = (odb.study_attr(conn, ref.osid, "confirmations") if ref.osid is not None else None) or {}
        records = {k: v for k, v in conf.items() if isinstance(v, dict)}
        failed = {k for k, v in records.items() if not v.get("ok", True)}
        remeasured = {
            k: float(v["remeasured_tokens_per_s"])
            for k, v in records.items()
            if k not in failed and v.get("remeasured_tokens_per_s") is not None
        }
        return failed, remeasured

    # -- trials only Optuna holds ---------------------------------------------------------------------
    def _extras(
        self, conn: Connection, ref: StudyRef, clauses: list[dict[str, Any]], number: int | None = None
    ) -> list[dict[str, Any]]:
        """Rows for the trials of an autotune study that Optuna holds and autotune's table does not:
        one running or queued now, or one failed by a worker that stopped before recording it."""
        if ref.osid is None or ref.row is None:
            return []
        ot = odb.trials
        q = select(ot.c.trial_id, ot.c.number, ot.c.state, ot.c.datetime_start, ot.c.datetime_complete).where(
            ot.c.study_id == ref.osid,
            ~select(Trial.id).where(Trial.study_id == ref.row["id"], Trial.trial_number == ot.c.number).exists(),
        )
        if number is not None:
            q = q.where(ot.c.number == number)
        found = conn.execute(q.order_by(ot.c.number)).all()
        if not found:
            return []
        ids = [t.trial_id for t in found]
        keys = ("config", "config_key", "failure", "rejected", "duplicate_of", "feasible", "constraints", "worker")
        attrs = odb.trial_attrs(conn, ids, keys)
        done = [t.trial_id for t in found if t.state == "COMPLETE"]
        measured = odb.trial_attrs(conn, done, ("measurement",))
        retried_as: dict[int, int] = {}
        if any(t.state in ("FAIL", "WAITING") for t in found):
            sa = odb.trial_system_attributes
            for n, raw in conn.execute(
                select(ot.c.number, sa.c.value_json)
                .join(sa, sa.c.trial_id == ot.c.trial_id)
                .where(ot.c.study_id == ref.osid, sa.c.key == "retry_history")
            ):
                history = json.loads(raw or "[]")
                if history:
                    retried_as[int(history[-1])] = n
        retry_of = {new: old for old, new in retried_as.items()}
        rows = []
        for t in found:
            a = attrs.get(t.trial_id, {})
            m = measured.get(t.trial_id, {}).get("measurement")
            row = blank_row(t.number, _extra_state(t.state, a, m is not None))
            cfg = dict(a.get("config") or {})
            row.update(
                config=cfg,
                label=config_label(cfg) if cfg else "-",
                config_key=str(a.get("config_key") or ""),
                feasible=a.get("feasible"),
                duplicate_of=a.get("duplicate_of"),
                worker=a.get("worker"),
                finished_at=_iso(odb.utc(t.datetime_complete)),
                constraints=clean_json(list(a.get("constraints") or [])),
                started_at=_iso(odb.utc(t.datetime_start)),
                optuna_only=True,
            )
            if m:
                cols = measurement_columns(m)
                row.update({c: _num(cols[c]) for c in (*LATENCY_COLUMNS, "output_tokens_per_s", "requests_per_s")})
                row["peak_memory_mb"] = _num(cols["peak_memory_mb"])
                row["quality"] = clean_json(dict(m.get("quality") or {}))
                row["measurement"] = m
            failure = a.get("failure") or {}
            if row["state"] == "failed":
                row["failure_kind"] = failure.get("kind") or "lost"
                reason = failure.get("reason") or "no result recorded: Optuna failed the trial (its worker stopped)"
                if t.number in retried_as:
                    reason += f"; retried as trial {retried_as[t.number]}"
                row["failure_reason"] = reason
                row["log"] = failure.get("log")
            elif t.number in retry_of:
                row["failure_reason"] = None
                row["retry_of"] = retry_of[t.number]
            row["spent"] = row["state"] in ("measured", "infeasible") or (row["state"] == "failed" and bool(failure))
            row["missed"] = missed_clauses(row, clauses)
            rows.append(row)
        return rows

    # -- summaries ------------------------------------------------------------------------------------------
    def study_summaries(self) -> list[dict[str, Any]]:
        """One row per study for the list page, autotune's newest first, then those only Optuna holds."""
        self.tables()
        out = []
        with self.engine.connect() as conn:
            if self.has_autotune:
                for row in conn.execute(select(Study.__table__).order_by(Study.created_at.desc(), Study.id)).mappings():
                    osid = odb.study_id(conn, row["name"]) if self.has_optuna else None
                    ref = StudyRef(row["name"], "autotune", row, osid)
                    out.append(self._autotune_summary(ref, self._scan(conn, ref)))
            if self.has_optuna:
                ours = {s["name"] for s in out}
                st = odb.studies
                for sid, name in conn.execute(select(st.c.study_id, st.c.study_name).order_by(st.c.study_id.desc())):
                    if name not in ours:
                        out.append(self._optuna_summary(conn, StudyRef(name, "optuna", None, sid)))
        return out

    def summary(self, name: str) -> dict[str, Any]:
        """One study's summary, spec and hardware (the API's study detail)."""
        with self.engine.connect() as conn:
            ref = self._ref(conn, name)
            if ref.row is None:
                summary = self._optuna_summary(conn, ref)
            else:
                summary = self._autotune_summary(ref, self._scan(conn, ref))
        latency, limit = slo_latency(ref.spec)
        hardware = dict((ref.row or {}).get("hardware") or {})
        return {
            **summary,
            "spec": ref.spec,
            "hardware_info": hardware,
            "pareto_latency": latency,
            "slo_limit_ms": limit,
        }

    # -- autotune's studies: one scan of their trials per request ------------------------------------------------
    def _scan(self, conn: Connection, ref: StudyRef, more: tuple[str, ...] = ()) -> Scan:
        """Every trial of the study as :data:`SCAN_BASE` and the columns in ``more``, in one pass, with
        the rows only Optuna holds and the winners' re-measurements."""
        assert ref.row is not None
        names = list(dict.fromkeys((*SCAN_BASE, *more)))
        dialect = conn.dialect.name
        cols: list[Any] = []
        for name in names:
            if name == "engine_reused":
                cols.append(Trial.timings["engine_reused"].as_boolean())
            elif name == "wall_s" and dialect == "postgresql":
                cols.append(func.extract("epoch", Trial.finished_at - Trial.started_at))
            elif name == "wall_s" and dialect == "sqlite":  # the stored text, parsed below in C, to the microsecond
                cols.append(type_coerce(Trial.finished_at, String))  # (SQLite's julianday keeps milliseconds)
            elif name == "wall_s":
                cols.append(Trial.finished_at)
            else:
                cols.append(getattr(Trial, name))
        subtract = "wall_s" in names and dialect != "postgresql"
        if subtract:
            cols.append(type_coerce(Trial.started_at, String) if dialect == "sqlite" else Trial.started_at)
        q = select(*cols).where(Trial.study_id == ref.row["id"]).order_by(Trial.trial_number)
        rows = [tuple(r) for r in conn.execute(q)]
        if subtract:
            w = names.index("wall_s")
            rows = [(*r[:w], _seconds(r[-1], r[w]), *r[w + 1 : -1]) for r in rows]
        clauses = slo_clauses(ref.spec)
        at = {name: i for i, name in enumerate(names)}
        return Scan(at, rows, self._extras(conn, ref, clauses), *self._confirmations(conn, ref), clauses)

    def _best(self, conn: Connection, ref: StudyRef, scan: Scan) -> dict[str, Any] | None:
        """The highest-throughput trial that met every SLO clause and was not refuted when re-measured.

        Same rule as :func:`autotune.tuner.best_feasible` (first of equals by trial number).
        """
        assert ref.row is not None
        best = _best_number(scan)[0]
        if best is None:
            return None
        q = select(*ROW_COLUMNS).where(Trial.study_id == ref.row["id"], Trial.trial_number == best)
        row = trial_row(conn.execute(q).mappings().one(), scan.failed, scan.clauses)
        row["remeasured_tokens_per_s"] = scan.remeasured.get(row["config_key"])
        return row

    def _autotune_summary(self, ref: StudyRef, scan: Scan, best: dict[str, Any] | None = None) -> dict[str, Any]:
        """The summary of an autotune study (``best``: its best trial when already read)."""
        assert ref.row is not None
        s, spec, at = ref.row, ref.spec, scan.at
        counts: dict[str, int] = dict(Counter(r[at["state"]] for r in scan.rows))
        spent = sum(counts.get(k, 0) for k in ("measured", "infeasible", "failed"))
        for r in scan.extras:
            counts[r["state"]] = counts.get(r["state"], 0) + 1
            spent += r["spent"]
        if best is None:  # the number and throughput are in the scan
            best_number, best_tps = _best_number(scan)
        else:
            best_number = best["number"]
            shown = best["remeasured_tokens_per_s"]
            best_tps = best["output_tokens_per_s"] if shown is None else shown
        return {
            "name": s["name"],
            "kind": "autotune",
            "model": s["model_ref"],
            "hardware": hardware_summary(dict(s["hardware"] or {})),
            "device": (s["hardware"] or {}).get("device"),
            "slo": [c["text"] for c in scan.clauses],
            "objective": spec.get("objective"),
            "directions": [],
            "budget_trials": (spec.get("budget") or {}).get("trials"),
            "trials_done": sum(counts.values()),
            # What the budget counts: measured, infeasible and failed trials (not repeats, rejected configs
            # or a trial whose worker stopped: Optuna runs it again).
            "trials_spent": spent,
            "trials_failed": counts.get("failed", 0),
            "trials_by_state": counts,
            "best_trial": best_number,
            "best_output_tokens_per_s": best_tps,
            "best_values": None,
            "status": s["status"],
            "created_at": _iso(s["created_at"]),
            "updated_at": _iso(s["updated_at"]),
        }

    def _optuna_summary(self, conn: Connection, ref: StudyRef) -> dict[str, Any]:
        """The summary of a study only Optuna holds: its trial states, directions and best values."""
        assert ref.osid is not None
        ot = odb.trials
        counts: dict[str, int] = {}
        for state, n in conn.execute(
            select(ot.c.state, func.count()).where(ot.c.study_id == ref.osid).group_by(ot.c.state)
        ):
            counts[odb.PLAIN_STATES.get(str(state), str(state).lower())] = n
        first, last = conn.execute(
            select(
                func.min(ot.c.datetime_start), func.max(func.coalesce(ot.c.datetime_complete, ot.c.datetime_start))
            ).where(ot.c.study_id == ref.osid)
        ).one()
        directions = odb.directions(conn, ref.osid)
        best = self._optuna_best(conn, ref.osid, directions)
        return {
            "name": ref.name,
            "kind": "optuna",
            "model": "",
            "hardware": "",
            "device": None,
            "slo": [],
            "objective": ", ".join(directions) or None,
            "directions": directions,
            "budget_trials": None,
            "trials_done": sum(counts.values()),
            "trials_spent": sum(counts.get(k, 0) for k in ("complete", "pruned", "failed")),
            "trials_failed": counts.get("failed", 0),
            "trials_by_state": counts,
            "best_trial": best[0] if best else None,
            "best_output_tokens_per_s": None,
            "best_values": [best[1]] if best else None,
            "status": "running" if counts.get("running") or counts.get("waiting") else "idle",
            "created_at": _iso(odb.utc(first)),
            "updated_at": _iso(odb.utc(last)),
        }

    def _optuna_best(self, conn: Connection, osid: int, directions: list[str]) -> tuple[int, float] | None:
        """(number, value) of a single-objective study's best complete trial (first of equals)."""
        if len(directions) != 1 or directions[0] not in ("maximize", "minimize"):
            return None
        ot, tv = odb.trials, odb.trial_values
        order = tv.c.value.desc() if directions[0] == "maximize" else tv.c.value.asc()
        found = conn.execute(
            select(ot.c.number, tv.c.value)
            .join(tv, (tv.c.trial_id == ot.c.trial_id) & (tv.c.objective == 0))
            .where(ot.c.study_id == osid, ot.c.state == "COMPLETE", tv.c.value_type == "FINITE")
            .order_by(order, ot.c.number)
            .limit(1)
        ).first()
        return (int(found[0]), float(found[1])) if found else None

    def _optuna_points(self, conn: Connection, osid: int) -> list[dict[str, Any]]:
        """Number and first value of every complete trial of a study only Optuna holds."""
        ot, tv = odb.trials, odb.trial_values
        q = (
            select(ot.c.number, tv.c.value, tv.c.value_type)
            .join(tv, (tv.c.trial_id == ot.c.trial_id) & (tv.c.objective == 0))
            .where(ot.c.study_id == osid, ot.c.state == "COMPLETE")
            .order_by(ot.c.number)
        )
        out = []
        for n, v, vtype in conn.execute(q):
            value = _num(odb.value_of(v, vtype))
            if value is not None:
                out.append({"number": n, "value": value})
        return out

    # -- a study's page ----------------------------------------------------------------------------------------
    def study(self, name: str, latency: str | None = None, query: TableQuery | None = None) -> StudyView:
        """A study's summary, best trial and plot points (``latency``: default the study's SLO latency),
        and with ``query`` that page of its trials table: one scan of the trials for all of it."""
        with self.engine.connect() as conn:
            ref = self._ref(conn, name)
            if ref.kind == "optuna":
                assert ref.osid is not None
                summary = self._optuna_summary(conn, ref)
                best = None
                if summary["best_trial"] is not None:
                    best = self._optuna_rows(conn, ref.osid, [summary["best_trial"]])[0]
                table = self._optuna_table(conn, ref.osid, query) if query else None
                points = self._optuna_points(conn, ref.osid)
                return StudyView("optuna", summary, {}, {}, best, points, None, summary["directions"], table)
            assert ref.row is not None
            col = latency_column(latency or slo_latency(ref.spec)[0])
            scan = self._scan(conn, ref, (col, *OVERHEAD_COLUMNS, *(_table_columns(query) if query else ())))
            best = self._best(conn, ref, scan)
            summary = self._autotune_summary(ref, scan, best)
            configs = self._configs(conn, ref.row["id"])
            points = self._points(scan, col, configs)
            table = self._table(conn, ref, scan, query, configs) if query else None
        return StudyView(
            "autotune",
            summary,
            ref.spec,
            dict(ref.row["hardware"] or {}),
            best,
            points,
            _overhead(scan),
            [],
            table,
        )

    def points(self, name: str, latency: str | None = None) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
        """An autotune study's spec, the latency asked for (default its SLO latency) and the points a
        Pareto front is drawn from: what the compare page and the Pareto API read (one scan)."""
        with self.engine.connect() as conn:
            ref = self._ref(conn, name)
            if ref.row is None:
                raise NotFound(f"study {name!r} was not made by autotune: it has no latency to plot")
            lat = latency or slo_latency(ref.spec)[0]
            scan = self._scan(conn, ref, (latency_column(lat),))
            return ref.spec, lat, self._points(scan, latency_column(lat), self._configs(conn, ref.row["id"]))

    def autotune_names(self) -> list[str]:
        """autotune's studies, newest first (what the compare page offers)."""
        self.tables()
        if not self.has_autotune:
            return []
        with self.engine.connect() as conn:
            return list(conn.scalars(select(Study.name).order_by(Study.created_at.desc(), Study.id)))

    def _configs(self, conn: Connection, study_id: int) -> dict[str, dict[str, Any]]:
        """Each distinct config of a study by its key (read once, not once per trial)."""
        first = select(func.min(Trial.id)).where(Trial.study_id == study_id).group_by(Trial.config_key)
        return {
            k: dict(c or {}) for k, c in conn.execute(select(Trial.config_key, Trial.config).where(Trial.id.in_(first)))
        }

    @staticmethod
    def _points(scan: Scan, col: str, configs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """Every trial with a throughput: what the Pareto front, history, importance and parallel
        categories are drawn from (configs read once per distinct config)."""
        labels = {k: config_label(c) for k, c in configs.items()}
        at = scan.at
        n, st, fe, tp, la, ke = (
            at[c] for c in ("trial_number", "state", "feasible", "output_tokens_per_s", col, "config_key")
        )
        failed = scan.failed
        points = [
            {
                "number": r[n],
                "state": r[st],
                "feasible": r[fe],
                "output_tokens_per_s": _num(r[tp]),
                col: _num(r[la]),
                "config_key": r[ke],
                "config": configs.get(r[ke], {}),
                "label": labels.get(r[ke], "-"),
                "confirmed_failed": r[ke] in failed,
            }
            for r in scan.rows
            if r[tp] is not None
        ]
        extra = [r for r in scan.extras if r["output_tokens_per_s"] is not None]
        return sorted(points + extra, key=lambda r: r["number"]) if extra else points

    # -- the trials table -----------------------------------------------------------------------------------------
    def trials(self, name: str, query: TableQuery) -> dict[str, Any]:
        """A page of a study's trials, filtered and sorted (missing values last), every trial Optuna
        holds included: ``{"total", "offset", "limit", "items"}``, and what the page's table needs
        besides (``kind``, the SLO ``latency``, ``best_trial``)."""
        with self.engine.connect() as conn:
            ref = self._ref(conn, name)
            if ref.kind == "optuna":
                assert ref.osid is not None
                page = self._optuna_table(conn, ref.osid, query)
                best = self._optuna_best(conn, ref.osid, odb.directions(conn, ref.osid))
                return {**page, "kind": "optuna", "latency": "", "best_trial": best[0] if best else None}
            scan = self._scan(conn, ref, _table_columns(query))
            page = self._table(conn, ref, scan, query)
            latency = slo_latency(ref.spec)[0]
            return {**page, "kind": "autotune", "latency": latency, "best_trial": _best_number(scan)[0]}

    def _table(
        self,
        conn: Connection,
        ref: StudyRef,
        scan: Scan,
        query: TableQuery,
        configs: dict[str, dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        assert ref.row is not None
        at = scan.at
        sort = _sort_column(query)
        needle = query.q.strip().lower()
        labels: dict[str, str] = {}
        if needle:
            configs = configs if configs is not None else self._configs(conn, ref.row["id"])
            labels = {k: config_label(c).lower() for k, c in configs.items()}
        n, st, fe, ke = at["trial_number"], at["state"], at["feasible"], at["config_key"]
        so = at[sort] if sort != "number" else None
        fk, fr, du = (at.get(c, -1) for c in FILTER_COLUMNS)  # read when filtering by text
        lean: list[tuple[int, Any, bool]] = []
        for r in scan.rows:
            if query.state and r[st] != query.state:
                continue
            if query.feasible is not None and bool(r[fe]) != query.feasible:
                continue
            if needle:
                text = f"{r[n]} {r[st]} {labels.get(r[ke], '')} {r[fk] or ''} {r[fr] or ''}"
                text += f" repeat of trial {r[du]}" if r[du] is not None else ""
                if needle not in text.lower():
                    continue
            lean.append((r[n], r[so] if so is not None else None, False))
        extras = {r["number"]: r for r in scan.extras}
        for e in scan.extras:
            if query.state and e["state"] != query.state:
                continue
            if query.feasible is not None and bool(e["feasible"]) != query.feasible:
                continue
            text = f"{e['number']} {e['state']} {e['label']} {e['failure_kind'] or ''} {e['failure_reason'] or ''}"
            if needle and needle not in text.lower():
                continue
            lean.append((e["number"], e.get(sort) if sort != "number" else None, True))
        total, page = _sorted_page(lean, query)
        wanted = [num for num, extra in page if not extra]
        full = {}
        if wanted:
            q = select(*ROW_COLUMNS).where(Trial.study_id == ref.row["id"], Trial.trial_number.in_(wanted))
            full = {t["trial_number"]: trial_row(t, scan.failed, scan.clauses) for t in conn.execute(q).mappings()}
        items = [extras[num] if extra else full[num] for num, extra in page]
        return {"total": total, "offset": query.offset, "limit": query.limit, "items": items}

    def _optuna_table(self, conn: Connection, osid: int, query: TableQuery) -> dict[str, Any]:
        ot, tv = odb.trials, odb.trial_values
        q = (
            select(ot.c.trial_id, ot.c.number, ot.c.state, tv.c.value, tv.c.value_type)
            .outerjoin(tv, (tv.c.trial_id == ot.c.trial_id) & (tv.c.objective == 0))
            .where(ot.c.study_id == osid)
        )
        found = conn.execute(q).all()
        needle = query.q.strip().lower()
        texts: dict[int, str] = {}
        if needle:
            tp = odb.trial_params
            every = conn.execute(
                select(tp.c.trial_id).join(ot, ot.c.trial_id == tp.c.trial_id).where(ot.c.study_id == osid)
            ).all()
            params = odb.params(conn, sorted({tid for (tid,) in every}))
            texts = {tid: params_label(p).lower() for tid, p in params.items()}
        lean: list[tuple[int, Any, bool]] = []
        for tid, n, state, v, vtype in found:
            name = odb.PLAIN_STATES.get(str(state), str(state).lower())
            if query.state and name != query.state:
                continue
            if query.feasible is not None:
                continue  # only autotune's trials are judged against an SLO
            if needle and needle not in f"{n} {name} {texts.get(tid, '')}":
                continue
            value = _num(odb.value_of(v, vtype)) if vtype is not None else None
            lean.append((n, value if query.sort == "value" else None, False))
        total, page = _sorted_page(lean, query)
        numbers = [n for n, _ in page]
        rows = {r["number"]: r for r in self._optuna_rows(conn, osid, numbers)}
        return {"total": total, "offset": query.offset, "limit": query.limit, "items": [rows[n] for n in numbers]}

    def _optuna_rows(self, conn: Connection, osid: int, numbers: list[int]) -> list[dict[str, Any]]:
        """Table rows of a few trials of a study only Optuna holds: state, values, params, times."""
        if not numbers:
            return []
        ot = odb.trials
        found = conn.execute(
            select(ot.c.trial_id, ot.c.number, ot.c.state, ot.c.datetime_start, ot.c.datetime_complete)
            .where(ot.c.study_id == osid, ot.c.number.in_(numbers))
            .order_by(ot.c.number)
        ).all()
        ids = [t.trial_id for t in found]
        params, values = odb.params(conn, ids), odb.values(conn, ids)
        out = []
        for t in found:
            row = blank_row(t.number, odb.PLAIN_STATES.get(str(t.state), str(t.state).lower()))
            p = params.get(t.trial_id, {})
            row.update(
                kind="optuna",
                params=clean_json(p),
                label=params_label(p),
                values=clean_json(values[t.trial_id]) if t.trial_id in values else None,
                finished_at=_iso(odb.utc(t.datetime_complete)),
                started_at=_iso(odb.utc(t.datetime_start)),
            )
            out.append(row)
        return out

    # -- one trial, the export, the status ---------------------------------------------------------------------------
    def trial(self, name: str, number: int) -> dict[str, Any]:
        """Everything the database holds about one trial (autotune's row, else what Optuna holds)."""
        with self.engine.connect() as conn:
            ref = self._ref(conn, name)
            if ref.row is not None:
                t = (
                    conn.execute(
                        select(Trial.__table__).where(Trial.study_id == ref.row["id"], Trial.trial_number == number)
                    )
                    .mappings()
                    .first()
                )
                if t is not None:
                    return trial_detail(t, slo_clauses(ref.spec))
                found = self._extras(conn, ref, slo_clauses(ref.spec), number=number)
                if found:
                    return self._extra_detail(found[0])
            elif ref.osid is not None:
                rows = self._optuna_rows(conn, ref.osid, [number])
                if rows:
                    detail = blank_detail(rows[0])
                    tid = conn.scalar(
                        select(odb.trials.c.trial_id).where(
                            odb.trials.c.study_id == ref.osid, odb.trials.c.number == number
                        )
                    )
                    detail["user_attrs"] = clean_json(odb.all_attrs(conn, tid)) if tid is not None else {}
                    return detail
        raise NotFound(f"study {name!r} has no trial {number}")

    @staticmethod
    def _extra_detail(row: dict[str, Any]) -> dict[str, Any]:
        m = row.pop("measurement", None)
        log = row.pop("log", None)
        detail = blank_detail(row)
        detail["log_excerpt"] = log
        if m:
            cols = measurement_columns(m)
            detail["latency"] = {x: {s: _num(cols[f"{x}_{s}_ms"]) for s in LATENCY_STATS} for x in LATENCY_METRICS}
            for k in ("requests", "output_tokens", "stopped_by", "memory_kind"):
                detail[k] = cols[k]
            detail.update(
                duration_s=_num(cols["duration_s"]),
                mean_batch_rows=_num(cols["mean_batch_rows"]),
                timings=clean_json(cols["timings"] or {}),
                metrics=clean_json(cols["metrics"] or {}),
                latency_histogram=clean_json(cols["latency_histogram"] or {}),
                e2e_samples_ms=clean_json(cols["e2e_samples"] or []),
            )
        return detail

    def export(self, name: str) -> dict[str, Any]:
        """The export document of the best feasible trial, built by the same function as
        ``autotune best --json`` (reading that one trial, not the study's every trial)."""
        with self.engine.connect() as conn:
            ref = self._ref(conn, name)
            if ref.row is None:
                raise NotFound(f"study {name!r} was not made by autotune: it has no export")
            if ref.osid is None:
                raise NotFound(f"study {name!r} has no Optuna record in {safe_url(self.url)}")
            best = _best_number(self._scan(conn, ref))[0]
        if best is None:
            raise NotFound(f"study {name!r} has no trial that meets its SLO; nothing to export")
        import optuna

        from autotune.export import export_dict

        storage = self.optuna_storage()
        study = optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler())
        trial_id = storage.get_trial_id_from_study_id_trial_number(ref.osid, best)
        return export_dict(study, storage.get_trial(trial_id))

    def status(self, name: str) -> dict[str, Any]:
        """What a page polls: cheap, and it changes whenever a trial lands or the study ends."""
        with self.engine.connect() as conn:
            ref = self._ref(conn, name)
            if ref.row is None:
                s = self._optuna_summary(conn, ref)
                return {
                    "name": name,
                    "status": s["status"],
                    "trials_done": s["trials_done"],
                    "updated_at": s["updated_at"],
                }
            n = conn.scalar(select(func.count()).select_from(Trial).where(Trial.study_id == ref.row["id"])) or 0
            n += len(self._extras(conn, ref, []))
        return {"name": name, "status": ref.row["status"], "trials_done": n, "updated_at": _iso(ref.row["updated_at"])}


def _seconds(start: datetime | str | None, end: datetime | str | None) -> float | None:
    """``end - start`` in seconds (SQLite gives the stored text)."""
    if not start or not end:
        return None
    if isinstance(start, str):
        start = datetime.fromisoformat(start)
    if isinstance(end, str):
        end = datetime.fromisoformat(end)
    return (end - start).total_seconds()


def _sort_column(query: TableQuery) -> str:
    return "output_tokens_per_s" if query.sort == "value" else query.sort


def _table_columns(query: TableQuery) -> tuple[str, ...]:
    """What a scan reads for the trials table besides :data:`SCAN_BASE`: the sort key, and the
    failure text when filtering by text."""
    sort = _sort_column(query)
    return (*(() if sort == "number" else (sort,)), *(FILTER_COLUMNS if query.q.strip() else ()))


def _extra_state(state: str, attrs: Mapping[str, Any], measured: bool) -> str:
    """The table state of a trial only Optuna holds (the rule ``autotune.tuner.store_state`` records)."""
    if state in ("RUNNING", "WAITING"):
        return state.lower()
    if "rejected" in attrs:
        return "rejected"
    if "duplicate_of" in attrs:
        return "duplicate"
    if state == "FAIL":
        return "failed"
    if state == "PRUNED":
        return "rejected"
    return "measured" if measured else "infeasible"


def _sqlite_read_only(dbapi_connection: Any, _record: Any) -> None:
    """SQLite refuses every write on this connection (the dashboard never writes)."""
    cur = dbapi_connection.cursor()
    try:
        cur.execute("PRAGMA query_only = ON")
    finally:
        cur.close()
