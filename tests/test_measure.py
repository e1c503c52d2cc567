"""Measurement arithmetic against known timings (no model involved)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from autotune.engine import GenerationResult
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
