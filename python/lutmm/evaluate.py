"""Quality and speed checks for (quantized) causal LMs: perplexity, greedy generation, decode speed.

    ppl = lutmm.evaluate.perplexity(model, "path/to/model_dir", "heldout.txt")   # 512-token windows

Perplexity protocol (the one mini-llama's published bf16 numbers use, see its train.py): the text is tokenized
in 100,000-character chunks, cut into non-overlapping windows of `window` input tokens, each window scored
independently (no context carried over), mean NLL over all predicted tokens, exp.

`ahead` is how many tokens ahead each position predicts: 1 for a normal LM. mini-llama was trained with
labels shifted twice (train.py passes already-shifted labels to HF, which shifts again), so it predicts
token t+2 from tokens <= t; its published 42.6 is an ahead=2 perplexity (ahead=1 gives ~2340 on it).
ahead="auto" scores the first window both ways and keeps the better one (`detect_ahead`).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import List, Optional, Union

import torch
import torch.nn.functional as F

CHUNK_CHARS = 100_000


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (for the built-in random demo model, which has no tokenizer)."""
    vocab_size = 256
    eos_token_id = None

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class _TokenizersWrapper:
    """A `tokenizers.Tokenizer` with encode -> ids and decode, no special tokens added."""

    def __init__(self, tok):
        self.tok = tok
        eos = tok.token_to_id("<|endoftext|>") if hasattr(tok, "token_to_id") else None
        self.eos_token_id = eos

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


class _HFWrapper:
    """A transformers tokenizer with the same interface."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_token_id = getattr(tok, "eos_token_id", None)

    def encode(self, text: str) -> List[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def load_tokenizer(tokenizer_or_dir):
    """Anything with encode(text) -> ids and decode(ids): a model directory or tokenizer.json path (read with
    the `tokenizers` library), a tokenizers.Tokenizer, a transformers tokenizer, or a ByteTokenizer."""
    if isinstance(tokenizer_or_dir, (str, os.PathLike)):
        p = Path(tokenizer_or_dir)
        f = p / "tokenizer.json" if p.is_dir() else p
        if not f.is_file():
            raise ValueError(f"tokenizer: no tokenizer.json at {p}")
        from tokenizers import Tokenizer

        return _TokenizersWrapper(Tokenizer.from_file(str(f)))
    if isinstance(tokenizer_or_dir, (ByteTokenizer, _TokenizersWrapper, _HFWrapper)):
        return tokenizer_or_dir
    try:
        from tokenizers import Tokenizer

        if isinstance(tokenizer_or_dir, Tokenizer):
            return _TokenizersWrapper(tokenizer_or_dir)
    except ImportError:  # pragma: no cover
        pass
    if callable(tokenizer_or_dir) and hasattr(tokenizer_or_dir, "decode"):
        return _HFWrapper(tokenizer_or_dir)
    raise ValueError(f"tokenizer: expected a directory, a tokenizer.json path or a tokenizer object, "
                     f"got {type(tokenizer_or_dir).__name__}")


def check_file(path, what: str) -> Path:
    """`path` as a Path; ValueError naming `what` and the path when it does not exist or is not a file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what}: {path} {'is not a file' if p.exists() else 'does not exist'}")
    return p


def read_text_file(path, what: str = "text") -> str:
    """A UTF-8 text file's contents; ValueError naming `what` and the file when it is missing, not a file or
    not UTF-8 (the decoder's own message names neither)."""
    p = check_file(path, what)
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what}: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def encode_text(tokenizer, text: str, max_tokens: Optional[int] = None) -> torch.Tensor:
    """Token ids (int64 1-D) of `text`, tokenized in CHUNK_CHARS-character chunks (stops early at max_tokens)."""
    tok = load_tokenizer(tokenizer)
    ids: List[int] = []
    for i in range(0, len(text), CHUNK_CHARS):
        ids += tok.encode(text[i:i + CHUNK_CHARS])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens] if max_tokens is not None else ids
    return torch.tensor(ids, dtype=torch.long)


def _model_device(model) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x[None], use_cache=False).logits[0].float()


def _window_nll(logits: torch.Tensor, ids: torch.Tensor, start: int, window: int, ahead: int):
    """(sum NLL, count) of one window whose inputs are ids[start:start+window] and logits are `logits`."""
    targets = ids[start + ahead:start + window + 1].to(logits.device)
    n = min(targets.numel(), logits.shape[0])
    if n <= 0:
        return 0.0, 0
    return F.cross_entropy(logits[:n], targets[:n], reduction="sum").item(), n


