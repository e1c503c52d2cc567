"""Capacity mode: the highest request rate at which a config still keeps the SLO (its goodput).

A closed-loop trial says how fast a config runs when clients wait for each other; a service sees
requests arrive on their own schedule. For a few top configs, this replays the study's workload as
a Poisson stream and searches the rate: it grows the rate from the config's closed-loop request
rate until the SLO breaks, then bisects between the last rate that kept it and the first that did
not. Every probe is a real measurement in a trial process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from autotune.config import TrialConfig
from autotune.measure import Measurement
from autotune.spec import StudySpec

Measure = Callable[[StudySpec, TrialConfig], Measurement]


@dataclass
class Capacity:
    """The rate search for one config: every probe, and the best rate that kept the SLO."""

    config: TrialConfig
    probes: list[dict[str, Any]] = field(default_factory=list)  # rate, ok, requests/s, tokens/s, latency
    rate: float | None = None  # requests/s offered at the best probe that kept the SLO
    goodput_tokens_per_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.model_dump(mode="json"),
            "label": self.config.label(),
            "rate": self.rate,
            "goodput_tokens_per_s": self.goodput_tokens_per_s,
            "probes": self.probes,
        }


def poisson_spec(spec: StudySpec, rate: float) -> StudySpec:
    """The study's workload offered as a Poisson stream of ``rate`` requests/s (enough requests to
    fill the measurement window)."""
    w = spec.workload
    n = math.ceil(rate * w.max_duration_s * 1.2) + 8
    workload = w.model_copy(
        update={
            "arrival": w.arrival.model_copy(update={"type": "poisson", "rate": rate, "clients": None}),
            "requests": n,
            "stability": None,
        }
    )
    return spec.model_copy(update={"workload": workload})


def find_capacity(
    spec: StudySpec, cfg: TrialConfig, measure: Measure, start_rate: float, *, steps: int = 5, growth: float = 1.5
) -> Capacity:
    """Search the highest Poisson rate (requests/s) at which ``cfg`` keeps every latency SLO clause.

    Probes ``start_rate`` first, grows by ``growth`` until a probe breaks the SLO (or ``steps``
    probes), then bisects ``steps`` times between the best good and the lowest bad rate.
    """
    if start_rate <= 0:
        raise ValueError("start_rate must be > 0")
    cap = Capacity(cfg)
    # Load decides latency and memory; fidelity does not change with the request rate.
    bounded = [c for c in spec.slo if c.percentile is not None or c.metric == "peak_memory_mb"]

    def probe(rate: float) -> bool:
        m = measure(poisson_spec(spec, rate), cfg)
        ok = all(c.ok(m.value(c.name)) for c in bounded)
        cap.probes.append(
            {
                "rate": rate,
                "ok": ok,
                "requests_per_s": m.requests_per_s,
                "tokens_per_s": m.output_tokens_per_s,
                **{c.name: m.value(c.name) for c in bounded},
            }
        )
        if ok and (cap.rate is None or rate > cap.rate):
            cap.rate, cap.goodput_tokens_per_s = rate, m.output_tokens_per_s
        return ok

    good, bad = 0.0, math.inf
    rate = start_rate
    for _ in range(steps):
        if probe(rate):
            good, rate = rate, rate * growth
        else:
            bad = rate
            break
    if bad == math.inf:
        return cap  # never broke within the probes: the best rate is a lower bound
    if good == 0.0:  # even the first rate broke the SLO: search below it
        rate = bad / growth
        for _ in range(steps):
            if probe(rate):
                good = rate
                break
            bad, rate = rate, rate / growth
    for _ in range(steps if good > 0 else 0):
        mid = (good + bad) / 2
        if probe(mid):
            good = mid
        else:
            bad = mid
    return cap
