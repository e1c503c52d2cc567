"""Search-space rules: what the hardware cannot run is never proposed or is rejected early."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from autotune.config import TrialConfig
from autotune.errors import SpaceError
from autotune.models import resolve_model
from autotune.space import SearchSpace, server_context
from autotune.spec import OWN_KNOB_ENGINES, StudySpec, parse_spec

from .conftest import ROOT, make_hw


def spec(**space: object) -> StudySpec:
    return parse_spec({"model": "preset:llama-small", "slo": {"e2e_ms": {"p95": 2000}}, "space": space})


def test_cpu_defaults_drop_gpu_only_values_with_reasons() -> None:
    s = SearchSpace.from_spec(spec(precision=["fp32", "tf32", "bf16"]), make_hw())
    assert "tf32" not in s.values["precision"] and "fp8" not in s.values["quantization"]
    assert "int4-weight-only" not in s.values["quantization"]
    assert "inductor-cudagraphs" not in s.values["backend"]
    assert "NVIDIA GPU" in s.dropped["quantization=fp8"]
    assert "compute capability >= 8.0" in s.dropped["precision=tf32"]
    assert s.values["streams"] == [1, 2]


def test_fp8_needs_compute_capability_89() -> None:
    a100 = SearchSpace.from_spec(spec(), make_hw("cuda", (8, 0)))
    h100 = SearchSpace.from_spec(spec(), make_hw("cuda", (9, 0)))
    assert "fp8" not in a100.values["quantization"] and "this GPU has 8.0" in a100.dropped["quantization=fp8"]
    assert {"fp8", "int4-weight-only"} <= set(h100.values["quantization"])
    assert "inductor-cudagraphs" in h100.values["backend"] and "tf32" in h100.values["precision"]


def test_torchao_missing_hides_its_quantizers() -> None:
    s = SearchSpace.from_spec(spec(), make_hw(torchao=None))
    assert s.values["quantization"] == ["none", "int8-dynamic"]
    assert "torchao" in s.dropped["quantization=int8-weight-only"]


def test_no_compiler_hides_inductor_on_cpu() -> None:
    s = SearchSpace.from_spec(spec(), make_hw(compiler=False))
    assert "inductor" not in s.values["backend"] and "C compiler" in s.dropped["backend=inductor"]
    assert s.values["backend"][0] == "eager"


def test_conflicting_combinations_are_rejected_with_reason() -> None:
    s = SearchSpace.from_spec(spec(), make_hw())
    assert "use precision fp32" in (s.check(TrialConfig(precision="bf16", quantization="int8-dynamic")) or "")
    assert "eager-only" in (s.check(TrialConfig(quantization="int8-dynamic", backend="inductor")) or "")
    assert s.check(TrialConfig(batch_size=8, quantization="int8-dynamic")) is None
    h = SearchSpace.from_spec(spec(), make_hw("cuda", (9, 0)))
    assert "use precision bf16" in (h.check(TrialConfig(quantization="int4-weight-only")) or "")
    assert h.check(TrialConfig(quantization="int4-weight-only", precision="bf16")) is None


def test_memory_estimate_rejects_configs_that_cannot_fit() -> None:
    info = resolve_model("preset:llama-1b")
    s = SearchSpace.from_spec(spec(), make_hw("cuda", (9, 0), memory_mb=8_000), info)
    small, huge = TrialConfig(batch_size=1, precision="bf16"), TrialConfig(batch_size=256, streams=4)
    assert s.check(small) is None
    reason = s.check(huge)
    assert reason is not None and "exceeds 90% of the device's 8,000 MB" in reason
    big, little = s.estimate_memory_mb(huge), s.estimate_memory_mb(small)
    assert big is not None and little is not None and big > little * 3


def test_user_values_that_cannot_run_leave_an_empty_space() -> None:
    with pytest.raises(SpaceError, match="no precision value runs"):
        SearchSpace.from_spec(spec(precision=["tf32"]), make_hw())
    with pytest.raises(SpaceError, match="every combination is rejected"):
        SearchSpace.from_spec(spec(precision=["bf16"], quantization=["int8-dynamic"]), make_hw())


def test_context_longer_than_model_is_refused() -> None:
    sp = parse_spec(
        {
            "model": "preset:llama-tiny",
            "slo": {"e2e_ms": {"p95": 1}},
            "workload": {"prompt_tokens": 2040, "output_tokens": 32},
        }
    )
    with pytest.raises(SpaceError, match="needs 2072 tokens of context"):
        SearchSpace.from_spec(sp, make_hw(), resolve_model("preset:llama-tiny"))


def test_grid_and_suggest_cover_the_space() -> None:
    s = SearchSpace.from_spec(
        spec(
            batch_size=[1, 8],
            precision=["fp32"],
            quantization=["none"],
            streams=[1],
            backend=["eager"],
            max_queue_delay_ms=[0, 10],
        ),
        make_hw(),
    )
    assert s.size() == 4 and len(list(s.grid())) == 4
    study = optuna.create_study(sampler=optuna.samplers.GridSampler(s.optuna_grid()))
    seen: set[TrialConfig] = set()

    def objective(t: optuna.Trial) -> float:
        seen.add(s.suggest(t))
        return 0.0

    study.optimize(objective, n_trials=4)
    assert seen == set(s.grid())


def test_ordinal_knobs_are_searched_by_rank() -> None:
    s = SearchSpace.from_spec(spec(batch_size=[16, 1, 4], streams=[1, 2]), make_hw())
    assert s.values["batch_size"] == [1, 4, 16]  # sorted, so rank order is size order
    assert s.param_name("batch_size") == "batch_size_rank" and s.param_name("streams") == "streams"
    trial = optuna.trial.FixedTrial(
        {
            "batch_size_rank": 2,
            "streams": 2,
            "max_queue_delay_ms_rank": 0,
            "precision": "fp32",
            "quantization": "none",
            "backend": "eager",
        }
    )
    cfg = s.suggest(trial)
    assert cfg.batch_size == 16 and cfg.streams == 2 and cfg.max_queue_delay_ms == 0.0
    assert s.optuna_grid()["batch_size_rank"] == [0, 1, 2]


def test_continuous_scheduler_rules() -> None:
    s = SearchSpace.from_spec(spec(scheduler=["static", "continuous"]), make_hw("cuda", (9, 0), 80_000))
    assert s.values["scheduler"] == ["static", "continuous"]
    ok = TrialConfig(batch_size=8, precision="bf16", scheduler="continuous")
    assert s.check(ok) is None
    assert "streams 1" in (s.check(ok.model_copy(update={"streams": 2})) or "")
    assert "backend eager" in (s.check(ok.model_copy(update={"backend": "inductor"})) or "")
    assert "queue delay" in (s.check(ok.model_copy(update={"max_queue_delay_ms": 5.0})) or "")
    assert "pipeline_depth 1" in (s.check(ok.model_copy(update={"pipeline_depth": 2})) or "")


def test_pipeline_depth_is_opt_in_and_searched_in_order() -> None:
    s = SearchSpace.from_spec(spec(), make_hw())
    assert s.values["pipeline_depth"] == [1] and "opt-in" in s.dropped["pipeline_depth=2"]
    listed = SearchSpace.from_spec(spec(pipeline_depth=[3, 1, 2]), make_hw())
    assert listed.values["pipeline_depth"] == [1, 2, 3] and listed.param_name("pipeline_depth") == "pipeline_depth_rank"
    assert listed.check(TrialConfig(pipeline_depth=3)) is None


def test_cpu_default_space_leaves_continuous_batching_out_with_a_reason() -> None:
    s = SearchSpace.from_spec(spec(), make_hw())
    assert s.values["scheduler"] == ["static"]
    assert "list it in space.scheduler" in s.dropped["scheduler=continuous"]
    gpu = SearchSpace.from_spec(spec(), make_hw("cuda", (9, 0), 80_000))
    assert gpu.values["scheduler"] == ["static", "continuous"]


def test_single_valued_knobs_are_not_study_parameters() -> None:
    s = SearchSpace.from_spec(spec(backend=["eager"], streams=[1], batch_size=[1, 2, 4]), make_hw())
    trial = optuna.trial.FixedTrial(
        {"batch_size_rank": 2, "precision": "fp32", "quantization": "none"} | {s.param_name("max_queue_delay_ms"): 0}
    )
    cfg = s.suggest(trial)
    assert cfg.backend == "eager" and cfg.streams == 1 and cfg.scheduler == "static" and cfg.batch_size == 4
    assert "backend" not in s.optuna_grid() and "scheduler" not in s.optuna_grid()


def test_attention_defaults_per_device() -> None:
    cpu = SearchSpace.from_spec(spec(), make_hw())
    h100 = SearchSpace.from_spec(spec(), make_hw("cuda", (9, 0)))
    assert cpu.values["attention"] == ["sdpa"]  # sdpa-no-cudnn is GPU-only, eager is opt-in on CPU
    assert "NVIDIA GPU" in cpu.dropped["attention=sdpa-no-cudnn"] and "attention=eager" in cpu.dropped
    assert "attention=sdpa-packed" in cpu.dropped  # opt-in on CPU, searched by default on GPU
    assert h100.values["attention"] == ["sdpa", "sdpa-no-cudnn", "eager", "sdpa-packed"]
    assert "paged SDPA" in (h100.check(TrialConfig(scheduler="continuous", attention="eager")) or "")


@pytest.mark.parametrize("path", sorted((ROOT / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_studies_parse_and_keep_every_listed_value_on_an_h100(path: Path) -> None:
    """The GPU check's study must not lose a knob value to a rule before it reaches a GPU."""
    from autotune.spec import load_spec

    study = load_spec(path)
    space = SearchSpace.from_spec(study, make_hw("cuda", (9, 0), memory_mb=143_000))
    listed_values = study.space.model_dump(exclude_none=True)
    for engine in OWN_KNOB_ENGINES:  # an engine's own knobs are searched as ENGINE.NAME
        for name, values in (listed_values.pop(engine, None) or {}).items():
            if f"{engine}.{name}" in space.values:
                assert space.values[f"{engine}.{name}"] == values, f"{engine}.{name}"
    for knob, listed in listed_values.items():
        # CPU-only values (the exported-graph backends) are dropped on a GPU, saying so.
        cpu_only = [v for v in listed if "CPU device only" in space.dropped.get(f"{knob}={v}", "")]
        listed = [v for v in listed if v not in cpu_only]
        assert space.values[knob] == (sorted(listed) if isinstance(listed[0], int | float) else listed), knob


