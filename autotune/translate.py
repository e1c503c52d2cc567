"""Translations of the export document into deployment configs for vLLM, TGI and Triton.

autotune measures its own engine (transformers + PyTorch); serving stacks expose different knobs. Each
translation therefore says, knob by knob, whether it *maps*, maps *approximately* (and why), or has *no
equivalent* (and why), as comments in the output: nothing is dropped silently. Only what was tuned is
emitted: a config tuned on a CPU gets no CUDA graph flags. Torch-free, so the CLI and the dashboard can
call it without importing the engine.

Every field of the export document may be hostile (a study name, model path or device name with line
breaks, quotes, ``$(...)``): each value is written in its target's own quoting, or not at all. Comment
lines are escaped to one printable line (:func:`escape_text`); the vLLM model is one single-quoted sh
word; env-file values are only written where docker, compose and python-dotenv read them back as-is
(:func:`env_value_ok`); pbtxt strings are escaped literals (:func:`pbtxt_string`); the Triton name is
reduced to ``[A-Za-z0-9._-]``. A model reference that cannot be one (:func:`model_ref_ok`) becomes a
PLACEHOLDER that fails loudly, like an autotune preset's.

Mappings follow these documentation pages (checked 2026-11):

- vLLM: engine arguments of ``vllm serve`` (https://docs.vllm.ai/en/stable/configuration/engine_args/:
  ``--dtype {auto,half,float16,bfloat16,float,float32}``, ``--quantization``, ``--max-num-seqs``,
  ``--max-model-len``, ``--enforce-eager``, ``--scheduling-policy {fcfs,priority}``), optimization levels
  ``-O0..-O3`` (https://docs.vllm.ai/en/latest/design/optimization_levels/), in-flight bitsandbytes
  quantization (https://docs.vllm.ai/en/stable/features/quantization/bnb/).
- TGI: text-generation-launcher arguments and their environment variables
  (https://huggingface.co/docs/text-generation-inference/reference/launcher: ``MODEL_ID``, ``DTYPE``
  {float16, bfloat16}, ``QUANTIZE`` {awq, compressed-tensors, eetq, exl2, gptq, marlin, bitsandbytes,
  bitsandbytes-nf4, bitsandbytes-fp4, fp8}, ``MAX_BATCH_SIZE``, ``MAX_INPUT_TOKENS``, ``MAX_TOTAL_TOKENS``,
  ``CUDA_GRAPHS``, ``WAITING_SERVED_RATIO``, ``MAX_WAITING_TOKENS``).
- Triton: model configuration
  (https://docs.nvidia.com/deeplearning/triton-inference-server/user-guide/docs/user_guide/model_configuration.html:
  ``max_batch_size``, ``instance_group [{count, kind: KIND_GPU|KIND_CPU}]``, ``parameters``, ``optimization``),
  the dynamic batcher (.../user_guide/batcher.html: ``dynamic_batching { max_queue_delay_microseconds }``),
  and the Python backend (https://github.com/triton-inference-server/python_backend: ``TritonPythonModel``
  with ``initialize(args)`` / ``execute(requests)`` / ``finalize()``, ``pb_utils.get_input_tensor_by_name``,
  ``Tensor``, ``InferenceResponse``, TYPE_STRING as numpy object arrays of bytes). The Triton export is a
  model repository entry (:func:`triton_repository`): config.pbtxt, and ``1/model.py``
  (``autotune/triton_model.py``) which serves the export beside it with autotune's own engine.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import re
import shlex
import shutil
import tarfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

PRESET_PREFIX = "preset:"  # same as autotune.presets.PRESET_PREFIX, kept literal to stay import-light

Status = Literal["maps", "approximate", "no equivalent"]


@dataclass(frozen=True)
class Knob:
    """How one autotune knob lands in the target: ``status`` plus a short reason (the comment line)."""

    name: str
    value: Any
    status: Status
    note: str

    def line(self) -> str:
        value = f"{self.value:g}" if isinstance(self.value, float) else self.value
        return f"{self.name}={value}: {self.status}: {self.note}"


# -- escaping: every free-text value is hostile until written for its language ----------------------------
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(ch: str) -> str:
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    o = ord(ch)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def escape_text(value: Any) -> str:
    """``value`` as text that stays on one line in any file: backslashes doubled, and every character
    ``str.isprintable`` rejects written as a Python-style escape (``\\n``, ``\\x1b``, ``\\u2028``): line
    breaks of every kind (LF, CR, VT, FF, NEL, U+2028/U+2029), NUL and the other C0/C1 controls,
    format characters (bidi overrides), lone surrogates, non-space blanks. What is left cannot end a
    ``#`` comment in sh, an env file or protobuf text, nor hide text from a reader (U+202E)."""
    return "".join("\\\\" if ch == "\\" else ch if ch.isprintable() else _escape_char(ch) for ch in str(value))


