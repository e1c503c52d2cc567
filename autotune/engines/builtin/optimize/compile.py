"""Execution backends. Compiled backends need fixed shapes, so they switch the model to a
static KV cache and the engine pads every batch to ``batch_size`` rows and one prompt length;
generate() then compiles its decode step (transformers' ``CompileConfig``) on first use.

The CUDA-graph backends run autotune's own static-cache decode loop (:mod:`autotune.engines.builtin.decoder`)
instead of ``generate()`` and capture its whole step as one CUDA graph, so a new token costs one
graph replay instead of ``generate()``'s per-token Python: ``cuda-graphs`` captures the eager
kernels (no compiler, ~1 s), ``inductor-cudagraphs`` compiles the step with Inductor first and
captures the fused kernels (fewer, larger kernels; a compile per process).

``tensorrt`` is the same ``generate()`` path as ``inductor`` with Torch-TensorRT as the
``torch.compile`` backend: TensorRT engines for the decode step, offered only on a GPU where
``torch_tensorrt`` imports.

``onnxruntime`` and ``openvino`` export the forward pass to ONNX once per model (cached on disk) and
decode with that runtime (:mod:`autotune.engines.builtin.exported`): one runtime call per step instead of PyTorch's
per-operator dispatch, every shape dynamic so nothing is padded."""

from __future__ import annotations

from typing import Any

from autotune.config import TrialConfig
from autotune.engines.builtin.optimize.base import Technique, first_reason, needs_cuda
from autotune.hardware import Hardware


def _eager(model: Any, hw: Hardware) -> Any:
    return model


def _compiled(backend: str, mode: str) -> Any:
    """Have generate() compile its decode step with ``torch.compile(backend=backend)``."""

    def apply(model: Any, hw: Hardware) -> Any:
        from transformers import CompileConfig

        if backend == "torch_tensorrt":
            import torch_tensorrt  # noqa: F401  (importing it registers the torch.compile backend)

        # transformers' own path: generate() compiles the decode step only (prefill stays eager,
        # so one prompt shape never costs a second graph) and reads each step's outputs before
        # the next CUDA-graph replay overwrites them. Compiling model.forward ourselves failed
        # on the H200 with "accessing tensor output of CUDAGraphs that has been overwritten".
        gen = model.generation_config
        gen.cache_implementation = "static"
        gen.compile_config = CompileConfig(fullgraph=False, dynamic=False, backend=backend, mode=mode)
        if hw.device_type != "cuda":  # transformers auto-compiles on accelerators only unless told
            gen.compile_config._compile_all_devices = True
        gen.disable_compile = False
        return model

    return apply


def _needs_tensorrt(hw: Hardware) -> str | None:
    from importlib.util import find_spec

    missing = (
        None
        if find_spec("torch_tensorrt")
        else "needs Torch-TensorRT (pip install torch-tensorrt, the build made for this torch)"
    )
    return first_reason(needs_cuda()(hw), missing)


def _tensorrt_conflict(cfg: TrialConfig, hw: Hardware) -> str | None:
    if cfg.scheduler == "continuous":
        return "continuous batching runs transformers' own loop: tensorrt needs scheduler static or bucketed"
    if cfg.quantization != "none":
        return "torchao's quantized tensors do not lower to TensorRT engines: use quantization none"
    return None


def _needs_compiler(hw: Hardware) -> str | None:
    if hw.device_type == "cpu" and not hw.has_c_compiler:
        return "inductor on CPU needs a C compiler (gcc/clang) on PATH"
    return None


def _quant_compile_conflict(cfg: TrialConfig, hw: Hardware) -> str | None:
    if hw.device_type == "cpu" and cfg.quantization == "int8-dynamic":
        return "torch's fbgemm dynamic int8 modules are eager-only: use backend eager"
    return None


