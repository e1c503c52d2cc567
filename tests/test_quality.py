"""Fidelity against the reference: exact for the reference itself, small for int8, large for a broken model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from autotune.engines.builtin.optimize import QUANTIZERS
from autotune.errors import SpecError
from autotune.hardware import probe
from autotune.models import builtin_path, load_model
from autotune.quality import Reference, build_eval_set, compute_reference, fidelity, text_perplexity
from autotune.runner import _perturb
from autotune.spec import QualitySpec, parse_spec

from .conftest import TINY_SPEC, run_cli

TINY_LM = "builtin:tiny-lm"
Q = QualitySpec(sequences=4, tokens=64, greedy_prompt_tokens=16, greedy_tokens=8)


@pytest.fixture(scope="module")
def shipped() -> tuple[object, object, object]:
    """The shipped model, its tokenizer, and its reference on a small eval set."""
    model, tok, _ = load_model(TINY_LM)
    es = build_eval_set(Q, tok)
    return model, tok, compute_reference(model, es, Q.top_k)


def test_the_reference_against_itself_is_exact(shipped: tuple) -> None:
    model, tok, ref = shipped
    q = fidelity(model, build_eval_set(Q, tok), Reference.from_bytes(ref.to_bytes()))  # through the store format
    assert q["kl"] == 0.0 and q["top1_agreement"] == 1.0 and q["greedy_agreement"] == 1.0
    assert q["perplexity_increase_pct"] == 0.0 and q["perplexity"] == ref.perplexity


def test_int8_is_close_but_not_identical_and_noise_is_far(shipped: tuple) -> None:
    _, tok, ref = shipped
    es, hw = build_eval_set(Q, tok), probe("cpu")
    int8, _, _ = load_model(TINY_LM)
    q8 = fidelity(QUANTIZERS["int8-dynamic"].apply(int8, hw), es, ref)
    assert 0.0 < q8["kl"] < 0.05 and q8["top1_agreement"] >= 0.9
    broken, _, _ = load_model(TINY_LM)
    _perturb(broken)
    qb = fidelity(broken, es, ref)
    assert qb["kl"] > 20 * q8["kl"] and qb["kl"] > 0.1
    assert qb["top1_agreement"] < q8["top1_agreement"] and qb["perplexity_increase_pct"] > 10


def test_shipped_model_heldout_perplexity_matches_its_training_record() -> None:
    root = builtin_path(TINY_LM)
    assert root is not None
    record = json.loads((root / "training.json").read_text())
    model, tok, _ = load_model(TINY_LM)
    ppl = text_perplexity(model, tok, (root / "heldout.txt").read_text(encoding="utf-8"))
    assert ppl == pytest.approx(record["heldout_perplexity"], rel=0.01)
    assert ppl < 200  # trained: far below the vocabulary size a random model would score near
    assert model.config.vocab_size > 1000


def test_eval_set_is_seeded_and_keyed() -> None:
    _, tok, _ = load_model("preset:llama-tiny")
    a, b = build_eval_set(Q, tok), build_eval_set(Q, tok)
    assert a == b and a.key() == b.key() and all(len(w) == Q.tokens for w in a.windows)
    other = build_eval_set(Q.model_copy(update={"seed": 1}), tok)
    assert other.key() != a.key()
    prompts = build_eval_set(QualitySpec(prompts=["def f(x):", "Return the"]), tok)
    assert len(prompts.windows) == 2 and prompts.greedy_prompt_tokens <= min(len(w) for w in prompts.windows)


def test_bad_eval_input_is_one_clear_error(tmp_path: Path) -> None:
    _, tok, _ = load_model("preset:llama-tiny")
    with pytest.raises(SpecError, match="file not found"):
        build_eval_set(QualitySpec(eval_text=str(tmp_path / "nope.txt")), tok)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(SpecError, match="is empty"):
        build_eval_set(QualitySpec(eval_text=str(empty)), tok)
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    with pytest.raises(SpecError, match="fewer than one window"):
        build_eval_set(QualitySpec(eval_text=str(short)), tok)
    with pytest.raises(SpecError, match="at least 2 tokens"):
        build_eval_set(QualitySpec(prompts=["ok then", "x"]), tok)


def test_quality_clauses_parse_and_judge() -> None:
    spec = parse_spec(
        {
            "model": "preset:llama-tiny",
            "slo": {"e2e_ms": {"p95": 100}, "max_kl": 0.05, "min_top1_agreement": 0.9},
        }
    )
    kl, top1 = spec.quality_constraints
    assert kl.describe() == "kl <= 0.05" and top1.describe() == "top1_agreement >= 0.9"
    assert kl.ok(0.01) and not kl.ok(0.1) and top1.ok(0.95) and not top1.ok(0.5)
    assert top1.excess(0.45) == pytest.approx(0.5)
    with pytest.raises(SpecError, match=r"quality\.enabled is false"):
        parse_spec({"model": "preset:llama-tiny", "slo": {"max_kl": 0.1}, "quality": {"enabled": False}})
    with pytest.raises(SpecError, match="write max_kl"):
        parse_spec({"model": "preset:llama-tiny", "slo": [{"metric": "kl", "min": 0.5}]})


def test_a_fast_but_broken_config_is_infeasible_with_its_reason(tmp_path: Path) -> None:
    """A real tune of the shipped model where batch 8 has perturbed weights: never the answer."""
    spec = tmp_path / "quality.yaml"
    text = TINY_SPEC.read_text().replace("preset:llama-tiny", TINY_LM).replace("name: tiny", "name: quality")
    text = text.replace("  e2e_ms: {p95: 2000}", "  e2e_ms: {p95: 2000}\n  max_kl: 0.05")
    text = text.replace("quantization: [none, int8-dynamic]", "quantization: [none]").replace("trials: 4", "trials: 6")
    text += "quality: {sequences: 4, tokens: 64, greedy_prompt_tokens: 16, greedy_tokens: 8}\n"
    spec.write_text(text)
    res = run_cli(
        "tune", str(spec), "--export", "best.json", cwd=tmp_path, env={"AUTOTUNE_INJECT_FAULT": "perturb:batch_size=8"}
    )
    assert res.returncode == 0, res.stderr
    assert "computing the quality reference" in res.stderr
    broken = [line for line in res.stderr.splitlines() if line.startswith("  trial") and "b8 " in line and "→" in line]
    assert broken and all("misses kl <= 0.05 (measured" in line for line in broken), res.stderr
    doc = json.loads((tmp_path / "best.json").read_text())
    assert doc["config"]["batch_size"] != 8
    assert doc["metrics"]["quality"]["kl"] == 0.0 and doc["metrics"]["quality"]["top1_agreement"] == 1.0


def test_reference_is_stored_once_and_reused_by_a_resumed_study(tmp_path: Path) -> None:
    import sqlite3

    spec = tmp_path / "q.yaml"
    spec.write_text(
        TINY_SPEC.read_text().replace("trials: 4", "trials: 1")
        + "quality: {sequences: 2, tokens: 32, greedy_prompt_tokens: 8, greedy_tokens: 4}\n"
    )
    assert run_cli("tune", str(spec), cwd=tmp_path).returncode == 0
    res = run_cli("tune", str(spec), "--trials", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "computing the quality reference" not in res.stderr  # read back from the store
    with sqlite3.connect(tmp_path / "studies" / "autotune.db") as db:
        assert db.execute("SELECT count(*) FROM autotune_references").fetchone() == (1,)


def test_perturb_changes_every_linear_layer() -> None:
    model, _, _ = load_model("preset:llama-tiny")
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights = [m.weight.clone() for m in linears]
    _perturb(model)
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)
    assert all(not torch.equal(w, m.weight) for w, m in zip(weights, linears, strict=True))


def test_an_empty_eval_text_stops_tune_before_any_trial(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n")
    spec = tmp_path / "bad.yaml"
    spec.write_text(TINY_SPEC.read_text() + "quality: {eval_text: empty.txt}\n")
    res = run_cli("tune", str(spec), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "error: quality.eval_text: empty.txt is empty" in res.stderr and "Traceback" not in res.stderr
    assert "trial 0" not in res.stderr
