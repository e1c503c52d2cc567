"""Load a model and tokenizer from a preset, a local checkpoint directory or a hub id.

One loading path serves all three, so what a test measures on a preset is the same code that loads a
user's checkpoint. The module imports no torch or transformers at the top: the tuner process calls
``classify_model_ref`` (and ``resolve_model`` for presets) to validate a spec without paying for, or
being destabilised by, a model import; only the trial child process calls ``load_model``.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast
from urllib.parse import urlparse

from autotune.errors import ModelError
from autotune.presets import PRESET_PREFIX, PRESETS, Preset, approx_llama_parameters, get_preset, preset_name

if TYPE_CHECKING:
    import torch
    from transformers import (
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
    )

ModelKind = Literal["preset", "local", "hub"]
T = TypeVar("T")

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>")
"""Special tokens of ``build_tokenizer``, ids 0..3 (the preset configs use the same ids)."""
_MIN_VOCAB = len(SPECIAL_TOKENS) + 256

_PATH_PREFIXES = ("/", "./", "../", "~")
_HUB_SEGMENT = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"{_HUB_SEGMENT}(?:/{_HUB_SEGMENT})?")
_NO_NETWORK = {
    "ConnectError",
    "ConnectTimeout",
    "OfflineModeIsEnabled",
    "gaierror",
    "LocalEntryNotFoundError",
}
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class ModelInfo:
    """What the tuner needs to know about a model (sizes for memory and feasibility rules), no weights."""

    ref: str
    kind: ModelKind
    architecture: str
    num_parameters: int
    vocab_size: int
    max_context: int  # 0 when the config records no position limit
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, for the store and for passing to the trial process."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        """Inverse of ``to_dict``; unknown keys are ignored so records from newer versions still load."""
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def _known_presets() -> str:
    return ", ".join(PRESET_PREFIX + name for name in PRESETS)


def _is_hub_id(ref: str) -> bool:
    """The hub's own naming rules: ``name`` or ``org/name``, each at most 96 chars, no ``--`` or ``..``."""
    return (
        _HUB_ID.fullmatch(ref) is not None
        and ".." not in ref
        and "--" not in ref
        and all(len(part) <= 96 for part in ref.split("/"))
    )


#: Real models shipped inside the package (``builtin:NAME``), each trained by a script in bench/.
BUILTIN_PREFIX = "builtin:"


def builtin_models() -> list[str]:
    root = resources.files("autotune") / "data" / "models"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file())


def builtin_path(ref: str) -> Path | None:
    """The checkpoint directory of a ``builtin:NAME`` reference (None for any other reference)."""
    if not ref.startswith(BUILTIN_PREFIX):
        return None
    name = ref.removeprefix(BUILTIN_PREFIX)
    if name not in builtin_models():
        known = ", ".join(BUILTIN_PREFIX + n for n in builtin_models()) or "none"
        raise ModelError(f"unknown built-in model {ref!r} (built-in: {known})")
    return Path(str(resources.files("autotune") / "data" / "models" / name))


def classify_model_ref(ref: str) -> ModelKind:
    """Say whether ``ref`` is a preset, a local directory (``builtin:`` models are shipped ones) or a
    hub id; reject anything else early.

    Torch-free and filesystem-only, so a bad spec fails in the tuner before any trial is spawned.
    """
    if builtin_path(ref) is not None:
        return "local"
    name = preset_name(ref)
    if name is not None:
        get_preset(name)  # raises ModelError listing the known presets
        return "preset"
    if not ref.strip():
        raise ModelError(f"empty model reference; pass a local path, a hub id or one of {_known_presets()}")
    path = Path(ref).expanduser()
    try:
        is_dir, exists = path.is_dir(), path.exists()
    except OSError:  # e.g. a name too long for the filesystem: it is no path we can use
        is_dir = exists = False
    if is_dir:
        return "local"
    if exists:
        raise ModelError(f"model path is not a directory: {ref} (pass the checkpoint directory with config.json)")
    if ref.startswith(_PATH_PREFIXES):
        raise ModelError(f"model path does not exist: {ref}")
    if _is_hub_id(ref):
        return "hub"
    raise ModelError(
        f"not a model reference: {ref!r}; pass a local directory, a hub id (org/name) or one of {_known_presets()}"
    )