def test_bucketed_scheduler_is_searched_only_when_prompt_lengths_vary() -> None:
    fixed = SearchSpace.from_spec(spec(), make_hw("cuda", (9, 0)))
    assert "bucketed" not in fixed.values["scheduler"] and "one length" in fixed.dropped["scheduler=bucketed"]
    varied_spec = parse_spec(
        {
            "model": "preset:llama-small",
            "slo": {"e2e_ms": {"p95": 2000}},
            "workload": {"prompt_tokens": {"distribution": "uniform", "min": 16, "max": 256}},
        }
    )
    varied = SearchSpace.from_spec(varied_spec, make_hw())
    assert "bucketed" in varied.values["scheduler"]
    assert "no padding to save" in (varied.check(TrialConfig(batch_size=1, scheduler="bucketed")) or "")


# -- engines as a knob ---------------------------------------------------------------------------
class FakeServerEngine:
    """A stand-in for an external engine with two shared knobs and two of its own."""

    name = "vllm"
    kind = "server"
    runtime_knobs = ()

    def version(self) -> str:
        return "0.0-test"

    def require(self) -> str:
        return self.version()

    def knobs(self, hw: object) -> object:
        from autotune.engines import EngineKnob, EngineKnobs

        return EngineKnobs(
            shared={"batch_size": [8, 16, 32, 64], "precision": ["fp32", "bf16"]},
            own={
                "max_num_batched_tokens": EngineKnob("max_num_batched_tokens", (None, 4096), ordinal=True),
                "enable_prefix_caching": EngineKnob("enable_prefix_caching", (False, True)),
            },
            dropped={"quantization=int8-dynamic": "vLLM needs a pre-quantized checkpoint"},
        )

    def conflict(self, cfg: TrialConfig, hw: object) -> str | None:
        return "too many tokens" if cfg.batch_size == 64 and cfg.arg("max_num_batched_tokens") == 4096 else None


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    import autotune.engines as engines

    monkeypatch.setitem(engines._PATHS, "vllm", f"{__name__}:FakeServerEngine")


