"""Deployment translations (vLLM command, TGI env file, Triton config.pbtxt) checked against the fields
those tools document, for every knob value, plus ``autotune export --format`` end to end."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from autotune.config import ATTENTIONS, BACKENDS, PRECISIONS, QUANTIZATIONS, SCHEDULERS
from autotune.translate import FORMATS, token_limits

from .conftest import TINY_SPEC, run_cli

# -- what the tools document (see autotune/translate.py's docstring for the pages) ---------------------------
#: `vllm serve` flags we may emit -> allowed values (None: takes no value; set(): any value).
VLLM_FLAGS: dict[str, set[str] | None] = {
    "--max-num-seqs": set(),
    "--max-model-len": set(),
    "--dtype": {"auto", "half", "float16", "bfloat16", "float", "float32"},
    "--quantization": {"aqlm", "awq", "fp8", "gptq", "bitsandbytes", "marlin", "gptq_marlin", "torchao"},
    "--scheduling-policy": {"fcfs", "priority"},
    "--async-scheduling": None,
    "--enforce-eager": None,
    "-O0": None,
    "-O1": None,
    "-O2": None,
    "-O3": None,
}
#: text-generation-launcher env variables -> allowed values (set(): any).
TGI_KEYS: dict[str, set[str]] = {
    "MODEL_ID": set(),
    "DTYPE": {"float16", "bfloat16"},
    "QUANTIZE": {
        "awq", "compressed-tensors", "eetq", "exl2", "gptq", "marlin",
        "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "fp8",
    },
    "MAX_BATCH_SIZE": set(),
    "MAX_INPUT_TOKENS": set(),
    "MAX_TOTAL_TOKENS": set(),
    "CUDA_GRAPHS": set(),
    "MAX_CONCURRENT_REQUESTS": set(),
    "WAITING_SERVED_RATIO": set(),
    "MAX_WAITING_TOKENS": set(),
}  # fmt: skip
#: Triton ModelConfig fields (model_config.proto) we may emit, and the nested ones we check.
TRITON_FIELDS = {
    "name", "platform", "backend", "max_batch_size", "input", "output", "dynamic_batching",
    "instance_group", "parameters", "optimization", "sequence_batching", "model_transaction_policy",
}  # fmt: skip
TRITON_DYNAMIC = {"max_queue_delay_microseconds", "preferred_batch_size", "preserve_ordering"}
TRITON_INSTANCE = {"count", "kind", "gpus", "name"}
TRITON_KINDS = {"KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"}
TRITON_TENSOR = {"name", "data_type", "dims"}

VERDICT = re.compile(r"^#\s+(\w+)=(\S+): (maps|approximate|no equivalent): \S")


# -- a minimal protobuf text-format reader (enough for config.pbtxt) -------------------------------------------
_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([A-Za-z_][\w.]*)|(-?\d+(?:\.\d+)?)|([{}\[\]:,]))')


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text.rstrip()):
        m = _TOKEN.match(text, pos)
        assert m, f"unparseable config.pbtxt at {text[pos : pos + 40]!r}"
        pos = m.end()
        if m.group(1) is None:
            out.append(next(g for g in m.groups()[1:] if g is not None))
    return out


def parse_pbtxt(text: str) -> dict[str, list[Any]]:
    """Fields to lists of values (messages as dicts): raises on unbalanced braces or stray tokens."""
    toks = _tokens(text)
    i = 0

    def value() -> Any:
        nonlocal i
        t = toks[i]
        i += 1
        if t == "{":
            return message("}")
        if t == "[":
            items = []
            while toks[i] != "]":
                items.append(value())
                if toks[i] == ",":
                    i += 1
            i += 1
            return items
        return json.loads(t) if t.startswith('"') or t[0].isdigit() or t[0] == "-" else t

    def message(end: str | None) -> dict[str, list[Any]]:
        nonlocal i
        fields: dict[str, list[Any]] = {}
        while i < len(toks) and toks[i] != end:
            name = toks[i]
            assert re.fullmatch(r"[A-Za-z_]\w*", name), f"expected a field name, got {name!r}"
            i += 1
            if toks[i] == ":":
                i += 1
            v = value()
            fields.setdefault(name, []).extend(v if isinstance(v, list) else [v])
        assert (i < len(toks)) == (end is not None), "unbalanced braces"
        i += 1
        return fields

    return message(None)


# -- documents -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir after a real 4-trial tune of the tiny preset, with its export in best.json."""
    work = tmp_path_factory.mktemp("translate")
    res = run_cli("tune", str(TINY_SPEC), "--export", "best.json", cwd=work)
    assert res.returncode == 0, res.stderr
    return work


