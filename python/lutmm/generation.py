"""Fast greedy decoding for Hugging Face causal LMs: a static KV cache, and on CUDA the decode step
captured once as a CUDA graph and replayed per token (optionally torch.compile'd first), gpt-fast style.

Eager Hugging Face `generate` launches every kernel of every layer from Python for every token: on a
LLaMA-3-8B-shaped model that bounds decode at ~20-100 tokens/s whatever the kernels cost, while the
replayed graph runs at the kernels' speed (bench/bench_e2e.py builds its measurement the same way:
docs/performance.md, end-to-end section).

    from lutmm.generation import greedy_static
    out = greedy_static(model, input_ids, max_new_tokens=128)   # [B, prompt + new] token ids
"""
from __future__ import annotations

from typing import Optional

import torch


@torch.no_grad()
def greedy_static(model, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id: Optional[int] = None,
                  min_new_tokens: int = 0, compile: bool = False, graph: Optional[bool] = None,
                  check_every: int = 16) -> torch.Tensor:
    """Greedy continuation of `input_ids` ([B, P] on the model's device): returns [B, P + n] with n <=
    max_new_tokens. As in Hugging Face `generate`, `eos_token_id` cannot be chosen before
    `min_new_tokens` new tokens, and after a row emits it its later positions hold it; decoding stops
    early when every row has ended, checked
    every `check_every` tokens (a host synchronization each). graph: capture the step as a CUDA graph
    (default: on CUDA). compile: torch.compile the step first (minutes on large models; faster steps)."""
    from transformers import StaticCache

    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected [batch, prompt] with prompt >= 1, got {tuple(input_ids.shape)}")
    if max_new_tokens < 0 or min_new_tokens < 0 or check_every < 1:
        raise ValueError("max_new_tokens and min_new_tokens must be >= 0, check_every >= 1")
    dev = next(model.parameters()).device
    if input_ids.device != dev:
        raise ValueError(f"input_ids on {input_ids.device}, the model on {dev}")
    if max_new_tokens == 0:
        return input_ids.clone()
    if graph is None:
        graph = dev.type == "cuda"
    if graph and dev.type != "cuda":
        raise ValueError("graph=True needs the model on a CUDA device")
    b, p = input_ids.shape
    cache = StaticCache(config=model.config, max_cache_len=p + max_new_tokens)
    pos = torch.tensor([p], device=dev)  # the position of the token a step reads
    suppress = eos_token_id is not None and min_new_tokens > 0

    def pick(logits, at):  # logits [B, V] of new token number at - p + 1 (position `at` read)
        if suppress:  # new token i (0-based) may be eos only from i = min_new_tokens on
            logits = logits.clone()
            logits[:, eos_token_id] = torch.where(at < p + min_new_tokens - 1, float("-inf"), logits[:, eos_token_id])
        return logits.argmax(-1, keepdim=True)

    out = model(input_ids, past_key_values=cache, cache_position=torch.arange(p, device=dev), use_cache=True)
    token = pick(out.logits[:, -1], pos - 1)  # [B, 1]: the first new token
    static_ids = token.clone()

    def step():
        o = model(static_ids, past_key_values=cache, cache_position=pos, use_cache=True)
        return pick(o.logits[:, -1], pos)

    if compile:
        step = torch.compile(step, dynamic=False)
    run = step
    if graph and max_new_tokens > 1:
        replay, graph_out = capture_step(step, cache, p, dev)

        def run():
            replay()
            return graph_out

    new = [token]
    for i in range(1, max_new_tokens):
        if eos_token_id is not None and i % check_every == 0 and bool(_ended(torch.cat(new, 1), eos_token_id).all()):
            break
        nxt = run()
        new.append(nxt.clone())
        static_ids.copy_(nxt)
        pos.add_(1)
    gen = torch.cat(new, 1)
    if eos_token_id is not None:  # positions after a row's end hold eos
        ended = _ended_at(gen, eos_token_id)
        gen = gen.masked_fill(torch.arange(gen.shape[1], device=dev)[None, :] > ended[:, None], eos_token_id)
    return torch.cat([input_ids, gen], 1)


def capture_step(step, cache, length: int, device, warmups: int = 2):
    """A decode step captured as one CUDA graph: `warmups` runs of `step` first on a side stream
    (compilation, workspaces, lazy initialization; capture requires them), then the cache's write
    position rewound to `length` (rewind_static_cache: the warm-up runs advanced it), then the capture.
    Returns (replay, out): replay() runs the graph, which leaves its result in the tensor `out`."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmups):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    rewind_static_cache(cache, length)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    return g.replay, out


def rewind_static_cache(cache, length: int) -> None:
    """Make the next write of every layer of a transformers StaticCache land at position `length`.
    Its layers (transformers 5) count the positions written so far themselves (`cumulative_length`)
    and write there whatever `cache_position` says, so warm-up runs of a decode step, which a CUDA
    graph capture needs, would shift every later write (and run past the end: an index_copy_ assert).
    Captured steps then advance the count on the device, one position per replay."""
    for layer in getattr(cache, "layers", ()):
        n = getattr(layer, "cumulative_length", None)
        if torch.is_tensor(n):
            n.fill_(length)


def _ended_at(gen: torch.Tensor, eos: int) -> torch.Tensor:
    """Per row, the index of its first eos among the new tokens `gen` [B, n], else n."""
    hit = gen == eos
    n = torch.full_like(hit[:, 0], gen.shape[1], dtype=torch.long)
    return torch.where(hit.any(1), hit.long().argmax(1), n)


def _ended(gen: torch.Tensor, eos: int) -> torch.Tensor:
    return _ended_at(gen, eos) < gen.shape[1]
