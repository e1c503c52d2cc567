"""Train the tiny Llama that autotune ships (autotune/data/models/tiny-lm/) on Python stdlib docstrings.

Offline and seeded: the corpus is the docstrings of the running interpreter's standard library, the
tokenizer a 4096-entry byte-level BPE trained on them, the model a 4-layer Llama with grouped-query
attention. Writes the model, tokenizer, held-out text, training.json and a README into --out, then
reloads the saved model from disk and reports its held-out perplexity. Not imported by tests, not run in CI.

    python bench/train_tiny_lm.py [--steps N] [--seed S] [--out DIR]
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import random
import re
import shlex
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

OUT = Path(__file__).resolve().parent.parent / "autotune" / "data" / "models" / "tiny-lm"
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip"}
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
VOCAB = 4096
HELDOUT_PCT = 5
HELDOUT_CAP_CHARS = 100_000
SEQ_LEN = 256
BATCH = 16
PEAK_LR = 2e-3
MIN_LR_RATIO = 0.1
WARMUP_FRAC = 0.05
WEIGHT_DECAY = 0.1
ARCH: dict[str, Any] = {
    "hidden_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 512,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
PERPLEXITY_DEFINITION = (
    "Tokenize the whole heldout.txt once with tokenizer(text, add_special_tokens=False)['input_ids'], split the ids "
    "into consecutive non-overlapping 128-token windows (dropping a final window shorter than 2 tokens), score each "
    "window independently in fp32 eval mode with an all-ones attention mask and no BOS, take the n-1 next-token "
    "natural-log NLLs of each n-token window (logits at i predict token i+1), and report "
    "exp(total NLL / predicted tokens)."
)


def _normalise(doc: str) -> str:
    """Strip trailing spaces, expand tabs and collapse runs of blank lines (the text is already dedented)."""
    lines = [line.rstrip().expandtabs(4) for line in doc.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _docstrings(tree: ast.AST) -> Iterator[str]:
    """Module, class and function docstrings of a parsed file, in source order."""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def collect_docs(stdlib: Path) -> tuple[list[str], int]:
    """Deduplicated, normalised docstrings of the stdlib's .py files (sorted paths), and the number of files read."""
    seen: set[str] = set()
    docs: list[str] = []
    files = 0
    for path in sorted(stdlib.rglob("*.py")):
        if SKIP_DIRS & set(path.relative_to(stdlib).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
            continue
        files += 1
        for raw in _docstrings(tree):
            doc = _normalise(raw)
            if doc and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs, files


def is_heldout(doc: str) -> bool:
    """Stable ~5% split by the SHA-256 of the text."""
    return int.from_bytes(hashlib.sha256(doc.encode()).digest()[:8], "big") % 100 < HELDOUT_PCT


def split_docs(docs: list[str]) -> tuple[list[str], list[str], int]:
    """Train docs, held-out docs kept (up to HELDOUT_CAP_CHARS of text), and how many held-out docs the cap dropped."""
    train = [d for d in docs if not is_heldout(d)]
    held, size = [], 0
    pool = [d for d in docs if is_heldout(d)]
    for doc in pool:
        if size + len(doc) + 2 > HELDOUT_CAP_CHARS:
            break
        held.append(doc)
        size += len(doc) + 2
    return train, held, len(pool) - len(held)


def train_tokenizer(docs: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style, no prefix space) with pad/bos/eos specials, wrapped for transformers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=ARCH["max_position_embeddings"],
    )


