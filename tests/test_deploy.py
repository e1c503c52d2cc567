"""The exported config as deployments load it: validation, version and hardware checks, the same Engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from autotune.config import TrialConfig
from autotune.deploy import (
    SCHEMA_FILE,
    ConfigFileError,
    HardwareMismatchWarning,
    json_schema,
    load_config,
    load_engine,
)

from .conftest import TINY_SPEC, run_cli


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.json from a real tiny tune."""
    work = tmp_path_factory.mktemp("deploy")
    res = run_cli("tune", str(TINY_SPEC), "--export", "best.json", cwd=work)
    assert res.returncode == 0, res.stderr
    return work / "best.json"


def _edited(export: Path, tmp_path: Path, **changes: Any) -> Path:
    doc = json.loads(export.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = doc
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(doc))
    return path


def test_load_engine_runs_exactly_the_exported_config(export: Path) -> None:
    import autotune

    doc = load_config(export)
    engine = autotune.load_engine(export)  # the documented entry point, from the package root
    try:
        assert engine.config == doc.config and engine.info.ref == doc.model
        prompts = [[11 + i] * 8 for i in range(5)]
        results = engine.generate(prompts, max_new_tokens=4)
        assert [len(r.output_ids) for r in results] == [4] * 5
    finally:
        engine.stop()
    from autotune.engines.builtin.engine import Engine
    from autotune.hardware import probe

    with Engine.build(doc.model, doc.config, probe("cpu"), seed=doc.model_seed) as direct:
        expected = [r.output_ids for r in direct.generate(prompts, 4)]
    assert [r.output_ids for r in results] == expected  # same weights, same knobs, same greedy tokens


def test_async_submit_is_batched(export: Path) -> None:
    import asyncio

    engine = load_engine(export)

    async def many() -> list[Any]:
        return list(await asyncio.gather(*(engine.asubmit([20 + i] * 8, 3) for i in range(6))))

    try:
        results = asyncio.run(many())
    finally:
        engine.stop()
    assert [len(r.output_ids) for r in results] == [3] * 6
    assert max(r.batch_rows for r in results) <= engine.config.batch_size


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"schema_version": 1, "study": "x"', "truncated"),
        ("not json at all", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_unreadable_files_are_one_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ConfigFileError, match=message):
        load_config(path)
    with pytest.raises(ConfigFileError, match="no such file"):
        load_config(tmp_path / "missing.json")


def test_hand_edited_values_name_the_field(export: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match=r"config\.precision: Input should be 'fp32'"):
        load_config(_edited(export, tmp_path, config__precision="fp64"))
    with pytest.raises(ConfigFileError, match=r"config\.turbo: unknown field"):
        load_config(_edited(export, tmp_path, config__turbo=True))
    with pytest.raises(ConfigFileError, match=r"config\.batch_size: Input should be greater than or equal to 1"):
        load_config(_edited(export, tmp_path, config__batch_size=0))


def test_newer_schema_versions_are_refused_with_the_version(export: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="schema version 2 is newer than this autotune reads \\(1\\)"):
        load_config(_edited(export, tmp_path, schema_version=2))


def test_other_model_needs_an_explicit_override(export: Path) -> None:
    with pytest.raises(ConfigFileError, match="tuned for model 'preset:llama-tiny', not 'preset:llama-small'"):
        load_engine(export, model="preset:llama-small", start=False)


def test_other_hardware_warns_or_refuses(export: Path, tmp_path: Path) -> None:
    moved = _edited(export, tmp_path, hardware__fingerprint="0" * 16, hardware__device_name="NVIDIA H100")
    with pytest.raises(ConfigFileError, match="device_name: tuned on 'NVIDIA H100'"):
        load_engine(moved, strict=True, start=False)
    with pytest.warns(HardwareMismatchWarning, match="device_name"):
        engine = load_engine(moved, start=False)
    assert engine.config == load_config(export).config


def test_schema_file_is_current_and_printed_by_the_cli(tmp_path: Path) -> None:
    assert json.loads(SCHEMA_FILE.read_text()) == json_schema()  # regenerate with json_schema() when it changes
    res = run_cli("schema", cwd=tmp_path)
    assert res.returncode == 0 and json.loads(res.stdout)["title"] == "autotune export"
    knobs = json.loads(res.stdout)["$defs"]["TrialConfig"]["properties"]
    assert set(knobs) == set(TrialConfig.model_fields)


def test_the_exported_file_validates_against_the_published_schema(export: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema_rs")
    validator = jsonschema.validator_for(json.loads(SCHEMA_FILE.read_text()))
    doc = json.loads(export.read_text())
    assert validator.is_valid(doc)
    doc["config"]["precision"] = "fp64"
    assert not validator.is_valid(doc)


def test_loading_stays_torch_free_until_the_engine_is_built(export: Path) -> None:
    code = f"import sys, autotune; autotune.load_config({str(export)!r}); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_the_export_carries_a_digest_and_other_weights_warn_or_are_refused(export: Path, tmp_path: Path) -> None:
    """A checkpoint folder tuned, then changed on disk (weights saved again): the export's digest no
    longer matches, load_engine warns (strict: refuses); the unchanged folder loads silently."""
    import shutil
    import warnings

    from autotune.deploy import ModelMismatchWarning
    from autotune.digest import model_digest
    from autotune.models import builtin_path

    doc = json.loads(export.read_text())
    assert doc["model_digest"] == model_digest(doc["model"], doc["model_seed"])
    src = builtin_path("builtin:tiny-lm")
    assert src is not None
    ckpt = tmp_path / "ckpt"
    shutil.copytree(src, ckpt)
    tuned = _edited(export, tmp_path, model=str(ckpt), model_digest=model_digest(str(ckpt)), config__batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModelMismatchWarning)
        load_engine(tuned, start=False)  # the same files: no warning
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # the same size, other last bytes
    with pytest.warns(ModelMismatchWarning, match="not the ones the config was tuned with"):
        load_engine(tuned, start=False)
    with pytest.raises(ConfigFileError, match="not the ones the config was tuned with"):
        load_engine(tuned, start=False, strict=True)


def test_digests_cover_weights_tokenizer_and_presets(tmp_path: Path) -> None:
    from autotune.digest import model_digest

    ckpt = tmp_path / "m"
    ckpt.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        (ckpt / name).write_text(name)
    first = model_digest(str(ckpt))
    assert first is not None and first["files"] == 3  # the README is not what the model computes
    (ckpt / "README.md").write_text("edited")
    assert model_digest(str(ckpt)) == first
    (ckpt / "tokenizer.json").write_text("another vocabulary")
    assert model_digest(str(ckpt))["sha256"] != first["sha256"]  # type: ignore[index]
    a, b = model_digest("preset:llama-tiny", 0), model_digest("preset:llama-tiny", 1)
    assert a and b and a["sha256"] != b["sha256"] and model_digest("preset:llama-tiny", 0) == a
