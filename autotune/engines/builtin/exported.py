"""Backends that run the model exported to ONNX: ``onnxruntime`` and ``openvino``.

PyTorch eager spends most of a small model's decode step in per-operator dispatch; a graph runtime
runs the same graph with one call (``python bench/exported_step.py --batch 4 --cached 16`` on the
2-core CPU: tiny-lm, ONNX Runtime 0.45 ms a step, OpenVINO 1.7 ms, PyTorch eager 3.5 ms). Hugging
Face's exporters (optimum-onnx) pin transformers below 4.58, so the graph is exported here with
``torch.onnx.export``'s TorchScript tracer, checked against PyTorch on inputs of other shapes, or
with its torch.export path where the tracer fails or disagrees (:func:`_onnx_export`): one graph,
every shape dynamic (batch, new tokens, cached tokens), that takes the token ids, their positions,
a 4-D additive mask and the key/value cache of every layer, and returns each row's next token (greedy,
end-of-sequence suppressed like the other loops) and the cache grown by the new tokens. ONNX
Runtime and OpenVINO both read that file (:data:`RUNTIMES`: one class with one method each).

Prefill and decode are the same graph: the prompt is run against a one-slot dummy cache whose
slot is masked out for every query, so cached tokens never need a zero-length input. The slot
stays (masked) for the whole generation.

Exports are cached on disk (``AUTOTUNE_CACHE_DIR``, default ``~/.cache/autotune``) under a key
of the weights' digest, the attention kernel and the exporter's versions: a later trial or study
of the same model loads the file instead of exporting again, and the time each took is reported
apart from measurement (``export_s``, ``export_cached``). The fidelity check runs a second graph
(logits at every position) on the same runtime, so what is scored is what is served.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Bumped when the exported graph changes, so old cache entries are not used. 2: graphs from the
#: TorchScript tracer, whose step runs faster in ONNX Runtime than torch.export's (bench/exporters.py).
EXPORT_FORMAT = 2
_EXPORT_LOCK = threading.Lock()


def cache_root() -> Path:
    return Path(os.environ.get("AUTOTUNE_CACHE_DIR") or Path.home() / ".cache" / "autotune") / "onnx"


class _OnnxRuntime:
    """ONNX Runtime's CPU provider; its thread pool is per session."""

    package = "onnxruntime"

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(self, feed: dict[str, Any]) -> list[Any]:
        return list(self._session.run(None, feed))


class _OpenVino:
    """OpenVINO's CPU plugin, tuned for latency (one stream of inference requests)."""

    package = "openvino"

    def __init__(self, path: Path, threads: int) -> None:
        import openvino as ov

        hints = {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            # fp32 as the backend promises: on CPUs with native bf16 (AVX512-BF16, AMX) the plugin
            # would otherwise run in bf16 by default, and the tokens would drift from the reference.
            "INFERENCE_PRECISION_HINT": "f32",
        }
        compiled = ov.Core().compile_model(str(path), "CPU", hints)
        self._outputs = list(compiled.outputs)
        self._request = compiled.create_infer_request()  # not thread-safe: one per stream worker

    def run(self, feed: dict[str, Any]) -> list[Any]:
        got = self._request.infer(feed)  # copies the outputs: the next call may feed them back in
        return [got[o] for o in self._outputs]


#: Runtime name (the backend's) -> its class: ``cls(path, threads).run(feed) -> outputs in order``.
RUNTIMES: dict[str, type[_OnnxRuntime] | type[_OpenVino]] = {"onnxruntime": _OnnxRuntime, "openvino": _OpenVino}
#: What the export itself needs, whatever runs the graph.
EXPORTER_PACKAGES = ("onnx", "onnxscript")


def missing_packages(runtime: str) -> list[str]:
    """The packages ``runtime`` needs that are not installed (checked without importing them)."""
    from importlib.util import find_spec

    return [p for p in (RUNTIMES[runtime].package, *EXPORTER_PACKAGES) if find_spec(p) is None]


