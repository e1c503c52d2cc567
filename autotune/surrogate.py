"""How much a study could still gain: constrained expected improvement from a Gaussian process.

The stopping rule (``budget.patience``) asks two questions: has the best feasible throughput stalled
for K measured trials, and does a model of what was measured still expect a worthwhile gain from
any config not yet measured? This module answers the second with numpy alone (whatever the
sampler): one Gaussian process on throughput, one per SLO clause on its excess, expected
improvement over the best feasible throughput times the probability that every clause holds
(Gardner et al., 2014), maximised over the unmeasured candidates. The same score
(:func:`constrained_ei`) decides which of several equally near configs a sampler measures when its
model's proposal is refused or repeated (:func:`autotune.tuner.surrogate_rank`).

Knobs are encoded the way the samplers see them: ordinal knobs (batch size, streams, queue delay)
by their position on a log scale in [0, 1], categorical knobs one-hot. Kernel Matern 5/2 with the
length scale picked by marginal likelihood from a short list; the noise is the measurement's
relative run-to-run spread, so a gain inside the noise is not mistaken for an expected one.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from autotune.config import TrialConfig, knob_value

if TYPE_CHECKING:
    from autotune.space import SearchSpace

#: Length scales (in the [0, 1] encoding) tried for each fit; the most likely one is used.
LENGTH_SCALES = (0.15, 0.25, 0.4, 0.6, 1.0, 1.6)
#: Relative run-to-run noise assumed when none was measured (the CPU landscapes measured 7.6-8.2%).
DEFAULT_NOISE = 0.05
#: Candidates scored at most; larger spaces are sampled (seeded).
MAX_CANDIDATES = 4000


@dataclass(frozen=True)
class Observation:
    """One measured config: its throughput and its SLO excess per clause (<= 0 holds, 1.0 failed)."""

    config: TrialConfig
    tokens_per_s: float
    constraints: Sequence[float]
    failed: bool = False


@dataclass(frozen=True)
class Outlook:
    """What the model expects from the best unmeasured candidate."""

    expected_gain_pct: float  # constrained EI as a share of the best feasible tokens/s
    config: TrialConfig | None  # the candidate with the largest constrained EI
    candidates: int  # unmeasured candidates scored

    def describe(self) -> str:
        if self.config is None:
            return "no unmeasured config is left to expect a gain from"
        return (
            f"a Gaussian process on the {self.candidates} unmeasured configs expects at most "
            f"{self.expected_gain_pct:.2f}% more (from {self.config.label()})"
        )


#: The column marker of an ordinal knob (None is a value: an engine knob left to the engine).
_ORDINAL = object()


class Encoder:
    """Configs as points in [0, 1]^d: log-position for ordinal knobs, one-hot for the others."""

    def __init__(self, values: dict[str, list[Any]], ordinal: Sequence[str]) -> None:
        self.values = values
        self.columns: list[tuple[str, Any]] = []
        self.scales: dict[str, tuple[float, float]] = {}
        for knob, vals in values.items():
            if len(vals) < 2:
                continue
            if knob in ordinal and all(isinstance(v, int | float) for v in vals):
                logs = [math.log1p(float(v)) for v in vals]
                self.scales[knob] = (min(logs), (max(logs) - min(logs)) or 1.0)
                self.columns.append((knob, _ORDINAL))
            else:
                self.columns += [(knob, v) for v in vals]

    def __call__(self, configs: Sequence[TrialConfig]) -> np.ndarray:
        out = np.zeros((len(configs), len(self.columns)))
        for i, cfg in enumerate(configs):
            for j, (knob, value) in enumerate(self.columns):
                v = knob_value(cfg, knob, self.values[knob])
                if value is _ORDINAL:
                    lo, span = self.scales[knob]
                    out[i, j] = (math.log1p(float(v)) - lo) / span
                else:  # one-hot, scaled so two categories lie 1 apart
                    out[i, j] = math.sqrt(0.5) if v == value else 0.0
        return out


def space_candidates(space: SearchSpace, seed: int = 0) -> list[TrialConfig]:
    """The configs of ``space`` its rules let run; a seeded sample of :data:`MAX_CANDIDATES` when more."""
    rng = random.Random(seed)
    kept: list[TrialConfig] = []
    for n, cfg in enumerate(itertools.islice((c for c in space.grid() if space.check(c) is None), 200_000)):
        if len(kept) < MAX_CANDIDATES:
            kept.append(cfg)
        elif (j := rng.randrange(n + 1)) < MAX_CANDIDATES:  # reservoir sampling
            kept[j] = cfg
    return kept


def _matern52(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    d = np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0.0)) / scale
    return (1 + math.sqrt(5) * d + 5 / 3 * d**2) * np.exp(-math.sqrt(5) * d)


class _GP:
    """GP on standardised targets: a ridge-regressed linear mean (so a trend along batch size is
    extrapolated, not forgotten a step past the data) plus a Matern 5/2 residual with a fixed noise
    share; the length scale is the most likely of :data:`LENGTH_SCALES`."""

    RIDGE = 0.1

    def __init__(self, x: np.ndarray, y: np.ndarray, noise_sd: float) -> None:
        self.mean = float(y.mean())
        self.sd = float(y.std()) or max(abs(self.mean), 1.0)
        z = (y - self.mean) / self.sd
        self.w = np.linalg.solve(x.T @ x + self.RIDGE * np.eye(x.shape[1]), x.T @ z)
        z = z - x @ self.w
        noise = min(max((noise_sd / self.sd) ** 2, 1e-6), 1.0)
        best: tuple[float, float, np.ndarray, np.ndarray] | None = None
        for scale in LENGTH_SCALES:
            k = _matern52(x, x, scale) + noise * np.eye(len(x))
            try:
                chol = np.linalg.cholesky(k)
            except np.linalg.LinAlgError:
                continue
            alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, z))
            nll = 0.5 * float(z @ alpha) + float(np.log(np.diag(chol)).sum())
            if best is None or nll < best[0]:
                best = (nll, scale, chol, alpha)
        if best is None:  # cannot happen with noise > 0; keep a defined state anyway
            raise np.linalg.LinAlgError("no length scale gave a positive-definite kernel")
        _, self.scale, self.chol, self.alpha = best
        self.x = x

    def predict(self, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ks = _matern52(xs, self.x, self.scale)
        mu = xs @ self.w + ks @ self.alpha
        v = np.linalg.solve(self.chol, ks.T)
        var = np.maximum(1.0 - (v**2).sum(0), 1e-12)
        return mu * self.sd + self.mean, np.sqrt(var) * self.sd


def _norm_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))


def _norm_pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)


def constrained_ei(
    observations: Sequence[Observation],
    configs: Sequence[TrialConfig],
    values: dict[str, list[Any]],
    ordinal: Sequence[str],
    noise: float = DEFAULT_NOISE,
) -> np.ndarray:
    """Expected improvement of each config over the best feasible throughput measured, times the
    probability that every SLO clause holds there; before anything feasible was measured, that
    probability alone (the first task is to find a config that meets the SLO)."""
    encode = Encoder(values, ordinal)
    xs = encode(configs)
    ran = [o for o in observations if not o.failed]
    feasible = [o.tokens_per_s for o in ran if all(c <= 0 for c in o.constraints)]
    score = np.ones(len(configs))
    if feasible:
        best = max(feasible)
        y = np.array([o.tokens_per_s for o in ran])
        mu, sd = _GP(encode([o.config for o in ran]), y, noise * float(np.mean(y))).predict(xs)
        sd = np.maximum(sd, 1e-9)
        z = (mu - best) / sd
        score = (mu - best) * _norm_cdf(z) + sd * _norm_pdf(z)
    x_all = encode([o.config for o in observations])
    for j in range(len(observations[0].constraints) if observations else 0):
        c = np.array([min(float(o.constraints[j]), 1.0) for o in observations])
        c_mu, c_sd = _GP(x_all, c, noise).predict(xs)
        score = score * _norm_cdf(-c_mu / np.maximum(c_sd, 1e-9))
    return score


def outlook(
    observations: Sequence[Observation],
    candidates: Sequence[TrialConfig],
    values: dict[str, list[Any]],
    ordinal: Sequence[str],
    noise: float = DEFAULT_NOISE,
) -> Outlook | None:
    """Largest constrained expected improvement over ``candidates`` not yet measured, as a share of
    the best feasible throughput; None while nothing feasible was measured (no incumbent to beat)."""
    feasible = [o.tokens_per_s for o in observations if not o.failed and all(c <= 0 for c in o.constraints)]
    if not feasible:
        return None
    seen = {o.config.key() for o in observations}
    todo = [c for c in candidates if c.key() not in seen]
    if not todo:
        return Outlook(0.0, None, 0)
    score = constrained_ei(observations, todo, values, ordinal, noise)
    i = int(np.argmax(score))
    return Outlook(float(score[i]) / max(feasible) * 100, todo[i], len(todo))