def _preset_info(ref: str, preset: Preset) -> ModelInfo:
    cfg = preset.config
    heads = cfg["num_attention_heads"]
    return ModelInfo(
        ref=ref,
        kind="preset",
        architecture="LlamaForCausalLM",
        num_parameters=preset.approx_parameters,
        vocab_size=cfg["vocab_size"],
        max_context=cfg["max_position_embeddings"],
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
    )


def _first_attr(config: Any, *names: str) -> Any:
    """The first of ``names`` that ``config`` sets (configs of different families spell sizes differently)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _config_info(ref: str, kind: ModelKind, config: PretrainedConfig) -> ModelInfo:
    """ModelInfo from a transformers config; parameter count by Llama arithmetic (close for most decoders)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = _first_attr(text, "hidden_size", "n_embd", "d_model")
    layers = _first_attr(text, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first_attr(text, "num_attention_heads", "n_head", "num_heads")
    vocab = _first_attr(text, "vocab_size")
    missing = [
        n for n, v in (("hidden_size", hidden), ("num_layers", layers), ("heads", heads), ("vocab", vocab)) if not v
    ]
    if missing:
        raise ModelError(f"model config of {ref!r} does not give {', '.join(missing)}; is it a decoder-only LM?")
    kv_heads = _first_attr(text, "num_key_value_heads") or heads
    head_dim = _first_attr(text, "head_dim") or hidden // heads
    intermediate = _first_attr(text, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    tied = bool(_first_attr(text, "tie_word_embeddings") or _first_attr(config, "tie_word_embeddings"))
    architectures = getattr(config, "architectures", None) or []
    return ModelInfo(
        ref=ref,
        kind=kind,
        architecture=architectures[0] if architectures else str(getattr(config, "model_type", "unknown")),
        num_parameters=approx_llama_parameters(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            tie_word_embeddings=tied,
        ),
        vocab_size=vocab,
        max_context=int(_first_attr(text, "max_position_embeddings", "n_positions", "seq_length") or 0),
        hidden_size=hidden,
        num_layers=layers,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
    )


# --- loading helpers -------------------------------------------------------------------------------

_LOAD_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, KeyError, ImportError, RuntimeError)


def _quiet() -> None:
    """Silence transformers/hub warnings, retry chatter and the weight-loading bar (trial logs stay readable);
    errors reach the user as one ModelError line. Hub download bars are kept: big downloads need progress.
    """
    import huggingface_hub.utils.logging as hub_logging
    import transformers.utils.logging as tf_logging

    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    hub_logging.set_verbosity_error()


def _is_oom(exc: BaseException) -> bool:
    """OOM must stay OOM (the runner classifies it as such), never be wrapped as a ModelError."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _hub_reason(exc: BaseException) -> str:
    """Name the cause from the exception chain; the hub client's own messages are several lines long."""
    names: set[str] = set()
    seen: BaseException | None = exc
    while seen is not None and len(names) < 20:
        names.add(type(seen).__name__)
        seen = seen.__cause__ or seen.__context__
    if "GatedRepoError" in names:
        return "gated repository; accept its terms on the hub and set HF_TOKEN"
    if "RepositoryNotFoundError" in names:
        return "repository not found (or private; set HF_TOKEN)"
    if names & _NO_NETWORK:
        return "no network"
    return _one_line(exc)


def _offline() -> bool:
    """Offline mode read now, not at import: huggingface_hub freezes HF_HUB_OFFLINE when first imported."""
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().lower()
    return env in _TRUE or bool(constants.HF_HUB_OFFLINE)


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One TCP connect to the hub: without it an offline machine spends ~30 s in the client's retries."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a direct probe says nothing about a proxy; let the client try
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _from_hub(ref: str, what: str, load: Callable[..., T]) -> T:
    """Call ``load`` for a hub id: local cache first (works offline), then the network if reachable."""
    hint = f"pass a local path or a preset ({_known_presets()})"
    try:
        return load(local_files_only=True)
    except _LOAD_ERRORS as exc:
        if _is_oom(exc):
            raise
        if not isinstance(exc, OSError):  # found in the cache but unusable: the network will not help
            raise ModelError(f"cannot load {what} of {ref!r}: {_one_line(exc)}") from exc
        cache_miss = exc
    if _offline():
        raise ModelError(
            f"cannot load {what} of {ref!r} from the hub: offline (HF_HUB_OFFLINE) and not cached; {hint}"
        ) from cache_miss
    if not _hub_reachable():
        raise ModelError(f"cannot load {what} of {ref!r} from the hub: no network; {hint}") from cache_miss
    try:
        return load()
    except _LOAD_ERRORS as exc:
        if _is_oom(exc):
            raise
        raise ModelError(f"cannot load {what} of {ref!r} from the hub: {_hub_reason(exc)}; {hint}") from exc


def _from_local(ref: str, what: str, load: Callable[..., T]) -> T:
    """Call ``load`` for a local directory, never touching the network."""
    try:
        return load(local_files_only=True)
    except _LOAD_ERRORS as exc:
        if _is_oom(exc):
            raise
        raise ModelError(f"cannot load {what} from {ref}: {_one_line(exc)}") from exc


def _load(ref: str, kind: ModelKind, what: str, load: Callable[..., T]) -> T:
    return _from_local(ref, what, load) if kind == "local" else _from_hub(ref, what, load)


def _source(ref: str, kind: ModelKind) -> str:
    if kind != "local":
        return ref
    return str(builtin_path(ref) or Path(ref).expanduser())


def resolve_model(ref: str) -> ModelInfo:
    """Describe a model from its config only (no weights), so the tuner can size the search space cheaply.

    Presets need no transformers import at all; local and hub refs read ``config.json``.
    """
    kind = classify_model_ref(ref)
    if kind == "preset":
        return _preset_info(ref, get_preset(cast(str, preset_name(ref))))
    _quiet()
    from transformers import AutoConfig

    source = _source(ref, kind)
    if kind == "local" and not (Path(source) / "config.json").is_file():
        raise ModelError(f"cannot load model from {ref}: no config.json in that directory")
    config = _load(ref, kind, "the config", lambda **kw: AutoConfig.from_pretrained(source, **kw))
    return _config_info(ref, kind, config)


# --- tokenizer ---------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet of the ByteLevel pre-tokenizer/decoder."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer of exactly ``vocab_size`` tokens that needs no download.

    Every byte is a token, so any text encodes and round-trips; ids past the 260 real tokens are
    ``<extra_N>`` fillers so whatever a random-weight model generates still decodes.
    """
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {_MIN_VOCAB} (4 special + 256 byte tokens), got {vocab_size}")
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_map = _bytes_to_unicode()
    tokens = [*SPECIAL_TOKENS, *(byte_map[b] for b in range(256))]
    tokens += [f"<extra_{i}>" for i in range(vocab_size - len(tokens))]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    unk, bos, eos, pad = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=unk,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        add_bos_token=True,  # Llama convention: prompts start with <s>
        add_eos_token=False,
        padding_side="left",  # decoder-only batched generation continues from the right edge
        clean_up_tokenization_spaces=False,  # keep decode(encode(text)) == text
    )


# --- models ------------------------------------------------------------------------------------------


def _build_preset_model(preset: Preset, seed: int, device: torch.device) -> PreTrainedModel:
    """Seeded random weights, initialised once, directly on ``device``.

    On a GPU the weights are drawn there (a 1B preset builds in about a second instead of several
    on the host), so the same seed gives the same weights per device type, not across types.
    Plain construction runs torch's default init and then transformers' init (~35% of the build
    time wasted on llama-small); ``no_init_weights`` skips the first. Global RNGs are left untouched.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**preset.config)
    gpu = device.type == "cuda"
    with torch.random.fork_rng(devices=[device.index or 0] if gpu else []), torch.device(device if gpu else "cpu"):
        torch.manual_seed(seed)
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # older/newer transformers: construct normally (init twice, still seeded)
            return LlamaForCausalLM(config)
        with no_init_weights():
            model = LlamaForCausalLM(config)
        model.init_weights()
        return model


