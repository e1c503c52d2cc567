"""Models every serving stack can load: ``builtin:`` and ``preset:`` models as checkpoint folders.

vLLM, TGI and Triton load a hub id or a folder with weights, tokenizer and config; autotune's
``builtin:`` models are shipped folders already, and its presets are weights drawn in-process from
a seed. A preset is written once (``save_pretrained``, in a child process: the CLI imports no
torch) into ``$AUTOTUNE_CACHE_DIR/checkpoints`` (default ``~/.cache/autotune``), under a name that
carries its seed and digest, and the deployment files point at that folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from autotune.digest import model_digest
from autotune.models import builtin_path
from autotune.presets import preset_name


def cache_root() -> Path:
    return Path(os.environ.get("AUTOTUNE_CACHE_DIR") or Path.home() / ".cache" / "autotune") / "checkpoints"


def _preset_folder(name: str, ref: str, seed: int) -> Path:
    digest = model_digest(ref, seed)
    assert digest is not None  # a preset always has one
    return cache_root() / f"preset-{name}-seed{seed}-{digest['sha256'][:12]}"


def checkpoint_dir(ref: str, seed: int = 0, *, timeout_s: float = 600.0) -> Path | None:
    """The folder a serving stack loads for ``ref``: a ``builtin:`` model's shipped folder, a preset
    written once (created now if missing), or None when ``ref`` is a path or hub id already."""
    shipped = builtin_path(ref)
    if shipped is not None:
        return shipped.resolve()
    name = preset_name(ref)
    if name is None:
        return None
    folder = _preset_folder(name, ref, seed)
    if not (folder / "config.json").is_file():
        from autotune.runner import write_checkpoint

        write_checkpoint(ref, seed, folder, timeout_s)
    return folder


def servable(doc: dict[str, Any], *, write: bool = True) -> dict[str, Any]:
    """The export document with a ``builtin:``/``preset:`` model replaced by its checkpoint folder,
    for the deployment files of other serving stacks (``model_written_from`` keeps the reference).

    ``write=False`` (the dashboard, which starts no processes) only uses a preset's folder if an
    earlier ``autotune export`` wrote it; otherwise the document is returned as it is and the
    translation writes its placeholder.
    """
    ref = str(doc.get("model") or "")
    seed = int(doc.get("model_seed") or 0)
    name = preset_name(ref)
    if builtin_path(ref) is None and name is None:
        return doc
    if name is not None and not write and not (_preset_folder(name, ref, seed) / "config.json").is_file():
        return doc
    folder = checkpoint_dir(ref, seed)
    assert folder is not None
    return {**doc, "model": str(folder), "model_written_from": ref}
