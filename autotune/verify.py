"""Check that a deployment delivers what the study measured: replay the study's workload, compare.

In-process, the exported config's engine runs :func:`~autotune.measure.run_workload` exactly as a
trial did. Against a URL (``autotune serve``, or any OpenAI-compatible server such as vLLM), the
same requests (token ids, so lengths are exact) go over HTTP with the same closed-loop concurrency
or arrival times. There, ``e2e_ms`` and throughput are what the client sees (HTTP included). From
``autotune serve``, ``ttft_ms`` and ``queue_ms`` are the server's engine timings (it sends text when
the batch finishes) and ``tpot_ms`` spreads the rest of the client's wait over the output tokens;
other servers stream, so ``ttft_ms`` is the first token's arrival (queueing unknown: 0), and their
engine config cannot be compared with the export's (said on stderr). The verdict: throughput at
least ``1 - tolerance`` of the tuned figure (the winner's re-measurement where the export has
one), and every SLO clause met.
"""

from __future__ import annotations

import asyncio
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autotune.engines.openai_client import RemoteRun
from autotune.errors import AutotuneError, SpecError

if TYPE_CHECKING:
    from autotune.engines.builtin.engine import Engine
    from autotune.measure import Measurement
    from autotune.spec import WorkloadSpec

DEFAULT_TOLERANCE = 0.10
_PCTS = ("p50", "p90", "p95", "p99")


class VerifyFailed(AutotuneError):
    """The deployment is slower than tuned (beyond the tolerance) or misses an SLO clause."""

    exit_code = 3


# -- the export document ------------------------------------------------------------------------
def load_doc(path: str | Path) -> dict[str, Any]:
    """The export file as a plain dict, validated by :func:`autotune.deploy.load_config`."""
    from autotune.deploy import load_config

    return load_config(path).model_dump(mode="json")


def workload_of(doc: dict[str, Any]) -> WorkloadSpec:
    from pydantic import ValidationError

    from autotune.spec import WorkloadSpec

    if not doc.get("workload"):
        raise SpecError("the export holds no workload to replay; export it again with this autotune")
    try:
        return WorkloadSpec.model_validate(doc["workload"])
    except ValidationError as e:
        raise SpecError(f"export's workload is invalid: {e.errors()[0]['msg']}") from None


def build_engine(doc: dict[str, Any], *, device: str | None = None, strict: bool = False) -> Engine:
    """The exported config's engine, built by the deployment loader (what ``autotune serve`` runs)."""
    from autotune.deploy import load_engine

    return load_engine(doc, device=device, strict=strict, start=False)


def first_token_id(engine: Engine) -> int:
    """Prompts skip the special tokens, as the trial's did (see runner)."""
    return len(getattr(engine.tokenizer, "all_special_ids", []) or [0])


# -- in-process ----------------------------------------------------------------------------------
def verify_local(doc: dict[str, Any], engine: Engine) -> Measurement:
    """Run the study's workload on ``engine`` exactly as the trial did."""
    from autotune.measure import run_workload

    with engine:
        return run_workload(
            engine,
            workload_of(doc),
            vocab_size=engine.info.vocab_size,
            first_token_id=first_token_id(engine),
            build_timings=engine.timings.as_dict(),
        )


# -- over HTTP -----------------------------------------------------------------------------------
async def _health(client: Any, url: str) -> dict[str, Any] | None:
    """``autotune serve``'s /health document; None for a server that is not autotune's (no such document)."""
    import httpx

    try:
        r = await client.get(f"{url}/health")
    except httpx.HTTPError as e:
        raise AutotuneError(f"cannot reach the server at {url}: {type(e).__name__}: {e}") from None
    try:
        doc = r.json()
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or "config" not in doc:
        return None
    if r.status_code != 200:
        raise AutotuneError(f"{url}/health answered {r.status_code} ({doc.get('status', 'not ready')})")
    return doc


async def _served_model(client: Any, url: str) -> str | None:
    """The first model a server lists at /v1/models (None where it lists none)."""
    try:
        r = await client.get(f"{url}/v1/models")
        data = r.json().get("data") or [] if r.status_code == 200 else []
    except Exception as e:  # httpx errors, a body that is not JSON
        raise AutotuneError(f"{url}/v1/models did not answer as an OpenAI-compatible server: {e}") from None
    return str(data[0]["id"]) if data else None


def prompt_vocabulary(doc: dict[str, Any]) -> tuple[int, int]:
    """(vocabulary size, first ordinary token id) of the export's model, from its config and tokenizer
    (no weights): what prompts are drawn from when the server does not say."""
    from autotune.models import load_tokenizer, resolve_model

    ref = (doc.get("config") or {}).get("model") or doc.get("model")
    if not ref:
        raise SpecError("the export names no model: cannot tell the vocabulary the prompts are drawn from")
    return int(resolve_model(ref).vocab_size), len(getattr(load_tokenizer(ref), "all_special_ids", []) or [0])


