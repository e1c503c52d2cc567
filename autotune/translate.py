"""Translations of the export document into deployment configs for vLLM, TGI and Triton.

autotune measures its own engine (transformers + PyTorch); serving stacks expose different knobs. Each
translation therefore says, knob by knob, whether it *maps*, maps *approximately* (and why), or has *no
equivalent* (and why), as comments in the output: nothing is dropped silently. Torch-free, so the CLI and
the dashboard can call it without importing the engine.

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
  and the Python backend (https://github.com/triton-inference-server/python_backend) that runs a
  transformers model from ``model.py`` and reads ``parameters`` from its model config.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
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


# -- shared helpers --------------------------------------------------------------------------------------
def is_preset(doc: dict[str, Any]) -> bool:
    """Presets are built in-process with random weights: no serving stack can load them."""
    return str(doc.get("model") or "").startswith(PRESET_PREFIX)


def placeholder(doc: dict[str, Any]) -> str:
    """A model name that fails loudly if deployed as-is, yet says which preset it stands for."""
    name = str(doc.get("model") or "model").removeprefix(PRESET_PREFIX)
    return "PLACEHOLDER-" + re.sub(r"[^A-Za-z0-9._-]", "-", name)


def _length_upper(value: Any) -> int | None:
    """The longest length a workload length (int or distribution dict) can produce."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if value.get("distribution", "fixed") == "fixed" and value.get("value") is not None:
            return int(value["value"])
        if value.get("max") is not None:
            return int(value["max"])
    return None


def token_limits(doc: dict[str, Any]) -> tuple[int | None, int | None]:
    """(longest prompt, longest prompt + output) of the tuned workload: serving limits sized to what was measured."""
    wl = doc.get("workload") or {}
    prompt, output = _length_upper(wl.get("prompt_tokens")), _length_upper(wl.get("output_tokens"))
    total = prompt + output if prompt is not None and output is not None else None
    return prompt, total


def _num(x: Any, digits: int = 1) -> str:
    return f"{x:.{digits}f}" if isinstance(x, int | float) and math.isfinite(x) else "n/a"


def header(doc: dict[str, Any], tool: str, what: str, knobs: list[Knob], extra: list[str] | None = None) -> list[str]:
    """Comment lines (``# ``-prefixed; all three targets use ``#``) that make the output self-describing."""
    hw = doc.get("hardware") or {}
    m = doc.get("metrics") or {}
    slo = ", ".join(
        f"{c.get('percentile') or ''} {c.get('metric')} <= {c.get('max')}".strip() for c in doc.get("slo") or []
    )
    lines = [
        f"autotune {doc.get('autotune_version')} export (schema {doc.get('schema_version')}) as {what}",
        f"study: {doc.get('study')}  trial: {doc.get('trial')}  exported: {doc.get('exported_at')}",
        f"model: {doc.get('model')}",
        f"hardware: {hw.get('device_name')} ({hw.get('device_type')}), fingerprint {hw.get('fingerprint')}",
        f"measured: {_num(m.get('output_tokens_per_s'))} output tokens/s, "
        f"p95 e2e {_num((m.get('e2e_ms') or {}).get('p95'))} ms; SLO: {slo or 'none'}",
        "The numbers were measured on autotune's engine (transformers + PyTorch), not on this tool: re-measure.",
    ]
    if is_preset(doc):
        lines += [
            f"WARNING: {doc.get('model')} is an autotune preset (random weights built in-process); {tool} cannot",
            "load it. The model below is a clearly marked PLACEHOLDER: replace it with the hub id or local path",
            "of the real model you tuned for.",
        ]
    lines += extra or []
    lines.append("Knobs (maps / approximate: why / no equivalent: why):")
    lines += [f"  {k.line()}" for k in knobs]
    return ["# " + line if line else "#" for line in lines]


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


def to_vllm(doc: dict[str, Any]) -> str:
    """A runnable ``vllm serve`` command (shell script) with the verdicts as comments."""
    knobs, args = vllm_knobs(doc)
    _, total = token_limits(doc)
    extra = [f"--max-model-len {total}: from the workload (longest prompt + longest output)"] if total else []
    if is_preset(doc):
        why = f"set MODEL to the hub id or path of the real model ({doc.get('model')} is an autotune preset)"
        model = f'"${{MODEL:?{why}}}"'
        extra.append("MODEL: PLACEHOLDER, run as  MODEL=org/name sh this-file")
    else:
        model = shlex.quote(str(doc.get("model")))
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
    if be == "eager":
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
    """An env file for ``docker run --env-file`` (``KEY=value`` lines, ``#`` comments)."""
    knobs, env = tgi_knobs(doc)
    prompt, total = token_limits(doc)
    extra = []
    if prompt is not None and total is not None:
        extra.append(f"MAX_INPUT_TOKENS / MAX_TOTAL_TOKENS: from the workload ({prompt} prompt, {total} in all)")
    lines = header(doc, "TGI", "a text-generation-launcher env file (docker run --env-file)", knobs, extra)
    if is_preset(doc):
        lines += ["# PLACEHOLDER: replace MODEL_ID with the hub id or local path of the real model"]
        model = placeholder(doc)
    else:
        model = str(doc.get("model"))
    out = {"MODEL_ID": model, **env}
    if prompt is not None and total is not None:
        out["MAX_INPUT_TOKENS"] = str(prompt)
        out["MAX_TOTAL_TOKENS"] = str(total)
    return "\n".join([*lines, *(f"{k}={v}" for k, v in out.items())]) + "\n"


