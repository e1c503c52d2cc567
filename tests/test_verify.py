"""``autotune verify``: the side-by-side verdict (throughput within tolerance, every SLO clause), the HTTP
replay against a live ``autotune serve`` (same requests, same concurrency), and the command's exit codes:
0 verified, 3 short of the tuned figures, 2 bad input."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from autotune.errors import AutotuneError
from autotune.measure import Measurement
from autotune.verify import build_engine, compare, expected_throughput, load_doc, verify_remote

from .conftest import run_cli
from .test_serve import LiveServer, write_export


def measurement(tps: float, e2e_p95: float, memory: float = 300.0) -> Measurement:
    lat = {"p50": 5.0, "p90": 6.0, "p95": e2e_p95, "p99": e2e_p95 + 1, "mean": 5.0, "max": e2e_p95 + 2}
    return Measurement(
        output_tokens_per_s=tps,
        requests_per_s=tps / 8,
        requests=32,
        output_tokens=256,
        duration_s=1.0,
        e2e_ms=lat,
        ttft_ms=lat,
        tpot_ms=lat,
        queue_ms=lat,
        mean_batch_rows=4.0,
        peak_memory_mb=memory,
        memory_kind="process_peak_rss",
    )


def doc(tuned_tps: float = 100.0, slo: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    lat = {p: 10.0 for p in ("p50", "p90", "p95", "p99")}
    return {
        "slo": slo if slo is not None else [{"metric": "e2e_ms", "percentile": "p95", "max": 50.0}],
        "metrics": {"output_tokens_per_s": tuned_tps, "e2e_ms": lat, "ttft_ms": lat, "tpot_ms": lat},
    }


def test_verdict_throughput_tolerance_and_slo() -> None:
    assert compare(doc(100), measurement(95, 40)).ok  # 5% below: inside 10%
    assert compare(doc(100), measurement(150, 40)).ok  # faster than tuned is fine
    slow = compare(doc(100), measurement(89, 40))
    assert not slow.ok and "11% below" in slow.reasons[0]
    missed = compare(doc(100), measurement(120, 51))
    assert not missed.ok and missed.reasons == ["SLO e2e_ms p95 <= 50.0: measured 51.0"]
    assert compare(doc(100), measurement(89, 40), tolerance=0.2).ok
    rows = {r.metric: r for r in missed.rows}
    assert rows["e2e_ms.p95"].ok is False and rows["e2e_ms.p50"].ok is None  # only SLO clauses get a verdict
    mem = [{"metric": "peak_memory_mb", "percentile": None, "max": 250.0}]
    assert not compare(doc(100, mem), measurement(100, 40, memory=300)).ok
    assert compare(doc(100, mem), measurement(100, 40, memory=math.nan)).ok  # unknown memory is not a miss


def test_the_throughput_verdict_is_against_the_winners_re_measurement() -> None:
    """The search trial's figure is the best of many noisy windows; the confirmation runs are not selected."""
    confirmed = {
        **doc(100),
        "confirmation": {"ok": True, "trial": 3, "runs": [{"output_tokens_per_s": t} for t in (80, 86, 90)]},
    }
    assert expected_throughput(confirmed) == (86.0, "re-measured (3 runs)")
    assert expected_throughput(doc(100)) == (100.0, "search trial")  # no re-measurement: the trial's figure
    v = compare(confirmed, measurement(80, 40))  # 7% below the re-measured 86, 20% below the trial's 100
    assert v.ok
    rows = {r.metric: r for r in v.rows}
    assert rows["output_tokens_per_s (re-measured (3 runs))"].ok is True
    assert (
        rows["output_tokens_per_s (search trial)"].tuned == 100
        and rows["output_tokens_per_s (search trial)"].ok is None
    )
    short = compare(confirmed, measurement(77, 40))
    assert not short.ok and "the tuned 86.0, re-measured (3 runs)" in short.reasons[0]
    exported = {
        **confirmed,
        "metrics": {**confirmed["metrics"], "output_tokens_per_s": 86.0, "search": {"output_tokens_per_s": 100.0}},
    }
    rows = {r.metric: r for r in compare(exported, measurement(80, 40)).rows}  # today's exports: both figures
    assert rows["output_tokens_per_s (search trial)"].tuned == 100
    failed_run = {**doc(100), "confirmation": {"ok": False, "runs": [{"failure": "oom: out of memory"}]}}
    assert expected_throughput(failed_run) == (100.0, "search trial")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, LiveServer]]:
    """The tiny export served by an in-process uvicorn, built by the same loader `autotune serve` uses."""
    path = write_export(tmp_path_factory.mktemp("verify") / "best.json")
    srv = LiveServer(build_engine(load_doc(path))).start()
    yield path, srv
    srv.stop()


