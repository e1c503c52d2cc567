"""Triton Inference Server model (Python backend) for an autotune export.

``autotune export STUDY --format triton --output MODEL_REPOSITORY`` copies this file, unchanged, to
``MODEL_REPOSITORY/NAME/1/model.py`` beside ``autotune-export.json`` (the export document) and writes
``NAME/config.pbtxt``. It serves the export with autotune's own engine, the one the trials measured:
``autotune.load_engine`` applies every exported model knob (precision, quantization, attention,
backend). Triton's dynamic batcher forms the batches (``max_batch_size``,
``max_queue_delay_microseconds``) and its instance group replaces the engine's streams: each instance
runs one engine, and each batch Triton hands it runs as one engine call on exactly those rows
(``Engine.run_batch``; the continuous scheduler batches them continuously).

Requests: ``text_input`` (TYPE_STRING, ``[rows, 1]``, UTF-8 prompts) and optionally ``max_tokens``
(TYPE_INT32, ``[rows, 1]``; default: the tuned workload's longest output); the answer is
``text_output`` (TYPE_STRING, ``[rows, 1]``, the generated text). A request that cannot be served
(empty prompt, too long for the context, a bad ``max_tokens``) gets an error response; the other
requests of the batch are still answered.

The Python backend's interpreter must import autotune and its dependencies (``pip install autotune``
in the Triton image, or an ``EXECUTION_ENV_PATH`` environment). Not imported by autotune itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

EXPORT_FILE = "autotune-export.json"
PLACEHOLDER = "PLACEHOLDER-"
DEFAULT_MAX_TOKENS = 16


def _export_path(args: dict[str, str]) -> Path:
    """The export beside this file; else in the version directory Triton names."""
    here = Path(__file__).resolve().with_name(EXPORT_FILE)
    if here.is_file() or "model_repository" not in args:
        return here
    return Path(args["model_repository"]) / str(args.get("model_version", "1")) / EXPORT_FILE


def _rows(request: Any, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else np.asarray(tensor.as_numpy()).reshape(-1)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TritonPythonModel:
    """Python-backend entry points: initialize once per instance, execute per batch, finalize on unload."""

    def initialize(self, args: dict[str, str]) -> None:
        from autotune.deploy import load_engine
        from autotune.translate import token_limits

        config = json.loads(args["model_config"])
        params = {k: str((v or {}).get("string_value", "")) for k, v in (config.get("parameters") or {}).items()}
        doc = json.loads(_export_path(args).read_text(encoding="utf-8"))
        model = params.get("model") or doc["model"]
        if model.startswith(PLACEHOLDER):
            raise ValueError(
                f'config.pbtxt: the "model" parameter is {model!r}: replace it with the hub id or local path of '
                f"the real model (the export's model {doc['model']!r} cannot be served)"
            )
        # Triton's dynamic batcher forms the batches and its instances run them concurrently: inside one
        # instance the engine runs each batch it is handed, on one stream, with no queue window.
        doc["config"] = {**doc["config"], "streams": 1, "max_queue_delay_ms": 0.0}
        gpu = args.get("model_instance_kind") == "GPU"
        device = f"cuda:{args.get('model_instance_device_id') or 0}" if gpu else "cpu"
        if not gpu:  # the instances split the cores, as the tuned streams did
            instances = sum(int(g.get("count") or 1) for g in config.get("instance_group") or [{}])
            import torch

            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, instances)))
        other = model != doc["model"]
        self.engine = load_engine(doc, model=model, allow_other_model=other, device=device, start=False)
        prompt, total = token_limits(doc)
        self.default_max_tokens = total - prompt if prompt is not None and total is not None else DEFAULT_MAX_TOKENS

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request, in order. The rows of all valid requests run together as the
        batch Triton formed (one engine call per ``batch_size`` rows), each cut at its own max_tokens."""
        rows: list[tuple[list[int], int]] = []
        spans: list[range | str] = []
        for request in requests:
            try:
                mine = self._rows(request)
            except ValueError as err:
                spans.append(str(err))
                continue
            spans.append(range(len(rows), len(rows) + len(mine)))
            rows += mine
        texts: list[str] = []
        failure = ""
        try:
            texts = self._generate(rows)
        except Exception as err:  # the engine failed the batch: say so on each of its requests
            failure = f"{type(err).__name__}: {err}"
        responses = []
        for span in spans:
            if isinstance(span, str) or failure:
                msg = span if isinstance(span, str) else failure
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(msg)))
                continue
            out = np.array([texts[i].encode("utf-8") for i in span], dtype=np.object_).reshape(-1, 1)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", out)]))
        return responses

    def _generate(self, rows: list[tuple[list[int], int]]) -> list[str]:
        engine = self.engine
        size = max(1, engine.config.batch_size)
        texts: list[str] = []
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            outputs = engine.run_batch([ids for ids, _ in chunk], max(n for _, n in chunk))
            texts += [
                str(engine.tokenizer.decode(out[:n], skip_special_tokens=True))
                for out, (_, n) in zip(outputs, chunk, strict=True)
            ]
        return texts

    def _rows(self, request: Any) -> list[tuple[list[int], int]]:
        """Every row of ``request`` as (prompt ids, max tokens), checked: all of them or a ValueError."""
        engine = self.engine
        prompts = _rows(request, "text_input")
        if prompts is None or prompts.size == 0:
            raise ValueError("text_input is missing or empty")
        limits = _rows(request, "max_tokens")
        if limits is None:
            limits = np.full(prompts.size, self.default_max_tokens)
        elif limits.size != prompts.size:
            raise ValueError(f"max_tokens has {limits.size} rows, text_input {prompts.size}")
        rows = []
        for i, (prompt, limit) in enumerate(zip(prompts, limits, strict=True)):
            try:
                ids = engine.encode(_text(prompt))
            except UnicodeDecodeError:
                raise ValueError(f"text_input row {i} is not UTF-8") from None
            if not ids:
                raise ValueError(f"text_input row {i} encodes to no tokens")
            room = engine.max_context - len(ids)
            if room < 1:
                raise ValueError(f"text_input row {i} is {len(ids)} tokens; the context is {engine.max_context}")
            if not 1 <= int(limit) <= room:
                raise ValueError(f"max_tokens row {i} is {int(limit)}; prompt {len(ids)} tokens leaves 1..{room}")
            rows.append((ids, int(limit)))
        return rows

    def finalize(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()