async def replay_http(
    doc: dict[str, Any],
    url: str,
    *,
    vocab_size: int | None = None,
    first_token_id: int | None = None,
    request_timeout_s: float = 300.0,
) -> RemoteRun:
    """Warm up, then replay the workload against ``url`` the way :func:`run_workload` does in-process.

    Against ``autotune serve`` the served config must be the exported one (its /health says), and the
    vocabulary comes from there. Any other OpenAI-compatible server (vLLM) is asked /v1/models for the
    model to name; the prompts' vocabulary is ``vocab_size`` or the export's model's, and the served
    config cannot be compared (``RemoteRun.notes`` says so). Requests go through
    :class:`~autotune.engines.openai_client.Replayer`, the replay ``measure_server`` runs.
    """
    from autotune.config import TrialConfig
    from autotune.engines.openai_client import Api, Replayer, client, guarded

    url = url.rstrip("/")
    spec = workload_of(doc)
    cfg = TrialConfig.model_validate(doc["config"])
    async with client(url, request_timeout_s) as http:
        health = await _health(http, url)
        notes: list[str] = []
        if health is not None:
            # A config that names no model variant runs the export's model (health fills it in).
            served = TrialConfig.model_validate({**health["config"], "model": None})
            model = cfg.model or doc.get("model")
            other_model = model is not None and health["config"].get("model") not in (None, model)
            if served != cfg.model_copy(update={"model": None}) or other_model:
                theirs, ours = health["config"].get("model"), model
                raise AutotuneError(
                    f"{url} serves {served.label()} ({theirs}), not the exported {cfg.label()} ({ours or 'its model'})"
                )
            vocab = vocab_size or int(health.get("vocab_size") or 0)
            if not vocab:
                raise AutotuneError(f"{url}/health does not say the model's vocabulary size; upgrade that server")
            first = first_token_id if first_token_id is not None else int(health.get("first_token_id", 4))
            api = Api(url, stream=False, exact_length=False, greedy=False)  # exact and greedy; timings in the body
        else:
            api = Api(url, model=await _served_model(http, url))
            if vocab_size:
                vocab, first = vocab_size, (first_token_id if first_token_id is not None else 4)
            else:
                vocab, first = prompt_vocabulary(doc)
            notes.append(
                f"{url} is not `autotune serve` (its /health says no config): serving "
                f"{api.model or 'an unnamed model'}; the served engine config was not compared with the export's"
            )
        rep = Replayer(http, api)

        async def body() -> RemoteRun:
            await rep.warm_up(spec, cfg, vocab, first)
            results, t0, t1, stopped = await rep.run(spec, cfg, vocab, first)
            after = await _health(http, url) if health is not None else None  # peak memory after the run
            return RemoteRun(results, t0, t1, stopped, after or {}, list(rep.failures), notes=notes)

        return await guarded(body(), rep, stall_timeout_s=request_timeout_s)


def verify_remote(
    doc: dict[str, Any], url: str, *, vocab_size: int | None = None, say: Callable[[str], object] | None = None
) -> Measurement:
    """Replay over HTTP and summarize like a trial; lost requests make it fail loudly. ``say`` hears
    what the replay could not check (another server's config)."""
    from autotune.measure import summarize

    run = asyncio.run(replay_http(doc, url, vocab_size=vocab_size))
    if say is not None:
        for note in run.notes:
            say(note)
    if run.failures:
        raise VerifyFailed(f"{len(run.failures)} request(s) failed against {url}; first: {run.failures[0]}")
    if not run.results:
        raise VerifyFailed(f"no request finished against {url}")
    return summarize(
        run.results,
        run.t0,
        run.t1,
        peak_memory_mb=float(run.health.get("peak_memory_mb", math.nan)),
        memory_kind=str(run.health.get("memory_kind", "server" if run.health else "none")),
        stopped_by=run.stopped_by,
    )


# -- the comparison ------------------------------------------------------------------------------
@dataclass
class Row:
    metric: str
    tuned: float
    measured: float
    limit: str = ""
    ok: bool | None = None


@dataclass
class Verdict:
    rows: list[Row]
    ok: bool
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "reasons": self.reasons, "rows": [r.__dict__ for r in self.rows]}