def engine_spec(engine: object, **space: object) -> StudySpec:
    return parse_spec(
        {"model": "preset:llama-small", "slo": {"e2e_ms": {"p95": 2000}}, "engine": engine, "space": space}
    )


def test_an_engine_list_searches_each_engine_with_only_its_own_knobs(fake_vllm: None) -> None:
    spec = engine_spec(["builtin", "vllm"], batch_size=[4, 8, 16])
    s = SearchSpace.from_spec(spec, make_hw())
    ctx = {"max_model_len": server_context(spec)}  # a server's context is in its config: the launch is exported
    assert ctx["max_model_len"] == 129  # the fidelity check's 128-token windows + 1, above the workload's 96
    assert s.values["engine"] == ["builtin", "vllm"]
    assert s.values["vllm.max_num_batched_tokens"] == [None, 4096]
    configs = [c for c in s.grid() if s.check(c) is None]
    vllm = [c for c in configs if c.engine == "vllm"]
    builtin = [c for c in configs if c.engine == "builtin"]
    assert vllm and builtin and len(set(configs)) == len(configs)  # each config once
    assert {c.batch_size for c in vllm} == {8, 16}  # 4 is the built-in engine's only
    assert all(c.streams == 1 and c.backend == "eager" and c.quantization == "none" for c in vllm)
    assert all(not c.engine_args for c in builtin)
    args = {"max_num_batched_tokens": 4096, "enable_prefix_caching": False, **ctx}  # None: the flag left out
    assert TrialConfig(engine="vllm", engine_args=args, batch_size=8) in vllm
    assert TrialConfig(engine="vllm", engine_args={"enable_prefix_caching": True, **ctx}, batch_size=8) in vllm
    # the other engine's knobs are not the built-in engine's, nor its shared values the other's
    assert "no such knob" in str(s.check(TrialConfig(engine="vllm", batch_size=8, streams=2)))
    assert "pre-quantized" in str(s.check(TrialConfig(engine="vllm", batch_size=8, quantization="int8-dynamic")))
    assert "built-in engine has no such knob" in str(s.check(TrialConfig(engine_args={"block_size": 16})))


