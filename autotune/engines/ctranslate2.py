"""CTranslate2 as an engine: its C++ decode loop and int8 GEMMs behind autotune's own batcher.

CTranslate2 runs in autotune's process, so it keeps everything the built-in engine has around the
model: the batcher and its streams, the workload replay, ``autotune serve`` and ``verify``.
:class:`CTranslate2Served` subclasses :class:`autotune.engines.builtin.engine.Engine` and replaces only how a
batch is generated (``generator.generate_batch`` on the unpadded prompts) and how the engine is
built (a ``ctranslate2.Generator`` instead of a torch model).

The model is converted once from its checkpoint folder (presets are written as one first, see
:mod:`autotune.checkpoint`) with ``TransformersConverter`` at float32, and cached under
``$AUTOTUNE_CACHE_DIR/ctranslate2/<weight digest>-float32``; the compute type (int8, bfloat16, ...)
is applied when the generator loads it. Converting once is the cheaper choice: on llama-small
(58M) converting takes ~6 s at float32 (3 s at int8), while quantizing on load adds 0.3-0.7 s to
a 0.1 s load, and one lossless copy serves every compute type.

Knobs: batch size, queue delay and streams (each stream a concurrent ``generate_batch``: the
generator gets ``inter_threads=streams``), precision x quantization mapped to a compute type the
device supports, and CTranslate2's own ``intra_threads`` (threads per batch; default cores //
streams).

What is measured as the first-token time, and why it is sampled: :meth:`CTranslate2Served._first_tokens`.
Fidelity scores what is served: ``engine.served`` holds ``fidelity()``'s ``logits`` (``forward_batch``
at the served compute type, full vocabulary) and ``greedy`` (the served ``generate_batch``);
``engine.model`` is the architecture on the meta device, for what reads the model's shape.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from autotune.config import TrialConfig
from autotune.engines.base import EngineKnob, EngineKnobs, ServingEngine
from autotune.engines.builtin.engine import BuildTimings, Engine, GenerationResult, _Prepared

if TYPE_CHECKING:
    from autotune.hardware import Hardware
    from autotune.models import ModelInfo

#: The precision the cached conversion keeps (lossless for fp32/bf16/fp16 checkpoints).
CONVERTED_AS = "float32"
#: Bumped when the conversion changes, so older cache entries are not used.
CONVERT_FORMAT = 1
_CONVERT_LOCK = threading.Lock()

#: (precision, quantization) -> CTranslate2 compute type. On a CPU, CTranslate2's ``int8`` is
#: ``int8_float32`` (the loaded generator reports it so): one value, not two.
COMPUTE_TYPES: dict[tuple[str, str], str] = {
    ("fp32", "none"): "float32",
    ("fp32", "int8-dynamic"): "int8_float32",
    ("bf16", "none"): "bfloat16",
    ("bf16", "int8-dynamic"): "int8_bfloat16",
    ("fp16", "none"): "float16",
    ("fp16", "int8-dynamic"): "int8_float16",
}
#: Why a shared knob value has no CTranslate2 counterpart.
_NO_COUNTERPART = {
    "precision=tf32": "CTranslate2 has no TF32 switch (fp32 runs float32)",
    "quantization=int8-weight-only": "CTranslate2's int8 quantizes the activations too: that is int8-dynamic",
    "quantization=int4-weight-only": "CTranslate2 runs int4 only from AWQ-quantized checkpoints",
    "quantization=fp8": "CTranslate2 has no fp8 compute type",
    "backend": "CTranslate2 runs its own C++ decode loop (no torch backend applies)",
    "attention": "CTranslate2 has its own attention kernels",
    "scheduler=continuous": "transformers' paged-attention scheduler runs a torch model; "
    "CTranslate2 runs static batches",
    "scheduler=bucketed": "not searched: CTranslate2 forwards a batch's common prompt length at once and the rest "
    "step by step, so bucketing buys little",
    "pipeline_depth": "preparing a CTranslate2 batch is converting ids to token strings: nothing to overlap",
}
#: CUDA compute types by the compute capability they need (CTranslate2's documented table: the
#: parent process must not initialise CUDA, so the device is not asked).
_CUDA_MIN_CC = {
    "float32": (3, 5),
    "int8_float32": (6, 1),
    "float16": (5, 3),
    "int8_float16": (6, 1),
    "bfloat16": (8, 0),
    "int8_bfloat16": (8, 0),
}


def import_ctranslate2() -> Any:
    """``import ctranslate2`` (one place, so how it is loaded can change in one place).

    What was measured about its OpenMP: the wheel bundles a libgomp, but torch puts its own in the
    global symbol scope (``libtorch_global_deps``, ``RTLD_GLOBAL``), so CTranslate2's OpenMP calls
    bind to torch's runtime (``LD_DEBUG=bindings``): its wait policy and its per-thread pools (see
    ``engines/builtin/openmp.py``) apply to it. Trial processes ran with ``OMP_WAIT_POLICY=PASSIVE``
    until 2026-12-07 and the engine at 0.84-0.99x there (``bench/ctranslate2_engine.py``, mode
    ``engine:passive``); importing with ``RTLD_DEEPBIND`` (its own libgomp) did not close that gap,
    so the plain import stays.
    """
    import ctranslate2

    return ctranslate2


def compute_type(precision: str, quantization: str) -> str | None:
    """The CTranslate2 compute type that runs ``precision`` x ``quantization``, or None."""
    return COMPUTE_TYPES.get((precision, quantization))


def supported_compute_types(hw: Hardware) -> set[str]:
    """The compute types CTranslate2 runs on ``hw``'s device."""
    ctranslate2 = import_ctranslate2()
    if hw.device_type == "cuda":
        cc = tuple(hw.compute_capability or (0, 0))
        return {ct for ct, need in _CUDA_MIN_CC.items() if cc >= need}
    return set(ctranslate2.get_supported_compute_types("cpu"))


