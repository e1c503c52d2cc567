"""Fidelity: does a fast config still give the model's answers?

Every study fixes a seeded evaluation set (windows of an evaluation text, or the spec's prompts)
and computes a *reference* once: the model at the spec's reference precision, eager,
unquantized. Each trial then scores its own model on the same inputs:

- ``kl``: mean KL(reference || trial) of the next-token distributions. The reference keeps its
  ``top_k`` most likely tokens per position plus one bucket for the rest of the vocabulary, so
  the figure is the KL of those coarsened distributions (never more than the full KL; 0 when
  the logits match).
- ``top1_agreement``: share of positions where the trial's most likely token is the reference's.
- ``greedy_agreement``: mean share of ``greedy_tokens`` greedy tokens that match the reference's
  continuation before the first difference (tokens after a divergence are not comparable).
- ``perplexity`` and ``perplexity_increase_pct`` against the reference's perplexity on the windows.

Fidelity is computed eagerly on the trial's weights and numerics (precision, quantization,
attention kernel); compiled backends and schedulers run those same weights.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autotune.errors import SpecError

if TYPE_CHECKING:
    from autotune.spec import QualitySpec

#: The default evaluation text: held-out Python standard-library docstrings (never trained on).
DEFAULT_EVAL_TEXT = "models/tiny-lm/heldout.txt"
_EPS = 1e-12


def default_eval_text() -> str:
    return (resources.files("autotune") / "data" / DEFAULT_EVAL_TEXT).read_text(encoding="utf-8")


def read_eval_text(q: QualitySpec) -> str:
    """The evaluation text of a quality spec, or one clear SpecError."""
    if q.eval_text is None:
        return default_eval_text()
    path = Path(q.eval_text)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"quality.eval_text: file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"quality.eval_text: cannot read {path} as UTF-8 text ({type(err).__name__})") from None
    if not text.strip():
        raise SpecError(f"quality.eval_text: {path} is empty")
    return text


@dataclass(frozen=True)
class EvalSet:
    """Token windows (all ``tokens`` long when cut from a text; prompts keep their own length)."""

    windows: list[list[int]]
    greedy_prompt_tokens: int
    greedy_tokens: int

    def key(self) -> str:
        """A hash of the inputs: a cached reference is only valid for the very same eval set."""
        blob = json.dumps([self.windows, self.greedy_prompt_tokens, self.greedy_tokens]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def build_eval_set(q: QualitySpec, tokenizer: Any) -> EvalSet:
    """Cut the seeded windows from the eval text (or tokenize the spec's prompts)."""
    if q.prompts:
        windows = [list(tokenizer(p, add_special_tokens=False)["input_ids"])[: q.tokens] for p in q.prompts]
        short = [i for i, w in enumerate(windows) if len(w) < 2]
        if short:
            raise SpecError(f"quality.prompts.{short[0]}: needs at least 2 tokens to predict anything")
        prompt = min(q.greedy_prompt_tokens, min(len(w) for w in windows))
        return EvalSet(windows, prompt, q.greedy_tokens)
    ids = list(tokenizer(read_eval_text(q), add_special_tokens=False)["input_ids"])
    if len(ids) < q.tokens:
        raise SpecError(f"quality: the eval text has {len(ids)} tokens, fewer than one window of {q.tokens}")
    room = len(ids) - q.tokens + 1
    starts = sorted(random.Random(q.seed).sample(range(room), min(q.sequences, room)))
    return EvalSet([ids[s : s + q.tokens] for s in starts], q.greedy_prompt_tokens, q.greedy_tokens)


@dataclass
class Reference:
    """What the reference model said on an eval set; stored once per study."""

    eval_key: str
    topk_ids: Any  # numpy int32 [positions, k]: every window's predicting positions, concatenated
    topk_logprobs: Any  # numpy float32 [positions, k]
    perplexity: float
    greedy: list[list[int]]

    def to_bytes(self) -> bytes:
        import numpy as np

        buf = io.BytesIO()
        meta = json.dumps({"eval_key": self.eval_key, "perplexity": self.perplexity, "greedy": self.greedy})
        raw_meta = np.frombuffer(meta.encode(), np.uint8)
        np.savez_compressed(buf, ids=self.topk_ids, logprobs=self.topk_logprobs, meta=raw_meta)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Reference:
        import numpy as np

        with np.load(io.BytesIO(data)) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            return cls(meta["eval_key"], z["ids"], z["logprobs"], float(meta["perplexity"]), meta["greedy"])

    def to_b64(self) -> str:
        return base64.b64encode(self.to_bytes()).decode()

    @classmethod
    def from_b64(cls, text: str) -> Reference:
        return cls.from_bytes(base64.b64decode(text))


#: Windows scored per forward pass (consecutive windows of equal length).
_CHUNK = 8


def _chunks(windows: list[list[int]]) -> Iterator[list[list[int]]]:
    """Consecutive windows of equal length in batches of up to ``_CHUNK``, in order. No padding,
    so batching never changes what a window sees."""
    chunk: list[list[int]] = []
    for w in windows:
        if chunk and (len(w) != len(chunk[0]) or len(chunk) == _CHUNK):
            yield chunk
            chunk = []
        chunk.append(w)
    if chunk:
        yield chunk


#: A runtime other than the PyTorch model (the onnxruntime backend): token ids [rows, tokens] ->
#: logits [rows, tokens, vocab], and greedy continuations (prompts of one length, new tokens) -> ids.
Logits = Callable[[Any], Any]
Greedy = Callable[[list[list[int]], int], list[list[int]]]


def _torch_logits(model: Any) -> Logits:
    import torch

    device = next(model.parameters()).device

    def run(ids: Any) -> Any:
        ids = ids.to(device)
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

    return run


def _logprobs(model: Any, windows: list[list[int]], logits: Logits | None = None) -> Iterator[tuple[Any, Any]]:
    """Per window: log-probabilities at every predicting position (float32, on the CPU) and the
    actual next tokens. A vocabulary-wide tensor exists for one chunk of windows at a time."""
    import torch

    run = logits or _torch_logits(model)
    with torch.inference_mode():
        for chunk in _chunks(windows):
            lp = torch.log_softmax(run(torch.tensor(chunk))[:, :-1].float(), dim=-1).cpu()
            for row, w in zip(lp, chunk, strict=True):
                yield row, torch.tensor(w[1:])


def _greedy(model: Any, es: EvalSet, greedy: Greedy | None = None) -> list[list[int]]:
    import torch

    device = next(model.parameters()).device
    pad = model.generation_config.pad_token_id
    pad = 0 if pad is None else pad
    conts: list[list[int]] = []
    prompts = [w[: es.greedy_prompt_tokens] for w in es.windows]
    with torch.inference_mode():
        for chunk in _chunks(prompts):
            if greedy is not None:
                conts += greedy(chunk, es.greedy_tokens)
                continue
            ids = torch.tensor(chunk, device=device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=es.greedy_tokens,
                min_new_tokens=es.greedy_tokens,
                do_sample=False,
                pad_token_id=pad,
                disable_compile=True,  # quality is about the weights' numerics, not a compile
            )
            conts += out[:, ids.shape[1] :].tolist()
    return conts


def compute_reference(model: Any, es: EvalSet, top_k: int) -> Reference:
    import torch

    ids, vals, nll = [], [], []
    for lp, targets in _logprobs(model, es.windows):
        v, i = torch.topk(lp, min(top_k, lp.shape[-1]), dim=-1)
        ids.append(i.to(torch.int32))
        vals.append(v)
        nll.append(-lp.gather(1, targets[:, None]).squeeze(1))
    return Reference(
        eval_key=es.key(),
        topk_ids=torch.cat(ids).numpy(),
        topk_logprobs=torch.cat(vals).numpy(),
        perplexity=math.exp(float(torch.cat(nll).mean())),
        greedy=_greedy(model, es),
    )


def _prefix_share(got: list[int], want: list[int]) -> float:
    n = 0
    for a, b in zip(got, want, strict=False):
        if a != b:
            break
        n += 1
    return n / max(len(want), 1)


def fidelity(
    model: Any, es: EvalSet, ref: Reference, *, logits: Logits | None = None, greedy: Greedy | None = None
) -> dict[str, float]:
    """The trial's fidelity figures against the reference (see the module docstring); ``logits``
    and ``greedy`` measure another runtime's numerics (what the trial serves) instead of ``model``'s."""
    import torch

    if ref.eval_key != es.key():
        raise ValueError("the reference was computed on another evaluation set")
    all_ids = torch.from_numpy(ref.topk_ids).long()
    all_ref = torch.from_numpy(ref.topk_logprobs)
    kls, top1, nlls, at = [], [], [], 0
    for lp, targets in _logprobs(model, es.windows, logits):
        n = lp.shape[0]
        ids, ref_lp = all_ids[at : at + n], all_ref[at : at + n]
        at += n
        trial_lp = lp.gather(1, ids)
        p_ref = ref_lp.exp()
        tail_ref = (1 - p_ref.sum(-1)).clamp_min(0)
        tail_trial = (1 - trial_lp.exp().sum(-1)).clamp_min(0)
        tail = tail_ref * ((tail_ref + _EPS).log() - (tail_trial + _EPS).log())
        kls.append((p_ref * (ref_lp - trial_lp)).sum(-1) + torch.where(tail_ref > _EPS, tail, 0.0))
        top1.append(lp.argmax(-1) == ids[:, 0])
        nlls.append(-lp.gather(1, targets[:, None]).squeeze(1))
    kl = torch.cat(kls)
    ppl = math.exp(float(torch.cat(nlls).mean()))
    conts = _greedy(model, es, greedy)
    return {
        "kl": max(float(kl.mean()), 0.0),
        "top1_agreement": float(torch.cat(top1).float().mean()),
        "greedy_agreement": sum(_prefix_share(g, w) for g, w in zip(conts, ref.greedy, strict=True)) / len(conts),
        "perplexity": ppl,
        "reference_perplexity": ref.perplexity,
        "perplexity_increase_pct": 100.0 * (ppl - ref.perplexity) / ref.perplexity,
    }


def text_perplexity(model: Any, tokenizer: Any, text: str, window: int = 128) -> float:
    """Perplexity of ``text``: tokenized once, cut into consecutive ``window``-token pieces (a last
    piece under 2 tokens dropped), each scored on its own; exp of the mean next-token NLL.
    The shipped tiny model's training script records its held-out figure the same way."""

    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    pieces = [ids[i : i + window] for i in range(0, len(ids), window)]
    total, count = 0.0, 0
    for lp, targets in _logprobs(model, [p for p in pieces if len(p) >= 2]):
        total += float(-lp.gather(1, targets[:, None]).sum())
        count += len(targets)
    return math.exp(total / count)