def test_http_replay_sends_the_workload_with_its_lengths(served: tuple[Path, LiveServer]) -> None:
    path, srv = served
    before = srv.metric("autotune_requests_total", code="200")
    m = verify_remote(load_doc(path), srv.url)
    assert m.requests == 32 and m.output_tokens == 32 * 8 and m.mean_prompt_tokens == 16
    assert m.output_tokens_per_s > 0 and m.e2e_ms["p95"] >= m.ttft_ms["p95"] > 0
    assert m.peak_memory_mb > 0  # from the server's /health
    assert srv.metric("autotune_requests_total", code="200") - before == 32 + 4  # measured + one warm-up round
    assert compare(load_doc(path), m).ok


def test_http_replay_refuses_a_server_running_another_config(served: tuple[Path, LiveServer], tmp_path: Path) -> None:
    _, srv = served
    other = write_export(tmp_path / "other.json", config={"batch_size": 2})
    with pytest.raises(AutotuneError, match=r"serves b4 .* not the exported b2"):
        verify_remote(load_doc(other), srv.url)
    with pytest.raises(AutotuneError, match="cannot reach"):
        verify_remote(load_doc(other), "http://127.0.0.1:9")


def test_cli_verify_url_exit_codes(served: tuple[Path, LiveServer], tmp_path: Path) -> None:
    path, srv = served
    res = run_cli("verify", str(path), "--url", srv.url, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "output_tokens_per_s" in res.stdout and "OK" in res.stdout and "verified" in res.stderr
    fast = write_export(tmp_path / "fast.json", tuned_tps=1e9)  # a tuned figure no deployment reaches
    res = run_cli("verify", str(fast), "--url", srv.url, "--json", cwd=tmp_path, timeout=120)
    assert res.returncode == 3, res.stderr
    out = json.loads(res.stdout)
    assert out["ok"] is False and "below the tuned" in out["reasons"][0]
    assert len(res.stderr.strip().splitlines()) == 1 and "below the tuned" in res.stderr


def test_cli_verify_in_process_and_bad_input(tmp_path: Path) -> None:
    strict = write_export(tmp_path / "best.json", slo_max=0.001)  # an SLO nothing meets
    res = run_cli("verify", str(strict), "--runs", "2", cwd=tmp_path, timeout=120)
    assert res.returncode == 3, res.stderr
    assert "in-process" in res.stdout and "MISSED" in res.stdout and "SLO e2e_ms p95" in res.stderr
    assert "2 replays:" in res.stderr  # the engine replayed twice in one process, the median compared
    (tmp_path / "broken.json").write_text("{not json")
    for bad in ("broken.json", "missing.json"):
        res = run_cli("verify", bad, cwd=tmp_path, timeout=60)
        assert res.returncode == 2 and res.stderr.startswith("error:") and "Traceback" not in res.stderr


@pytest.fixture(scope="module")
def foreign(served: tuple[Path, LiveServer]) -> Iterator[LiveServer]:
    """Another OpenAI-compatible server (as vLLM is): the same engine behind an app without autotune's
    /health, so nothing says which config it runs."""
    _, srv = served
    other = LiveServer(srv.engine, manage_engine=False)  # the first app owns the engine
    other.app.router.routes[:] = [r for r in other.app.router.routes if getattr(r, "path", "") != "/health"]
    other.start()
    yield other
    other.stop()


def test_http_replay_against_a_server_that_is_not_autotunes(
    served: tuple[Path, LiveServer], foreign: LiveServer, tmp_path: Path
) -> None:
    """The model from /v1/models, the prompts' vocabulary from the export's model, requests streamed with
    the exact-length fields; the served config cannot be compared, and the replay says so."""
    path, _ = served
    assert httpx.get(f"{foreign.url}/health", timeout=10).status_code == 404
    short = {"prompt": [5, 6], "max_tokens": 2, "min_tokens": 3, "ignore_eos": True}  # vLLM's fields, accepted
    r = httpx.post(f"{foreign.url}/v1/completions", json=short, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens"
    notes: list[str] = []
    before = foreign.metric("autotune_requests_total", code="200")
    m = verify_remote(load_doc(path), foreign.url, say=notes.append)
    assert m.requests == 32 and m.output_tokens == 32 * 8 and m.mean_prompt_tokens == 16
    assert m.output_tokens_per_s > 0 and m.e2e_ms["p95"] >= m.ttft_ms["p95"] > 0
    assert m.peak_memory_mb != m.peak_memory_mb and m.memory_kind == "none"  # the server does not say
    assert foreign.metric("autotune_requests_total", code="200") - before == 32 + 4
    assert len(notes) == 1 and "not `autotune serve`" in notes[0] and "preset:llama-tiny" in notes[0]
    other = write_export(tmp_path / "other.json", config={"batch_size": 2})
    assert verify_remote(load_doc(other), foreign.url, vocab_size=512).requests == 32  # not compared: not refused
    res = run_cli("verify", str(path), "--url", foreign.url, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "note:" in res.stderr and "is not `autotune serve`" in res.stderr and "verified" in res.stderr