def cache_root() -> Path:
    from autotune.checkpoint import cache_root as checkpoints

    return checkpoints().parent / "ctranslate2"


@dataclass
class CTranslate2Timings(BuildTimings):
    """The built-in timings plus the conversion (``load_s``: the tokenizer and the generator, whose
    load applies the compute type, so ``quantize_s`` stays 0)."""

    checkpoint_s: float = 0.0  # writing a preset as a checkpoint folder (0 when it was there)
    convert_s: float = 0.0  # converting the checkpoint, or finding it in the cache
    convert_cached: float = 0.0  # 1.0 when the conversion came from the disk cache


@dataclass(frozen=True)
class Converted:
    """A CTranslate2 model folder and where it came from."""

    path: Path
    source: Path
    convert_s: float
    cached: bool
    checkpoint_s: float = 0.0


def _source_folder(ref: str, seed: int) -> Path:
    """The checkpoint folder of ``ref``: a preset written once, a ``builtin:`` model, a local folder, or
    a hub id's snapshot (downloaded when it is not cached)."""
    from autotune.checkpoint import checkpoint_dir
    from autotune.digest import model_dir
    from autotune.errors import ModelError

    folder = checkpoint_dir(ref, seed) or model_dir(ref)
    if folder is None:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(ref))
        except Exception as err:  # no network, no such repo
            raise ModelError(f"cannot fetch {ref!r} to convert it for CTranslate2: {err}") from err
    return folder


def convert(ref: str, seed: int = 0) -> Converted:
    """``ref`` converted for CTranslate2, from the cache when it was converted before.

    Keyed by the weights' digest (:func:`autotune.digest.model_digest`), not the path, so a second
    checkout or study reuses it; written beside its place and renamed, so it appears whole.
    """
    from autotune.digest import model_digest

    t = time.perf_counter()
    source = _source_folder(ref, seed)
    checkpoint_s = time.perf_counter() - t
    digest = model_digest(ref, seed) or model_digest(str(source), seed)
    if digest is None:
        from autotune.errors import ModelError

        raise ModelError(f"no weights to convert in {source}")
    target = cache_root() / f"{digest['sha256'][:16]}-{CONVERTED_AS}"
    t = time.perf_counter()
    with _CONVERT_LOCK:
        if _complete(target):
            return Converted(target, source, time.perf_counter() - t, True, checkpoint_s)
        from ctranslate2.converters import TransformersConverter

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            TransformersConverter(str(source)).convert(str(tmp), quantization=CONVERTED_AS, force=True)
            _unique_vocabulary(tmp)
            meta = {"format": CONVERT_FORMAT, "source": str(source), "ref": ref, "digest": digest["sha256"]}
            meta["ctranslate2"] = CTranslate2Engine().version()
            (tmp / "autotune.json").write_text(json.dumps(meta, indent=1))
            if _complete(target):  # another process converted it meanwhile: same weights
                shutil.rmtree(tmp)
            else:
                if target.exists():  # an older format, or a leftover: replaced
                    shutil.rmtree(target)
                tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return Converted(target, source, time.perf_counter() - t, False, checkpoint_s)


