"""Deployment translations (vLLM command, TGI env file, Triton model repository) checked against the fields
those tools document, for every knob value, on GPU- and CPU-tuned exports; hostile text in every field of the
export document run through each target's own parser (sh, docker's env-file rules, protobuf text format with
Triton's model_config.proto); the Triton Python-backend model run against a stand-in of its API on tiny-lm;
plus ``autotune export --format`` end to end."""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from autotune.config import ATTENTIONS, BACKENDS, PRECISIONS, QUANTIZATIONS, SCHEDULERS
from autotune.translate import (
    FORMATS,
    TRITON_EXPORT_FILE,
    TRITON_MODEL_SOURCE,
    VLLM_NO_CUDA_GRAPHS,
    escape_text,
    pbtxt_string,
    placeholder,
    tgi_knobs,
    token_limits,
    triton_archive,
    triton_name,
    triton_repository,
    vllm_knobs,
    write_triton_repository,
)

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
    "--compilation-config": {VLLM_NO_CUDA_GRAPHS},
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
#: Triton ModelConfig fields (model_config.proto) we may set.
TRITON_FIELDS = {
    "name",
    "backend",
    "max_batch_size",
    "input",
    "output",
    "dynamic_batching",
    "instance_group",
    "parameters",
}
VERDICT = re.compile(r"^#\s+(\w+)=(\S+): (maps|approximate|no equivalent): \S")


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


def crafted(device_type: str = "cuda", **config: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BASE_DOC)
    doc["config"].update(config)
    if device_type != "cuda":
        doc["hardware"] = {"device": "cpu", "device_type": "cpu", "device_name": "Test CPU", "fingerprint": "cpu0"}
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
def vllm_argv(text: str) -> list[str]:
    """The command's words as sh would split them (comment lines dropped)."""
    assert text.startswith("#!/bin/sh\n")
    body = [ln for ln in text.split("\n") if ln and not ln.startswith("#")]
    return shlex.split(" ".join(ln.removesuffix("\\") for ln in body))


def check_vllm(text: str, doc: dict[str, Any]) -> dict[str, str | None]:
    argv = vllm_argv(text)
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
    if doc["hardware"].get("device_type") != "cuda":  # nothing that captures CUDA graphs
        assert "-O2" not in flags and ("-O1" not in flags or flags["--compilation-config"] == VLLM_NO_CUDA_GRAPHS)
    return flags


def parse_env_file(text: str, lines: Callable[[str], list[str]] = lambda t: t.split("\n")) -> dict[str, str]:
    """docker run --env-file's rules: a variable per line (a trailing CR dropped), leading blanks trimmed,
    blank and ``#`` lines skipped, KEY=value split at the first ``=``, the value raw to the end of the line.
    ``lines=str.splitlines`` reads it as Python-based parsers do (CR, VT, FF, NEL, U+2028... end lines)."""
    env: dict[str, str] = {}
    for raw in lines(text):
        line = raw.removesuffix("\r").lstrip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"not a KEY=value line: {raw!r}"
        assert key not in env, f"{key} twice"
        env[key] = value
    return env


def check_tgi(text: str, doc: dict[str, Any]) -> dict[str, str]:
    env = parse_env_file(text)
    assert parse_env_file(text, str.splitlines) == env  # no line break docker misses and Python sees
    for key, val in env.items():
        assert key in TGI_KEYS, f"undocumented TGI variable {key}"
        assert re.fullmatch(r"\S+", val), f"{key}={val!r}"
        assert not TGI_KEYS[key] or val in TGI_KEYS[key], f"{key}={val} not among {sorted(TGI_KEYS[key])}"
    assert not ({"DTYPE", "QUANTIZE"} <= set(env)), "TGI documents that DTYPE cannot be used with QUANTIZE"
    assert int(env["MAX_INPUT_TOKENS"]) < int(env["MAX_TOTAL_TOKENS"])
    assert env["MAX_BATCH_SIZE"] == str(doc["config"]["batch_size"])
    if doc["hardware"].get("device_type") == "cuda":
        assert re.fullmatch(r"0|\d+(,\d+)*", env["CUDA_GRAPHS"])
    else:
        assert "CUDA_GRAPHS" not in env, "a config tuned on a CPU measured no CUDA graphs"
    return env