def _own_loop_conflict(cfg: TrialConfig, hw: Hardware) -> str | None:
    if cfg.scheduler == "continuous":
        return f"continuous batching runs transformers' own loop: {cfg.backend} needs scheduler static"
    return None


def _exported_unsupported(runtime: str) -> Any:
    def check(hw: Hardware) -> str | None:
        from autotune.engines.builtin.exported import missing_packages

        missing = missing_packages(runtime)
        if missing:
            return f"needs {', '.join(missing)} (pip install 'autotune[{runtime}]')"
        if hw.device_type != "cpu":
            return f"runs on {runtime}'s CPU device only here (its GPU execution is not wired in yet)"
        return None

    return check


def _exported_conflict(cfg: TrialConfig, hw: Hardware) -> str | None:
    be = cfg.backend
    if cfg.scheduler == "continuous":
        return f"continuous batching runs transformers' own loop: {be} needs scheduler static or bucketed"
    if cfg.quantization != "none":
        return (
            "the export takes the model unquantized (torchao and fbgemm modules do not export): use quantization none"
        )
    if cfg.precision not in ("fp32", "tf32"):
        return f"the export runs in fp32 on {be}'s CPU device: use precision fp32"
    if cfg.attention not in ("sdpa", "eager"):
        return f"attention {cfg.attention} is not exported: use sdpa or eager"
    return None


BACKENDS: dict[str, Technique] = {
    "eager": Technique("eager", _eager, description="plain PyTorch eager"),
    "inductor": Technique(
        "inductor",
        _compiled("inductor", "default"),
        _needs_compiler,
        _quant_compile_conflict,
        description="torch.compile (inductor) with a static KV cache",
    ),
    "inductor-cudagraphs": Technique(
        "inductor-cudagraphs",
        _eager,  # the decoder compiles its own step (autotune.engines.builtin.decoder)
        needs_cuda(),
        _own_loop_conflict,
        description="autotune's static-cache decode loop, its step compiled by Inductor, then one CUDA graph",
    ),
    "cuda-graphs": Technique(
        "cuda-graphs",
        _eager,
        needs_cuda(),
        _own_loop_conflict,
        description="autotune's static-cache decode loop, each step one captured CUDA graph (no compiler)",
    ),
    "tensorrt": Technique(
        "tensorrt",
        _compiled("torch_tensorrt", "default"),
        _needs_tensorrt,
        _tensorrt_conflict,
        description="torch.compile with Torch-TensorRT (TensorRT engines) and a static KV cache",
    ),
    "onnxruntime": Technique(
        "onnxruntime",
        _eager,  # the engine exports the model once it is built (autotune.engines.builtin.exported)
        _exported_unsupported("onnxruntime"),
        _exported_conflict,
        description="the forward pass exported to ONNX (cached on disk), decoded by ONNX Runtime",
    ),
    "openvino": Technique(
        "openvino",
        _eager,
        _exported_unsupported("openvino"),
        _exported_conflict,
        description="the same ONNX export, decoded by OpenVINO's CPU plugin",
    ),
}


def uses_static_decoder(backend: str) -> bool:
    """Backends that decode in :class:`autotune.engines.builtin.decoder.StaticDecoder` instead of ``generate()``."""
    return backend in ("cuda-graphs", "inductor-cudagraphs")


def uses_exported_graph(backend: str) -> bool:
    """Backends that decode in :class:`autotune.engines.builtin.exported.GraphDecoder`."""
    return backend in ("onnxruntime", "openvino")


def compiles_decoder_step(backend: str) -> bool:
    """Whether :class:`autotune.engines.builtin.decoder.StaticDecoder` runs its step through ``torch.compile``."""
    return backend == "inductor-cudagraphs"


def needs_fixed_shapes(backend: str) -> bool:
    """Compiled backends recompile per shape; the engine pads to one shape instead. The ONNX
    graph is exported with every shape dynamic."""
    return backend not in ("eager", "onnxruntime", "openvino")