def pack(docs: list[str], tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """The training docs joined with <|eos|>, tokenized and cut into [n, SEQ_LEN] rows (the tail is dropped)."""
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // SEQ_LEN
    return torch.tensor(ids[: n * SEQ_LEN], dtype=torch.long).view(n, SEQ_LEN)


def lr_at(step: int, steps: int) -> float:
    """Linear warmup over WARMUP_FRAC of the steps, then cosine decay from PEAK_LR to MIN_LR_RATIO * PEAK_LR."""
    warmup = max(1, int(WARMUP_FRAC * steps))
    if step < warmup:
        return PEAK_LR * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return PEAK_LR * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def batches(rows: torch.Tensor, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches: one seeded permutation of the rows per epoch."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(rows.shape[0], generator=gen)
        for i in range(0, len(order) - batch + 1, batch):
            yield rows[order[i : i + batch]]


@torch.no_grad()
def heldout_perplexity(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, text: str, window: int = 128
) -> float:
    """exp(mean next-token NLL) over non-overlapping `window`-token windows of `text`, each scored on its own."""
    model.eval()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            continue
        x = torch.tensor([chunk], dtype=torch.long)
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits.float()
        total += F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(total / count)


def cpu_model() -> str:
    """The first 'model name' of /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, prompt: str, new_tokens: int = 40) -> str:
    """Greedy continuation of `prompt`."""
    x = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**x, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def write_readme(out: Path, info: dict[str, Any]) -> None:
    """A short model card from the training record."""
    a, c = info["architecture"], info["corpus"]
    text = f"""# tiny-lm

A tiny real causal language model (`LlamaForCausalLM`, {info["parameters"]:,} parameters, fp32) that autotune
ships so that it can tune and check inference configurations offline, with a quality figure to compare against.

- Architecture: Llama, hidden {a["hidden_size"]}, {a["num_hidden_layers"]} layers, {a["num_attention_heads"]} heads,
  {a["num_key_value_heads"]} KV heads (GQA), intermediate {a["intermediate_size"]}, max positions
  {a["max_position_embeddings"]}, tied embeddings, vocabulary {a["vocab_size"]}.
- Tokenizer: byte-level BPE ({a["vocab_size"]} entries) trained on the training text; `<|eos|>` ends documents and is
  the EOS token, `<|pad|>` pads, `<|bos|>` exists but is not added by default.
- Corpus: the module, class and function docstrings of the Python {c["python_version"]} standard library
  ({c["train_docs"]:,} training documents, {c["train_tokens"]:,} tokens), deduplicated; a stable SHA-256 hash of
  each docstring holds out ~{HELDOUT_PCT}%. The held-out text used for evaluation is stored in `heldout.txt`
  ({c["heldout_docs"]:,} documents, {c["heldout_chars"]:,} characters, {c["heldout_tokens"]:,} tokens), so the
  figure below is reproducible with any Python version.
- Training: {info["steps"]} steps of {info["batch_size"]} x {info["seq_len"]} packed tokens, AdamW, peak learning rate
  {PEAK_LR:g} with warmup and cosine decay, seed {info["seed"]}, {info["train_wall_s"] / 60:.1f} minutes on
  {info["machine"]["cpu_cores"]} CPU cores. Final training loss {info["final_train_loss"]:.3f}.

**Held-out perplexity: {info["heldout_perplexity"]:.3f}** — {info["perplexity_definition"]}

Reproduce (CPU, a few minutes to tens of minutes; the stdlib and thread count affect the exact figures):

    {info["command"]}

Everything is in `training.json`. Licence: the training corpus and `heldout.txt` are docstrings of the Python
standard library, © Python Software Foundation, used under the PSF License Agreement.
"""
    (out / "README.md").write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT, help="model directory to write")
    ap.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=BATCH, help="sequences per step")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument(
        "--eval-every", type=int, default=100, help="held-out perplexity every N steps (0: only at the end)"
    )
    args = ap.parse_args()
    command = shlex.join(["python", *sys.argv])

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs, files = collect_docs(stdlib)
    train_docs, held_docs, held_dropped = split_docs(docs)
    heldout_text = "\n\n".join(held_docs) + "\n"
    (out / "heldout.txt").write_text(heldout_text)
    print(f"corpus: {len(docs)} docstrings from {files} files; {len(train_docs)} train, {len(held_docs)} held out")

    tokenizer = train_tokenizer(train_docs)
    rows = pack(train_docs, tokenizer)
    heldout_tokens = len(tokenizer(heldout_text, add_special_tokens=False)["input_ids"])
    print(f"tokenizer: {len(tokenizer)} entries; {rows.numel()} training tokens in {rows.shape[0]} rows")

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **ARCH,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=PEAK_LR,
        betas=(0.9, 0.95),
    )
    model.train()
    losses: list[float] = []
    data = batches(rows, args.batch_size, args.seed)
    t0 = time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps)
        x = next(data)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            recent = losses[-args.log_every :]
            elapsed = time.perf_counter() - t0
            print(
                f"step {step + 1}/{args.steps} loss {sum(recent) / len(recent):.4f} "
                f"lr {lr_at(step, args.steps):.2e} {elapsed:.0f}s ({elapsed / (step + 1):.2f} s/step)",
                flush=True,
            )
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            print(
                f"step {step + 1} held-out perplexity {heldout_perplexity(model, tokenizer, heldout_text):.3f}",
                flush=True,
            )
            model.train()
    wall = time.perf_counter() - t0

    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # transformers 5 records its new class name; the generic name also loads with transformers 4.x.
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, local_files_only=True)
    loaded_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ppl = heldout_perplexity(loaded, loaded_tok, (out / "heldout.txt").read_text())
    sample = generate(loaded, loaded_tok, "Return the")
    print(f"held-out perplexity {ppl:.4f}\nsample: {sample!r}")

    tail = losses[-50:]
    info: dict[str, Any] = {
        "command": command,
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": SEQ_LEN,
        "tokens_seen": args.steps * args.batch_size * SEQ_LEN,
        "optimizer": {"name": "AdamW", "betas": [0.9, 0.95], "weight_decay": WEIGHT_DECAY, "grad_clip_norm": 1.0},
        "lr_schedule": {
            "peak_lr": PEAK_LR,
            "warmup_steps": max(1, int(WARMUP_FRAC * args.steps)),
            "warmup": "linear from peak/warmup_steps",
            "decay": "cosine to min_lr",
            "min_lr": PEAK_LR * MIN_LR_RATIO,
        },
        "parameters": n_params,
        "architecture": {"model_type": "llama", "vocab_size": len(tokenizer), **ARCH},
        "corpus": {
            "description": "module/class/function docstrings (ast.get_docstring) of the Python standard library's .py "
            f"files, skipping {sorted(SKIP_DIRS)}; deduplicated, lightly whitespace-normalised; held out when "
            f"int(sha256(text)[:8 bytes]) % 100 < {HELDOUT_PCT}; held-out text capped to {HELDOUT_CAP_CHARS} chars",
            "python_version": platform.python_version(),
            "files": files,
            "docs_total": len(docs),
            "train_docs": len(train_docs),
            "train_chars": sum(len(d) for d in train_docs),
            "train_tokens": rows.numel(),
            "heldout_docs": len(held_docs),
            "heldout_docs_dropped_by_cap": held_dropped,
            "heldout_chars": len(heldout_text),
            "heldout_tokens": heldout_tokens,
        },
        "train_wall_s": round(wall, 1),
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "final_train_loss": round(losses[-1], 4),
        "final_train_loss_mean_last_50": round(sum(tail) / len(tail), 4),
        "heldout_perplexity": round(ppl, 4),
        "perplexity_definition": PERPLEXITY_DEFINITION,
        "sample_greedy": {"prompt": "Return the", "output": sample},
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    write_readme(out, info)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