def parse_pbtxt(text: str) -> Any:
    """config.pbtxt read by protobuf's own text-format parser against Triton's model_config.proto."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def check_triton(text: str, doc: dict[str, Any]) -> Any:
    cfg = parse_pbtxt(text)
    assert {f.name for f, _ in cfg.ListFields()} == TRITON_FIELDS
    c = doc["config"]
    assert cfg.name == triton_name(doc) and cfg.backend == "python"
    assert cfg.max_batch_size == c["batch_size"]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == round(c["max_queue_delay_ms"] * 1000)
    (group,) = cfg.instance_group
    assert group.count == c["streams"]
    kind = "KIND_GPU" if doc["hardware"].get("device_type") == "cuda" else "KIND_CPU"
    assert group.kind == model_config_pb2.ModelInstanceGroup.Kind.Value(kind)
    types_ = model_config_pb2.DataType
    assert [(t.name, t.data_type, list(t.dims), t.optional) for t in cfg.input] == [
        ("text_input", types_.Value("TYPE_STRING"), [1], False),
        ("max_tokens", types_.Value("TYPE_INT32"), [1], True),
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg.output] == [
        ("text_output", types_.Value("TYPE_STRING"), [1])
    ]
    assert set(cfg.parameters) == {"model"}
    return cfg


CHECKS: dict[str, Callable[[str, dict[str, Any]], Any]] = {"vllm": check_vllm, "tgi": check_tgi, "triton": check_triton}


def verdicts(text: str) -> dict[str, tuple[str, str]]:
    """knob -> (value, verdict) from the output's comment lines."""
    out = {}
    for ln in text.splitlines():
        if m := VERDICT.match(ln):
            out[m.group(1)] = (m.group(2), m.group(3))
    return out


def comments(text: str) -> str:
    return "\n".join(ln for ln in text.split("\n") if ln.startswith("#"))


# -- tests ---------------------------------------------------------------------------------------------------
def test_registry() -> None:
    assert list(FORMATS) == ["json", "vllm", "tgi", "triton"]
    assert json.loads(FORMATS["json"](BASE_DOC | {"metrics": {}})) == BASE_DOC | {"metrics": {}}


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("fmt", ["vllm", "tgi", "triton"])
@pytest.mark.parametrize(("knob", "value"), KNOB_CASES)
def test_every_knob_value_gets_a_verdict(fmt: str, knob: str, value: Any, device: str) -> None:
    """Each knob value is mapped or explained in a comment, and the output stays within documented fields."""
    doc = crafted(device, **{knob: value})
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
    assert cfg.instance_group[0].count == 4 and cfg.dynamic_batching.max_queue_delay_microseconds == 250
    assert cfg.parameters["model"].string_value == "meta-llama/Llama-3.2-1B-Instruct"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_config_tuned_on_a_cpu_gets_no_cuda_graphs(backend: str) -> None:
    """Only what was tuned: no CUDA_GRAPHS sizes / -O2 for a CPU-tuned config, and the comment says why;
    the same config tuned on a GPU keeps them."""
    cpu, gpu = crafted("cpu", backend=backend, batch_size=8), crafted("cuda", backend=backend, batch_size=8)
    tgi_cpu, tgi_gpu = FORMATS["tgi"](cpu), FORMATS["tgi"](gpu)
    assert "CUDA_GRAPHS" not in check_tgi(tgi_cpu, cpu) and "CUDA_GRAPHS" in check_tgi(tgi_gpu, gpu)
    assert "no CUDA_GRAPHS: tuned on a CPU" in comments(tgi_cpu)
    vllm_cpu, vllm_gpu = check_vllm(FORMATS["vllm"](cpu), cpu), check_vllm(FORMATS["vllm"](gpu), gpu)
    assert "-O2" not in vllm_cpu and ("-O1" in vllm_cpu) == (backend == "inductor")
    assert ("--compilation-config" in vllm_cpu) == (backend == "inductor")
    if backend not in ("eager", "inductor"):
        assert "-O2" in vllm_gpu
    if backend != "eager":
        assert "tuned on a CPU" in comments(FORMATS["vllm"](cpu))


