"""Seeded request streams: prompt and output lengths from the spec, arrival times by pattern.

Prompts are token ids drawn from the model's ordinary vocabulary (never all zeros, never
special tokens), so every config sees the same, realistic-shaped work.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from autotune.spec import LengthDist, WorkloadSpec


@dataclass(frozen=True)
class Request:
    """One request of the workload. ``arrival_s`` is its offset from the start (Poisson/offline)."""

    id: int
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    arrival_s: float = 0.0


def sample_length(dist: LengthDist, rng: random.Random) -> int:
    if dist.distribution == "fixed":
        assert dist.value is not None
        return dist.value
    if dist.distribution == "uniform":
        return rng.randint(dist.min, dist.max)
    assert dist.mean is not None
    value = round(rng.gauss(dist.mean, dist.std or 0.0))
    return max(dist.min, min(dist.max, value))


def build_requests(
    spec: WorkloadSpec, vocab_size: int, *, first_token_id: int = 4, count: int | None = None, seed_offset: int = 0
) -> list[Request]:
    """The workload's requests, identical for every trial with the same spec and vocabulary.

    ``first_token_id`` skips the special tokens at the bottom of the vocabulary.
    ``seed_offset`` gives an independent stream (used for warm-up requests).
    """
    rng = random.Random(spec.seed * 1_000_003 + seed_offset)
    n = spec.requests if count is None else count
    low, high = first_token_id, vocab_size - 1
    if high <= low:
        raise ValueError(f"vocabulary of {vocab_size} tokens is too small for prompts")
    clock, requests = 0.0, []
    for i in range(n):
        plen = sample_length(spec.prompt_tokens, rng)
        olen = sample_length(spec.output_tokens, rng)
        if spec.arrival.type == "poisson":
            assert spec.arrival.rate is not None
            clock += rng.expovariate(spec.arrival.rate)
        prompt = tuple(rng.randint(low, high) for _ in range(plen))
        requests.append(Request(i, prompt, olen, clock))
    return requests


def concurrency(spec: WorkloadSpec, batch_size: int, streams: int) -> int:
    """Closed-loop clients: the spec's number, or enough to fill every stream's batch."""
    return spec.arrival.clients or batch_size * streams