@torch.no_grad()
def detect_ahead(model, ids: torch.Tensor, window: int = 512, device=None) -> int:
    """1 or 2: which prediction offset gives the lower NLL on the first window (see the module docstring)."""
    device = torch.device(device) if device is not None else _model_device(model)
    logits = _logits(model, ids[:window].to(device))
    nll = {a: _window_nll(logits, ids, 0, window, a) for a in (1, 2)}
    return min((1, 2), key=lambda a: nll[a][0] / max(nll[a][1], 1))


@torch.no_grad()
def perplexity(model, tokenizer_or_dir, text_path, window: int = 512, max_tokens: Optional[int] = None,
               device=None, progress: bool = True, ahead: Union[int, str] = 1) -> float:
    """Perplexity of `model` on the text file `text_path` (non-overlapping `window`-token windows, each scored
    on its own; mean NLL over every predicted token; exp). max_tokens: only the first N tokens of the text.
    ahead: 1 (next token), 2 (mini-llama's objective) or "auto" (see the module docstring)."""
    from tqdm.auto import tqdm

    if window < 2:
        raise ValueError(f"window: got {window}, expected >= 2")
    text = read_text_file(text_path, "text_path")
    ids = encode_text(tokenizer_or_dir, text, max_tokens)
    if ids.numel() < 3:
        raise ValueError(f"text_path: {text_path} has {ids.numel()} tokens, expected at least 3")
    device = torch.device(device) if device is not None else _model_device(model)
    model.eval()
    if ahead == "auto":
        ahead = detect_ahead(model, ids, window, device)
    if ahead not in (1, 2):
        raise ValueError(f"ahead: got {ahead!r}, expected 1, 2 or 'auto'")
    total, count = 0.0, 0
    starts = range(0, ids.numel() - 1, window)
    for s in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
        logits = _logits(model, ids[s:s + window].to(device))
        nll, n = _window_nll(logits, ids, s, window, ahead)
        total, count = total + nll, count + n
    return math.exp(total / count)


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 32, min_new_tokens: int = 0, static: bool = False,
             compile: bool = False) -> str:
    """Greedy continuation of `prompt` (the new text only, up to and with its end-of-sequence token).
    static: through lutmm.generation.greedy_static (static cache; on CUDA a replayed CUDA graph, compiled
    first with `compile`) instead of Hugging Face `generate`; the same tokens."""
    tok = load_tokenizer(tokenizer)
    device = _model_device(model)
    ids = torch.tensor([tok.encode(prompt)], dtype=torch.long, device=device)
    if ids.numel() == 0:
        raise ValueError("prompt: empty after tokenization")
    if static:
        from .generation import greedy_static
        out = greedy_static(model, ids, max_new_tokens, eos_token_id=tok.eos_token_id, min_new_tokens=min_new_tokens,
                            compile=compile)
    else:
        out = _greedy(model, ids, max_new_tokens, min_new_tokens, tok.eos_token_id)
    gen = out[0, ids.shape[1]:].tolist()
    if tok.eos_token_id is not None and tok.eos_token_id in gen:  # greedy_static pads ended rows with it
        gen = gen[:gen.index(tok.eos_token_id) + 1]
    return tok.decode(gen)


def _greedy(model, ids, max_new_tokens, min_new_tokens, eos_token_id):
    pad = eos_token_id if eos_token_id is not None else 0
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                          min_new_tokens=min_new_tokens, do_sample=False, pad_token_id=pad,
                          eos_token_id=eos_token_id, temperature=None, top_p=None, top_k=None)


@torch.no_grad()
def decode_speed(model, prompt_ids: torch.Tensor, new_tokens: int = 32, reps: int = 1) -> float:
    """Greedy decode speed in tokens/s (KV cache, batch 1, exactly `new_tokens` new tokens; best of `reps`)."""
    device = _model_device(model)
    ids = prompt_ids.reshape(1, -1).to(device)
    _greedy(model, ids, 2, 2, None)  # warm-up (allocations, lazy init, CUDA workspaces)
    best = float("inf")
    for _ in range(max(1, reps)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        _greedy(model, ids, new_tokens, new_tokens, None)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return new_tokens / best