def test_slo_clauses_read_as_the_spec_wrote_them() -> None:
    """A fidelity floor is stored with ``min`` and reads ``>=``; a ceiling with ``max`` reads ``<=``."""
    doc = crafted()
    doc["slo"] = [
        {"metric": "e2e_ms", "percentile": "p95", "max": 500.0},
        {"metric": "top1_agreement", "min": 0.9},
        {"metric": "kl", "max": 0.05},
        {"metric": "peak_memory_mb", "max": 4000},
    ]
    want = "SLO: p95 e2e_ms <= 500, top1_agreement >= 0.9, kl <= 0.05, peak_memory_mb <= 4000"
    for fmt in ("vllm", "tgi", "triton"):
        head = comments(FORMATS[fmt](doc))
        assert want in head and "None" not in head, head


@pytest.mark.parametrize("fmt", ["vllm", "tgi", "triton"])
def test_real_export_of_a_preset(real_doc: dict[str, Any], fmt: str) -> None:
    """The tiny study's real export: header names study/trial/model/fingerprint, the preset is a placeholder."""
    text = FORMATS[fmt](real_doc)
    CHECKS[fmt](text, real_doc)
    blob = comments(text)
    assert f"study: {real_doc['study']}  trial: {real_doc['trial']}" in blob
    assert real_doc["hardware"]["fingerprint"] in blob and "preset:llama-tiny" in blob
    assert "WARNING" in blob and "PLACEHOLDER" in text
    assert set(verdicts(text)) == set(real_doc["config"]) - {"engine", "engine_args"}  # measured on autotune's
    assert "<= None" not in blob and ">= None" not in blob


def _stub_vllm(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A ``vllm`` on PATH that writes its arguments (NUL-terminated) to a file outside the run directory."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    argv = tmp_path / "argv"
    fake = bin_dir / "vllm"
    fake.write_text(f"#!/bin/sh\nfor a in \"$@\"; do printf '%s\\0' \"$a\"; done > '{argv}'\n")
    fake.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, argv


def test_vllm_script_runs(real_doc: dict[str, Any], tmp_path: Path) -> None:
    """The vLLM output is a runnable script: refuses to run on the preset placeholder, passes its flags."""
    script = tmp_path / "serve.sh"
    script.write_text(FORMATS["vllm"](real_doc))
    env, argv = _stub_vllm(tmp_path)
    res = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=10)
    assert res.returncode != 0 and "autotune preset" in res.stderr and not argv.exists()
    res = subprocess.run(["sh", str(script)], env={**env, "MODEL": "org/m"}, capture_output=True, text=True, timeout=10)
    assert res.returncode == 0, res.stderr
    args = argv.read_text().split("\0")[:-1]
    assert args[:2] == ["serve", "org/m"] and args[2:] == vllm_knobs(real_doc)[1]


# -- hostile text in every field of the export document -------------------------------------------------------
HOSTILE = [
    "nl\ntouch PWNED\n#",
    "cr\rtouch PWNED\r#",
    "crlf\r\ntouch PWNED\r\n",
    "nul\x00esc\x1b[2J\x07bel",
    "ls\u2028touch PWNED\u2029ps",
    "nel\u0085touch PWNED",
    "vt\x0bff\x0cfs\x1cgs\x1drs\x1e",
    "bidi\u202etxt.exe\u200b",
    "it's \"quoted\" 'twice'",
    "back\\slash\\n\\",
    "$(touch PWNED)",
    "`touch PWNED`",
    "${HOME} $PATH",
    "#hash ; touch PWNED #",
    "KEY=value",
    "x\nMODEL_ID=evil\nQUANTIZE=fp8",
    'x"\n}\nparameters { key: "evil" value: { string_value: "1" } }\n#',
    "' ; touch PWNED ; '",
    "lone \ud800 surrogate",
    "  blank ends  ",
    "-rf",
]
IDS = [f"h{i}" for i in range(len(HOSTILE))]


def hostile_doc(h: str, device_type: str = "cuda") -> dict[str, Any]:
    """BASE_DOC with ``h`` in every free-text field: study, model, variant, hardware, SLO, times, versions."""
    doc = crafted(device_type)
    doc.update(study=f"s{h}", model=f"org/m{h}", exported_at=h, autotune_version=h, schema_version=h, trial=h)
    doc["config"]["model"] = f"org/v{h}"
    doc["hardware"].update(device=h, device_name=h, fingerprint=h, cpu_model=h)
    doc["slo"] = [{"metric": h, "percentile": h, "max": h}, {"metric": "top1_agreement", "min": h}, {"metric": h}]
    doc["metrics"] = {"output_tokens_per_s": h, "e2e_ms": {"p95": h}}
    return doc