def _complete(folder: Path) -> bool:
    try:
        meta = json.loads((folder / "autotune.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(meta.get("format") == CONVERT_FORMAT and (folder / "model.bin").is_file())


def _vocabulary_file(folder: Path) -> Path:
    for name in ("vocabulary.json", "vocabulary.txt"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no vocabulary in the converted model {folder}")


def read_vocabulary(folder: Path) -> list[str]:
    """The converted model's tokens by id: ``generate_batch`` takes token strings, not ids."""
    path = _vocabulary_file(folder)
    if path.suffix == ".json":
        return list(json.loads(path.read_text(encoding="utf-8")))
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def _unique_vocabulary(folder: Path) -> None:
    """Give every id its own string: CTranslate2 maps strings to ids, so a token string that two ids
    share would send the second id's prompts in as the first (outputs are read as ids, untouched)."""
    vocab = read_vocabulary(folder)
    seen: set[str] = set()
    changed = False
    for i, tok in enumerate(vocab):
        if tok in seen:
            vocab[i], changed = f"{tok}\u2063<autotune-id-{i}>", True
        seen.add(vocab[i])
    if changed:
        path = _vocabulary_file(folder)
        text = json.dumps(vocab, ensure_ascii=False) if path.suffix == ".json" else "".join(t + "\n" for t in vocab)
        path.write_text(text, encoding="utf-8")


def _meta_model(folder: Path, precision: str, pad_id: int | None) -> Any:
    """The architecture on the meta device (no weights: CTranslate2 holds them), at the config's
    precision, so what reads ``engine.model`` for its shape (the roofline's counts, fidelity's
    generation config) works unchanged. It cannot run."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from autotune.engines.builtin.optimize.precision import torch_dtype

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch_dtype(precision))
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    if model.generation_config.pad_token_id is None and pad_id is not None:
        model.generation_config.pad_token_id = pad_id
    return model.eval()


class CTranslate2Served(Engine):
    """autotune's :class:`~autotune.engines.builtin.engine.Engine` (batcher, streams, serving) with CTranslate2's
    ``generate_batch`` generating each batch. Build it with :meth:`build`."""

    generator: Any
    vocabulary: list[str]
    converted: Converted
    #: Every how many batches of one shape the first-token time is clocked per row (see :meth:`_first_tokens`).
    clock_every: int = 8

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._clock_lock = threading.Lock()
        self._batches_of_shape: dict[tuple[int, int], int] = {}
        self._first_share: dict[tuple[int, int], float] = {}
        #: Batches whose first-token times were clocked per row, and batches whose were estimated.
        self.first_token_clock = {"clocked": 0, "estimated": 0}

    @classmethod
    def build(
        cls,
        model_ref: str,
        config: TrialConfig,
        hardware: Hardware,
        *,
        seed: int = 0,
        prompt_pad_to: int | None = None,
        max_context: int | None = None,
    ) -> CTranslate2Served:
        """Convert (or find) the model, load the generator at the config's compute type."""
        from autotune.models import load_tokenizer, resolve_model

        why = CTranslate2Engine().conflict(config, hardware)
        if why:
            raise ValueError(f"ctranslate2 cannot run {config.label()}: {why}")
        ctype = compute_type(config.precision, config.quantization)
        assert ctype is not None  # conflict() said so
        ctranslate2 = import_ctranslate2()
        timings = CTranslate2Timings()
        converted = convert(model_ref, seed)
        timings.checkpoint_s, timings.convert_s = converted.checkpoint_s, converted.convert_s
        timings.convert_cached = float(converted.cached)
        t = time.perf_counter()
        tokenizer = load_tokenizer(str(converted.source))
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        cuda = hardware.device_type == "cuda"
        generator = ctranslate2.Generator(
            str(converted.path),
            device="cuda" if cuda else "cpu",
            device_index=int(hardware.device.partition(":")[2] or 0) if cuda else 0,
            compute_type=ctype,
            inter_threads=config.streams,
            intra_threads=0 if cuda else intra_threads(config, hardware),
        )
        info: ModelInfo = resolve_model(model_ref)
        model = _meta_model(converted.source, config.precision, tokenizer.pad_token_id)
        timings.load_s = time.perf_counter() - t
        engine = cls(
            model,
            tokenizer,
            config,
            hardware,
            info,
            timings=timings,
            prompt_pad_to=prompt_pad_to,
            max_context=max_context,
        )
        engine.generator = generator
        engine.vocabulary = read_vocabulary(converted.path)
        engine.converted = converted
        return engine

    def reconfigure(self, config: TrialConfig) -> None:
        """As the built-in engine's, but streams and the own knobs set the generator's thread pools:
        they need a new build."""
        changed = [k for k in ("streams", "engine_args") if getattr(config, k) != getattr(self.config, k)]
        if changed:
            raise ValueError(f"{', '.join(changed)} change the CTranslate2 generator: build a new engine")
        super().reconfigure(config)

    # -- generation ---------------------------------------------------------------------------
    def _tokens(self, prompts: Sequence[Sequence[int]]) -> list[list[str]]:
        vocab = self.vocabulary
        return [[vocab[i] for i in p] for p in prompts]

    def _generate(self, p: _Prepared, stream: int) -> list[GenerationResult]:
        """One ``generate_batch`` on the unpadded prompts (the padded tensors of ``p`` are not used):
        greedy, exactly ``p.new_tokens`` new tokens (end-of-sequence suppressed until then, as the
        built-in engine's ``min_new_tokens``). First-token times: see :meth:`_first_tokens`."""
        rows, shape = len(p.batch), (len(p.batch), p.new_tokens)
        with self._clock_lock:
            seen = self._batches_of_shape.get(shape, 0)
            self._batches_of_shape[shape] = seen + 1
            clocked = seen % self.clock_every == 0 or shape not in self._first_share
        firsts: list[float | None] = [None] * rows

        def clock(step: Any) -> bool:
            if firsts[step.batch_id] is None:
                firsts[step.batch_id] = time.perf_counter()
            return False

        tokens = self._tokens([q.prompt_ids for q in p.batch])
        t_start = time.perf_counter()
        out = self.generator.generate_batch(
            tokens,
            max_length=p.new_tokens,
            min_length=p.new_tokens,
            include_prompt_in_result=False,
            beam_size=1,
            sampling_topk=1,
            callback=clock if clocked else None,
        )
        t_end = time.perf_counter()
        t_first = self._first_tokens(shape, firsts if clocked else None, t_start, t_end)
        return [
            GenerationResult(
                request_id=q.request_id,
                prompt_tokens=len(q.prompt_ids),
                output_ids=list(r.sequences_ids[0][: q.max_new_tokens]),
                t_submit=q.t_submit,
                t_start=t_start,
                t_first_token=t_first[i],
                t_end=t_end,
                batch_rows=rows,
                stream=stream,
            )
            for i, (q, r) in enumerate(zip(p.batch, out, strict=True))
        ]

    def _first_tokens(
        self, shape: tuple[int, int], firsts: list[float | None] | None, t_start: float, t_end: float
    ) -> list[float]:
        """Each row's first-token time.

        A clocked batch (the first of its shape (rows, new tokens), then every ``clock_every``-th)
        times it per row with ``generate_batch``'s step callback: when CTranslate2 handed that row's
        first new token back (a row with a longer prompt than the batch's shortest gets it later: the
        common prompt length is forwarded at once, the rest step by step). The callback is a GIL round
        trip per row and step; on every batch it cost 7% of llama-small's int8 b64 throughput (one round). So the
        other batches are estimated: start + the mean first-token share of the duration of the last
        clocked batch of their shape. :attr:`first_token_clock` counts both kinds.
        """
        span = t_end - t_start
        if firsts is not None:
            times = [t if t is not None else t_end for t in firsts]
            share = sum(t - t_start for t in times) / (len(times) * span) if span > 0 else 1.0
            with self._clock_lock:
                self._first_share[shape] = share
                self.first_token_clock["clocked"] += 1
            return times
        with self._clock_lock:
            share = self._first_share.get(shape, 1.0)
            self.first_token_clock["estimated"] += 1
        return [t_start + share * span] * shape[0]

    # -- fidelity: what is served is scored ---------------------------------------------------
    def served_logits(self, ids: Any) -> Any:
        """Token ids [rows, tokens] -> float32 logits [rows, tokens, vocab] from ``forward_batch``
        (the whole sequence at once, as the reference is scored), at the served compute type."""
        import numpy as np
        import torch

        ctranslate2 = import_ctranslate2()
        out = self.generator.forward_batch([[int(t) for t in row] for row in ids.tolist()])
        if out.dtype != ctranslate2.DataType.float32:
            out = out.to(ctranslate2.DataType.float32)
        if out.device != "cpu":
            out = out.to_device(ctranslate2.Device.cpu)
        return torch.from_numpy(np.array(out))

    def served_greedy(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy continuations of ``prompts``, exactly ``new_tokens`` each, as :meth:`_generate` makes them."""
        out = self.generator.generate_batch(
            self._tokens(prompts),
            max_length=new_tokens,
            min_length=new_tokens,
            include_prompt_in_result=False,
            beam_size=1,
            sampling_topk=1,
        )
        return [list(r.sequences_ids[0]) for r in out]

    @property
    def served(self) -> dict[str, Any]:
        """``fidelity(...)``'s keyword arguments that score this engine (nothing is approximated:
        full-vocabulary logits, and the served decode loop)."""
        return {"logits": self.served_logits, "greedy": self.served_greedy}


def intra_threads(config: TrialConfig, hw: Hardware) -> int:
    """Threads per batch: the config's ``intra_threads``, else the cores split between the streams."""
    given = config.arg("intra_threads")
    if given is not None:
        return int(given)
    return max(1, (hw.cpu_cores or os.cpu_count() or 1) // config.streams)


class CTranslate2Engine(ServingEngine):
    """CTranslate2 (pip ``ctranslate2``), in autotune's process behind its batcher."""

    name: ClassVar[str] = "ctranslate2"
    kind: ClassVar[Literal["in-process", "server"]] = "in-process"
    runtime_knobs: ClassVar[tuple[str, ...]] = ("batch_size", "max_queue_delay_ms")

    def version(self) -> str | None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("ctranslate2")
        except PackageNotFoundError:
            return None

    def install_hint(self) -> str:
        return "pip install 'autotune[ctranslate2]'"

    def knobs(self, hw: Hardware) -> EngineKnobs:
        from autotune.config import PRECISIONS, QUANTIZATIONS
        from autotune.space import default_values

        self.require()
        shared: dict[str, list[Any]] = {k: default_values(k, hw)[0] for k in ("batch_size", "max_queue_delay_ms")}
        shared["streams"] = default_values("streams", hw)[0]
        supported = supported_compute_types(hw)
        where = hw.device_name if hw.device_type == "cuda" else "this CPU"
        dropped = dict(_NO_COUNTERPART)
        shared["precision"], shared["quantization"] = [], []
        for prec in PRECISIONS:
            types = [compute_type(prec, q) for q in QUANTIZATIONS]
            if any(t in supported for t in types if t):
                shared["precision"].append(prec)
            elif f"precision={prec}" not in dropped:
                dropped[f"precision={prec}"] = (
                    f"CTranslate2 {self.version()} has no {compute_type(prec, 'none')} on {where} "
                    f"(it runs {', '.join(sorted(supported))})"
                )
        for q in QUANTIZATIONS:
            if any(compute_type(prec, q) in supported for prec in shared["precision"]):
                shared["quantization"].append(q)
            elif f"quantization={q}" not in dropped:
                dropped[f"quantization={q}"] = (
                    f"no precision runs it on {where} (CTranslate2: {', '.join(sorted(supported))})"
                )
        own = {
            "intra_threads": EngineKnob(
                "intra_threads",
                (None,),
                help="threads per batch (CTranslate2's intra_threads); default: the cores split between the streams",
                ordinal=True,
            )
        }
        return EngineKnobs(shared=shared, own=own, dropped=dropped)

    def conflict(self, cfg: TrialConfig, hw: Hardware) -> str | None:
        ctype = compute_type(cfg.precision, cfg.quantization)
        if ctype is None:
            key = f"quantization={cfg.quantization}" if cfg.quantization != "none" else f"precision={cfg.precision}"
            return f"{cfg.precision} x {cfg.quantization}: " + _NO_COUNTERPART.get(key, "no CTranslate2 compute type")
        supported = supported_compute_types(hw)
        if ctype not in supported:
            return f"compute_type={ctype}: CTranslate2 does not run it here (it runs {', '.join(sorted(supported))})"
        for knob in ("backend", "attention", "scheduler", "pipeline_depth"):
            value, default = getattr(cfg, knob), TrialConfig.model_fields[knob].default
            if value != default:
                return f"{knob}={value}: " + _NO_COUNTERPART.get(f"{knob}={value}", _NO_COUNTERPART.get(knob, ""))
        threads = cfg.arg("intra_threads")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            return f"intra_threads={threads}: a positive whole number of threads"
        return None

    def build_engine(
        self,
        model_ref: str,
        config: TrialConfig,
        hardware: Hardware,
        *,
        seed: int = 0,
        prompt_pad_to: int | None = None,
        max_context: int | None = None,
    ) -> Engine:
        """The engine a trial measures and ``autotune serve`` serves (``Engine.build``'s signature)."""
        self.require()
        return CTranslate2Served.build(
            model_ref, config, hardware, seed=seed, prompt_pad_to=prompt_pad_to, max_context=max_context
        )