def export_key(model: Any, attention: str) -> str:
    """What the exported graph depends on: the weights (every byte), the architecture's config,
    the attention kernel and the exporter's versions; not where the weights were read from (the
    config's ``_name_or_path``: the quickstart from a second checkout exported its graph again)."""
    import onnxscript
    import torch
    import transformers

    h = hashlib.sha256()
    what = {
        "format": EXPORT_FORMAT,
        "config": {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"},
        "attention": attention,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnxscript": onnxscript.__version__,
    }
    h.update(json.dumps(what, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _eos_ids(model: Any) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def _step_module(model: Any) -> Any:
    """The exported function, as a module: (ids, positions, mask, *cache) -> (next ids, *grown cache)."""
    import torch
    from transformers import DynamicCache

    from autotune.engines.builtin.decoder import _cache_kwarg

    layers = model.config.num_hidden_layers
    eos = _eos_ids(model)
    cache_kw = _cache_kwarg(model)

    class Step(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, position_ids: Any, mask: Any, *cache: Any) -> tuple[Any, ...]:
            past = DynamicCache()
            for i in range(layers):
                past.update(cache[2 * i], cache[2 * i + 1], i)
            logits = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
                **{cache_kw: past},
            ).logits[:, -1, :]
            if eos:
                logits = logits.index_fill(1, torch.tensor(eos, dtype=torch.long), float("-inf"))
            grown = [t for i in range(layers) for t in (past.layers[i].keys, past.layers[i].values)]
            return (logits.argmax(-1), *grown)

    return Step().eval()


def _cache_shape(model: Any, rows: int, length: int) -> tuple[int, int, int, int]:
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return (rows, heads, length, head_dim)


def export(model: Any, path: Path, fast: bool = True) -> str:
    """Write the step graph (``path`` plus its weights); returns the exporter that wrote it
    (``fast``: try the tracer first, see :func:`_onnx_export`)."""
    import torch

    layers = model.config.num_hidden_layers
    names = [f"cache.{i}" for i in range(2 * layers)]
    outputs = ["next_ids", *[f"grown.{i}" for i in range(2 * layers)]]

    def inputs(rows: int, new: int, cached: int, seed: int | None = None) -> tuple[Any, ...]:
        """The step's inputs at these sizes: ones and zeros, or with ``seed`` random ids and cache."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        shape = _cache_shape(model, rows, cached)
        return (
            torch.randint(0, model.config.vocab_size, (rows, new), generator=gen)
            if gen
            else torch.ones(rows, new, dtype=torch.long),
            torch.arange(cached, cached + new).repeat(rows, 1),
            torch.zeros(rows, 1, new, cached + new),
            *(torch.randn(shape, generator=gen) if gen else torch.zeros(shape) for _ in range(2 * layers)),
        )

    # Sizes other than 0 and 1 (which torch.export would specialise); the probe has others again,
    # so a shape the tracer baked in shows as a disagreement.
    example, probe = inputs(2, 3, 4), inputs(3, 2, 5, seed=0)
    b, s, p = torch.export.Dim("rows"), torch.export.Dim("new"), torch.export.Dim("cached")
    dynamic = (
        {0: b, 1: s},
        {0: b, 1: s},
        {0: b, 2: s, 3: torch.export.Dim.AUTO},  # cached + new: export derives the relation
        tuple({0: b, 2: p} for _ in range(2 * layers)),
    )
    axes = {"input_ids": {0: "rows", 1: "new"}, "position_ids": {0: "rows", 1: "new"}}
    axes["mask"] = {0: "rows", 2: "new", 3: "total"}
    axes.update({n: {0: "rows", 2: "cached"} for n in names})
    axes.update({o: {0: "rows", 2: "grown"} for o in outputs[1:]} | {"next_ids": {0: "rows"}})
    graph = _Graph(["input_ids", "position_ids", "mask", *names], outputs, dynamic, axes)
    return _onnx_export(_step_module(model), example, probe, path, graph, fast)


@dataclass
class _Graph:
    """A graph's names and dynamic dimensions, as each exporter takes them."""

    inputs: list[str]
    outputs: list[str]
    dynamic_shapes: Any  # torch.export's
    dynamic_axes: dict[str, dict[int, str]]  # the TorchScript tracer's


def _onnx_export(
    module: Any, example: tuple[Any, ...], probe: tuple[Any, ...], path: Path, graph: _Graph, fast: bool = True
) -> str:
    """Export with the TorchScript tracer (``torch.onnx.export(dynamo=False)``), which takes a
    second where torch.export takes ten (tiny-lm's step: 1.1 s against 9.5 s on the 2-core CPU,
    ``python bench/exporters.py``; most of a first onnxruntime trial's overhead), if the traced
    graph gives PyTorch's outputs on ``probe`` (other shapes than ``example``: a tracer records
    one run, so a shape baked into the graph shows there); else with torch.export
    (``dynamo=True``), as every export did before. Returns which one wrote ``path``:
    ``torchscript`` or ``dynamo``."""
    import warnings

    import torch

    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        if fast and _traced(module, example, probe, path, graph):
            return "torchscript"
        _write(module, example, path, graph, dynamo=True)
    return "dynamo"


def _write(module: Any, example: tuple[Any, ...], path: Path, graph: _Graph, dynamo: bool) -> None:
    """One ``torch.onnx.export`` call: torch.export's (weights in an external file, which models
    past 2 GB need) or the tracer's."""
    import torch

    how: dict[str, Any] = (
        {"dynamic_shapes": graph.dynamic_shapes, "external_data": True}
        if dynamo
        else {"dynamic_axes": graph.dynamic_axes}
    )
    torch.onnx.export(
        module,
        example,
        str(path),
        dynamo=dynamo,
        input_names=graph.inputs,
        output_names=graph.outputs,
        verbose=False,
        **how,
    )


def _traced(module: Any, example: tuple[Any, ...], probe: tuple[Any, ...], path: Path, graph: _Graph) -> bool:
    """Export with the tracer; False (and nothing of it left beside ``path``) if that fails or the
    graph disagrees with ``module`` on ``probe``."""
    before = set(path.parent.iterdir())
    try:
        _write(module, example, path, graph, dynamo=False)
        if _agrees(module, probe, path, graph.inputs):
            return True
    except Exception:  # any failure of the fast path: the caller falls back to torch.export
        pass
    for leftover in set(path.parent.iterdir()) - before:
        leftover.unlink()
    return False


def _agrees(module: Any, probe: tuple[Any, ...], path: Path, names: list[str]) -> bool:
    """Whether the graph at ``path``, run by an installed runtime, gives ``module``'s outputs on
    ``probe``: integer outputs exactly, float ones within float noise."""
    from importlib.util import find_spec

    import numpy as np
    import torch

    runtime = next((cls for cls in RUNTIMES.values() if find_spec(cls.package) is not None), None)
    if runtime is None:
        return False
    want = module(*probe)
    want = [t.numpy() for t in (want if isinstance(want, tuple) else (want,))]
    got = runtime(path, max(1, torch.get_num_threads())).run({n: t.numpy() for n, t in zip(names, probe, strict=True)})
    return len(got) == len(want) and all(
        g.shape == w.shape
        and (np.array_equal(g, w) if w.dtype.kind in "iu" else np.allclose(g, w, rtol=1e-3, atol=1e-4))
        for g, w in zip(got, want, strict=True)
    )


def _logits_module(model: Any) -> Any:
    """For the fidelity check: token ids and a 2-D mask -> logits at every position (no cache)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return Logits().eval()


def export_logits(model: Any, path: Path, fast: bool = True) -> str:
    """Write the fidelity graph (``path`` plus its weights); returns the exporter that wrote it."""
    import torch

    example = (torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
    gen = torch.Generator().manual_seed(0)
    probe = (torch.randint(0, model.config.vocab_size, (3, 7), generator=gen), torch.ones(3, 7, dtype=torch.long))
    b, s = torch.export.Dim("rows"), torch.export.Dim("tokens")
    axes = {"input_ids": {0: "rows", 1: "tokens"}, "attention_mask": {0: "rows", 1: "tokens"}}
    graph = _Graph(["input_ids", "attention_mask"], ["logits"], ({0: b, 1: s}, {0: b, 1: s}), axes)
    return _onnx_export(_logits_module(model), example, probe, path, graph, fast)


def _manifest(final: Path, name: str) -> Path:
    return final / f"{name}.sizes.json"


def _intact(final: Path, name: str) -> bool:
    """Whether ``final/name`` and its data files have the sizes they were published with (a copy
    cut short, a disk filled up or a hand edit shows here, and the entry is exported again)."""
    try:
        sizes = json.loads(_manifest(final, name).read_text())
        return bool(sizes) and all((final / f).stat().st_size == n for f, n in sizes.items())
    except (OSError, ValueError, AttributeError):
        return False


def _publish(final: Path, name: str, write: Any) -> bool:
    """Write ``final/name`` (and its external ``.data`` file) once, whatever the number of trial
    processes exporting the same model at once: one holds the folder's lock and exports through a
    private folder (a reader never sees half a file), the others wait and find it there. True when
    an intact copy was already there."""
    final.mkdir(parents=True, exist_ok=True)
    with open(final / ".lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # not a POSIX system: one exporting process at a time is then the user's care
            pass
        if _intact(final, name):
            return True
        work = Path(tempfile.mkdtemp(prefix=".export-", dir=final))
        try:
            write(work / name)
            files = sorted(work.iterdir(), key=lambda p: p.name == name)  # the graph itself last
            sizes = {f.name: f.stat().st_size for f in files}
            _manifest(final, name).unlink(missing_ok=True)  # no manifest while files are swapped
            for f in files:
                os.replace(f, final / f.name)
            _manifest(final, name).write_text(json.dumps(sizes))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return False


@dataclass
class ExportedStep:
    """One model's exported step graph in this process, and a runtime session per stream worker."""

    runtime: str  # a RUNTIMES key
    path: Path
    export_s: float
    cached: bool
    layers: int
    heads: int  # key/value heads
    head_dim: int
    dtype_min: float
    model: Any = field(repr=False, default=None)  # the PyTorch model, for the fidelity graph's export

    def __post_init__(self) -> None:
        self._sessions: dict[tuple[int, int], Any] = {}
        self._logits: Any = None
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model: Any, attention: str, runtime: str = "onnxruntime") -> ExportedStep:
        """Export ``model`` (or take its export from the disk cache) to run on ``runtime``."""
        import torch

        with _EXPORT_LOCK:
            t = time.perf_counter()
            final = cache_root() / export_key(model, attention)
            cached = _publish(final, "step.onnx", lambda path: export(model, path))
            _, heads, _, head_dim = _cache_shape(model, 1, 1)
            layers = model.config.num_hidden_layers
            took = time.perf_counter() - t
            return cls(runtime, final / "step.onnx", took, cached, layers, heads, head_dim, torch.finfo().min, model)

    def _session(self, path: Path, threads: int) -> Any:
        return RUNTIMES[self.runtime](path, threads)

    def logits(self, ids: Any) -> Any:
        """Logits at every position of ``ids`` (rows x tokens, no padding) from the exported
        fidelity graph, exported (or taken from the cache) on first use."""
        import numpy as np
        import torch

        with self._lock:
            if self._logits is None:
                path = self.path.parent / "logits.onnx"
                with _EXPORT_LOCK:
                    _publish(path.parent, path.name, lambda p: export_logits(self.model, p))
                self._logits = self._session(path, max(1, torch.get_num_threads()))
        feed = {"input_ids": ids.numpy().astype(np.int64), "attention_mask": np.ones(ids.shape, dtype=np.int64)}
        return torch.from_numpy(self._logits.run(feed)[0])

    def greedy(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Greedy continuations of same-length prompts through the step graph."""
        import torch

        ids = torch.tensor(prompts, dtype=torch.long)
        decoder = GraphDecoder(self, self.session(-1, max(1, torch.get_num_threads())))
        decoder.prefill(ids, torch.ones_like(ids))
        return decoder.decode(new_tokens).tolist()

    def session(self, stream: int, threads: int) -> Any:
        """This stream worker's session (ONNX Runtime's thread pool is per session)."""
        with self._lock:
            s = self._sessions.get((stream, threads))
            if s is None:
                s = self._sessions[(stream, threads)] = self._session(self.path, threads)
            return s


class GraphDecoder:
    """Greedy generation through an :class:`ExportedStep`, with
    :class:`autotune.engines.builtin.decoder.StaticDecoder`'s interface (``prefill`` then ``decode``),
    for any number of rows and prompt width."""

    def __init__(self, step: ExportedStep, session: Any) -> None:
        self.step, self.session = step, session
        self._cache: list[Any] = []
        self._tokens: Any = None

    def prefill(self, ids: Any, attention_mask: Any) -> Any:
        """Run the prompts (left-padded ``ids``); returns the first new token of each row."""
        import numpy as np
        import torch

        from autotune.engines.builtin.decoder import prompt_attention

        allowed, positions = prompt_attention(attention_mask.bool())
        keep = attention_mask.numpy().astype(bool)
        rows, width = keep.shape
        lo = self.step.dtype_min
        mask = np.full((rows, 1, width, 1 + width), lo, dtype=np.float32)  # column 0: the dummy slot
        mask[:, 0, :, 1:][allowed.numpy()] = 0.0
        positions = positions.numpy().astype(np.int64)
        empty = np.zeros((rows, self.step.heads, 1, self.step.head_dim), dtype=np.float32)
        cache = [empty] * (2 * self.step.layers)
        out = self.session.run(self._feed(ids.numpy().astype(np.int64), positions, mask, cache))
        self._cache = out[1:]
        # The decode steps' mask: dummy slot hidden, prompt keys where real; grows one visible column a step.
        self._mask_row = np.concatenate(
            [np.full((rows, 1), lo, np.float32), np.where(keep, 0.0, lo).astype(np.float32)], 1
        )
        self._position = keep.sum(-1, keepdims=True).astype(np.int64)
        self._tokens = out[0].astype(np.int64)
        self._out = [self._tokens]
        return torch.from_numpy(self._tokens)

    def _feed(self, ids: Any, positions: Any, mask: Any, cache: list[Any]) -> dict[str, Any]:
        feed = {"input_ids": ids, "position_ids": positions, "mask": mask}
        feed.update({f"cache.{i}": c for i, c in enumerate(cache)})
        return feed

    def decode(self, new_tokens: int) -> Any:
        """The remaining ``new_tokens - 1`` tokens after :meth:`prefill`; returns rows x new_tokens ids."""
        import numpy as np
        import torch

        rows = self._tokens.shape[0]
        visible = np.zeros((rows, new_tokens), dtype=np.float32)
        for t in range(new_tokens - 1):
            mask = np.concatenate([self._mask_row, visible[:, : t + 1]], 1)[:, None, None, :]
            out = self.session.run(self._feed(self._tokens[:, None], self._position + t, mask, self._cache))
            self._tokens = out[0].astype(np.int64)
            self._cache = out[1:]
            self._out.append(self._tokens)
        return torch.from_numpy(np.stack(self._out[:new_tokens], 1))
