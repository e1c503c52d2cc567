"""Study specs: what to tune (model), under which load (workload), against which promise (SLO).

A spec is YAML in ``studies/``; :func:`load_spec` validates it with pydantic and turns every
problem into one :class:`~autotune.errors.SpecError` line naming the field and what is allowed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from autotune.config import ArgValue, Attention, Backend, EngineName, Precision, Quantization, Scheduler
from autotune.errors import SpecError

LatencyMetric = Literal["e2e_ms", "ttft_ms", "tpot_ms"]
Percentile = Literal["p50", "p90", "p95", "p99"]
PERCENTILES: dict[str, float] = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0}
SamplerName = Literal["tpe", "nsga2", "gp", "random", "grid"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LengthDist(_Strict):
    """A token-length distribution. ``fixed`` needs ``value``; the others are clipped to [min, max]."""

    distribution: Literal["fixed", "uniform", "normal"] = "fixed"
    value: int | None = Field(None, ge=1)
    min: int = Field(1, ge=1)
    max: int = Field(4096, ge=1)
    mean: float | None = Field(None, gt=0)
    std: float | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _check(self) -> LengthDist:
        if self.distribution == "fixed" and self.value is None:
            raise ValueError("a fixed length needs 'value'")
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        if self.distribution == "normal" and self.mean is None:
            raise ValueError("a normal length distribution needs 'mean' (and optionally 'std')")
        return self

    @property
    def upper(self) -> int:
        """The longest length this distribution can produce."""
        return self.value if self.distribution == "fixed" and self.value is not None else self.max


def _length(value: Any) -> Any:
    return {"distribution": "fixed", "value": value} if isinstance(value, int) else value


class Arrival(_Strict):
    """How requests arrive: a closed loop of clients, a Poisson process, or all at once."""

    type: Literal["closed", "poisson", "offline"] = "closed"
    clients: int | None = Field(None, ge=1, description="closed loop; default batch_size x streams")
    rate: float | None = Field(None, gt=0, description="poisson: requests per second")

    @model_validator(mode="after")
    def _check(self) -> Arrival:
        if self.type == "poisson" and self.rate is None:
            raise ValueError("poisson arrival needs 'rate' (requests per second)")
        return self


class Stability(_Strict):
    """Stability-aware measurement: keep measuring back-to-back windows until the last two agree."""

    tolerance_pct: float = Field(3.0, gt=0, le=100, description="two windows agree within this (% of their mean)")
    max_windows: int = Field(4, ge=2, le=20, description="stop here even if no two windows agreed")


class WorkloadSpec(_Strict):
    """The request stream every trial replays. Output length is forced, so all configs do equal work."""

    requests: int = Field(256, ge=1, le=1_000_000)
    prompt_tokens: LengthDist = Field(default_factory=lambda: LengthDist(value=64))
    output_tokens: LengthDist = Field(default_factory=lambda: LengthDist(value=32))
    arrival: Arrival = Field(default_factory=Arrival)
    max_duration_s: float = Field(
        30.0, gt=0, description="stop issuing requests after this long; in-flight ones still finish"
    )
    warmup_requests: int | None = Field(
        None, ge=0, description="requests run before measuring; default one full round of batches"
    )
    stability: Stability | None = Field(
        None, description="repeat max_duration_s windows until two in a row agree (closed loop only)"
    )
    transport: Literal["in-process", "http"] = Field(
        "http",
        description="http (default): each trial serves its engine with `autotune serve`'s app and a client "
        "process replays the workload over loopback HTTP, as the exported deployment is served and verified, so "
        "the tuned figure is one `autotune serve` reproduces; in-process: clients in the trial process (what "
        "`load_engine` callers get: batches fill faster than over HTTP, so figures are higher than served)",
    )
    seed: int = 0

    _coerce_prompt = field_validator("prompt_tokens", "output_tokens", mode="before")(lambda cls, v: _length(v))

    @model_validator(mode="after")
    def _stability_needs_closed_loop(self) -> WorkloadSpec:
        if self.stability is not None and self.arrival.type != "closed":
            raise ValueError("stability windows need a closed-loop arrival (clients keep the load steady)")
        if self.stability is not None and "transport" not in self.model_fields_set:
            object.__setattr__(self, "transport", "in-process")  # stability windows imply it; the model is frozen
        if self.stability is not None and self.transport == "http":
            raise ValueError("stability windows run in-process: leave them out with transport http")
        return self


#: Fidelity metrics (see :mod:`autotune.quality`): the ones bounded from above, and from below.
QUALITY_MAX_METRICS = ("kl", "perplexity_increase_pct")
QUALITY_MIN_METRICS = ("top1_agreement", "greedy_agreement")
QUALITY_METRICS = QUALITY_MAX_METRICS + QUALITY_MIN_METRICS


class Constraint(_Strict):
    """One SLO clause: ``metric`` (at ``percentile`` for latencies) must stay <= ``max``, or, for
    the agreement metrics, >= ``min``."""

    metric: Literal[
        "e2e_ms",
        "ttft_ms",
        "tpot_ms",
        "peak_memory_mb",
        "kl",
        "perplexity_increase_pct",
        "top1_agreement",
        "greedy_agreement",
    ]
    percentile: Percentile | None = None
    max: float | None = Field(None, gt=0)
    min: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> Constraint:
        latency = self.metric in ("e2e_ms", "ttft_ms", "tpot_ms")
        if latency and self.percentile is None:
            raise ValueError(f"{self.metric} needs a percentile, one of p50, p90, p95, p99")
        if not latency and self.percentile is not None:
            raise ValueError(f"{self.metric} takes a plain number, not a percentile")
        if self.metric in QUALITY_MIN_METRICS:
            if self.min is None or self.max is not None:
                raise ValueError(f"{self.metric} is bounded from below: write min_{self.metric}: 0.9")
        elif self.max is None or self.min is not None:
            how = f"write max_{self.metric}: N" if self.metric in QUALITY_MAX_METRICS else "give it a max"
            raise ValueError(f"{self.metric} is bounded from above: {how}")
        return self

    @property
    def name(self) -> str:
        """``e2e_ms.p95`` style key used in measurements and stored attributes."""
        return f"{self.metric}.{self.percentile}" if self.percentile else self.metric

    @property
    def bound(self) -> float:
        return float(self.min if self.min is not None else self.max)  # type: ignore[arg-type]

    def excess(self, value: float) -> float:
        """How far ``value`` is past the bound, relative to it: <= 0 keeps the promise."""
        if self.min is not None:
            return (self.min - value) / self.min
        return (value - self.bound) / self.bound

    def ok(self, value: float) -> bool:
        return self.excess(value) <= 0

    def describe(self) -> str:
        what = f"{self.percentile} {self.metric}" if self.percentile else self.metric
        return f"{what} >= {self.min:g}" if self.min is not None else f"{what} <= {self.bound:g}"


def _parse_slo(value: Any) -> Any:
    """Accept ``{e2e_ms: {p95: 2000}, peak_memory_mb: 4000, max_kl: 0.05, min_top1_agreement: 0.9}``
    as well as a list of clauses."""
    if not isinstance(value, dict):
        return value
    clauses: list[dict[str, Any]] = []
    for metric, bound in value.items():
        if isinstance(bound, dict):
            clauses += [{"metric": metric, "percentile": p, "max": m} for p, m in bound.items()]
        elif isinstance(metric, str) and metric.startswith(("max_", "min_")) and metric[4:] in QUALITY_METRICS:
            clauses.append({"metric": metric[4:], metric[:3]: bound})
        else:
            clauses.append({"metric": metric, "max": bound})
    return clauses


class SpaceSpec(_Strict):
    """Candidate values per knob. ``None`` means: whatever the probed hardware supports."""

    batch_size: list[Annotated[int, Field(ge=1, le=4096)]] | None = None
    precision: list[Precision] | None = None
    quantization: list[Quantization] | None = None
    streams: list[Annotated[int, Field(ge=1, le=64)]] | None = None
    backend: list[Backend] | None = None
    max_queue_delay_ms: list[Annotated[float, Field(ge=0, le=60_000)]] | None = None
    scheduler: list[Scheduler] | None = None
    attention: list[Attention] | None = None
    pipeline_depth: list[Annotated[int, Field(ge=1, le=4)]] | None = None
    #: Each engine's own knobs by its own names (``vllm: {max_num_batched_tokens: [2048, 8192]}``); ``null``
    #: in a list means "leave the flag to the engine". A knob left out is searched over the engine's defaults.
    vllm: dict[str, list[ArgValue | None]] | None = None
    ctranslate2: dict[str, list[ArgValue | None]] | None = None

    @field_validator("*", mode="after")
    @classmethod
    def _non_empty(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: cls._non_empty(values) for k, values in v.items()}
        if v is not None and not v:
            raise ValueError("an empty list leaves nothing to search; omit the key for the default")
        return sorted(set(v), key=v.index) if v is not None else None

    def engine_space(self, engine: str) -> dict[str, list[ArgValue | None]]:
        """The spec's values for ``engine``'s own knobs (empty: the engine's defaults)."""
        given = getattr(self, engine, None) if engine in OWN_KNOB_ENGINES else None
        return dict(given or {})


#: Engines with knobs of their own (a ``space.<engine>`` section).
OWN_KNOB_ENGINES = ("vllm", "ctranslate2")


class Budget(_Strict):
    trials: int = Field(20, ge=1, le=100_000)
    timeout_s: float | None = Field(None, gt=0, description="wall-time budget for the whole study")
    trial_timeout_s: float = Field(600.0, gt=0, description="a trial running longer is killed")
    patience: int | None = Field(
        None,
        ge=1,
        description="stop early once this many measured trials in a row improved the best feasible tokens/s "
        "by less than min_improvement_pct and a Gaussian process on the measured trials expects less than "
        "that from every unmeasured config",
    )
    min_improvement_pct: float = Field(1.0, ge=0, description="what counts as an improvement for patience")
    engine_probes: int = Field(
        2,
        ge=0,
        le=10,
        description="with several engines searched: trials each engine gets first, near its best batch size, "
        "before the sampler takes over (0: the sampler alone splits the budget)",
    )
    engine_keep: float = Field(
        0.6,
        gt=0,
        le=1,
        description="after the probes, an engine whose best tokens/s is under this fraction of the best feasible "
        "figure any engine reached gets no more trials",
    )
    confirm_runs: int = Field(
        1,
        ge=0,
        le=10,
        description="re-measurements of the winner after the search, in fresh processes; their median is the "
        "figure shown and exported; a winner that misses the SLO on re-measurement is passed over",
    )
    confirm_tolerance_pct: float = Field(
        10.0,
        ge=0,
        le=100,
        description="how far a re-measurement may differ from the search's figure and still confirm it (widened "
        "to the spread the re-measurements themselves show)",
    )
    load_estimate: bool = Field(
        True,
        description="a trial other processes' CPU load disturbed, and that load did not pass, is ranked and "
        "judged against the SLO by its estimate for a quiet machine (its rates times the cores it lacked, "
        "latencies divided); the measurement itself is stored as measured. false: by what it measured",
    )
    reuse_engine: bool = Field(
        True,
        description="keep the trial process and its built model for the next trial when only runtime knobs "
        "(batch size, streams, queue delay, scheduler, pipeline depth) change; false: a fresh process per trial",
    )
    trial_niceness: int = Field(
        19,
        ge=0,
        le=19,
        description="CPU niceness of trial processes: above the tuner's, so that with several workers on one "
        "machine its storage calls are not queued behind other workers' measurements; 0 leaves it alone",
    )


class QualitySpec(_Strict):
    """The fixed, seeded evaluation set each trial's fidelity is measured on (see :mod:`autotune.quality`)."""

    enabled: bool = Field(True, description="measure fidelity in every trial")
    eval_text: str | None = Field(
        None, description="a UTF-8 text file to evaluate on; default: held-out Python docstrings shipped with autotune"
    )
    prompts: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=1, description="evaluate on these prompts instead of windows cut from the text"
    )
    sequences: int = Field(8, ge=1, le=256, description="windows cut from the eval text")
    tokens: int = Field(128, ge=8, le=4096, description="tokens per window (next-token predictions: tokens - 1)")
    greedy_prompt_tokens: int = Field(32, ge=1, le=4096, description="prompt length of the greedy comparison")
    greedy_tokens: int = Field(16, ge=1, le=1024, description="greedy tokens compared with the reference's")
    reference_precision: Precision = Field("fp32", description="the reference: this precision, eager, unquantized")
    top_k: int = Field(32, ge=1, le=1024, description="reference tokens kept per position for the KL")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> QualitySpec:
        if self.greedy_prompt_tokens >= self.tokens:
            raise ValueError(f"greedy_prompt_tokens ({self.greedy_prompt_tokens}) must be < tokens ({self.tokens})")
        return self