def only_printable(text: str) -> bool:
    """No line break but LF, no control, format or separator character anywhere in the output."""
    return all(ch == "\n" or ch.isprintable() for ch in text)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("h", HOSTILE, ids=IDS)
def test_hostile_text_stays_inert_in_every_format(h: str, device: str) -> None:
    """Each target's own parser finds exactly the intended settings, and hostile text only inside comments."""
    doc = hostile_doc(h, device)
    ref = doc["model"]
    for fmt in ("vllm", "tgi", "triton"):
        text = FORMATS[fmt](doc)
        assert only_printable(text), (fmt, text)
        CHECKS[fmt](text, doc)
        assert escape_text(doc["study"]) in comments(text)  # shown, escaped, in a comment
    argv = vllm_argv(FORMATS["vllm"](doc))
    printable = ref == ref.strip() and ref.isprintable()
    assert argv[2] == (ref if printable else '${MODEL:?set MODEL to the hub id or path of the model: the exported '
                                             "model reference is not one}")  # fmt: skip
    assert argv[3:] == vllm_knobs(doc)[1]
    env = check_tgi(FORMATS["tgi"](doc), doc)
    env_safe = printable and not set("\"'`\\$#") & set(ref)  # what docker, compose and dotenv all read as-is
    assert env == {
        "MODEL_ID": ref if env_safe else placeholder(doc),
        **tgi_knobs(doc)[1],
        "MAX_INPUT_TOKENS": "512",
        "MAX_TOTAL_TOKENS": "576",
    }
    cfg = check_triton(FORMATS["triton"](doc), doc)
    assert cfg.parameters["model"].string_value == (ref if printable else placeholder(doc))
    assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", cfg.name)


@pytest.mark.parametrize("h", HOSTILE, ids=IDS)
def test_hostile_vllm_script_runs_nothing_but_vllm(h: str, tmp_path: Path) -> None:
    """Every sh on the machine parses the script (``-n``) and runs it without creating a file; ``vllm`` gets
    the exact model reference as one argument, or the script asks for MODEL instead of guessing."""
    doc = hostile_doc(h)
    script = tmp_path / "serve.sh"
    script.write_text(FORMATS["vllm"](doc), encoding="utf-8")
    env, argv = _stub_vllm(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    shells = [s for s in ("sh", "dash", "bash") if shutil.which(s)]
    for shell in shells:
        res = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True, timeout=10)
        assert res.returncode == 0 and not res.stderr, (shell, res.stderr)
        for model in (None, "org/chosen"):
            argv.unlink(missing_ok=True)
            extra = {"MODEL": model} if model else {}
            res = subprocess.run(
                [shell, str(script)], cwd=run, env={**env, **extra}, capture_output=True, text=True, timeout=10
            )
            assert not list(run.iterdir()) and not list(tmp_path.rglob("PWNED")), (shell, h)
            ref = doc["model"]
            if ref == ref.strip() and ref.isprintable() and not ref.startswith("-"):
                assert res.returncode == 0, res.stderr
                assert argv.read_text().split("\0")[:-1] == ["serve", ref, *vllm_knobs(doc)[1]]
            elif model is None:
                assert res.returncode != 0 and "set MODEL" in res.stderr and not argv.exists()
            else:
                assert argv.read_text().split("\0")[1] == "org/chosen"


@pytest.mark.parametrize("h", HOSTILE, ids=IDS)
def test_pbtxt_strings_and_escaped_comments_read_back(h: str) -> None:
    """A pbtxt string literal parses back to the very string (protobuf's parser); an escaped comment is one line
    of printable text and different texts stay different."""
    cfg = parse_pbtxt(f"# {escape_text(h)}\nname: {pbtxt_string(h)} # {escape_text(h)}\nmax_batch_size: 3\n")
    assert cfg.name == h.replace("\ud800", "\ufffd") and cfg.max_batch_size == 3
    assert only_printable(escape_text(h) + pbtxt_string(h)) and "\n" not in escape_text(h)
    assert escape_text("a\\nb") != escape_text("a\nb")