def load_tokenizer(ref: str) -> PreTrainedTokenizerBase:
    """Just the tokenizer of a model reference (presets: the offline byte-level one)."""
    kind = classify_model_ref(ref)
    if kind == "preset":
        return build_tokenizer(get_preset(cast(str, preset_name(ref))).config["vocab_size"])
    _quiet()
    from transformers import AutoTokenizer

    source = _source(ref, kind)
    return _load(ref, kind, "the tokenizer", lambda **kw: AutoTokenizer.from_pretrained(source, **kw))


def check_variant(reference: str, variant: str) -> ModelInfo:
    """A model variant's info, after checking it can stand in for the reference: it resolves and
    speaks the same tokens (same vocabulary, same token ids). Any problem names the variant."""
    try:
        info = resolve_model(variant)
        ref_vocab, var_vocab = load_tokenizer(reference).get_vocab(), load_tokenizer(variant).get_vocab()
    except ModelError as err:
        raise ModelError(f"model variant {variant!r}: {err}") from None
    if ref_vocab != var_vocab:
        differ = len(set(var_vocab.items()) ^ set(ref_vocab.items()))
        raise ModelError(
            f"model variant {variant!r} has a different tokenizer than the reference {reference!r} "
            f"({len(var_vocab)} vs {len(ref_vocab)} tokens, {differ} entries differ): fidelity and the "
            "workload need the same tokens"
        )
    return info