def comment(line: str, prefix: str = "# ") -> str:
    """One ``#`` comment line (sh, env files and protobuf text share the syntax) whose text is escaped."""
    return prefix + escape_text(line) if line else prefix.rstrip()


def pbtxt_string(value: Any) -> str:
    """A protobuf text-format string literal: double-quoted, ``"`` and ``\\`` backslashed, printable
    characters as UTF-8, everything else (controls, line separators, NUL) as octal escapes of its
    UTF-8 bytes, which protobuf's C++ and Python parsers both read back to the same string. A lone
    surrogate (not encodable) becomes U+FFFD."""
    out = []
    for ch in str(value):
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        elif 0xD800 <= ord(ch) <= 0xDFFF:
            out.append("\ufffd")
        else:
            out.append("".join(f"\\{b:03o}" for b in ch.encode("utf-8")))
    return '"' + "".join(out) + '"'


#: Characters that make an env-file value read differently by docker's ``--env-file`` (no quoting at all,
#: the value runs to the end of the line), docker compose and python-dotenv (quotes, ``#`` comments,
#: ``$`` interpolation, backslash escapes): a value holding one of them has no spelling all three agree on.
_ENV_UNSAFE = frozenset("\"'`\\$#")


def env_value_ok(value: str) -> bool:
    """Whether ``value`` can be written unquoted after ``KEY=`` and be read back as-is by docker
    ``--env-file``, docker compose and python-dotenv: printable, no quote, backslash, ``$`` or ``#``,
    no blank at either end, not empty."""
    return bool(value) and value == value.strip() and value.isprintable() and not (_ENV_UNSAFE & set(value))


def model_ref_ok(value: str) -> bool:
    """Whether ``value`` can be a model reference (hub id or path) at all: printable, no blank at either
    end, not empty, not starting with ``-`` (a command line would read it as an option). A reference
    that fails this is never a real model: the translations put a loud placeholder in its place."""
    return bool(value) and value == value.strip() and value.isprintable() and not value.startswith("-")


# -- shared helpers --------------------------------------------------------------------------------------
def is_preset(doc: dict[str, Any]) -> bool:
    """Presets are built in-process with random weights: no serving stack can load them."""
    return str(doc.get("model") or "").startswith(PRESET_PREFIX)


def placeholder(doc: dict[str, Any]) -> str:
    """A model name that fails loudly if deployed as-is, yet says which model it stands for
    (only ``[A-Za-z0-9._-]``: safe in every target)."""
    name = str(doc.get("model") or "model").removeprefix(PRESET_PREFIX)
    return "PLACEHOLDER-" + re.sub(r"[^A-Za-z0-9._-]", "-", name)[:80]