def test_model_references_that_fit_are_written_exactly(tmp_path: Path) -> None:
    """Printable references with quotes, ``$``, backslash, ``#``, ``=``: sh gets the exact word, pbtxt the exact
    string; the env file takes ``=`` and blanks inside, but not what docker and dotenv read differently."""
    for ref, env_ok in (
        ("org/m=1 with spaces", True),
        ('/models/it\'s "q" \\ $x `y` #z', False),
        ("org/ünïcode-模型", True),
    ):
        doc = crafted()
        doc["model"] = ref
        assert vllm_argv(FORMATS["vllm"](doc))[2] == ref
        assert check_triton(FORMATS["triton"](doc), doc).parameters["model"].string_value == ref
        assert check_tgi_model(FORMATS["tgi"](doc), doc) == (ref if env_ok else placeholder(doc))


def check_tgi_model(text: str, doc: dict[str, Any]) -> str:
    env = parse_env_file(text)
    assert parse_env_file(text, str.splitlines) == env
    return env["MODEL_ID"]


# -- the Triton model repository -----------------------------------------------------------------------------
def test_triton_repository_is_complete() -> None:
    doc = crafted()
    files = triton_repository(doc)
    assert set(files) == {"crafted/config.pbtxt", "crafted/1/model.py", f"crafted/1/{TRITON_EXPORT_FILE}"}
    check_triton(files["crafted/config.pbtxt"], doc)
    assert files["crafted/config.pbtxt"] == FORMATS["triton"](doc)
    assert json.loads(files[f"crafted/1/{TRITON_EXPORT_FILE}"]) == json.loads(FORMATS["json"](doc))
    assert files["crafted/1/model.py"] == TRITON_MODEL_SOURCE.read_text()
    compile(files["crafted/1/model.py"], "model.py", "exec")
    with tarfile.open(fileobj=io.BytesIO(triton_archive(doc)), mode="r:gz") as tar:
        names = tar.getnames()
        assert set(names) == {*files, "crafted", "crafted/1"}
        for rel, text in files.items():
            member = tar.extractfile(rel)
            assert member is not None and member.read().decode() == text
    assert triton_archive(doc) == triton_archive(doc)  # reproducible download


@pytest.mark.parametrize("study", ["..", "../../etc", "/abs/path", ".hidden", "a/b\\c", "", "nl\nx", "ok-name_1.2"])
def test_triton_repository_writes_only_inside_its_directory(study: str, tmp_path: Path) -> None:
    """Whatever the study is called, the model lands in one directory directly under the repository, written
    whole; a rewrite replaces our files and leaves other files (another version) alone; no staging remains."""
    doc = crafted()
    doc["study"] = study
    root = tmp_path / "sandbox" / "models"
    model_dir = write_triton_repository(doc, root)
    assert model_dir.parent == root and model_dir.name == triton_name(doc) and not model_dir.name.startswith(".")
    assert {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} == set(triton_repository(doc))
    assert [p.name for p in (tmp_path / "sandbox").iterdir()] == ["models"]  # nothing beside the repository
    check_triton((model_dir / "config.pbtxt").read_text(), doc)
    (model_dir / "2").mkdir()
    (model_dir / "2" / "keep.txt").write_text("another version")
    (model_dir / "config.pbtxt").write_text("stale")
    assert write_triton_repository(doc, root) == model_dir
    assert (model_dir / "2" / "keep.txt").read_text() == "another version"
    assert (model_dir / "config.pbtxt").read_text() == FORMATS["triton"](doc)
    assert [p.name for p in root.iterdir()] == [model_dir.name]  # no staging directory left behind


# -- model.py against a stand-in of the Python backend's API ---------------------------------------------------
class StubTensor:
    """pb_utils.Tensor: a name and a numpy array (TYPE_STRING as np.object_ of bytes; np.str_ refused)."""

    def __init__(self, name: str, numpy_array: np.ndarray) -> None:
        if not isinstance(numpy_array, np.ndarray) or numpy_array.dtype.type in (np.str_, np.void):
            raise TypeError("Tensor dtype used for numpy_array is not supported by Python backend; use np.object_")
        self._name, self._array = name, numpy_array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class StubRequest:
    def __init__(self, inputs: list[StubTensor]) -> None:
        self._inputs = inputs

    def inputs(self) -> list[StubTensor]:
        return self._inputs


class StubError:
    def __init__(self, msg: str, code: int | None = None) -> None:
        self._msg = msg

    def message(self) -> str:
        return self._msg


