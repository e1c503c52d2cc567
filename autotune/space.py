"""SearchSpace: the spec's candidate values, cut down to what the hardware can run.

Values the device cannot run are removed up front (with the reason kept for the study
record); combinations that conflict, or that would not fit in memory, are rejected by
:meth:`SearchSpace.check` before any model is loaded.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autotune.config import KNOBS, TrialConfig, knob_value
from autotune.engines.builtin.optimize import REGISTRIES
from autotune.errors import SpaceError
from autotune.hardware import Hardware
from autotune.spec import SpaceSpec, StudySpec

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

    from autotune.engines import EngineKnobs
    from autotune.models import ModelInfo

# Bytes per weight for the memory estimate.
_WEIGHT_BYTES = {"fp32": 4.0, "tf32": 4.0, "bf16": 2.0, "fp16": 2.0}
_QUANT_BYTES = {"int8-dynamic": 1.0, "int8-weight-only": 1.0, "int4-weight-only": 0.5, "fp8": 1.0}
MEMORY_HEADROOM = 0.9
#: Numeric knobs whose order means something to the sampler (throughput and latency move with them).
ORDINAL_KNOBS = ("batch_size", "streams", "max_queue_delay_ms", "pipeline_depth")


#: Values that run on a CPU but are left out of its *default* space because they are slow there;
#: listing them in the spec searches them anyway.
CPU_DEFAULT_EXCLUSIONS: dict[str, str] = {
    "precision=fp16": "fp16 on CPU is emulated (slow); list it in space.precision to search it",
    "scheduler=continuous": (
        "transformers' continuous batching targets GPUs (a paged KV pool, CUDA graphs); "
        "list it in space.scheduler to search it on CPU"
    ),
    "attention=eager": (
        "transformers' eager attention is left out of the CPU default to keep the space small; "
        "list it in space.attention to search it"
    ),
    "attention=sdpa-packed": (
        "transformers already packs grouped-query heads at CPU decode when not compiling; "
        "list it in space.attention to search it"
    ),
    "quantization=int8-weight-only": (
        "torchao's int8 weight-only has no fast CPU kernel in eager mode (slower than fp32 here); "
        "list it in space.quantization to search it"
    ),
}

#: Why the default space does not search a pipelined engine (bench/levers.py measures it).
PIPELINE_REASON = (
    "a pipelined stream only pays where preparing and delivering a batch cost much next to running it, "
    "and it costs a thread each; opt-in: list it in space.pipeline_depth to search it"
)


def weight_bytes(precision: str, quantization: str) -> float:
    """Bytes per weight of a precision with a quantization (``none``: the precision's own)."""
    return _QUANT_BYTES.get(quantization, _WEIGHT_BYTES.get(precision, 4.0))


def default_values(knob: str, hw: Hardware) -> tuple[list[Any], dict[str, str]]:
    """What to search when the spec leaves a knob out, and what was left out of that default and why."""
    gpu = hw.device_type == "cuda"
    if knob == "batch_size":
        return ([1, 2, 4, 8, 16, 32, 64, 128, 256] if gpu else [1, 2, 4, 8, 16, 32, 64]), {}
    if knob == "streams":
        return ([1, 2, 4] if gpu else sorted({1, min(2, hw.cpu_cores)})), {}
    if knob == "max_queue_delay_ms":
        return [0.0, 5.0, 20.0, 50.0], {}
    if knob == "pipeline_depth":
        return [1], {"pipeline_depth=2": PIPELINE_REASON}
    values, left_out = list(REGISTRIES[knob]), {}
    if not gpu:
        exclusions = dict(CPU_DEFAULT_EXCLUSIONS)
        if not hw.cpu_bf16:
            exclusions["precision=bf16"] = (
                "this CPU has no native bf16 (AVX512-BF16/AMX), so bf16 is emulated (slow); "
                "list it in space.precision to search it"
            )
        left_out = {k: r for k, r in exclusions.items() if k.split("=")[1] in values and k.startswith(knob + "=")}
        values = [v for v in values if f"{knob}={v}" not in left_out]
    return values, left_out


@dataclass
class SearchSpace:
    """Per-knob candidate values after hardware filtering, plus the rules for combinations."""

    values: dict[str, list[Any]]
    hardware: Hardware
    model: ModelInfo | None = None
    max_context_tokens: int = 0
    concurrency_rows: int | None = None
    dropped: dict[str, str] = field(default_factory=dict)
    #: Model variants' sizes (ref -> info), for their memory estimates.
    variants: dict[str, ModelInfo] = field(default_factory=dict)
    #: The knobs of each engine searched (engine -> what it runs here); empty: the built-in engine only.
    engines: dict[str, EngineKnobs] = field(default_factory=dict)

    @classmethod
    def from_spec(
        cls,
        spec: StudySpec,
        hw: Hardware,
        model: ModelInfo | None = None,
        variants: dict[str, ModelInfo] | None = None,
    ) -> SearchSpace:
        values: dict[str, list[Any]] = {}
        dropped: dict[str, str] = {}
        given: SpaceSpec = spec.space
        engines = _engine_knobs(spec, hw, dropped)
        for knob in KNOBS:
            if knob == "engine":
                values[knob] = list(engines)
                continue
            if knob == "model":  # the spec's model list, reference first; None: no variants to choose
                values[knob] = spec.models if spec.variants else [None]
                continue
            candidates = getattr(given, knob)
            listed = candidates
            if candidates is None:
                candidates, left_out = default_values(knob, hw) if "builtin" in engines else ([], {})
                dropped.update(left_out)
                if knob == "scheduler" and spec.workload.prompt_tokens.distribution == "fixed":
                    reason = "every prompt of this workload has one length: nothing to bucket"
                    candidates = [v for v in candidates if v != "bucketed"]
                    dropped["scheduler=bucketed"] = reason
            if knob in REGISTRIES and "builtin" in engines:
                kept = []
                for v in candidates:
                    why = REGISTRIES[knob][v].unsupported(hw)
                    if why:
                        dropped[f"{knob}={v}"] = why
                    else:
                        kept.append(v)
                candidates = kept
            elif "builtin" not in engines:
                candidates = []
            candidates = _with_engines_values(knob, candidates, listed, engines, dropped)
            if not candidates:
                why = "; ".join(f"{k}: {r}" for k, r in dropped.items() if k.startswith(knob + "="))
                raise SpaceError(f"search space is empty: no {knob} value runs on {hw.summary()} ({why})")
            values[knob] = sorted(candidates) if knob in ORDINAL_KNOBS else candidates
        for engine, knobs in engines.items():
            values.update(_own_values(engine, knobs, spec.space.engine_space(engine)))
            if engine != "builtin" and _is_server(engine):  # in the config, so its export is the launch measured
                values[f"{engine}.max_model_len"] = [server_context(spec)]
        ctx = spec.workload.prompt_tokens.upper + spec.workload.output_tokens.upper
        if model is not None and ctx > model.max_context:
            raise SpaceError(f"workload needs {ctx} tokens of context but {model.ref} supports {model.max_context}")
        space = cls(values, hw, model, ctx, spec.workload.arrival.clients, dropped, dict(variants or {}), engines)
        if not any(space.check(c) is None for c in itertools.islice(space.grid(), 100_000)):
            first = next(space.grid())
            raise SpaceError(f"search space is empty: every combination is rejected (e.g. {space.check(first)})")
        return space

    # -- enumeration -----------------------------------------------------------------------
    def size(self) -> int:
        n = 1
        for v in self.values.values():
            n *= len(v)
        return n

    def grid(self) -> Any:
        """Every combination, in knob order (a generator of TrialConfig)."""
        keys = list(self.values)
        for combo in itertools.product(*(self.values[k] for k in keys)):
            chosen = dict(zip(keys, combo, strict=True))
            if self._canonical(chosen):
                yield _config(chosen)

    def _canonical(self, chosen: dict[str, Any]) -> bool:
        """Whether the other engines' own knobs sit at their first value (where they are pinned), so
        that each config has one set of parameters."""
        engine = chosen.get("engine", "builtin")
        return all(v == self.values[k][0] for k, v in chosen.items() if "." in k and k.partition(".")[0] != engine)

    def param_name(self, knob: str) -> str:
        """Ordinal knobs with 3+ values are searched by rank (``batch_size_rank``), others by value."""
        return f"{knob}_rank" if knob in ORDINAL_KNOBS and len(self.values[knob]) > 2 else knob

    def ranked_values(self, cfg: TrialConfig) -> dict[str, Any]:
        """The real values of the knobs searched by rank (``batch_size: 32`` beside ``batch_size_rank: 7``),
        stored with each trial so Optuna's own tools (``trials_dataframe``, optuna-dashboard) show them."""
        return {
            k: knob_value(cfg, k, self.values[k])
            for k in self.values
            if len(self.values[k]) > 1 and self.param_name(k) != k
        }

    def suggest(self, trial: optuna.trial.BaseTrial) -> TrialConfig:
        """Ask the sampler for one config. Ranks let TPE/GP/NSGA-II see that batch 8 lies between 4 and 16."""
        params: dict[str, Any] = {}
        for knob, values in self.values.items():
            if len(values) == 1:  # nothing to choose: not a study parameter
                continue
            name = self.param_name(knob)
            if name == knob:
                params[name] = trial.suggest_categorical(knob, values)
            else:
                params[name] = trial.suggest_int(name, 0, len(values) - 1)
        return self.config_for(params)

    def config_for(self, params: dict[str, Any]) -> TrialConfig:
        """The config :meth:`suggest` returns for these Optuna parameters (its inverse: :meth:`params_for`)."""
        chosen: dict[str, Any] = {}
        for knob, values in self.values.items():
            name = self.param_name(knob)
            if len(values) == 1:
                chosen[knob] = values[0]
            else:
                chosen[knob] = params[name] if name == knob else values[params[name]]
        return _config(chosen)

    def runnable(self) -> Callable[[dict[str, Any]], bool]:
        """A cached test of Optuna parameters against :meth:`check`'s rules, for samplers: configs the
        rules reject are never proposed, so no trial (and no model fit) is spent on them."""
        seen: dict[tuple[Any, ...], bool] = {}

        def ok(params: dict[str, Any]) -> bool:
            key = tuple(sorted(params.items()))
            if key not in seen:
                cfg = self.config_for(params)
                seen[key] = self.params_for(cfg) == params and self.check(cfg) is None
            return seen[key]

        return ok

    def params_for(self, cfg: TrialConfig) -> dict[str, Any] | None:
        """The Optuna parameters that make :meth:`suggest` return ``cfg`` (to enqueue it), or None
        when one of its values is not in this space."""
        params: dict[str, Any] = {}
        for knob, values in self.values.items():
            value = knob_value(cfg, knob, values)
            if value not in values:
                return None
            if len(values) > 1:
                name = self.param_name(knob)
                params[name] = value if name == knob else values.index(value)
        return params

    def distributions(self) -> dict[str, BaseDistribution]:
        """The Optuna distribution of each parameter :meth:`suggest` asks for, by parameter name."""
        from optuna.distributions import CategoricalDistribution, IntDistribution

        return {
            self.param_name(k): IntDistribution(0, len(v) - 1)
            if self.param_name(k) != k
            else CategoricalDistribution(list(v))
            for k, v in self.values.items()
            if len(v) > 1
        }

    def optuna_grid(self) -> dict[str, list[Any]]:
        """The GridSampler search space, in the same parameter names as :meth:`suggest`."""
        return {
            self.param_name(k): (list(range(len(v))) if self.param_name(k) != k else list(v))
            for k, v in self.values.items()
            if len(v) > 1
        }

    # -- rules ------------------------------------------------------------------------------
    def estimate_memory_mb(self, cfg: TrialConfig) -> float | None:
        """Weights plus a full KV cache for every row in flight, in MB (None without model info)."""
        m = self.variants.get(cfg.model, self.model) if cfg.model else self.model
        if m is None:
            return None
        wbytes = weight_bytes(cfg.precision, cfg.quantization)
        weights = m.num_parameters * wbytes
        kv_bytes = _WEIGHT_BYTES[cfg.precision]
        rows = cfg.batch_size * cfg.streams
        kv = rows * self.max_context_tokens * m.num_layers * 2 * m.num_kv_heads * m.head_dim * kv_bytes
        # Activations and logits: vocab-sized logits per row dominate for small models.
        logits = rows * m.vocab_size * 4 * 2
        return (weights + kv + logits) / 2**20

    def check(self, cfg: TrialConfig) -> str | None:
        """Why ``cfg`` cannot run here, or None. Called before any model is loaded."""
        hw = self.hardware
        if cfg.model is not None and cfg.model not in self.values["model"]:
            return f"model={cfg.model}: not one of this study's models ({', '.join(map(str, self.values['model']))})"
        if cfg.engine not in self.values.get("engine", ["builtin"]):
            return f"engine={cfg.engine}: not one of this study's engines"
        if cfg.engine == "builtin" and cfg.engine_args:
            return f"{cfg.engine_args[0][0]}: the built-in engine has no such knob"
        if cfg.engine != "builtin":
            return self._engine_check(cfg)
        for knob, registry in REGISTRIES.items():
            tech = registry[getattr(cfg, knob)]
            reason = tech.unsupported(hw) or tech.conflict(cfg, hw)
            if reason:
                return f"{knob}={tech.name}: {reason}"
        est = self.estimate_memory_mb(cfg)
        if est is not None and est > hw.device_memory_mb * MEMORY_HEADROOM:
            limit = f"{MEMORY_HEADROOM:.0%} of the device's {hw.device_memory_mb:,} MB"
            return f"estimated memory {est:,.0f} MB exceeds {limit}"
        return None

    def _engine_check(self, cfg: TrialConfig) -> str | None:
        """:meth:`check` for an engine other than the built-in one: its knobs and its own rules."""
        from autotune.engines import get_engine

        knobs = self.engines.get(cfg.engine)
        if knobs is None:
            return f"engine={cfg.engine}: not searched in this study"
        for knob in KNOBS:
            if knob in ("engine", "model"):
                continue
            value, allowed = getattr(cfg, knob), knobs.shared.get(knob)
            pinned = allowed is None and value != TrialConfig.model_fields[knob].default
            if pinned or (allowed is not None and value not in allowed):
                why = "has no such knob" if allowed is None else "does not run this value here"
                return f"{knob}={value}: " + knobs.dropped.get(f"{knob}={value}", f"engine {cfg.engine} {why}")
        for name, _ in cfg.engine_args:
            if name not in knobs.own and name != "max_model_len":
                return f"{name}: engine {cfg.engine} has no such knob here"
        reason = get_engine(cfg.engine).conflict(cfg, self.hardware)
        if reason:
            return reason
        est = self.estimate_memory_mb(cfg)
        if est is not None and est > self.hardware.device_memory_mb * MEMORY_HEADROOM:
            return f"estimated memory {est:,.0f} MB exceeds {MEMORY_HEADROOM:.0%} of the device's memory"
        return None


def server_context(spec: StudySpec) -> int:
    """The context a server engine is launched with: the workload's longest request, and the fidelity
    check's windows (the server scores them through its API)."""
    ctx = spec.workload.prompt_tokens.upper + spec.workload.output_tokens.upper
    q = spec.quality
    if q.enabled:
        ctx = max(ctx, q.tokens + 1, q.greedy_prompt_tokens + q.greedy_tokens + 1)
    return ctx


def _is_server(engine: str) -> bool:
    from autotune.engines import get_engine

    return get_engine(engine).kind == "server"


def _config(chosen: dict[str, Any]) -> TrialConfig:
    """The TrialConfig for knob values by searched name (``ENGINE.NAME`` keys become engine_args of
    the chosen engine; ``None``, and other engines' knobs, are left out)."""
    fields = {k: v for k, v in chosen.items() if "." not in k}
    engine = fields.get("engine", "builtin")
    args = {}
    for knob, value in chosen.items():
        owner, dot, name = knob.partition(".")
        if dot and owner == engine and value is not None:
            args[name] = value
    return TrialConfig(**fields, engine_args=args)


def _engine_knobs(spec: StudySpec, hw: Hardware, dropped: dict[str, str]) -> dict[str, EngineKnobs]:
    """Each engine the spec searches with its knobs on ``hw``; one not installed is dropped with the
    reason (and refused when it is the only one)."""
    from autotune.engines import EngineUnavailable, get_engine

    engines: dict[str, EngineKnobs] = {}
    for name in spec.engines:
        plugin = get_engine(name)
        try:
            plugin.require()
            knobs = plugin.knobs(hw)
        except EngineUnavailable as err:
            if len(spec.engines) == 1:
                raise SpaceError(str(err)) from None
            dropped[f"engine={name}"] = str(err)
            continue
        engines[name] = knobs
        if name != "builtin":  # the built-in engine's own drops are recorded knob by knob below
            dropped.update({f"{name}: {k}": why for k, why in knobs.dropped.items()})
    if not engines:
        raise SpaceError("no engine of " + ", ".join(spec.engines) + " is installed here")
    return engines


def _with_engines_values(
    knob: str, builtin: list[Any], listed: list[Any] | None, engines: dict[str, EngineKnobs], dropped: dict[str, str]
) -> list[Any]:
    """The built-in engine's values of a shared knob, plus those other engines run here (of the spec's
    list where it gives one); a knob an engine lacks is pinned to its default for it."""
    values = list(builtin)
    for name, knobs in engines.items():
        if name == "builtin":
            continue
        allowed = knobs.shared.get(knob)
        if allowed is None:
            extra = [TrialConfig.model_fields[knob].default]
        else:
            extra = [v for v in (listed if listed is not None else allowed) if v in allowed]
            for v in listed or []:
                if v not in allowed:
                    dropped.setdefault(
                        f"{name}: {knob}={v}", knobs.dropped.get(f"{knob}={v}", f"{name} does not run it here")
                    )
        values += [v for v in extra if v not in values]
    return values


def _own_values(engine: str, knobs: EngineKnobs, given: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """The searched values of ``engine``'s own knobs, as ``ENGINE.NAME`` knobs (the spec's, else the engine's)."""
    unknown = sorted(set(given) - set(knobs.own))
    if unknown:
        why = "; ".join(knobs.dropped.get(k, "no such knob") for k in unknown)
        have = ", ".join(knobs.own) or "none"
        raise SpaceError(f"space.{engine}: {', '.join(unknown)} cannot be searched here ({why}); its knobs: {have}")
    return {f"{engine}.{k}": list(given.get(k) or knob.values) for k, knob in knobs.own.items()}