def _length_upper(value: Any) -> int | None:
    """The longest length a workload length (int or distribution dict) can produce."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        try:
            if value.get("distribution", "fixed") == "fixed" and value.get("value") is not None:
                return int(value["value"])
            if value.get("max") is not None:
                return int(value["max"])
        except (TypeError, ValueError):
            return None
    return None


def token_limits(doc: dict[str, Any]) -> tuple[int | None, int | None]:
    """(longest prompt, longest prompt + output) of the tuned workload: serving limits sized to what was measured."""
    wl = doc.get("workload") or {}
    if not isinstance(wl, dict):
        return None, None
    prompt, output = _length_upper(wl.get("prompt_tokens")), _length_upper(wl.get("output_tokens"))
    total = prompt + output if prompt is not None and output is not None else None
    return prompt, total


def _num(x: Any, digits: int = 1) -> str:
    return f"{x:.{digits}f}" if isinstance(x, int | float) and math.isfinite(x) else "n/a"


def _bound(x: Any) -> str:
    return f"{x:g}" if isinstance(x, int | float) and not isinstance(x, bool) else str(x)


def slo_text(slo: Any) -> str:
    """The SLO clauses as the spec reads them: ``p95 e2e_ms <= 500`` for a ceiling (``max``),
    ``top1_agreement >= 0.9`` for a fidelity floor (``min``)."""
    parts = []
    for c in slo if isinstance(slo, list) else []:
        if not isinstance(c, dict):
            continue
        what = f"{c.get('percentile') or ''} {c.get('metric')}".strip()
        if c.get("min") is not None:
            parts.append(f"{what} >= {_bound(c['min'])}")
        elif c.get("max") is not None:
            parts.append(f"{what} <= {_bound(c['max'])}")
        else:
            parts.append(f"{what} (no bound)")
    return ", ".join(parts) or "none"


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _on_gpu(doc: dict[str, Any]) -> bool:
    """Tuned on a CUDA device (CUDA graphs and GPU-only knobs were part of what was measured)."""
    hw = doc.get("hardware")
    return isinstance(hw, dict) and hw.get("device_type") == "cuda"


def header(
    doc: dict[str, Any],
    tool: str,
    what: str,
    knobs: list[Knob],
    extra: list[str] | None = None,
    preset_note: list[str] | None = None,
) -> list[str]:
    """Comment lines (``# ``-prefixed; all three targets use ``#``) that make the output self-describing.
    Every line is escaped (:func:`comment`): a value from the document cannot end its comment."""
    hw = _mapping(doc.get("hardware"))
    m = _mapping(doc.get("metrics"))
    e2e = _mapping(m.get("e2e_ms"))
    lines = [
        f"autotune {doc.get('autotune_version')} export (schema {doc.get('schema_version')}) as {what}",
        f"study: {doc.get('study')}  trial: {doc.get('trial')}  exported: {doc.get('exported_at')}",
        f"model: {doc.get('model')}",
        *_written_from(doc),
        f"hardware: {hw.get('device_name')} ({hw.get('device_type')}), fingerprint {hw.get('fingerprint')}",
        f"measured: {_num(m.get('output_tokens_per_s'))} output tokens/s, "
        f"p95 e2e {_num(e2e.get('p95'))} ms; SLO: {slo_text(doc.get('slo'))}",
        "The numbers were measured on autotune's engine (transformers + PyTorch), not on this tool: re-measure.",
    ]
    if is_preset(doc):
        lines += preset_note or [
            f"WARNING: {doc.get('model')} is an autotune preset (random weights built in-process); {tool} cannot",
            "load it. The model below is a clearly marked PLACEHOLDER: replace it with the hub id or local path",
            "of the real model you tuned for.",
        ]
    lines += extra or []
    lines.append("Knobs (maps / approximate: why / no equivalent: why):")
    lines += [f"  {k.line()}" for k in knobs]
    return [comment(line) for line in lines]


def _written_from(doc: dict[str, Any]) -> list[str]:
    """What a checkpoint folder standing in for a ``builtin:``/``preset:`` model holds (see
    :func:`autotune.checkpoint.servable`)."""
    ref = doc.get("model_written_from")
    if not ref:
        return []
    lines = [f"  = {ref}, written by autotune as this checkpoint folder (weights, tokenizer, config)"]
    if str(ref).startswith(PRESET_PREFIX):
        lines.append(
            f"  the preset's random weights drawn on the CPU from seed {doc.get('model_seed', 0)}; a study on a GPU "
            "drew them there: same shapes and distribution, other values"
        )
    return lines


def _config(doc: dict[str, Any]) -> dict[str, Any]:
    """The tuned config with TrialConfig's defaults for knobs older exports lack."""
    from autotune.config import TrialConfig

    return {**TrialConfig().model_dump(mode="json"), **(doc.get("config") or {})}


def _model_knob(doc: dict[str, Any], c: dict[str, Any], where: str) -> Knob:
    """The served model: the study's, or the variant this config was tuned with."""
    chosen = c["model"] or doc.get("model")
    what = "the model variant the study chose" if c["model"] else "the study's model"
    return Knob("model", chosen, "maps", f"{where}: {what}")


def _attention_knob(attention: str, server: str, kernels: str) -> Knob:
    """Servers with their own attention kernels: the tuned HF kernel choice does not carry over."""
    if attention == "sdpa":
        return Knob("attention", attention, "approximate", f"{server} runs {kernels}; its default choice kept")
    return Knob(
        "attention", attention, "no equivalent", f"{server} runs {kernels}, not transformers' {attention} attention"
    )


# -- vLLM ------------------------------------------------------------------------------------------------
_VLLM_DTYPE = {"fp32": "float32", "tf32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: ``--compilation-config`` value that keeps vLLM from capturing CUDA graphs (its optimization levels
#: document user-set compilation fields as taking precedence over the level's defaults).
VLLM_NO_CUDA_GRAPHS = '{"cudagraph_mode": "NONE"}'


def vllm_knobs(doc: dict[str, Any]) -> tuple[list[Knob], list[str]]:
    """Knob verdicts and the ``vllm serve`` arguments they produce."""
    c = _config(doc)
    args: list[str] = []
    knobs: list[Knob] = []

    b = int(c["batch_size"])
    args += ["--max-num-seqs", str(b)]
    if c["scheduler"] == "continuous":
        knobs.append(Knob("batch_size", b, "maps", f"--max-num-seqs {b} (sequences batched per step)"))
    else:
        knobs.append(
            Knob("batch_size", b, "approximate", f"--max-num-seqs {b}: vLLM caps running sequences, not whole batches")
        )

    p = c["precision"]
    args += ["--dtype", _VLLM_DTYPE[p]]
    if p == "tf32":
        knobs.append(Knob("precision", p, "approximate", "--dtype float32: vLLM has no switch for TF32 matmuls"))
    else:
        knobs.append(Knob("precision", p, "maps", f"--dtype {_VLLM_DTYPE[p]}"))

    q = c["quantization"]
    if q == "none":
        knobs.append(Knob("quantization", q, "maps", "no --quantization (unquantized checkpoint)"))
    elif q == "fp8":
        args += ["--quantization", "fp8"]
        knobs.append(Knob("quantization", q, "maps", "--quantization fp8 (dynamic fp8 weights and activations)"))
    elif q == "int4-weight-only":
        args += ["--quantization", "bitsandbytes"]
        knobs.append(
            Knob(
                "quantization",
                q,
                "approximate",
                "--quantization bitsandbytes: in-flight 4-bit bitsandbytes, not torchao's int4 groupwise kernels",
            )
        )
    else:  # int8-dynamic, int8-weight-only
        knobs.append(
            Knob(
                "quantization",
                q,
                "no equivalent",
                "vLLM does not quantize to int8 at load time; serve a checkpoint quantized offline "
                "(e.g. W8A8 / W8A16 with LLM Compressor): vLLM reads its method from the checkpoint",
            )
        )

    be = c["backend"]
    if be == "eager":
        args.append("--enforce-eager")
        knobs.append(Knob("backend", be, "maps", "--enforce-eager (no compilation, no CUDA graphs)"))
    elif not _on_gpu(doc):  # tuned on a CPU: CUDA graphs were never measured, so none are switched on
        cpu = "tuned on a CPU, where no CUDA graphs were measured"
        if be == "inductor":
            args += ["-O1", "--compilation-config", VLLM_NO_CUDA_GRAPHS]
            note = f"-O1 (torch.compile, Inductor) with cudagraph_mode NONE: {cpu}"
            knobs.append(Knob("backend", be, "approximate", note + "; vLLM compiles its own model code"))
        else:
            args.append("--enforce-eager")
            status: Status = "no equivalent" if be in ("onnxruntime", "openvino", "tensorrt") else "approximate"
            note = f"vLLM has no {be} backend" if status == "no equivalent" else f"{be} needs CUDA"
            knobs.append(Knob("backend", be, status, f"{note}; --enforce-eager: {cpu}"))
    elif be == "inductor":
        args.append("-O1")
        knobs.append(
            Knob(
                "backend",
                be,
                "approximate",
                "-O1: torch.compile (Inductor), but vLLM also captures piecewise CUDA graphs at this level",
            )
        )
    elif be == "cuda-graphs":
        args.append("-O2")
        note = "-O2: CUDA graphs, but vLLM captures them around its own torch.compile (Inductor) graphs"
        knobs.append(Knob("backend", be, "approximate", note))
    elif be in ("onnxruntime", "openvino", "tensorrt"):
        args.append("-O2")
        note = f"vLLM has no {be} backend; -O2 is vLLM's default (torch.compile + CUDA graphs)"
        knobs.append(Knob("backend", be, "no equivalent", note))
    else:
        args.append("-O2")
        knobs.append(Knob("backend", be, "maps", "-O2: torch.compile (Inductor) + CUDA graphs (vLLM's default)"))

    s = int(c["streams"])
    if s == 1:
        knobs.append(Knob("streams", s, "maps", "one engine per GPU (vLLM's default)"))
    else:
        knobs.append(
            Knob(
                "streams",
                s,
                "no equivalent",
                "vLLM runs one engine per GPU and overlaps requests by batching; "
                "replicas need more GPUs (--data-parallel-size) or more servers",
            )
        )

    d = float(c["max_queue_delay_ms"])
    if d == 0:
        knobs.append(Knob("max_queue_delay_ms", d, "maps", "vLLM schedules waiting requests every step, no delay"))
    else:
        knobs.append(
            Knob(
                "max_queue_delay_ms",
                d,
                "no equivalent",
                "vLLM has no batching window: waiting requests join the running batch at the next step",
            )
        )

    args += ["--scheduling-policy", "fcfs"]
    if c["scheduler"] == "continuous":
        knobs.append(Knob("scheduler", "continuous", "maps", "vLLM batches continuously; --scheduling-policy fcfs"))
    else:
        knobs.append(
            Knob(
                "scheduler",
                c["scheduler"],
                "approximate",
                "vLLM always batches continuously (no run-to-completion batches, no length buckets); "
                "--scheduling-policy fcfs",
            )
        )

    if c["pipeline_depth"] > 1:
        args += ["--async-scheduling"]
        knobs.append(
            Knob(
                "pipeline_depth",
                c["pipeline_depth"],
                "approximate",
                "--async-scheduling: vLLM schedules the next step while the current one runs (one step "
                "ahead, per decode step rather than per batch)",
            )
        )
    else:
        knobs.append(
            Knob(
                "pipeline_depth",
                1,
                "approximate",
                "vLLM's default kept (async scheduling, on by default since 0.14, overlaps per step); "
                "add --no-async-scheduling to run synchronously as tuned",
            )
        )
    knobs.append(_attention_knob(c["attention"], "vLLM", "its paged attention kernels (FlashAttention, FlashInfer)"))
    knobs.append(_model_knob(doc, c, "vllm serve MODEL"))

    _, total = token_limits(doc)
    if total is not None:
        args += ["--max-model-len", str(total)]
    return knobs, args


def measured_vllm(doc: dict[str, Any]) -> str:
    """A config measured on vLLM itself: the launch the trial ran, flag for flag (no mapping)."""
    from autotune.deploy import engine_script

    hw = _mapping(doc.get("hardware"))
    m = _mapping(doc.get("metrics"))
    e2e = _mapping(m.get("e2e_ms"))
    lines = [
        f"autotune {doc.get('autotune_version')} export: study {doc.get('study')}, trial {doc.get('trial')}",
        f"model: {doc.get('model')}",
        *_written_from(doc),
        f"hardware: {hw.get('device_name')} ({hw.get('device_type')}), fingerprint {hw.get('fingerprint')}",
        f"measured on this very launch: {_num(m.get('output_tokens_per_s'))} output tokens/s, "
        f"p95 e2e {_num(e2e.get('p95'))} ms; SLO: {slo_text(doc.get('slo'))}",
    ]
    return engine_script(doc, comment="\n".join(escape_text(line) for line in lines))


def to_vllm(doc: dict[str, Any]) -> str:
    """A runnable ``vllm serve`` command (shell script) with the verdicts as comments. Values are
    single-quoted sh words; the model reference is written only if it can be one (see
    :func:`model_ref_ok`), else the script asks for ``MODEL`` and refuses to run without it.
    A config measured on vLLM is written as exactly the launch that was measured."""
    if _mapping(doc.get("config")).get("engine") == "vllm":
        return measured_vllm(doc)
    knobs, args = vllm_knobs(doc)
    _, total = token_limits(doc)
    extra = [f"--max-model-len {total}: from the workload (longest prompt + longest output)"] if total else []
    ref = str(doc.get("model") or "")
    if is_preset(doc) or not model_ref_ok(ref):
        if is_preset(doc):
            why = "set MODEL to the hub id or path of the real model: the config was tuned on an autotune preset"
        else:
            why = "set MODEL to the hub id or path of the model: the exported model reference is not one"
            extra.append(f"the exported model reference '{ref}' cannot be a model (control characters, blank")
            extra.append("ends, or a leading -): the script takes the model from MODEL instead")
        model = f'"${{MODEL:?{why}}}"'  # fixed text: nothing from the document is expanded by sh
        extra.append("MODEL: PLACEHOLDER, run as  MODEL=org/name sh this-file")
    else:
        model = shlex.quote(ref)
    lines = header(doc, "vLLM", "a `vllm serve` command", knobs, extra)
    cmd = [f"vllm serve {model}"]
    i = 0
    while i < len(args):  # one flag (with its value) per line
        if i + 1 < len(args) and not args[i + 1].startswith("-"):
            cmd.append(f"{args[i]} {shlex.quote(args[i + 1])}")
            i += 2
        else:
            cmd.append(args[i])
            i += 1
    return "\n".join(["#!/bin/sh", *lines, " \\\n  ".join(cmd)]) + "\n"


# -- TGI -------------------------------------------------------------------------------------------------
_TGI_DTYPE = {"bf16": "bfloat16", "fp16": "float16"}
_TGI_QUANT: dict[str, tuple[str, Status, str]] = {
    "int8-weight-only": ("eetq", "maps", "QUANTIZE=eetq (int8 weight-only, per channel; no pre-quantized model)"),
    "int8-dynamic": (
        "bitsandbytes",
        "approximate",
        "QUANTIZE=bitsandbytes: LLM.int8 (int8 weights, outliers in fp16) rather than dynamic int8 activations",
    ),
    "int4-weight-only": (
        "bitsandbytes-nf4",
        "approximate",
        "QUANTIZE=bitsandbytes-nf4: 4-bit NF4 rather than torchao's int4 groupwise",
    ),
    "fp8": ("fp8", "maps", "QUANTIZE=fp8 (e4m3, H100 and newer)"),
}


def tgi_knobs(doc: dict[str, Any]) -> tuple[list[Knob], dict[str, str]]:
    """Knob verdicts and the launcher environment they produce."""
    c = _config(doc)
    env: dict[str, str] = {}
    knobs: list[Knob] = []

    b = int(c["batch_size"])
    env["MAX_BATCH_SIZE"] = str(b)
    knobs.append(
        Knob(
            "batch_size",
            b,
            "approximate",
            f"MAX_BATCH_SIZE={b}: TGI sizes batches by tokens (MAX_BATCH_TOTAL_TOKENS); "
            "this cap on requests per batch is documented for hardware without unpadded inference",
        )
    )

    q = c["quantization"]
    p = c["precision"]
    if q != "none":
        value, status, note = _TGI_QUANT[q]
        env["QUANTIZE"] = value
        knobs.append(Knob("quantization", q, status, note))
        knobs.append(
            Knob("precision", p, "approximate", "DTYPE cannot be combined with QUANTIZE: TGI picks the compute dtype")
        )
    else:
        knobs.append(Knob("quantization", q, "maps", "no QUANTIZE"))
        if p in _TGI_DTYPE:
            env["DTYPE"] = _TGI_DTYPE[p]
            knobs.append(Knob("precision", p, "maps", f"DTYPE={_TGI_DTYPE[p]}"))
        else:
            knobs.append(
                Knob("precision", p, "no equivalent", "DTYPE accepts float16 or bfloat16 only; TGI picks its default")
            )

    be = c["backend"]
    if not _on_gpu(doc):  # tuned on a CPU: no CUDA graph sizes were measured, so none are emitted
        cpu = "no CUDA_GRAPHS: tuned on a CPU, where no CUDA graphs were measured (on a GPU, TGI's default applies)"
        if be in ("onnxruntime", "openvino", "tensorrt"):
            knobs.append(Knob("backend", be, "no equivalent", f"TGI has no {be} backend; {cpu}"))
        elif be == "eager":
            knobs.append(Knob("backend", be, "maps", f"TGI runs eagerly, never torch.compiles; {cpu}"))
        else:
            knobs.append(Knob("backend", be, "approximate", f"TGI runs its own kernels, no torch.compile; {cpu}"))
    elif be == "eager":
        env["CUDA_GRAPHS"] = "0"
        knobs.append(Knob("backend", be, "maps", "CUDA_GRAPHS=0 (no CUDA graphs; TGI never torch.compiles)"))
    elif be == "inductor":
        env["CUDA_GRAPHS"] = "0"
        knobs.append(
            Knob("backend", be, "approximate", "CUDA_GRAPHS=0: TGI runs its own kernels, no torch.compile switch")
        )
    else:
        sizes = [1]
        while sizes[-1] * 2 < b:
            sizes.append(sizes[-1] * 2)
        if b > 1:
            sizes.append(b)
        env["CUDA_GRAPHS"] = ",".join(map(str, sizes))
        if be in ("onnxruntime", "openvino", "tensorrt"):
            note = f"TGI has no {be} backend; CUDA_GRAPHS={env['CUDA_GRAPHS']} (TGI's own kernels, graphed)"
            knobs.append(Knob("backend", be, "no equivalent", note))
        else:
            note = f"CUDA_GRAPHS={env['CUDA_GRAPHS']}: graphs for batch sizes up to {b}, TGI's kernels, not Inductor"
            knobs.append(Knob("backend", be, "approximate", note))

    s = int(c["streams"])
    if s == 1:
        knobs.append(Knob("streams", s, "maps", "one model server (TGI's default)"))
    else:
        knobs.append(
            Knob(
                "streams",
                s,
                "no equivalent",
                "NUM_SHARD is tensor parallelism, not replicas: run several TGI containers behind a load balancer",
            )
        )

    d = float(c["max_queue_delay_ms"])
    knobs.append(
        Knob(
            "max_queue_delay_ms",
            d,
            "approximate" if d == 0 else "no equivalent",
            "TGI has no time-based batching window; WAITING_SERVED_RATIO and MAX_WAITING_TOKENS (token-counted) "
            "decide when waiting requests join; defaults kept",
        )
    )

    if c["scheduler"] == "continuous":
        knobs.append(Knob("scheduler", "continuous", "maps", "TGI always batches continuously"))
    else:
        knobs.append(
            Knob(
                "scheduler",
                c["scheduler"],
                "approximate",
                "TGI always batches continuously (no run-to-completion mode, no length buckets)",
            )
        )
    knobs.append(
        Knob(
            "pipeline_depth",
            c["pipeline_depth"],
            "no equivalent",
            "TGI's router batches in its own process while the model server runs; not configurable",
        )
    )
    knobs.append(_attention_knob(c["attention"], "TGI", "its own paged attention kernels"))
    knobs.append(_model_knob(doc, c, "MODEL_ID"))
    return knobs, env


def to_tgi(doc: dict[str, Any]) -> str:
    """An env file for ``docker run --env-file`` (``KEY=value`` lines, ``#`` comments). docker reads a
    value raw to the end of its line (no quoting), so a model reference that docker, compose and
    python-dotenv would not all read back as-is (:func:`env_value_ok`) becomes a PLACEHOLDER."""
    knobs, env = tgi_knobs(doc)
    prompt, total = token_limits(doc)
    extra = []
    if prompt is not None and total is not None:
        extra.append(f"MAX_INPUT_TOKENS / MAX_TOTAL_TOKENS: from the workload ({prompt} prompt, {total} in all)")
    ref = str(doc.get("model") or "")
    lines = header(doc, "TGI", "a text-generation-launcher env file (docker run --env-file)", knobs, extra)
    if is_preset(doc):
        lines += ["# PLACEHOLDER: replace MODEL_ID with the hub id or local path of the real model"]
        model = placeholder(doc)
    elif not (model_ref_ok(ref) and env_value_ok(ref)):
        lines.append(comment(f"PLACEHOLDER: the exported model reference '{ref}' cannot be written into an env"))
        lines.append("# file (control characters, quotes, backslash, $ or #, blank ends): set MODEL_ID to the model")
        model = placeholder(doc)
    else:
        model = ref
        if ref.startswith("/"):
            lines.append("# MODEL_ID is a folder on this machine: mount it into the container at the same path")
            lines.append("# (docker run -v FOLDER:FOLDER --env-file THIS-FILE ...)")
    out = {"MODEL_ID": model, **env}
    if prompt is not None and total is not None:
        out["MAX_INPUT_TOKENS"] = str(prompt)
        out["MAX_TOTAL_TOKENS"] = str(total)
    assert all(env_value_ok(v) for v in out.values()), out  # the rest are numbers and fixed names
    return "\n".join([*lines, *(f"{k}={v}" for k, v in out.items())]) + "\n"


# -- Triton ----------------------------------------------------------------------------------------------
#: The export document's name inside the model's version directory, beside model.py (which reads it).
TRITON_EXPORT_FILE = "autotune-export.json"
#: The Python-backend model written as ``NAME/1/model.py`` (a module of this package, copied verbatim).
TRITON_MODEL_SOURCE = Path(__file__).with_name("triton_model.py")


def triton_name(doc: dict[str, Any]) -> str:
    """The Triton model name (and its directory in the repository): the study name reduced to
    ``[A-Za-z0-9._-]``, never hidden, ``.`` or ``..``."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", str(doc.get("study") or ""))[:100].lstrip(".")
    return name or "model"


def triton_knobs(doc: dict[str, Any]) -> tuple[list[Knob], dict[str, Any]]:
    """Knob verdicts and the config.pbtxt fields they produce. model.py runs autotune's own engine
    (``autotune.load_engine`` on the export beside it), so the model knobs apply exactly; Triton's
    dynamic batcher and instance groups take over the queue window and the streams."""
    c = _config(doc)
    kind = "KIND_GPU" if _on_gpu(doc) else "KIND_CPU"
    b, s = int(c["batch_size"]), int(c["streams"])
    delay_us = round(float(c["max_queue_delay_ms"]) * 1000)
    fields = {"max_batch_size": b, "max_queue_delay_microseconds": delay_us, "count": s, "kind": kind}
    engine = "applied by model.py: autotune.load_engine builds the engine the trials measured"
    knobs = [
        Knob("batch_size", b, "maps", f"max_batch_size: {b} (the dynamic batcher fills batches up to it)"),
        Knob(
            "max_queue_delay_ms",
            float(c["max_queue_delay_ms"]),
            "maps",
            f"max_queue_delay_microseconds: {delay_us} (model.py's engine adds no window of its own)",
        ),
        Knob(
            "streams",
            s,
            "maps",
            f"instance_group count: {s} ({kind}): each instance is one engine running one batch at a time"
            + ("" if kind == "KIND_GPU" else ", with the CPU cores split between the instances"),
        ),
        Knob("precision", c["precision"], "maps", engine),
        Knob("quantization", c["quantization"], "maps", engine),
        Knob("backend", c["backend"], "maps", engine),
        Knob("attention", c["attention"], "maps", engine),
    ]
    if c["scheduler"] == "static":
        note = "dynamic_batching hands whole batches; model.py runs each as one batch, to the end"
        knobs.append(Knob("scheduler", "static", "maps", note))
    elif c["scheduler"] == "continuous":
        note = (
            "the engine in model.py batches continuously, but only among the rows of the batch Triton hands "
            "it: execute() answers that batch before the instance takes the next"
        )
        knobs.append(Knob("scheduler", "continuous", "approximate", note))
    else:
        note = "model.py runs the batch Triton hands it as one batch, not regrouped by prompt length"
        knobs.append(Knob("scheduler", c["scheduler"], "approximate", note))
    if int(c["pipeline_depth"]) > 1:
        note = "Triton hands an instance one batch per execute() call: model.py has nothing to prepare ahead"
        knobs.append(Knob("pipeline_depth", c["pipeline_depth"], "no equivalent", note))
    else:
        knobs.append(Knob("pipeline_depth", c["pipeline_depth"], "maps", "one batch at a time per instance"))
    knobs.append(_model_knob(doc, c, 'the "model" parameter (model.py loads it with the exported knobs)'))
    return knobs, fields


def to_triton(doc: dict[str, Any]) -> str:
    """The ``config.pbtxt`` (protobuf text format) of :func:`triton_repository`, with ``#`` comments."""
    knobs, f = triton_knobs(doc)
    name = triton_name(doc)
    if is_preset(doc) or not model_ref_ok(str(doc.get("model") or "")):
        model = placeholder(doc)
    else:
        model = str(doc.get("model"))
    prompt, total = token_limits(doc)
    extra = [
        f'name "{name}": the model repository directory must carry this name: model_repository/{name}/config.pbtxt',
        f"backend python: model_repository/{name}/1/model.py serves the export in 1/{TRITON_EXPORT_FILE} with",
        "autotune's engine (autotune must be importable by the Python backend: pip install it in the image);",
        "`autotune export STUDY --format triton --output model_repository` writes all three files.",
        "text_input (TYPE_STRING, one prompt per row) -> text_output; optional max_tokens (TYPE_INT32) per row,",
        f"default {total - prompt if prompt is not None and total is not None else 16} (the workload's longest output)",
    ]
    preset_note = [
        f'WARNING: {doc.get("model")} is an autotune preset (random weights built in-process). The "model"',
        "parameter below is a clearly marked PLACEHOLDER (model.py refuses it): replace it with the hub id or",
        "local path of the real model you tuned for.",
    ]
    lines = header(doc, "Triton", "a Triton Inference Server model (config.pbtxt)", knobs, extra, preset_note)
    if not is_preset(doc) and model != doc.get("model"):
        lines.append(comment(f"PLACEHOLDER: the exported model reference '{doc.get('model')}' cannot be a model:"))
        lines.append('# set the "model" parameter to the hub id or path of the model')
    body = [
        f"name: {pbtxt_string(name)}",
        'backend: "python"',
        f"max_batch_size: {f['max_batch_size']}",
        "input [",
        '  { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] },',
        '  { name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }',
        "]",
        "output [",
        '  { name: "text_output" data_type: TYPE_STRING dims: [ 1 ] }',
        "]",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {f['max_queue_delay_microseconds']}",
        "}",
        "instance_group [",
        f"  {{ count: {f['count']} kind: {f['kind']} }}",
        "]",
        f'parameters {{ key: "model" value: {{ string_value: {pbtxt_string(model)} }} }}',
    ]
    return "\n".join([*lines, *body]) + "\n"


def triton_repository(doc: dict[str, Any]) -> dict[str, str]:
    """A complete Triton model repository entry for the export, as relative path -> file text:
    ``NAME/config.pbtxt``, ``NAME/1/model.py`` (Python backend, autotune's engine) and
    ``NAME/1/autotune-export.json`` (the export document model.py loads)."""
    name = triton_name(doc)
    return {
        f"{name}/config.pbtxt": to_triton(doc),
        f"{name}/1/model.py": TRITON_MODEL_SOURCE.read_text(encoding="utf-8"),
        f"{name}/1/{TRITON_EXPORT_FILE}": to_json(doc),
    }


def write_triton_repository(doc: dict[str, Any], repository: str | Path) -> Path:
    """Write :func:`triton_repository` into the model repository directory ``repository`` (created if
    missing) and return the model's directory. The files are written to a hidden staging directory
    beside it first: a new model directory appears whole by one rename; an existing one gets each file
    replaced by a rename (other files in it, e.g. other versions, are left alone)."""
    files = triton_repository(doc)
    root = Path(repository)
    root.mkdir(parents=True, exist_ok=True)
    name = triton_name(doc)
    target = root / name
    stage = root / f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    stage.mkdir()
    try:
        for rel, text in files.items():
            path = stage.joinpath(*rel.split("/")[1:])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        try:
            stage.rename(target)  # POSIX: succeeds when target is missing (or an empty directory)
        except OSError:
            if not target.is_dir():
                raise
            for rel in files:
                parts = rel.split("/")[1:]
                dest = target.joinpath(*parts)
                dest.parent.mkdir(parents=True, exist_ok=True)
                stage.joinpath(*parts).replace(dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return target


def triton_archive(doc: dict[str, Any]) -> bytes:
    """:func:`triton_repository` as a gzipped tar (what a download serves; unpack it into the model
    repository: ``tar -xzf FILE -C model_repository``). Reproducible: fixed times, owners and modes."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        dirs: set[str] = set()
        for rel, text in triton_repository(doc).items():
            parts = rel.split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
            data = text.encode("utf-8")
            info = tarfile.TarInfo(rel)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# -- registry --------------------------------------------------------------------------------------------
def to_json(doc: dict[str, Any]) -> str:
    """The export document itself (what ``autotune export`` has always written)."""
    return json.dumps(doc, indent=2) + "\n"


FORMATS: dict[str, Callable[[dict[str, Any]], str]] = {
    "json": to_json,
    "vllm": to_vllm,
    "tgi": to_tgi,
    "triton": to_triton,
}

#: Download file names per format (the dashboard's Content-Disposition).
FILENAMES: dict[str, str] = {"json": "best-{name}.json", "vllm": "best-{name}-vllm.sh", "tgi": "best-{name}-tgi.env"}
FILENAMES["triton"] = "config.pbtxt"  # Triton only reads this name
#: Download file name of :func:`triton_archive` (the whole model repository entry).
TRITON_ARCHIVE_FILENAME = "{name}-triton-repository.tar.gz"


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Temp file next to the target, then rename: a crash never leaves half a config behind."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(p)
    finally:
        tmp.unlink(missing_ok=True)
    return p
