"""Seeded workloads: same spec, same requests; lengths and arrivals follow the spec."""

from __future__ import annotations

import itertools
import statistics

from autotune.spec import WorkloadSpec, parse_spec
from autotune.workload import build_requests, concurrency


def wl(**kw: object) -> WorkloadSpec:
    return parse_spec({"model": "preset:llama-tiny", "slo": {"e2e_ms": {"p95": 1}}, "workload": kw}).workload


def test_requests_are_deterministic_and_seeded() -> None:
    a = build_requests(wl(requests=20, seed=1), 512)
    assert a == build_requests(wl(requests=20, seed=1), 512)
    assert a != build_requests(wl(requests=20, seed=2), 512)


def test_prompts_avoid_special_tokens_and_are_not_constant() -> None:
    reqs = build_requests(wl(requests=50, prompt_tokens=64, output_tokens=32), 32000, first_token_id=4)
    ids = [t for r in reqs for t in r.prompt_ids]
    assert min(ids) >= 4 and max(ids) < 32000 and len(set(ids)) > 1000
    assert all(len(r.prompt_ids) == 64 and r.max_new_tokens == 32 for r in reqs)


def test_length_distributions_stay_in_bounds() -> None:
    reqs = build_requests(
        wl(
            requests=300,
            prompt_tokens={"distribution": "uniform", "min": 8, "max": 24},
            output_tokens={"distribution": "normal", "mean": 16, "std": 8, "min": 4, "max": 20},
        ),
        512,
    )
    plens = [len(r.prompt_ids) for r in reqs]
    olens = [r.max_new_tokens for r in reqs]
    assert min(plens) == 8 and max(plens) == 24
    assert min(olens) >= 4 and max(olens) <= 20 and 14 < statistics.mean(olens) < 17


def test_poisson_arrivals_have_the_requested_rate() -> None:
    reqs = build_requests(wl(requests=2000, arrival={"type": "poisson", "rate": 50.0}), 512)
    gaps = [b.arrival_s - a.arrival_s for a, b in itertools.pairwise(reqs)]
    assert all(g >= 0 for g in gaps)
    assert 0.018 < statistics.mean(gaps) < 0.022


def test_offline_and_closed_arrivals_start_at_zero() -> None:
    assert {r.arrival_s for r in build_requests(wl(requests=5, arrival={"type": "offline"}), 512)} == {0.0}


def test_closed_loop_concurrency_defaults_to_batch_times_streams() -> None:
    assert concurrency(wl(), 8, 2) == 16
    assert concurrency(wl(arrival={"type": "closed", "clients": 3}), 8, 2) == 3
