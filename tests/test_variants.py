"""Model variants: searched as one more knob, each judged against the first model's reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autotune.errors import ModelError, SpecError
from autotune.models import check_variant, load_model
from autotune.spec import parse_spec

from .conftest import TINY_SPEC, run_cli

TINY_LM = "builtin:tiny-lm"


@pytest.fixture(scope="module")
def pruned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 'pruned' variant of the shipped model: its last layer dropped, same tokenizer."""
    model, tok, _ = load_model(TINY_LM)
    model.model.layers = model.model.layers[:-1]
    model.config.num_hidden_layers -= 1
    out = tmp_path_factory.mktemp("variants") / "tiny-lm-pruned"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_model_list_is_the_reference_then_its_variants() -> None:
    spec = parse_spec({"model": [TINY_LM, "./a", "./b"], "slo": {"e2e_ms": {"p95": 100}}})
    assert spec.model == TINY_LM and spec.variants == ["./a", "./b"] and spec.models == [TINY_LM, "./a", "./b"]
    with pytest.raises(SpecError, match="listed twice"):
        parse_spec({"model": [TINY_LM, "./a", "./a"], "slo": {"e2e_ms": {"p95": 100}}})


def test_a_variant_must_speak_the_reference_tokens(pruned: Path) -> None:
    info = check_variant(TINY_LM, str(pruned))
    assert info.num_layers == 3
    with pytest.raises(ModelError, match=r"model variant 'preset:llama-tiny' has a different tokenizer"):
        check_variant(TINY_LM, "preset:llama-tiny")
    with pytest.raises(ModelError, match=r"model variant '/nonexistent/x'"):
        check_variant(TINY_LM, "/nonexistent/x")


def _spec(tmp_path: Path, models: list[str]) -> Path:
    text = TINY_SPEC.read_text().replace("model: preset:llama-tiny", f"model: {json.dumps(models)}")
    text = text.replace("name: tiny", "name: variants").replace("sampler: tpe", "sampler: grid")
    text = text.replace("batch_size: [1, 4, 8]", "batch_size: [4, 8]").replace(
        "quantization: [none, int8-dynamic]", "quantization: [none]"
    )
    text = text.replace("max_queue_delay_ms: [0, 5]", "max_queue_delay_ms: [5]")
    text += "quality: {sequences: 4, tokens: 64, greedy_prompt_tokens: 16, greedy_tokens: 8}\n"
    spec = tmp_path / "variants.yaml"
    spec.write_text(text)
    return spec


def test_variants_are_searched_and_judged_against_the_first_model(tmp_path: Path, pruned: Path) -> None:
    spec = _spec(tmp_path, [TINY_LM, str(pruned)])
    res = run_cli("tune", str(spec), "--export", "best.json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("  trial") and "→" in ln]
    ref_lines = [ln for ln in lines if f"model={TINY_LM}" in ln]
    variant_lines = [ln for ln in lines if f"model={pruned}" in ln]
    assert len(ref_lines) == 2 and len(variant_lines) == 2, res.stderr  # the grid: 2 models x 2 batch sizes
    assert all("KL 0," in ln for ln in ref_lines) and not any("KL 0," in ln for ln in variant_lines)
    doc = json.loads((tmp_path / "best.json").read_text())
    assert doc["model"] == doc["config"]["model"] and doc["model"] in (TINY_LM, str(pruned))


def test_a_bad_variant_stops_the_study_before_any_trial(tmp_path: Path) -> None:
    for variant, expected in (
        ("./missing-model", "model variant './missing-model': model path does not exist"),
        ("preset:llama-tiny", "model variant 'preset:llama-tiny' has a different tokenizer"),
    ):
        res = run_cli("tune", str(_spec(tmp_path, [TINY_LM, variant])), cwd=tmp_path)
        assert res.returncode != 0 and expected in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and "trial 0" not in res.stderr
