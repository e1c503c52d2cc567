"""Read-only access to a study store for the dashboard: plain dicts out, nothing written, no torch.

Trials come from autotune's own tables (one query per study, explicit percentile columns), which is
what keeps a 1,000-trial page fast; only the confirmations (which winners held up when re-measured)
and the export document come from Optuna's tables, so "best" here is the trial ``autotune best`` names.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from autotune.errors import StorageError
from autotune.measure import overhead
from autotune.store import Repository, check_schema, make_engine
from autotune.store.migrate import safe_url
from autotune.store.models import LATENCY_METRICS, LATENCY_STATS, Study, Trial

KNOBS = (
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


def trial_row(
    t: Any, failed_keys: set[str] | frozenset[str] = frozenset(), clauses: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """A trial as the table and the plots need it (no samples, no log); ``t``: a row mapping or a Trial.
    With the study's SLO ``clauses``, ``missed`` says why an infeasible trial is infeasible."""
    if not isinstance(t, Mapping):
        t = {c.key: getattr(t, c.key) for c in ROW_COLUMNS}
    row: dict[str, Any] = {c: _num(t[c]) for c in LATENCY_COLUMNS}
    cfg = dict(t["config"] or {})
    row.update(
        number=t["trial_number"],
        state=t["state"],
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


def trial_detail(t: Trial, clauses: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything stored about one trial: every metric, the latency histogram and samples, the log."""
    row = trial_row(t, clauses=clauses)
    row["latency"] = {m: {s: _num(getattr(t, f"{m}_{s}_ms")) for s in LATENCY_STATS} for m in LATENCY_METRICS}
    row.update(
        requests=t.requests,
        output_tokens=t.output_tokens,
        duration_s=_num(t.duration_s),
        mean_batch_rows=_num(t.mean_batch_rows),
        stopped_by=t.stopped_by,
        memory_kind=t.memory_kind,
        timings=clean_json(dict(t.timings or {})),
        metrics=clean_json(dict(t.metrics or {})),
        latency_histogram=clean_json(dict(t.latency_histogram or {})),
        e2e_samples_ms=clean_json(list(t.e2e_samples or [])),
        log_excerpt=t.log_excerpt,
        started_at=_iso(t.started_at),
    )
    return row


@dataclass
class StudyView:
    """One study's header and its trial rows, read in one go."""

    summary: dict[str, Any]
    spec: dict[str, Any]
    hardware: dict[str, Any]
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    overhead: dict[str, float] | None = None  # :func:`autotune.measure.overhead` of its measured trials


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest-throughput trial that met every SLO clause and was not refuted when re-measured.

    Same rule as :func:`autotune.tuner.best_feasible` (first of equals by trial number).
    """
    ok = [
        r
        for r in rows
        if r["feasible"] and r["state"] in ("measured", "duplicate") and r["output_tokens_per_s"] is not None
    ]
    ok = [r for r in ok if not r["confirmed_failed"]]
    return max(ok, key=lambda r: r["output_tokens_per_s"], default=None)


def hardware_summary(hw: dict[str, Any]) -> str:
    """``Hardware.summary()`` from the stored dict (the dashboard does not import the probe)."""
    if not hw:
        return "-"
    if hw.get("device_type") == "cuda":
        cc = ".".join(map(str, hw.get("compute_capability") or ()))
        return f"{hw.get('device_name')} (cc {cc}, {hw.get('device_memory_mb')} MB), torch {hw.get('torch_version')}"
    cores, mem = hw.get("cpu_cores"), hw.get("host_memory_mb")
    return f"{hw.get('cpu_model')}, {cores} cores, {mem} MB, torch {hw.get('torch_version')}"


class Store:
    """The dashboard's read-only window on one database (SQLite or PostgreSQL).

    Every connection is put in read-only mode by the database itself (SQLite ``query_only``,
    PostgreSQL ``default_transaction_read_only``), so no code path here can write, whatever it calls.
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
        check_schema(url)
        kwargs: dict[str, Any] = {}
        if u.get_backend_name() == "postgresql":
            kwargs["connect_args"] = {"options": "-c default_transaction_read_only=on"}
        self.engine: Engine = make_engine(url, **kwargs)
        if u.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_read_only)
        self.repo = Repository(self.engine)
        self._optuna: Any = None
        self._lock = threading.Lock()

    def close(self) -> None:
        self.engine.dispose()
        if self._optuna is not None:
            self._optuna.engine.dispose()

    # -- Optuna side (confirmations, export) ----------------------------------------------------
    def optuna_storage(self) -> Any:
        """Optuna's RDB storage on the same database, never creating tables, read-only connections."""
        with self._lock:
            if self._optuna is None:
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
                self._optuna = st
            return self._optuna

    def study_attrs(self, name: str) -> dict[str, Any]:
        """Optuna's user attributes of the study ({} when Optuna does not know it)."""
        st = self.optuna_storage()
        try:
            return st.get_study_user_attrs(st.get_study_id_from_name(name))
        except KeyError:
            return {}

    def failed_confirmations(self, name: str) -> set[str]:
        """Config keys whose re-measurement broke the SLO: never 'best', as in ``autotune best``."""
        conf = self.study_attrs(name).get("confirmations") or {}
        return {k for k, v in conf.items() if isinstance(v, dict) and not v.get("ok", True)}

    def export(self, name: str) -> dict[str, Any]:
        """The export document, built by the same function as ``autotune best --json``."""
        import optuna

        from autotune.errors import NoFeasibleConfig
        from autotune.export import export_dict

        self._study_row(name)
        try:
            study = optuna.load_study(
                study_name=name, storage=self.optuna_storage(), sampler=optuna.samplers.RandomSampler()
            )
        except KeyError:
            raise NotFound(f"study {name!r} has no Optuna record in {safe_url(self.url)}") from None
        try:
            return export_dict(study)
        except NoFeasibleConfig as err:
            raise NotFound(str(err)) from None

    # -- autotune's tables --------------------------------------------------------------------------
    def _study_row(self, name: str) -> Study:
        study = self.repo.get_study(name)
        if study is None:
            raise NotFound(f"no study named {name!r}")
        return study

    def study_summaries(self) -> list[dict[str, Any]]:
        """One row per study for the list page: counts and best throughput from one grouped query each."""
        with Session(self.engine) as session:
            studies = list(session.scalars(select(Study).order_by(Study.created_at.desc(), Study.id)))
            counts: dict[int, dict[str, int]] = {}
            for sid, state, n in session.execute(
                select(Trial.study_id, Trial.state, func.count()).group_by(Trial.study_id, Trial.state)
            ):
                counts.setdefault(sid, {})[state] = n
        out = []
        for s in studies:
            failed = self.failed_confirmations(s.name)
            # rare: a winner refuted when re-measured; then rank the rows as `autotune best` does
            best = self.study(s.name).best if failed else self._best_quick(s.id)
            out.append(self._summary(s, counts.get(s.id, {}), best))
        return out

    def _best_quick(self, study_id: int) -> dict[str, Any] | None:
        with Session(self.engine) as session:
            t = session.scalar(
                select(Trial)
                .where(
                    Trial.study_id == study_id,
                    Trial.feasible.is_(True),
                    Trial.state.in_(("measured", "duplicate")),
                    Trial.output_tokens_per_s.is_not(None),
                )
                .order_by(Trial.output_tokens_per_s.desc(), Trial.trial_number)
                .limit(1)
            )
            return trial_row(t) if t is not None else None

    @staticmethod
    def _summary(s: Study, counts: dict[str, int], best: dict[str, Any] | None) -> dict[str, Any]:
        spec = dict(s.spec or {})
        return {
            "name": s.name,
            "model": s.model_ref,
            "hardware": hardware_summary(dict(s.hardware or {})),
            "device": (s.hardware or {}).get("device"),
            "slo": [c["text"] for c in slo_clauses(spec)],
            "objective": spec.get("objective"),
            "budget_trials": (spec.get("budget") or {}).get("trials"),
            "trials_done": sum(counts.values()),
            # What the budget counts: measured, infeasible and failed trials (not repeats or rejected configs).
            "trials_spent": sum(counts.get(k, 0) for k in ("measured", "infeasible", "failed")),
            "trials_failed": counts.get("failed", 0),
            "trials_by_state": dict(counts),
            "best_trial": best["number"] if best else None,
            "best_output_tokens_per_s": best["output_tokens_per_s"] if best else None,
            "status": s.status,
            "created_at": _iso(s.created_at),
            "updated_at": _iso(s.updated_at),
        }

    def study(self, name: str) -> StudyView:
        """A study's header, its trial rows and its best feasible trial."""
        s = self._study_row(name)
        failed = self.failed_confirmations(name)
        query = select(*ROW_COLUMNS).where(Trial.study_id == s.id).order_by(Trial.trial_number)
        times = (Trial.started_at, Trial.finished_at, Trial.duration_s, Trial.timings)
        measured = select(*times).where(
            Trial.study_id == s.id, Trial.duration_s.is_not(None), Trial.duplicate_of.is_(None)
        )
        with self.engine.connect() as conn:  # Core rows: a third of the ORM's cost for 1,000 trials
            clauses = slo_clauses(dict(s.spec or {}))
            rows = [trial_row(t, failed, clauses) for t in conn.execute(query).mappings()]
            spans = [
                ((end - start).total_seconds(), float(window), bool((timings or {}).get("engine_reused")))
                for start, end, window, timings in conn.execute(measured)
                if start is not None and end is not None
            ]
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["state"]] = counts.get(r["state"], 0) + 1
        best = best_row(rows)
        summary = self._summary(s, counts, best)
        return StudyView(summary, dict(s.spec or {}), dict(s.hardware or {}), rows, best, overhead(spans))

    def status(self, name: str) -> dict[str, Any]:
        """What a page polls: cheap, and it changes whenever a trial lands or the study ends."""
        s = self._study_row(name)
        with Session(self.engine) as session:
            n = session.scalar(select(func.count()).select_from(Trial).where(Trial.study_id == s.id)) or 0
        return {"name": s.name, "status": s.status, "trials_done": n, "updated_at": _iso(s.updated_at)}

    def trial(self, name: str, number: int) -> dict[str, Any]:
        s = self._study_row(name)
        with Session(self.engine) as session:
            t = session.scalar(select(Trial).where(Trial.study_id == s.id, Trial.trial_number == number))
        if t is None:
            raise NotFound(f"study {name!r} has no trial {number}")
        return trial_detail(t, slo_clauses(dict(s.spec or {})))


def _sqlite_read_only(dbapi_connection: Any, _record: Any) -> None:
    """SQLite refuses every write on this connection (the dashboard never writes)."""
    cur = dbapi_connection.cursor()
    try:
        cur.execute("PRAGMA query_only = ON")
    finally:
        cur.close()
