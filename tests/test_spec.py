"""Spec validation: every error names the field and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from autotune.errors import SpecError
from autotune.spec import MAX_STUDY_NAME, check_study_name, load_spec, parse_spec

from .conftest import ROOT, TINY_SPEC

BASE = {"model": "preset:llama-tiny", "slo": {"e2e_ms": {"p95": 2000}}}


def test_quickstart_and_test_specs_are_valid() -> None:
    qs = load_spec(ROOT / "studies" / "quickstart.yaml")
    assert qs.name == "quickstart" and qs.model == "builtin:tiny-lm"
    assert qs.workload.prompt_tokens.value == 64 and qs.workload.output_tokens.value == 32
    assert [c.name for c in qs.slo] == ["e2e_ms.p95", "kl", "top1_agreement"] and qs.slo[0].max == 2000
    assert load_spec(TINY_SPEC).name == "tiny"


def test_slo_mapping_form_expands_to_clauses() -> None:
    spec = parse_spec(
        {**BASE, "slo": {"e2e_ms": {"p95": 2000, "p50": 800}, "ttft_ms": {"p99": 300}, "peak_memory_mb": 4000}}
    )
    assert [(c.name, c.max) for c in spec.slo] == [
        ("e2e_ms.p95", 2000),
        ("e2e_ms.p50", 800),
        ("ttft_ms.p99", 300),
        ("peak_memory_mb", 4000),
    ]
    assert spec.second_objective == "e2e_ms.p95"


def test_lengths_accept_int_or_distribution() -> None:
    spec = parse_spec(
        {**BASE, "workload": {"prompt_tokens": {"distribution": "uniform", "min": 8, "max": 32}, "output_tokens": 16}}
    )
    assert spec.workload.prompt_tokens.upper == 32
    assert spec.workload.output_tokens.distribution == "fixed" and spec.workload.output_tokens.upper == 16


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"slo": {"e2e_ms": {"p97": 10}}}, "slo.0.percentile: Input should be 'p50', 'p90', 'p95' or 'p99'"),
        ({"slo": {"e2e_ms": {"p95": -5}}}, "slo.0.max: Input should be greater than 0"),
        (
            {"slo": {"latency": {"p95": 5}}},
            "slo.0.metric: Input should be 'e2e_ms', 'ttft_ms', 'tpot_ms', 'peak_memory_mb', 'kl', ",
        ),
        ({"slo": {}}, "slo: List should have at least 1 item"),
        ({"space": {"batch_size": [0, 4]}}, "space.batch_size.0: Input should be greater than or equal to 1"),
        ({"space": {"precision": ["fp64"]}}, "space.precision.0: Input should be 'fp32', 'tf32', 'bf16' or 'fp16'"),
        ({"space": {"streams": []}}, "space.streams: an empty list leaves nothing to search"),
        ({"workload": {"arrival": {"type": "poisson"}}}, "workload.arrival: poisson arrival needs 'rate'"),
        ({"workload": {"arival": {}}}, "workload.arival: unknown field (allowed: requests, prompt_tokens"),
        ({"sampler": "cmaes"}, "sampler: Input should be 'tpe', 'nsga2', 'gp', 'random' or 'grid'"),
        ({"budget": {"trials": 0}}, "budget.trials: Input should be greater than or equal to 1"),
        ({"device": "tpu"}, "device: String should match pattern"),
        ({"model": ""}, "model: String should have at least 1 character"),
    ],
)
def test_bad_fields_name_the_field_and_allowed_values(patch: dict, expected: str) -> None:
    with pytest.raises(SpecError) as exc:
        parse_spec({**BASE, **patch})
    assert expected in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_model_and_slo_are_reported_together() -> None:
    with pytest.raises(SpecError, match="model: Field required; slo: Field required"):
        parse_spec({})


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(listy)


def test_name_defaults_to_file_stem(tmp_path: Path) -> None:
    p = tmp_path / "my-study.yaml"
    p.write_text("model: preset:llama-tiny\nslo: {e2e_ms: {p95: 100}}\n")
    assert load_spec(p).name == "my-study"


@pytest.mark.parametrize("path", sorted((ROOT / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_study_spec_loads(path: Path) -> None:
    assert load_spec(path).name


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "seed: 0\nmodel: preset:llama-tiny\nslo: {e2e_ms: {p95: 100}}\nseed: 5\n",
            "duplicate key 'seed' on lines 1 and 4",
        ),
        (
            "model: preset:llama-tiny\nslo:\n  e2e_ms: {p95: 100}\nworkload:\n  requests: 4\n  requests: 8\n",
            "duplicate key 'requests' on lines 5 and 6",
        ),
        ("model: preset:llama-tiny\nslo: {e2e_ms: {p95: 100, p95: 200}}\n", "duplicate key 'p95' on lines 2 and 2"),
    ],
)
def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path: Path, text: str, message: str) -> None:
    spec = tmp_path / "dup.yaml"
    spec.write_text(text)
    with pytest.raises(SpecError, match=message):
        load_spec(spec)


def test_yaml_merge_keys_may_still_override(tmp_path: Path) -> None:
    spec = tmp_path / "merge.yaml"
    spec.write_text(
        "base: &b {requests: 4, max_duration_s: 1}\nmodel: preset:llama-tiny\nslo: {e2e_ms: {p95: 100}}\n"
        "workload: {<<: *b, requests: 8}\n"
    )
    with pytest.raises(SpecError, match="base"):  # the unknown field, not a duplicate key
        load_spec(spec)


@pytest.mark.parametrize(
    "name",
    ["nl\ntouch PWNED\n#", "cr\rx", "nul\x00", "esc\x1b[31m", "ls\u2028x", "nel\x85x", "bidi\u202ex", "", "  ", " pad"],
)
def test_study_names_with_control_characters_are_refused(name: str) -> None:
    with pytest.raises(SpecError) as exc:
        check_study_name(name)
    assert "\n" not in str(exc.value)


def test_study_names_longer_than_the_database_column_are_refused() -> None:
    assert check_study_name("a" * MAX_STUDY_NAME) == "a" * MAX_STUDY_NAME
    assert check_study_name("größe test/β-2 (x)") == "größe test/β-2 (x)"  # any printable text is fine
    with pytest.raises(SpecError, match=f"at most {MAX_STUDY_NAME} characters, this one 600"):
        check_study_name("a" * 600)


def test_a_spec_file_named_with_a_newline_is_refused(tmp_path: Path) -> None:
    spec = tmp_path / "x\ntouch PWNED.yaml"
    spec.write_text("model: preset:llama-tiny\nslo: {e2e_ms: {p95: 100}}\n")
    with pytest.raises(SpecError, match="the study name"):
        load_spec(spec)