@pytest.fixture(scope="module")
def real_doc(tuned: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((tuned / "best.json").read_text())
    return doc


BASE_DOC: dict[str, Any] = {
    "schema_version": 1,
    "autotune_version": "0.1.0",
    "exported_at": "2026-11-27T00:00:00Z",
    "study": "crafted",
    "trial": 7,
    "model": "meta-llama/Llama-3.2-1B-Instruct",
    "model_seed": 0,
    "hardware": {"device": "cuda:0", "device_type": "cuda", "device_name": "NVIDIA H100", "fingerprint": "0123abcd"},
    "slo": [{"metric": "e2e_ms", "percentile": "p95", "max": 500.0}],
    "workload": {
        "prompt_tokens": {"distribution": "uniform", "min": 8, "max": 512},
        "output_tokens": 64,
    },
    "config": {
        "batch_size": 16,
        "precision": "bf16",
        "quantization": "none",
        "streams": 2,
        "backend": "inductor-cudagraphs",
        "max_queue_delay_ms": 2.5,
        "scheduler": "continuous",
        "pipeline_depth": 1,
        "attention": "sdpa",
        "model": None,
    },
    "metrics": {"output_tokens_per_s": float("nan"), "e2e_ms": {"p95": 120.0}},
}


def crafted(**config: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE_DOC)
    doc["config"].update(config)
    return doc


KNOB_CASES = [
    *(("precision", v) for v in PRECISIONS),
    *(("quantization", v) for v in QUANTIZATIONS),
    *(("backend", v) for v in BACKENDS),
    *(("scheduler", v) for v in SCHEDULERS),
    *(("attention", v) for v in ATTENTIONS),
    ("model", "meta-llama/Llama-3.2-1B-Instruct"),  # a variant: the export names it as the doc's model too
    ("streams", 1),
    ("streams", 3),
    ("max_queue_delay_ms", 0.0),
    ("max_queue_delay_ms", 2.5),
    ("batch_size", 1),
    ("batch_size", 48),
    ("pipeline_depth", 1),
    ("pipeline_depth", 2),
]


# -- per-format checks against the documented fields ----------------------------------------------------------
def check_vllm(text: str, doc: dict[str, Any]) -> dict[str, str | None]:
    assert text.startswith("#!/bin/sh\n")
    body = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    argv = shlex.split(" ".join(ln.removesuffix("\\") for ln in body))
    assert argv[:2] == ["vllm", "serve"]
    flags: dict[str, str | None] = {}
    i = 3
    while i < len(argv):
        flag = argv[i]
        assert flag in VLLM_FLAGS, f"undocumented vllm serve flag {flag}"
        allowed = VLLM_FLAGS[flag]
        if allowed is None:
            flags[flag] = None
            i += 1
        else:
            val = argv[i + 1]
            assert not allowed or val in allowed, f"{flag} {val} not among {sorted(allowed)}"
            flags[flag] = val
            i += 2
    assert flags["--max-num-seqs"] == str(doc["config"]["batch_size"])
    assert flags["--max-model-len"] == str(token_limits(doc)[1])
    assert len({"--enforce-eager", "-O1", "-O2"} & set(flags)) == 1
    return flags


def check_tgi(text: str, doc: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ln in text.splitlines():
        if not ln or ln.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Z_]+)=(\S+)", ln)
        assert m, f"not a KEY=value line: {ln!r}"
        key, val = m.groups()
        assert key in TGI_KEYS, f"undocumented TGI variable {key}"
        assert not TGI_KEYS[key] or val in TGI_KEYS[key], f"{key}={val} not among {sorted(TGI_KEYS[key])}"
        assert key not in env, f"{key} twice"
        env[key] = val
    assert not ({"DTYPE", "QUANTIZE"} <= set(env)), "TGI documents that DTYPE cannot be used with QUANTIZE"
    assert int(env["MAX_INPUT_TOKENS"]) < int(env["MAX_TOTAL_TOKENS"])
    assert env["MAX_BATCH_SIZE"] == str(doc["config"]["batch_size"])
    assert re.fullmatch(r"0|\d+(,\d+)*", env["CUDA_GRAPHS"])
    return env


def check_triton(text: str, doc: dict[str, Any]) -> dict[str, list[Any]]:
    cfg = parse_pbtxt(text)
    assert set(cfg) <= TRITON_FIELDS, set(cfg) - TRITON_FIELDS
    c = doc["config"]
    assert cfg["max_batch_size"] == [c["batch_size"]]
    (dyn,) = cfg["dynamic_batching"]
    assert set(dyn) <= TRITON_DYNAMIC
    assert dyn["max_queue_delay_microseconds"] == [round(c["max_queue_delay_ms"] * 1000)]
    (group,) = cfg["instance_group"]
    assert set(group) <= TRITON_INSTANCE and group["count"] == [c["streams"]]
    assert group["kind"][0] in TRITON_KINDS
    assert group["kind"] == ["KIND_GPU" if doc["hardware"]["device_type"] == "cuda" else "KIND_CPU"]
    for tensor in cfg["input"] + cfg["output"]:
        assert set(tensor) <= TRITON_TENSOR
    for p in cfg["parameters"]:
        assert set(p) == {"key", "value"} and set(p["value"][0]) == {"string_value"}
    return cfg


CHECKS = {"vllm": check_vllm, "tgi": check_tgi, "triton": check_triton}