class StudySpec(_Strict):
    """A whole study: model, workload, SLO, search space, budget."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-]{1,100}$")
    model: str = Field(min_length=1, description="the model; with variants, the reference they are judged against")
    variants: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list,
        description="other candidates (distilled, pruned, ...), searched as the 'model' knob; or write model: [a, b]",
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    engine: EngineName | Annotated[list[EngineName], Field(min_length=1)] = Field(
        "builtin",
        description="what generates the tokens: builtin (autotune's own), vllm, ctranslate2; a list searches "
        "the engines as a knob (autotune engines lists what is installed)",
    )
    workload: WorkloadSpec = Field(default_factory=WorkloadSpec)
    slo: Annotated[list[Constraint], Field(min_length=1)]
    space: SpaceSpec = Field(default_factory=SpaceSpec)
    budget: Budget = Field(default_factory=Budget)
    quality: QualitySpec = Field(default_factory=QualitySpec)
    objective: Literal["throughput", "pareto"] = Field(
        "throughput",
        description=(
            "throughput: maximize output tokens/s under the SLO constraints; pareto: also minimize the SLO "
            "latency, so the sampler explores the whole tokens/s-latency front. Both record every trial's "
            "SLO latency, so the Pareto front is always there to plot."
        ),
    )
    sampler: SamplerName = Field(
        "gp",
        description="gp: Optuna's Gaussian process after 3 random configs (the default: in replays of recorded "
        "landscapes it reached 99% of the best feasible config in as many or more seeds than TPE); tpe, nsga2, "
        "random (no repeats), grid",
    )
    warm_start: bool = Field(
        False,
        description="a new study first measures the best configs of earlier studies of the same model on the "
        "same hardware (same storage)",
    )
    seed: int = 0
    model_seed: int = Field(0, description="seed of preset random weights")

    _coerce_slo = field_validator("slo", mode="before")(lambda cls, v: _parse_slo(v))

    @model_validator(mode="before")
    @classmethod
    def _model_list(cls, data: Any) -> Any:
        """``model: [reference, variant, ...]`` becomes ``model`` + ``variants``."""
        if isinstance(data, dict) and isinstance(data.get("model"), list):
            models = list(data["model"])
            if not models:
                raise ValueError("model: an empty list names no model")
            data = {**data, "model": models[0], "variants": [*models[1:], *data.get("variants", [])]}
        return data

    @field_validator("variants", mode="after")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("a model variant is listed twice")
        return v

    @property
    def engines(self) -> list[str]:
        """The engines searched, in the spec's order (one for ``engine: NAME``)."""
        names: list[str] = [self.engine] if isinstance(self.engine, str) else list(self.engine)
        return sorted(set(names), key=names.index)

    @property
    def models(self) -> list[str]:
        """The reference model first, then its variants."""
        return [self.model, *(v for v in self.variants if v != self.model)]

    def in_fresh_processes(self) -> StudySpec:
        """This spec with every trial in a new process (``budget.reuse_engine`` off): for repeats of
        one config, whose spread must include the process-to-process part."""
        return self.model_copy(update={"budget": self.budget.model_copy(update={"reuse_engine": False})})

    @model_validator(mode="after")
    def _quality_constraints_need_quality(self) -> StudySpec:
        if not self.quality.enabled and self.quality_constraints:
            names = ", ".join(c.metric for c in self.quality_constraints)
            raise ValueError(f"slo bounds {names} but quality.enabled is false: nothing would measure it")
        return self

    @property
    def latency_constraints(self) -> list[Constraint]:
        return [c for c in self.slo if c.percentile is not None]

    @property
    def quality_constraints(self) -> list[Constraint]:
        return [c for c in self.slo if c.metric in QUALITY_METRICS]

    @property
    def second_objective(self) -> str:
        """The latency the Pareto front trades against throughput: the first latency SLO clause."""
        lat = self.latency_constraints
        return lat[0].name if lat else "e2e_ms.p95"


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed at the parent of ``loc``, for 'unknown field' messages."""
    model: Any = StudySpec
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            continue
        model = field.annotation
        for arg in getattr(model, "__args__", ()):
            if hasattr(arg, "model_fields"):
                model = arg
    return list(getattr(model, "model_fields", {}))


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = f"unknown field (allowed: {', '.join(_fields_at(e['loc']))})"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def parse_spec(data: Any, source: str = "spec") -> StudySpec:
    """Validate a mapping as a :class:`StudySpec`; errors become one SpecError line."""
    if not isinstance(data, dict):
        raise SpecError(
            f"{source}: expected a mapping of fields (model, workload, slo, ...), got {type(data).__name__}"
        )
    try:
        return StudySpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"{source}: {_format_validation_error(err)}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error.

    YAML 1.2 requires unique keys, but PyYAML keeps the last one silently: ``seed: 0`` early in a
    spec and ``seed: 5`` further down would tune with 5 and nobody would know.
    """

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # merged keys (<<) may be overridden: their purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                    seen[key] = line
                except TypeError:  # an unhashable key: construct_mapping reports it
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} on lines {first} and {line}", key_node.start_mark
                    )
        return super().construct_mapping(node, deep=deep)


