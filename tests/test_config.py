"""TrialConfig: keys stay stable across versions, labels name every knob that differs from the default."""

from __future__ import annotations

import hashlib
import json

from autotune.config import BASELINE, KNOBS, TrialConfig


def test_key_of_a_static_config_is_the_key_from_before_the_scheduler_knob() -> None:
    cfg = TrialConfig(batch_size=8, precision="bf16")
    old = {k: v for k, v in cfg.model_dump().items() if k != "scheduler"}
    assert cfg.key() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:12]
    assert cfg.model_copy(update={"scheduler": "continuous"}).key() != cfg.key()


def test_labels_and_knobs() -> None:
    assert BASELINE.label() == "b1 fp32 none x1 eager 0ms"
    assert TrialConfig(batch_size=4, scheduler="continuous").label().endswith(" continuous")
    assert set(KNOBS) == set(TrialConfig.model_fields)
