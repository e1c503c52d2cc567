"""The stopping rule's model: constrained expected improvement over the configs not yet measured."""

from __future__ import annotations

from typing import Any

import pytest

from autotune.config import TrialConfig
from autotune.surrogate import Observation, outlook

VALUES: dict[str, list[Any]] = {"batch_size": [1, 2, 4, 8, 16, 32], "quantization": ["none", "int8-dynamic"]}
CANDIDATES = [TrialConfig(batch_size=b, quantization=q) for b in VALUES["batch_size"] for q in VALUES["quantization"]]


def seen(batch: int, quant: str, limit_ms: float = 700.0) -> Observation:
    """Throughput and latency both grow with batch; int8 halves latency and doubles throughput."""
    speed = 2.0 if quant == "int8-dynamic" else 1.0
    latency = 100.0 * batch / speed
    cfg = TrialConfig(batch_size=batch, quantization=quant)
    return Observation(cfg, 10.0 * batch * speed, [latency / limit_ms - 1])


def test_a_rising_trend_with_room_under_the_slo_is_worth_measuring_on() -> None:
    early = [seen(b, q) for b in (1, 2) for q in VALUES["quantization"]]  # best b2 int8, far under the SLO
    look = outlook(early, CANDIDATES, VALUES, ["batch_size"])
    assert look is not None and look.expected_gain_pct > 5 and look.candidates == 8
    assert look.config is not None and look.config.batch_size > 2


def test_past_the_slo_edge_nothing_worthwhile_is_left() -> None:
    # Every batch up to 16 measured: b16 int8 and b8 none already miss the SLO, so b32 cannot help.
    dense = [seen(b, q) for b in (1, 2, 4, 8, 16) for q in VALUES["quantization"]]
    look = outlook(dense, CANDIDATES, VALUES, ["batch_size"])
    assert look is not None and look.expected_gain_pct < 1 and look.candidates == 2
    assert "expects at most" in look.describe()


def test_failures_count_as_infeasible_and_an_exhausted_space_expects_nothing() -> None:
    dense = [seen(b, q) for b in (1, 2, 4, 8, 16) for q in VALUES["quantization"]]
    oom = [Observation(TrialConfig(batch_size=32, quantization=q), 0.0, [1.0], True) for q in VALUES["quantization"]]
    look = outlook(dense + oom, CANDIDATES, VALUES, ["batch_size"])
    assert look is not None and look.expected_gain_pct == 0 and look.config is None
    assert "no unmeasured config" in look.describe()


def test_no_feasible_incumbent_means_no_outlook() -> None:
    assert outlook([seen(32, "none")], CANDIDATES, VALUES, ["batch_size"]) is None


@pytest.mark.parametrize("noise", [0.0, 0.05, 0.5])
def test_any_noise_level_gives_a_finite_answer(noise: float) -> None:
    early = [seen(b, q) for b in (1, 2) for q in VALUES["quantization"]] * 2  # repeats: a singular kernel without noise
    look = outlook(early, CANDIDATES, VALUES, ["batch_size"], noise=noise)
    assert look is not None and 0 <= look.expected_gain_pct < float("inf")
