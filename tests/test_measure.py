"""Measurement arithmetic against known timings (no model involved)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from autotune.engines.builtin.engine import GenerationResult
from autotune.measure import Measurement, distribution, percentile, summarize


@pytest.mark.parametrize("q", [0, 50, 90, 95, 99, 100])
def test_percentile_matches_numpy(q: float) -> None:
    xs = [float(v) for v in np.random.default_rng(0).exponential(100, 257)]
    assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_empty_distribution_is_nan() -> None:
    assert math.isnan(percentile([], 50)) and math.isnan(distribution([])["mean"])


def _result(i: int, submit: float, start: float, first: float, end: float, n: int, rows: int = 2) -> GenerationResult:
    return GenerationResult(i, 8, list(range(n)), submit, start, first, end, rows, 0)


def test_summarize_known_timings() -> None:
    # Two batches of two requests, 10 tokens each, over a 2-second window.
    results = [
        _result(0, 0.0, 0.0, 0.1, 1.0, 10),
        _result(1, 0.0, 0.0, 0.1, 1.0, 10),
        _result(2, 1.0, 1.2, 1.3, 2.0, 10),
        _result(3, 1.1, 1.2, 1.3, 2.0, 10),
    ]
    m = summarize(results, 0.0, 2.0, peak_memory_mb=123.0, memory_kind="process_peak_rss")
    assert m.output_tokens == 40 and m.requests == 4
    assert m.output_tokens_per_s == pytest.approx(20.0)
    assert m.requests_per_s == pytest.approx(2.0)
    assert m.e2e_ms["p50"] == pytest.approx(1000.0)  # e2e: 1000, 1000, 1000, 900
    assert m.e2e_ms["mean"] == pytest.approx(975.0)
    assert m.e2e_ms["max"] == pytest.approx(1000.0)
    assert sorted(m.e2e_samples_ms) == pytest.approx([900, 1000, 1000, 1000])
    assert m.ttft_ms["p50"] == pytest.approx(150.0)  # ttft: 100, 100, 300, 200
    assert m.tpot_ms["p50"] == pytest.approx(900 / 9 * 0.5 + 700 / 9 * 0.5)  # (end-first)/(n-1)
    assert m.queue_ms["max"] == pytest.approx(200.0)
    assert m.mean_batch_rows == 2.0
    assert m.value("e2e_ms.p95") == pytest.approx(float(np.percentile([1000, 1000, 1000, 900], 95)))
    assert m.value("peak_memory_mb") == 123.0


def test_single_token_outputs_have_zero_tpot() -> None:
    m = summarize([_result(0, 0, 0, 0.5, 0.5, 1)], 0.0, 0.5)
    assert m.tpot_ms["p50"] == 0.0 and m.ttft_ms["p50"] == pytest.approx(500.0)


def test_no_results_is_an_error() -> None:
    with pytest.raises(ValueError, match="no request finished"):
        summarize([], 0.0, 1.0)


def test_measurement_round_trips_through_dict() -> None:
    m = summarize([_result(0, 0, 0, 0.1, 0.5, 4)], 0.0, 0.5, timings={"load_s": 1.5})
    again = Measurement.from_dict(m.to_dict())
    assert again == m and again.timings["load_s"] == 1.5


def test_window_throughputs_count_tokens_by_completion_time() -> None:
    from autotune.measure import window_throughputs

    rs = [_result(i, 0.0, 0.0, 0.1, end, 10) for i, end in enumerate([0.5, 0.9, 1.2, 1.9, 2.5])]
    assert window_throughputs(rs, 0.0, 1.0, 2) == [20.0, 20.0]  # the one at 2.5 s is past two windows


@pytest.mark.parametrize(("tolerance", "cap"), [(60.0, 4), (1e-6, 3)])
def test_stability_windows_stop_when_two_agree_or_at_the_cap(tolerance: float, cap: int) -> None:
    """Back-to-back windows: figures pool the last two; the spread between them is stored."""
    from autotune.config import TrialConfig
    from autotune.engines.builtin.engine import Engine
    from autotune.hardware import probe
    from autotune.measure import run_workload
    from autotune.spec import WorkloadSpec

    spec = WorkloadSpec.model_validate(
        {
            "requests": 100_000,
            "prompt_tokens": 8,
            "output_tokens": 4,
            "max_duration_s": 0.4,
            "stability": {"tolerance_pct": tolerance, "max_windows": cap},
        }
    )
    with Engine.build("preset:llama-tiny", TrialConfig(batch_size=4), probe("cpu"), prompt_pad_to=8) as engine:
        m = run_workload(engine, spec, vocab_size=engine.info.vocab_size)
    assert 2 <= len(m.windows_tokens_per_s) <= cap
    a, b = m.windows_tokens_per_s[-2:]
    assert m.window_spread_pct == pytest.approx(100 * abs(a - b) / ((a + b) / 2))
    if tolerance > 50:  # generous: two windows agree at once (the CPU would have to halve its speed)
        assert m.stopped_by == "stable" and len(m.windows_tokens_per_s) == 2 and m.window_spread_pct <= tolerance
    elif m.stopped_by == "stable":  # only two windows with the very same token count agree this closely
        assert m.window_spread_pct == 0.0 and len(m.windows_tokens_per_s) <= cap
    else:  # otherwise no two agree within a millionth of a percent: runs to the cap
        assert m.stopped_by == "duration" and len(m.windows_tokens_per_s) == cap
    assert m.duration_s == pytest.approx(2 * 0.4, abs=0.35)  # the pooled last two windows (plus the drain)


def test_stability_needs_a_closed_loop() -> None:
    from autotune.errors import SpecError
    from autotune.spec import parse_spec

    with pytest.raises(SpecError, match="closed-loop"):
        parse_spec(
            {
                "model": "preset:llama-tiny",
                "slo": {"e2e_ms": {"p95": 100}},
                "workload": {"arrival": {"type": "poisson", "rate": 5}, "stability": {}},
            }
        )


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_a_closed_loop_of_batch_size_clients_keeps_every_batch_full_at_zero_delay(scheduler: str) -> None:
    """Clients resubmit from the finished request's callback, before the batcher collects again: at a
    0 ms queue delay no batch starts on the first few resubmitted requests (issue 27.6: client threads
    woken one by one made batches of 30.1 rows on average at b32, 0.67x a plain generate loop)."""
    from autotune.config import TrialConfig
    from autotune.engines.builtin.engine import Engine
    from autotune.hardware import probe
    from autotune.measure import run_workload
    from autotune.spec import WorkloadSpec

    spec = WorkloadSpec.model_validate(
        {"requests": 40, "prompt_tokens": 8, "output_tokens": 3, "max_duration_s": 60, "arrival": {"type": "closed"}}
    )
    cfg = TrialConfig(batch_size=4, max_queue_delay_ms=0, scheduler="static")
    if scheduler == "continuous":  # the harness's part only: results arrive per request, not per batch
        cfg = cfg.model_copy(update={"scheduler": "continuous"})
    with Engine.build("preset:llama-tiny", cfg, probe("cpu"), prompt_pad_to=8, max_context=16) as engine:
        m = run_workload(engine, spec, vocab_size=engine.info.vocab_size)
    assert m.requests == 40 and m.output_tokens == 120 and m.stopped_by == "requests"
    if scheduler == "static":
        assert m.mean_batch_rows == 4.0  # every batch full
        assert m.queue_ms["max"] < 50  # a request never waits for a whole batch to run


class _FakeEngine:
    """Resolves each request on a thread of its own after ``delay`` s; ``fail`` fails every request."""

    def __init__(self, delay: float = 0.001, fail: bool = False) -> None:
        self.delay, self.fail, self.submitted = delay, fail, 0

    def submit(self, prompt: object, max_new_tokens: int) -> object:
        import threading
        import time
        from concurrent.futures import Future

        self.submitted += 1
        fut: Future[GenerationResult] = Future()
        rid, now = self.submitted, time.perf_counter()

        def finish() -> None:
            time.sleep(self.delay)
            if self.fail:
                fut.set_exception(RuntimeError("injected"))
            else:
                fut.set_result(_result(rid, now, now, now, time.perf_counter(), max_new_tokens, rows=1))

        threading.Thread(target=finish, daemon=True).start()
        return fut


def _requests(n: int) -> list:
    from autotune.workload import Request

    return [Request(i, (5, 6, 7), 2, 0.0) for i in range(n)]


def test_closed_loop_keeps_each_client_to_one_request_and_stops_at_the_end() -> None:
    import time

    from autotune.measure import _closed_loop

    engine = _FakeEngine()
    done, stopped = _closed_loop(engine, _requests(30), 3, [float("inf")])  # type: ignore[arg-type]
    assert len(done) == 30 and stopped == "requests" and engine.submitted == 30
    engine = _FakeEngine(delay=0.01)
    done, stopped = _closed_loop(engine, _requests(10_000), 2, [time.perf_counter() + 0.1])  # type: ignore[arg-type]
    assert stopped == "duration" and 2 <= len(done) < 100


def test_closed_loop_raises_the_requests_error_when_none_finished() -> None:
    from autotune.measure import _closed_loop

    with pytest.raises(RuntimeError, match="injected"):
        _closed_loop(_FakeEngine(fail=True), _requests(8), 4, [float("inf")])  # type: ignore[arg-type]