def expected_throughput(doc: dict[str, Any]) -> tuple[float, str]:
    """The throughput a deployment of the export should reproduce, and where it comes from.

    The search keeps the highest of many noisy measurements, so the winning trial's own figure
    is biased upward (the winner's curse: on this project's 2-core VM the best of 4 trials
    re-measured 12% lower). The confirmation runs re-measure the winner in fresh processes after
    it was chosen, so nothing selected them: their median is the unbiased estimate. Exports
    without re-measurements fall back to the trial's figure.
    """
    runs = [
        float(r["output_tokens_per_s"])
        for r in (doc.get("confirmation") or {}).get("runs", [])
        if isinstance(r, dict) and r.get("output_tokens_per_s") is not None
    ]
    if runs:
        return statistics.median(runs), f"re-measured ({len(runs)} run{'s' if len(runs) > 1 else ''})"
    return float((doc.get("metrics") or {}).get("output_tokens_per_s", math.nan)), "search trial"


def compare(doc: dict[str, Any], m: Measurement, *, tolerance: float = DEFAULT_TOLERANCE) -> Verdict:
    """Tuned vs measured: throughput verdict (>= (1 - tolerance) x expected) and one verdict per SLO clause.

    The expected throughput is :func:`expected_throughput`; the search trial's own figure is shown
    beside it when it differs, without a verdict.
    """
    tuned = doc.get("metrics") or {}
    rows: list[Row] = []
    reasons: list[str] = []
    t_tput, source = expected_throughput(doc)
    floor = t_tput * (1 - tolerance)
    tput_ok = m.output_tokens_per_s >= floor if t_tput == t_tput else True
    rows.append(Row(f"output_tokens_per_s ({source})", t_tput, m.output_tokens_per_s, f">= {floor:,.1f}", tput_ok))
    # Exports carry the search trial's figure beside the re-measured one (older ones: in its place).
    searched = float((tuned.get("search") or tuned).get("output_tokens_per_s", math.nan))
    if source != "search trial":
        rows.append(Row("output_tokens_per_s (search trial)", searched, m.output_tokens_per_s))
    if not tput_ok:
        reasons.append(
            f"throughput {m.output_tokens_per_s:,.1f} tok/s is {1 - m.output_tokens_per_s / t_tput:.0%} below "
            f"the tuned {t_tput:,.1f}, {source} (tolerance {tolerance:.0%})"
        )
    rows.append(Row("requests_per_s", float(tuned.get("requests_per_s", math.nan)), m.requests_per_s))
    # Upper bounds only: fidelity floors (min_*) are the tuner's check, not a load test's.
    slo = {
        (c["metric"], c.get("percentile")): float(c["max"]) for c in doc.get("slo") or [] if c.get("max") is not None
    }
    for metric in ("e2e_ms", "ttft_ms", "tpot_ms"):
        for p in _PCTS:
            t = float((tuned.get(metric) or {}).get(p, math.nan))
            v = float(getattr(m, metric)[p])
            limit = slo.pop((metric, p), None)
            ok = None if limit is None else v <= limit
            rows.append(Row(f"{metric}.{p}", t, v, "" if limit is None else f"<= {limit:,.1f} (SLO)", ok))
            if ok is False:
                reasons.append(f"SLO {metric} {p} <= {limit:,.1f}: measured {v:,.1f}")
    mem_limit = slo.pop(("peak_memory_mb", None), None)
    mem_ok = None if mem_limit is None else not m.peak_memory_mb > mem_limit  # NaN (unknown) is not a miss
    rows.append(
        Row(
            "peak_memory_mb",
            float(tuned.get("peak_memory_mb", math.nan)),
            m.peak_memory_mb,
            "" if mem_limit is None else f"<= {mem_limit:,.1f} (SLO)",
            mem_ok,
        )
    )
    if mem_ok is False:
        reasons.append(f"SLO peak_memory_mb <= {mem_limit:,.1f}: measured {m.peak_memory_mb:,.1f}")
    return Verdict(rows, not reasons, reasons)


def render(verdict: Verdict, title: str) -> Any:
    """The side-by-side table (rich)."""
    from rich.table import Table

    t = Table(title=title, header_style="bold")
    for col, just in (("metric", "left"), ("tuned", "right"), ("measured", "right"), ("ratio", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    t.add_column("target")
    t.add_column("verdict")
    for r in verdict.rows:
        ratio = r.measured / r.tuned if r.tuned and r.tuned == r.tuned and r.measured == r.measured else math.nan
        t.add_row(
            r.metric,
            _f(r.tuned),
            _f(r.measured),
            "-" if ratio != ratio else f"{ratio:.2f}x",
            r.limit,
            "" if r.ok is None else ("[green]OK[/green]" if r.ok else "[red]MISSED[/red]"),
        )
    return t


def _f(v: float) -> str:
    return "-" if v != v else f"{v:,.1f}"
