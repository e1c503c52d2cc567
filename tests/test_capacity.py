"""Capacity mode: the rate search finds where the SLO breaks, from real-shaped measurements."""

from __future__ import annotations

from typing import Any

import pytest

from autotune.capacity import find_capacity, poisson_spec
from autotune.config import TrialConfig
from autotune.measure import Measurement
from autotune.spec import StudySpec, parse_spec

SPEC = parse_spec({"model": "preset:llama-tiny", "slo": {"e2e_ms": {"p95": 100}}, "workload": {"max_duration_s": 2}})


def queue(knee: float) -> Any:
    """A single-server queue: p95 latency explodes as the offered rate nears ``knee`` requests/s."""
    calls: list[float] = []

    def measure(spec: StudySpec, cfg: TrialConfig) -> Measurement:
        rate = spec.workload.arrival.rate
        assert spec.workload.arrival.type == "poisson" and rate is not None
        assert spec.workload.requests >= rate * spec.workload.max_duration_s  # enough to fill the window
        calls.append(rate)
        p95 = 20.0 / max(1e-6, 1 - min(rate / knee, 0.999))
        d = {k: p95 for k in ("p50", "p90", "p95", "p99", "mean", "max")}
        served = min(rate, knee)
        return Measurement(served * 16, served, 10, 160, 2.0, d, d, d, d, 4.0, 100.0, "rss")

    measure.calls = calls  # type: ignore[attr-defined]
    return measure


@pytest.mark.parametrize("start", [10.0, 200.0])
def test_rate_search_brackets_the_knee(start: float) -> None:
    measure = queue(knee=50.0)  # p95 <= 100 ms while rate <= 40 requests/s
    cap = find_capacity(SPEC, TrialConfig(batch_size=4), measure, start, steps=6)
    assert cap.rate is not None and 36.0 <= cap.rate <= 40.0
    assert cap.goodput_tokens_per_s == pytest.approx(cap.rate * 16)
    assert all(p["ok"] == (p["e2e_ms.p95"] <= 100) for p in cap.probes)
    assert len(measure.calls) <= 20


def test_a_config_that_never_breaks_reports_a_lower_bound() -> None:
    cap = find_capacity(SPEC, TrialConfig(), queue(knee=1e9), 5.0, steps=3)
    assert cap.rate == pytest.approx(5.0 * 1.5**2) and all(p["ok"] for p in cap.probes)


def test_poisson_spec_keeps_everything_but_the_arrivals() -> None:
    s = poisson_spec(SPEC, 25.0)
    assert s.workload.arrival.type == "poisson" and s.workload.arrival.rate == 25.0
    assert s.workload.prompt_tokens == SPEC.workload.prompt_tokens and s.slo == SPEC.slo
    with pytest.raises(ValueError, match="start_rate"):
        find_capacity(SPEC, TrialConfig(), queue(1.0), 0.0)