def _yaml_error(err: yaml.YAMLError) -> str:
    """The first line PyYAML gives, or its problem text (for duplicate keys the line is the context)."""
    problem = getattr(err, "problem", None)
    if problem and str(problem).startswith("duplicate key"):
        return str(problem)
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_spec(path: str | os.PathLike[str]) -> StudySpec:
    """Read and validate a YAML study spec file."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file not found: {p}")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except UnicodeDecodeError as err:
        raise SpecError(f"{p}: not valid YAML ({err})") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{p}: not valid YAML ({_yaml_error(err)})") from None
    spec = parse_spec(data, str(p))
    if spec.name:
        return spec
    return spec.model_copy(update={"name": check_study_name(p.stem, f"{p}: the study name (the file's name)")})


#: Optuna's ``studies.study_name`` (and autotune's own name column) hold at most this many characters.
MAX_STUDY_NAME = 512


def check_study_name(name: str, source: str = "--study") -> str:
    """``name`` if a study may carry it, else one SpecError line.

    A study name travels into the database, the dashboard's URLs, log lines and the comments of
    exported shell scripts, env files and protobuf text: control characters (a newline ends a
    comment and starts a command), invisible format characters (bidi overrides make text read
    differently than it runs) and line/paragraph separators are refused where a name is made,
    and so are names longer than the database column, which SQLite would take and PostgreSQL not.
    """
    import unicodedata

    if not name or not name.strip():
        raise SpecError(f"{source}: a study name cannot be empty")
    if len(name) > MAX_STUDY_NAME:
        raise SpecError(f"{source}: a study name has at most {MAX_STUDY_NAME} characters, this one {len(name)}")
    for i, ch in enumerate(name):
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            raise SpecError(
                f"{source}: a study name cannot contain control or invisible characters "
                f"({unicodedata.name(ch, f'U+{ord(ch):04X}')!s} at position {i + 1}); use letters, digits, ._-"
            )
    if name != name.strip():
        raise SpecError(f"{source}: a study name cannot start or end with whitespace")
    return name
