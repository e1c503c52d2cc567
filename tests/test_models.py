"""Tests for presets and model loading: everything runs offline on the tiny preset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autotune.errors import ModelError
from autotune.models import (
    SPECIAL_TOKENS,
    ModelInfo,
    build_tokenizer,
    classify_model_ref,
    load_model,
    resolve_model,
)
from autotune.presets import PRESET_PREFIX, PRESETS, get_preset, preset_name

ROOT = Path(__file__).resolve().parents[1]
TINY = PRESET_PREFIX + "llama-tiny"


# --- presets ---------------------------------------------------------------------------------------


def test_preset_parameter_counts_are_computed_from_config() -> None:
    assert set(PRESETS) >= {"llama-tiny", "llama-small", "llama-1b"}
    assert 50e6 < get_preset("llama-small").approx_parameters < 65e6
    assert 1.0e9 < get_preset("llama-1b").approx_parameters < 1.2e9
    assert get_preset("llama-tiny").approx_parameters < 1e6


def test_approx_parameters_is_exact_for_built_llama() -> None:
    model, _, info = load_model(TINY)
    assert model.num_parameters() == get_preset("llama-tiny").approx_parameters == info.num_parameters


def test_preset_name_and_unknown_preset() -> None:
    assert preset_name("preset:llama-small") == "llama-small"
    assert preset_name("llama-small") is None
    with pytest.raises(ModelError, match="llama-nope") as err:
        get_preset("llama-nope")
    assert all(PRESET_PREFIX + name in str(err.value) for name in PRESETS)


# --- building and generating -------------------------------------------------------------------------


def test_tiny_builds_and_generates_left_padded_batch() -> None:
    model, tokenizer, info = load_model(TINY)
    assert not model.training and model.dtype == torch.float32
    assert info.kind == "preset" and info.architecture == type(model).__name__ == "LlamaForCausalLM"
    assert (info.vocab_size, info.num_kv_heads, info.head_dim) == (512, 2, 16)
    batch = tokenizer(["hi", "a much longer prompt"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1  # left padded
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)
    assert all(isinstance(text, str) for text in tokenizer.batch_decode(out))


def test_seeded_weights_are_deterministic_and_leave_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, _, _ = load_model(TINY, seed=0)
    assert torch.equal(torch.rand(3), expected)  # building did not consume the caller's RNG
    b, _, _ = load_model(TINY, seed=0)
    c, _, _ = load_model(TINY, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])
    assert sa["model.embed_tokens.weight"].std().item() == pytest.approx(0.02, rel=0.1)  # really initialised


def test_dtype_and_bad_device() -> None:
    model, _, _ = load_model(TINY, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with pytest.raises(ModelError, match="device"):
        load_model(TINY, device="not-a-device")


# --- tokenizer -----------------------------------------------------------------------------------------


def test_tokenizer_round_trips_any_text() -> None:
    tokenizer = build_tokenizer(512)
    text = "héllo wörld 世界 🎉\n\ttabs  and  spaces, \x00 control é"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_has_exact_vocab_and_decodes_every_id() -> None:
    tokenizer = build_tokenizer(1000)
    assert len(tokenizer) == 1000
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == list(SPECIAL_TOKENS)
    assert (tokenizer.unk_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 2, 3)
    assert tokenizer.padding_side == "left"
    assert tokenizer.convert_ids_to_tokens(999) == "<extra_739>"
    assert isinstance(tokenizer.decode(list(range(1000))), str)
    assert all(isinstance(tokenizer.decode([i]), str) for i in range(1000))


def test_tokenizer_minimum_vocab() -> None:
    assert len(build_tokenizer(260)) == 260
    with pytest.raises(ValueError, match="260"):
        build_tokenizer(259)


# --- classifying refs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["org/name", "gpt2", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "a_b/c.d-e"])
def test_classify_hub_ids(ref: str) -> None:
    assert classify_model_ref(ref) == "hub"


def test_classify_presets_and_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert classify_model_ref(TINY) == "preset"
    assert classify_model_ref(str(tmp_path)) == "local"
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    assert classify_model_ref("ckpt") == "local"
    assert classify_model_ref("./ckpt") == "local"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert classify_model_ref("~/ckpt") == "local"


def test_classify_unknown_preset_lists_known() -> None:
    with pytest.raises(ModelError, match="unknown model preset 'nope'") as err:
        classify_model_ref("preset:nope")
    assert "preset:llama-small" in str(err.value)


@pytest.mark.parametrize("ref", ["/no/such/dir", "./missing", "../missing", "~/missing-model-dir"])
def test_classify_missing_path(ref: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ModelError, match="model path does not exist: "):
        classify_model_ref(ref)


def test_classify_file_is_not_a_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="not a directory"):
        classify_model_ref("weights.bin")


@pytest.mark.parametrize("ref", ["", "a/b/c", "org name", "org//name", "-bad", "org/na..me"])
def test_classify_garbage(ref: str) -> None:
    with pytest.raises(ModelError):
        classify_model_ref(ref)


# --- local checkpoints and hub ids ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real local checkpoint directory, written by transformers itself from the tiny preset."""
    path = tmp_path_factory.mktemp("tiny-ckpt")
    model, tokenizer, _ = load_model(TINY, seed=7)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_resolve_and_load_local_checkpoint(checkpoint: Path) -> None:
    info = resolve_model(str(checkpoint))
    preset = resolve_model(TINY)
    assert info.kind == "local" and info.ref == str(checkpoint)
    assert {**info.to_dict(), "ref": TINY, "kind": "preset"} == preset.to_dict()

    model, tokenizer, loaded = load_model(str(checkpoint))
    reference, _, _ = load_model(TINY, seed=7)
    assert loaded == info
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    ref_state = reference.state_dict()
    assert all(torch.equal(v, ref_state[k]) for k, v in model.state_dict().items())
    batch = tokenizer(["x", "longer prompt"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 4


def test_local_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no config\.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelError, match=r"no config\.json"):
        load_model(str(tmp_path))


def test_hub_id_offline_fails_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for call in (resolve_model, load_model):
        with pytest.raises(ModelError, match=r"cannot load .* 'autotune-test/no-such-model' from the hub") as err:
            call("autotune-test/no-such-model")
        message = str(err.value)
        assert "\n" not in message and "offline" in message and PRESET_PREFIX in message


def test_model_info_round_trips() -> None:
    info = resolve_model(PRESET_PREFIX + "llama-1b")  # config arithmetic only: nothing is built
    assert (info.num_layers, info.num_kv_heads, info.head_dim, info.max_context) == (22, 4, 64, 2048)
    assert ModelInfo.from_dict(info.to_dict()) == info
    assert ModelInfo.from_dict({**info.to_dict(), "added_later": 1}) == info


# --- import cost -------------------------------------------------------------------------------------


def test_imports_stay_torch_free() -> None:
    code = (
        "import sys, autotune.presets, autotune.models as m\n"
        "m.classify_model_ref('preset:llama-small'); m.resolve_model('preset:llama-small')\n"
        "heavy = [n for n in ('torch', 'transformers', 'tokenizers') if n in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