def verdicts(text: str) -> dict[str, tuple[str, str]]:
    """knob -> (value, verdict) from the output's comment lines."""
    out = {}
    for ln in text.splitlines():
        if m := VERDICT.match(ln):
            out[m.group(1)] = (m.group(2), m.group(3))
    return out


# -- tests ---------------------------------------------------------------------------------------------------
def test_registry() -> None:
    assert list(FORMATS) == ["json", "vllm", "tgi", "triton"]
    assert json.loads(FORMATS["json"](BASE_DOC | {"metrics": {}})) == BASE_DOC | {"metrics": {}}


@pytest.mark.parametrize("fmt", ["vllm", "tgi", "triton"])
@pytest.mark.parametrize(("knob", "value"), KNOB_CASES)
def test_every_knob_value_gets_a_verdict(fmt: str, knob: str, value: Any) -> None:
    """Each knob value is mapped or explained in a comment, and the output stays within documented fields."""
    doc = crafted(**{knob: value})
    text = FORMATS[fmt](doc)
    CHECKS[fmt](text, doc)
    found = verdicts(text)
    assert set(found) == set(BASE_DOC["config"]), found
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    assert found[knob][0] == shown
    assert "PLACEHOLDER" not in text and "meta-llama/Llama-3.2-1B-Instruct" in text


def test_known_mappings() -> None:
    """Spot checks of the values documented by each tool."""
    flags = check_vllm(FORMATS["vllm"](d := crafted(quantization="fp8", precision="fp16", backend="eager")), d)
    assert flags["--quantization"] == "fp8" and flags["--dtype"] == "float16" and "--enforce-eager" in flags
    env = check_tgi(FORMATS["tgi"](d := crafted(quantization="int8-weight-only")), d)
    assert env["QUANTIZE"] == "eetq" and "DTYPE" not in env
    env = check_tgi(FORMATS["tgi"](d := crafted(precision="fp16", batch_size=12)), d)
    assert env["DTYPE"] == "float16" and env["CUDA_GRAPHS"] == "1,2,4,8,12"
    assert (env["MAX_INPUT_TOKENS"], env["MAX_TOTAL_TOKENS"]) == ("512", "576")
    text = FORMATS["tgi"](crafted(precision="fp32", quantization="none"))
    assert verdicts(text)["precision"] == ("fp32", "no equivalent") and "DTYPE=" not in text
    cfg = check_triton(FORMATS["triton"](d := crafted(streams=4, max_queue_delay_ms=0.25)), d)
    assert cfg["instance_group"][0]["count"] == [4] and cfg["dynamic_batching"][0]["max_queue_delay_microseconds"] == [
        250
    ]


@pytest.mark.parametrize("fmt", ["vllm", "tgi", "triton"])
def test_real_export_of_a_preset(real_doc: dict[str, Any], fmt: str) -> None:
    """The tiny study's real export: header names study/trial/model/fingerprint, the preset is a placeholder."""
    text = FORMATS[fmt](real_doc)
    CHECKS[fmt](text, real_doc)
    head = [ln for ln in text.splitlines() if ln.startswith("#")]
    blob = "\n".join(head)
    assert f"study: {real_doc['study']}  trial: {real_doc['trial']}" in blob
    assert real_doc["hardware"]["fingerprint"] in blob and "preset:llama-tiny" in blob
    assert "WARNING" in blob and "PLACEHOLDER" in text
    assert set(verdicts(text)) == set(real_doc["config"])


def test_vllm_script_runs(real_doc: dict[str, Any], tmp_path: Path) -> None:
    """The vLLM output is a runnable script: refuses to run on the preset placeholder, passes its flags."""
    script = tmp_path / "serve.sh"
    script.write_text(FORMATS["vllm"](real_doc))
    fake = tmp_path / "bin" / "vllm"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:{os.environ['PATH']}"}
    res = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=10)
    assert res.returncode != 0 and "autotune preset" in res.stderr
    res = subprocess.run(["sh", str(script)], env={**env, "MODEL": "org/m"}, capture_output=True, text=True, timeout=10)
    assert res.returncode == 0, res.stderr
    argv = res.stdout.splitlines()
    assert argv[:2] == ["serve", "org/m"] and "--max-num-seqs" in argv


def test_cli_export_formats(tuned: Path, real_doc: dict[str, Any]) -> None:
    res = run_cli("export", "tiny", "--format", "triton", cwd=tuned)
    assert res.returncode == 0, res.stderr
    cfg = check_triton(res.stdout, real_doc)
    assert cfg["name"] == ["tiny"]
    res = run_cli("export", "tiny", "--format", "tgi", "--output", "deploy/tiny.env", cwd=tuned)
    assert res.returncode == 0, res.stderr
    check_tgi((tuned / "deploy" / "tiny.env").read_text(), real_doc)
    assert [p.name for p in (tuned / "deploy").iterdir()] == ["tiny.env"]  # no temp file left behind
    res = run_cli("export", "tiny", "--format", "nope", cwd=tuned)
    assert res.returncode == 2 and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and "allowed: json, vllm, tgi, triton" in res.stderr
