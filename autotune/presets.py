"""Built-in model presets: Llama-style architectures that need no download.

Machines without internet cannot fetch hub models, so tests, benchmarks and the quickstart build a real
transformers architecture from one of these configs with seeded random weights (see ``models.py``).
This module is stdlib-only so the tuner process, CLI and dashboard can list and validate presets
without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autotune.errors import ModelError

PRESET_PREFIX = "preset:"
"""A model reference that starts with this names a preset, e.g. ``preset:llama-small``."""

# Special token ids shared with ``models.build_tokenizer`` (<unk>, <s>, </s>, <pad> are ids 0..3).
_SPECIAL_TOKEN_IDS: dict[str, int] = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}


def approx_llama_parameters(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int | None = None,
    head_dim: int | None = None,
    tie_word_embeddings: bool = False,
) -> int:
    """Parameter count of a Llama-style decoder from its config alone (exact for Llama without biases).

    Lets the tuner size a model (memory estimates, feasibility) without building its weights.
    """
    kv_heads = num_key_value_heads or num_attention_heads
    hd = head_dim or hidden_size // num_attention_heads
    q_out, kv_out = num_attention_heads * hd, kv_heads * hd
    attention = hidden_size * q_out + 2 * hidden_size * kv_out + q_out * hidden_size  # q, k, v, o
    mlp = 3 * hidden_size * intermediate_size  # gate, up, down
    norms = 2 * hidden_size  # input + post-attention RMSNorm
    embedding = vocab_size * hidden_size
    lm_head = 0 if tie_word_embeddings else vocab_size * hidden_size
    return embedding + num_hidden_layers * (attention + mlp + norms) + hidden_size + lm_head


def _approx_from_config(config: dict[str, Any]) -> int:
    """``approx_llama_parameters`` fed from a ``LlamaConfig`` kwargs dict."""
    return approx_llama_parameters(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config.get("num_key_value_heads"),
        head_dim=config.get("head_dim"),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
    )


@dataclass(frozen=True)
class Preset:
    """A named model shape; ``config`` holds the kwargs for ``transformers.LlamaConfig``."""

    name: str
    description: str
    config: dict[str, Any] = field(hash=False)
    approx_parameters: int = field(init=False)

    def __post_init__(self) -> None:
        # Derived, not typed in, so it can never disagree with the config.
        object.__setattr__(self, "approx_parameters", _approx_from_config(self.config))


def _llama(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> dict[str, Any]:
    """LlamaConfig kwargs: untied embeddings, 2048 positions, default RoPE, our tokenizer's special ids."""
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        **_SPECIAL_TOKEN_IDS,
    }


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "llama-tiny",
            "Llama, 2 layers, hidden 64, vocab 512 (~0.14M params): builds and generates in ms, for tests.",
            _llama(vocab=512, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2),
        ),
        Preset(
            "llama-small",
            "Llama, 8 layers, hidden 512, vocab 32000 (~58M params): the CPU benchmark model.",
            _llama(vocab=32000, hidden=512, intermediate=1376, layers=8, heads=8, kv_heads=8),
        ),
        Preset(
            "llama-1b",
            "TinyLlama-1.1B shape: 22 layers, hidden 2048, GQA 32/4 heads, vocab 32000 (~1.1B params).",
            _llama(vocab=32000, hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4),
        ),
    )
}


def preset_name(ref: str) -> str | None:
    """The preset name in ``ref`` if it has the ``preset:`` prefix, else None (it is a path or hub id)."""
    return ref[len(PRESET_PREFIX) :] if ref.startswith(PRESET_PREFIX) else None


def get_preset(name: str) -> Preset:
    """Look a preset up by name; an unknown name is a user error that lists the valid choices."""
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(PRESET_PREFIX + n for n in PRESETS)
        raise ModelError(f"unknown model preset {name!r}; known presets: {known}") from None
