"""A digest of the weights and tokenizer a config was tuned with, so a deployment knows it loads them.

An export names its model by reference (a path, a hub id, ``builtin:``/``preset:``); the files behind
that reference can change (a re-downloaded revision, a hand-edited ``"model"``, a checkpoint saved
again after fine-tuning) and the tuned figures then describe another model. The study records a
digest of the files when it is created; the export carries it; :func:`autotune.load_engine` and
``autotune serve`` compare it with the files they load (a mismatch warns; ``strict`` refuses).

Torch-free: the tuner computes it from the files alone.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path
from typing import Any

#: The files that decide what a model computes: its weights, its tokenizer, its architecture.
DIGEST_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.gguf",
    "*.msgpack",
    "*.h5",
    "config.json",
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "*.model",
    "*.tiktoken",
)
_CHUNK = 1 << 20


def model_dir(ref: str) -> Path | None:
    """The local folder holding ``ref``'s files: a shipped ``builtin:`` model, a checkpoint folder, or a
    hub id's copy in the local cache; None for a preset or a hub id that is not cached here."""
    from autotune.models import builtin_path, classify_model_ref

    builtin = builtin_path(ref)
    if builtin is not None:
        return builtin
    kind = classify_model_ref(ref)
    if kind == "local":
        return Path(ref).expanduser()
    if kind == "hub":
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(ref, local_files_only=True))
        except Exception:  # not in the cache, or no huggingface_hub: nothing to hash here
            return None
    return None


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def model_digest(ref: str, seed: int = 0) -> dict[str, Any] | None:
    """``{"sha256", "files", "bytes", "kind"}`` of ``ref``'s weights, tokenizer and config (the
    sha256 of each file's relative path, size and sha256, sorted), or for a preset, of the
    parameters and seed its weights are generated from; None when the files are not here."""
    from autotune.presets import get_preset, preset_name

    name = preset_name(ref)
    if name is not None:
        preset = get_preset(name)
        blob = json.dumps({"preset": repr(preset), "seed": seed}, sort_keys=True).encode()
        return {"sha256": hashlib.sha256(blob).hexdigest(), "files": 0, "bytes": 0, "kind": "preset parameters + seed"}
    folder = model_dir(ref)
    if folder is None or not folder.is_dir():
        return None
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and any(fnmatch.fnmatch(p.name, pattern) for pattern in DIGEST_PATTERNS)
    )
    if not files:
        return None
    total = hashlib.sha256()
    size = 0
    for p in files:
        n = p.stat().st_size
        size += n
        total.update(f"{p.relative_to(folder).as_posix()}\0{n}\0{_file_sha256(p)}\n".encode())
    return {"sha256": total.hexdigest(), "files": len(files), "bytes": size, "kind": "weights, tokenizer, config"}


def digest_mismatch(recorded: dict[str, Any] | None, ref: str, seed: int = 0) -> str | None:
    """Why the files ``ref`` names now are not the ones ``recorded`` describes, or None when they
    are (or when either side has no digest: an older export, a hub model not cached here)."""
    if not recorded or not recorded.get("sha256"):
        return None
    here = model_digest(ref, seed)
    if here is None or here["sha256"] == recorded["sha256"]:
        return None
    return (
        f"the weights/tokenizer of {ref!r} are not the ones the config was tuned with (sha256 "
        f"{here['sha256'][:12]}… here, {recorded['sha256'][:12]}… tuned; {here['files']} files, "
        f"{here['bytes']:,} bytes here vs {recorded.get('files')} files, {recorded.get('bytes', 0):,} bytes tuned): "
        "its tuned figures may not hold"
    )
