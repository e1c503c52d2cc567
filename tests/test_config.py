"""TrialConfig: keys stay stable across versions, labels name every knob that differs from the default."""

from __future__ import annotations

import hashlib
import json

from autotune.config import BASELINE, KNOBS, TrialConfig


def test_key_at_later_knobs_defaults_is_the_key_from_before_those_knobs() -> None:
    cfg = TrialConfig(batch_size=8, precision="bf16")
    later = ("scheduler", "attention", "model", "pipeline_depth", "engine", "engine_args")
    old = {k: v for k, v in cfg.model_dump().items() if k not in later}
    assert cfg.key() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:12]
    assert cfg.model_copy(update={"scheduler": "continuous"}).key() != cfg.key()
    assert cfg.model_copy(update={"attention": "sdpa-no-cudnn"}).key() != cfg.key()
    assert cfg.model_copy(update={"pipeline_depth": 2}).key() != cfg.key()
    assert (
        cfg.model_copy(update={"attention": "eager"}).key()
        != cfg.model_copy(update={"attention": "sdpa-no-cudnn"}).key()
    )


def test_labels_and_knobs() -> None:
    assert BASELINE.label() == "b1 fp32 none x1 eager 0ms"
    assert TrialConfig(batch_size=4, scheduler="continuous").label().endswith(" continuous")
    assert TrialConfig(batch_size=4, scheduler="bucketed").label() == "b4 fp32 none x1 eager 0ms bucketed"
    assert TrialConfig(attention="sdpa-no-cudnn").label() == "b1 fp32 none x1 eager 0ms attn=sdpa-no-cudnn"
    assert TrialConfig(batch_size=4, pipeline_depth=2).label() == "b4 fp32 none x1 eager 0ms pipe2"
    assert set(KNOBS) | {"engine_args"} == set(TrialConfig.model_fields)  # engine_args: each engine's own knobs
    vllm = TrialConfig(batch_size=8, engine="vllm", engine_args={"max_num_batched_tokens": 2048, "block_size": 16})
    assert vllm.label() == "b8 fp32 none x1 eager 0ms engine=vllm block_size=16 max_num_batched_tokens=2048"


def test_engine_args_are_a_json_object_and_keep_the_config_hashable() -> None:
    cfg = TrialConfig(engine="vllm", engine_args={"enable_prefix_caching": True, "max_num_batched_tokens": 2048})
    doc = cfg.model_dump(mode="json")
    assert doc["engine_args"] == {"enable_prefix_caching": True, "max_num_batched_tokens": 2048}
    assert TrialConfig.model_validate(doc) == cfg and hash(TrialConfig.model_validate(doc)) == hash(cfg)
    assert cfg.arg("enable_prefix_caching") is True and cfg.arg("block_size", 16) == 16
    assert cfg.key() != TrialConfig(engine="vllm").key() != TrialConfig().key()