# -- Triton ----------------------------------------------------------------------------------------------
def triton_knobs(doc: dict[str, Any]) -> tuple[list[Knob], dict[str, Any]]:
    """Knob verdicts and the config.pbtxt fields they produce."""
    c = _config(doc)
    hw = doc.get("hardware") or {}
    kind = "KIND_GPU" if hw.get("device_type") == "cuda" else "KIND_CPU"
    b, s = int(c["batch_size"]), int(c["streams"])
    delay_us = round(float(c["max_queue_delay_ms"]) * 1000)
    fields = {"max_batch_size": b, "max_queue_delay_microseconds": delay_us, "count": s, "kind": kind}
    param = "passed to model.py as a parameter; Triton itself does not apply it, the Python backend model must"
    knobs = [
        Knob("batch_size", b, "maps", f"max_batch_size: {b} (the dynamic batcher fills batches up to it)"),
        Knob("max_queue_delay_ms", float(c["max_queue_delay_ms"]), "maps", f"max_queue_delay_microseconds: {delay_us}"),
        Knob("streams", s, "maps", f"instance_group count: {s} ({kind}): model instances run batches concurrently"),
        Knob("precision", c["precision"], "approximate", param),
        Knob("quantization", c["quantization"], "approximate", param),
    ]
    if c["backend"] in ("inductor-cudagraphs", "cuda-graphs"):
        note = param + "; optimization.cuda.graphs is documented for TensorRT models only"
    else:
        note = param
    knobs.append(Knob("backend", c["backend"], "approximate", note))
    if c["scheduler"] == "static":
        knobs.append(Knob("scheduler", "static", "maps", "dynamic_batching runs whole batches to completion"))
    elif c["scheduler"] == "bucketed":
        knobs.append(
            Knob(
                "scheduler",
                "bucketed",
                "no equivalent",
                "the dynamic batcher forms batches in arrival order; grouping by prompt length is left to "
                "model.py (passed as a parameter)",
            )
        )
    else:
        knobs.append(
            Knob(
                "scheduler",
                "continuous",
                "no equivalent",
                "the dynamic batcher forms whole batches; iteration-level batching is the vLLM / TensorRT-LLM "
                "backends' job (passed to model.py as a parameter)",
            )
        )
    knobs.append(
        Knob(
            "pipeline_depth",
            c["pipeline_depth"],
            "approximate",
            "the dynamic batcher forms the next batch while an instance runs; how far model.py prepares "
            "ahead is " + param,
        )
    )
    knobs.append(Knob("attention", c["attention"], "approximate", param))
    knobs.append(_model_knob(doc, c, 'the "model" parameter'))
    return knobs, fields


def _pbtxt_str(value: Any) -> str:
    return json.dumps(str(value))  # protobuf text format accepts C-style double-quoted strings


def to_triton(doc: dict[str, Any]) -> str:
    """A ``config.pbtxt`` (protobuf text format) for the Python backend, with ``#`` comments."""
    knobs, f = triton_knobs(doc)
    c = _config(doc)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", str(doc.get("study") or "model")) or "model"
    model = placeholder(doc) if is_preset(doc) else str(doc.get("model"))
    extra = [
        f'name "{name}": the model repository directory must carry this name: model_repository/{name}/config.pbtxt',
        "backend python: model_repository/NAME/1/model.py loads the model with transformers and honours the",
        "parameters below; the text_input / text_output tensors follow the vLLM backend's naming",
    ]
    lines = header(doc, "Triton", "a Triton Inference Server config.pbtxt", knobs, extra)
    if is_preset(doc):
        lines.append('# PLACEHOLDER: replace the "model" parameter with the hub id or local path of the real model')
    params = {
        "model": model,
        "precision": c["precision"],
        "quantization": c["quantization"],
        "torch_backend": c["backend"],
        "scheduler": c["scheduler"],
        "pipeline_depth": c["pipeline_depth"],
        "attention": c["attention"],
    }
    body = [
        f"name: {_pbtxt_str(name)}",
        'backend: "python"',
        f"max_batch_size: {f['max_batch_size']}",
        "input [",
        '  { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] }',
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
        *(
            f"parameters {{ key: {_pbtxt_str(k)} value: {{ string_value: {_pbtxt_str(v)} }} }}"
            for k, v in params.items()
        ),
    ]
    return "\n".join([*lines, *body]) + "\n"


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