class StubResponse:
    def __init__(self, output_tensors: list[StubTensor] | None = None, error: StubError | None = None) -> None:
        if not isinstance(output_tensors, list):
            raise TypeError('"output_tensors" must be a list.')
        self._outputs, self._error = output_tensors, error

    def output_tensors(self) -> list[StubTensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> StubError | None:
        return self._error


def _get_input_tensor_by_name(request: StubRequest, name: str) -> StubTensor | None:
    return next((t for t in request.inputs() if t.name() == name), None)


@pytest.fixture
def pb_utils(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """The slice of ``triton_python_backend_utils`` model.py uses, installed where its import finds it."""
    mod = types.ModuleType("triton_python_backend_utils")
    mod.Tensor = StubTensor  # type: ignore[attr-defined]
    mod.InferenceRequest = StubRequest  # type: ignore[attr-defined]
    mod.InferenceResponse = StubResponse  # type: ignore[attr-defined]
    mod.TritonError = StubError  # type: ignore[attr-defined]
    mod.get_input_tensor_by_name = _get_input_tensor_by_name  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", mod)
    return mod


def load_model_py(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("autotune_triton_model_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TritonPythonModel()


def strings(rows: list[str]) -> np.ndarray:
    return np.array([[r.encode("utf-8")] for r in rows], dtype=np.object_)


def int32s(name: str, *rows: int) -> StubTensor:
    """A TYPE_INT32 input of shape [rows, 1], as Triton hands it to the Python backend."""
    return StubTensor(name, np.array([[r] for r in rows], dtype=np.int32))


def triton_args(model_dir: Path, cfg: Any) -> dict[str, str]:
    """What Triton hands initialize(): the model config as JSON, the instance and where the model lives."""
    return {
        "model_config": json_format.MessageToJson(cfg, preserving_proto_field_name=True),
        "model_instance_kind": "CPU",
        "model_instance_device_id": "0",
        "model_repository": str(model_dir),
        "model_version": "1",
        "model_name": cfg.name,
    }


def test_triton_model_py_generates_text_in_batches(
    real_doc: dict[str, Any], tmp_path: Path, pb_utils: types.ModuleType
) -> None:
    """The written model.py loads the export of the shipped tiny-lm beside it with autotune's engine, answers a
    batch of requests (several rows, a max_tokens, two bad requests) in one engine call per batch_size rows with
    the text that engine generates, and stops on finalize."""
    import torch

    from autotune.deploy import load_engine

    threads = torch.get_num_threads()  # initialize() splits the cores between the instances: restored below
    doc = copy.deepcopy(real_doc) | {"model": "builtin:tiny-lm"}
    model_dir = write_triton_repository(doc, tmp_path / "models")
    cfg = check_triton((model_dir / "config.pbtxt").read_text(), doc)
    model = load_model_py(model_dir / "1" / "model.py")
    model.initialize(triton_args(model_dir, cfg))
    try:
        calls: list[tuple[int, int]] = []
        run_batch = model.engine.run_batch

        def counted(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
            calls.append((len(prompts), max_new_tokens))
            return run_batch(prompts, max_new_tokens)

        model.engine.run_batch = counted
        prompts = ["def add(a, b):", "The os module", "Return the"]
        requests = [
            StubRequest([StubTensor("text_input", strings(prompts[:2]))]),
            StubRequest([StubTensor("text_input", strings(prompts[2:])), int32s("max_tokens", 3)]),
            StubRequest([StubTensor("text_input", strings([""]))]),
            StubRequest([StubTensor("text_input", strings(["x"])), int32s("max_tokens", 0)]),
        ]
        responses = model.execute(requests)
    finally:
        model.finalize()
        torch.set_num_threads(threads)
    assert len(responses) == len(requests)
    assert [r.has_error() for r in responses] == [False, False, True, True]
    assert "no tokens" in responses[2].error().message() and "max_tokens" in responses[3].error().message()
    got = []
    for r in responses[:2]:
        (out,) = r.output_tensors()
        assert out.name() == "text_output" and out.as_numpy().dtype == np.object_ and out.as_numpy().shape[1] == 1
        got += [b.decode("utf-8") for b in out.as_numpy().reshape(-1)]
    assert len(got) == 3 and all(got)
    _, total = token_limits(doc)
    default = total - token_limits(doc)[0]  # type: ignore[operator]
    b = doc["config"]["batch_size"]
    limits = [default, default, 3]
    assert calls == [(len(limits[i : i + b]), max(limits[i : i + b])) for i in range(0, 3, b)]
    # the same rows through the same engine config, outside Triton: the very same text
    ref = load_engine(doc | {"config": {**doc["config"], "streams": 1, "max_queue_delay_ms": 0.0}}, start=False)
    try:
        want = []
        for i in range(0, 3, b):
            ids = [ref.encode(p) for p in prompts[i : i + b]]
            outs = ref.run_batch(ids, max(limits[i : i + b]))
            want += [
                ref.tokenizer.decode(o[:n], skip_special_tokens=True)
                for o, n in zip(outs, limits[i : i + b], strict=True)
            ]
            assert all(len(o[:n]) == n for o, n in zip(outs, limits[i : i + b], strict=True))
    finally:
        ref.stop()
    assert got == want


def test_triton_model_py_refuses_a_placeholder(real_doc: dict[str, Any], tmp_path: Path, pb_utils: Any) -> None:
    """A preset's export names a PLACEHOLDER model: model.py says what to replace instead of loading anything."""
    model_dir = write_triton_repository(real_doc, tmp_path / "models")
    cfg = check_triton((model_dir / "config.pbtxt").read_text(), real_doc)
    assert cfg.parameters["model"].string_value.startswith("PLACEHOLDER-")
    with pytest.raises(ValueError, match=r'the "model" parameter is .PLACEHOLDER-llama-tiny'):
        load_model_py(model_dir / "1" / "model.py").initialize(triton_args(model_dir, cfg))


def test_cli_export_formats(tuned: Path, real_doc: dict[str, Any]) -> None:
    res = run_cli("export", "tiny", "--format", "triton", cwd=tuned)
    assert res.returncode == 0, res.stderr
    cfg = check_triton(res.stdout, real_doc)
    assert cfg.name == "tiny" and "--output DIR" in res.stderr
    res = run_cli("export", "tiny", "--format", "tgi", "--output", "deploy/tiny.env", cwd=tuned)
    assert res.returncode == 0, res.stderr
    check_tgi((tuned / "deploy" / "tiny.env").read_text(), real_doc)
    assert [p.name for p in (tuned / "deploy").iterdir()] == ["tiny.env"]  # no temp file left behind
    res = run_cli("export", "tiny", "--format", "nope", cwd=tuned)
    assert res.returncode == 2 and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and "allowed: json, vllm, tgi, triton" in res.stderr


def test_builtin_and_preset_models_become_checkpoint_folders_vllm_and_tgi_load(
    tuned: Path, real_doc: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``autotune export --format vllm|tgi`` writes a preset once as a folder (weights, tokenizer,
    config) with exactly the weights the trials drew, and points the file at it; a builtin model's
    shipped folder is used as it is; the dashboard (no writing) keeps the placeholder until then."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from autotune.checkpoint import servable
    from autotune.models import builtin_path, load_model

    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path / "cache"))
    assert servable(real_doc, write=False) == real_doc  # nothing written yet: the placeholder stays
    res = run_cli("export", "tiny", "--format", "vllm", cwd=tuned, env={"AUTOTUNE_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr
    (folder,) = (tmp_path / "cache" / "checkpoints").iterdir()
    assert f"vllm serve {folder}" in res.stdout and "PLACEHOLDER" not in res.stdout
    assert "= preset:llama-tiny, written by autotune as this checkpoint folder" in res.stdout
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    drawn, _, _ = load_model("preset:llama-tiny", seed=real_doc["model_seed"])
    assert all(
        torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), drawn.state_dict().values(), strict=True)
    )
    assert AutoTokenizer.from_pretrained(folder)("def f(x):")["input_ids"]
    assert servable(real_doc, write=False)["model"] == str(folder)  # written once, found again
    tgi = FORMATS["tgi"](servable(real_doc))
    assert f"MODEL_ID={folder}" in tgi.splitlines()
    builtin = servable({**real_doc, "model": "builtin:tiny-lm"}, write=False)
    assert (
        builtin["model"] == str(builtin_path("builtin:tiny-lm")) and builtin["model_written_from"] == "builtin:tiny-lm"
    )
    assert f"vllm serve {builtin['model']}" in FORMATS["vllm"](builtin)