def test_a_sampler_is_only_offered_one_parameter_set_per_config(fake_vllm: None) -> None:
    s = SearchSpace.from_spec(engine_spec(["builtin", "vllm"], batch_size=[8, 16]), make_hw())
    ok = s.runnable()
    args = {"enable_prefix_caching": True, "max_model_len": 129}
    cfg = TrialConfig(engine="vllm", batch_size=16, precision="bf16", engine_args=args)
    params = s.params_for(cfg)
    assert params is not None and s.config_for(params) == cfg and ok(params)
    builtin = s.params_for(TrialConfig(batch_size=8))
    assert builtin is not None and ok(builtin)
    assert not ok({**builtin, "vllm.enable_prefix_caching": True})  # the same built-in config again


def test_engine_rules_and_spec_values_apply(fake_vllm: None) -> None:
    s = SearchSpace.from_spec(engine_spec("vllm", vllm={"max_num_batched_tokens": [4096]}), make_hw())
    assert s.values["engine"] == ["vllm"] and s.values["vllm.max_num_batched_tokens"] == [4096]
    assert s.values["batch_size"] == [8, 16, 32, 64]
    args = {"max_num_batched_tokens": 4096, "max_model_len": 129}
    assert s.check(TrialConfig(engine="vllm", batch_size=64, engine_args=args))
    with pytest.raises(SpaceError, match=r"space\.vllm: block_size cannot be searched here"):
        SearchSpace.from_spec(engine_spec("vllm", vllm={"block_size": [16]}), make_hw())


def test_an_engine_that_is_not_installed_is_refused_alone_and_dropped_from_a_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from autotune.engines import EngineUnavailable

    def missing(self: object) -> str:
        raise EngineUnavailable("engine vllm is not installed; install it with: autotune engines install vllm")

    monkeypatch.setattr(FakeServerEngine, "require", missing)
    import autotune.engines as engines

    monkeypatch.setitem(engines._PATHS, "vllm", f"{__name__}:FakeServerEngine")
    with pytest.raises(SpaceError, match="autotune engines install vllm"):
        SearchSpace.from_spec(engine_spec("vllm"), make_hw())
    s = SearchSpace.from_spec(engine_spec(["builtin", "vllm"]), make_hw())
    assert s.values["engine"] == ["builtin"] and "not installed" in s.dropped["engine=vllm"]