def load_model(
    ref: str, *, device: str = "cpu", dtype: torch.dtype | None = None, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelInfo]:
    """Load model + tokenizer for inference (eval mode, on ``device``, ``dtype`` or float32).

    Presets get seeded random weights and ``build_tokenizer``; local/hub refs go through the
    Auto classes (no remote code). The returned ModelInfo counts the loaded parameters exactly.
    """
    import torch

    kind = classify_model_ref(ref)
    _quiet()
    dtype = dtype or torch.float32
    try:
        target = torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"invalid device {device!r}: {_one_line(exc)}") from exc

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    if kind == "preset":
        preset = get_preset(cast(str, preset_name(ref)))
        info = _preset_info(ref, preset)
        model = _build_preset_model(preset, seed, target)
        tokenizer = build_tokenizer(preset.config["vocab_size"])
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        info = resolve_model(ref)
        source = _source(ref, kind)
        tokenizer = _load(ref, kind, "the tokenizer", lambda **kw: AutoTokenizer.from_pretrained(source, **kw))
        model = _load(
            ref,
            kind,
            "the model",
            lambda **kw: AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw),
        )
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.generation_config.pad_token_id is None and tokenizer.pad_token_id is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
        info = replace(info, num_parameters=model.num_parameters())

    try:
        model = model.to(device=target, dtype=dtype)
    except (RuntimeError, AssertionError) as exc:  # e.g. "Torch not compiled with CUDA enabled"
        if _is_oom(exc):
            raise
        raise ModelError(f"cannot move model {ref!r} to {device}/{dtype}: {_one_line(exc)}") from exc
    return model.eval(), tokenizer, info
