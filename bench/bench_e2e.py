"""End-to-end decode throughput: a LLaMA-3-8B-shaped model with lutmm against bf16 (issue 7).

    python3 bench/bench_e2e.py                  # 8B shape, bits {4,3,2} x g {64,128}, batch {1,4,16}
    python3 bench/bench_e2e.py --model 70b-2l   # 2 decoder layers with LLaMA-3-70B dimensions
    python3 bench/bench_e2e.py --model tiny --device cpu --gen 4 --no-graph   # smoke test
    python3 bench/bench_e2e.py --no-fuse        # 7 separate linears per layer (HF's module layout)

Random weights (HF's N(0, 0.02) init; lutmm layers get random codes and scales): decode speed does not
depend on the values. Each decode step (batch B, static KV cache, prompt 128, 256 new tokens) runs as
one captured CUDA graph; graph-free (eager) numbers are printed beside. Peak GPU memory per model.
Measured on an H100 on 2026-11-26 (docs/performance.md, "End-to-end decode") and on an H200 on 2026-11-28
(docs/performance.md, "H200 after session 30"; the help texts' numbers below are the H100's).

Projections are fused by default (lutmm.nn.fuse_projections): q/k/v as one linear and gate/up as one, 4
linear calls per layer instead of 7, for lutmm and, so the comparison stays like for like, for the bf16
baseline too (its nn.Linear weights concatenated). --unfused-bf16 keeps HF's stock bf16 model as the
baseline; --no-fuse leaves every model unfused.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import List, NamedTuple, Optional

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import lutmm
from lutmm.attention import use_gqa_attention
from lutmm.generation import capture_step, rewind_static_cache
from lutmm.nn import LUTLinear, fuse_projections

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_kernel import random_qweight  # noqa: E402

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "70b-2l": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=2, num_attention_heads=64,
                   num_key_value_heads=8, vocab_size=1024),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}


ATTNS = ("gqa", "gqa-kernel", "sdpa")


def build(shape: str, device: str, attn: str = "sdpa") -> LlamaForCausalLM:
    """The model with random weights and attention `attn` (set_attention)."""
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=2048, rope_theta=500000.0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    set_attention(model, attn)
    return model


def set_attention(model, attn: str) -> None:
    """attn: "sdpa" (transformers' own), "gqa" (lutmm.attention: K and V read once per KV head instead of
    repeated for every query head) or "gqa-kernel" (the same, decode steps through lutmm's CUDA
    decode-attention kernel)."""
    if attn in ("gqa", "gqa-kernel"):
        use_gqa_attention(model, decode_kernel=attn == "gqa-kernel")
    elif attn == "sdpa":
        model.set_attn_implementation("sdpa")
    else:
        raise ValueError(f"attn must be one of {ATTNS}, got {attn!r}")


def swap_to_lutmm(model, bits: int, g: int, lm_head: bool = False) -> int:
    """Replaces every decoder nn.Linear (and the lm_head with `lm_head`) by a LUTLinear with random codes;
    returns how many."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and (lm_head or "lm_head" not in n)]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        qw = random_qweight(old.out_features, old.in_features, bits, g, old.weight.device)
        setattr(parent, attr, LUTLinear.from_quantized(qw))
        del old
    return len(names)


def fuse(model, gated: bool = True) -> int:
    """Fuses q/k/v and gate/up of every decoder layer (LUTLinear or nn.Linear alike; with `gated`, LUT MLPs
    write silu(gate) * up from the gate/up kernel); returns the number of linear calls saved per forward.
    Raises RuntimeError if a layer could not be fused (the numbers would silently mix fused and unfused
    layers)."""
    report = fuse_projections(model, warn=False, gated=gated)
    if report.skipped:
        raise RuntimeError(f"bench_e2e: could not fuse {report.skipped}")
    return report.linear_calls_saved


def kernel_class(name: str) -> str:
    """The breakdown class of a CUDA kernel by name: linears (ours, cuBLAS, dequant), attention, other."""
    name = name.lower()
    # Attention first: the memory-efficient SDPA kernels are CUTLASS kernels (fmha_cutlassF_...); lutmm's
    # decode attention is attn_mma_kernel / attn_combine_kernel. (cuBLAS batched matmuls of the plain
    # decode path, nvjet_*, count as linears: their names do not tell them apart.)
    if any(k in name for k in ("attention", "flash", "fmha", "sdpa", "softmax", "attn_")):
        return "attention"
    if any(k in name for k in ("lut_", "dequant", "gemm", "gemv", "sm90_xmma", "cutlass", "nvjet")):
        return "quantized/dense linears"
    return "other"


def short_name(key: str) -> str:
    """A kernel's profiler name without the namespaces, template arguments kept (lut_stream_kernel<3, 1,
    bf16, true, 2>: bits, token tiles, dtype, row tiles, CTAs per SM)."""
    for a, b in (("void ", ""), ("lutmm::gpu::", ""), ("lut::", ""), ("(anonymous namespace)::", ""),
                 ("__nv_bfloat16", "bf16"), ("__half", "fp16")):
        key = key.replace(a, b)
    return key[:90]


def by_class(events, steps: int, top: int = 0) -> dict:
    """Per-step CUDA time (us) by kernel_class over profiler events (key, count, device time) of `steps`
    steps; with top > 0 also the `top` largest kernels as (us per step, calls per step, name)."""
    out = {"quantized/dense linears": 0.0, "attention": 0.0, "other": 0.0}
    largest = []
    for e in events:
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        if us <= 0:
            continue
        out[kernel_class(e.key)] += us / steps
        largest.append((us / steps, e.count // steps, short_name(e.key)))
    if top:
        largest.sort(reverse=True)
        out["top kernels (us per step, calls per step)"] = [(round(u, 1), c, k) for u, c, k in largest[:top]]
    return out


def profile_replays(run, replays: int = 4) -> dict:
    """Per-step CUDA time (us) by kernel class over `replays` replays of the captured decode step (what
    the tokens/s above time), with the largest kernels of each class."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            run()
        torch.cuda.synchronize()
    return by_class(prof.key_averages(), replays, top=10)


class Decode(NamedTuple):
    """decode_tokens_per_s's result."""
    tokens_per_s: float         # the median of the timed runs
    samples: List[float]        # each timed run's tokens/s, in order
    profile: Optional[dict]     # the captured step's breakdown (profile_replays), or None


@torch.no_grad()
def decode_tokens_per_s(model, batch: int, prompt: int, gen: int, graph: bool, compile_step: bool = False,
                        profile_step: bool = False, repeats: int = 1) -> Decode:
    """Decode tokens/s, the median of `repeats` timed runs of `gen` steps (the cache rewound to the prompt
    between them; one compilation and capture), with each run's tokens/s and, with profile_step (graph mode
    on CUDA), the captured step's breakdown (profile_replays), else None: a Decode."""
    dev = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_cache_len=prompt + gen + 8)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=dev)
    out = model(ids, past_key_values=cache, cache_position=torch.arange(prompt, device=dev), use_cache=True)
    static_ids = out.logits[:, -1].argmax(-1, keepdim=True)
    static_pos = torch.tensor([prompt], device=dev)

    def step():
        o = model(static_ids, past_key_values=cache, cache_position=static_pos, use_cache=True)
        return o.logits[:, -1].argmax(-1, keepdim=True)

    if compile_step:  # fuse the elementwise work around the linears (norms, rotary, SiLU, residuals)
        step = torch.compile(step, dynamic=False)

    cuda = dev.type == "cuda"
    if graph and cuda:
        run, static_out = capture_step(step, cache, prompt, dev)
    else:
        static_out = None
        run = None
        if compile_step:  # compile outside the timed loop
            for _ in range(2):
                step()
            rewind_static_cache(cache, prompt)
    first_ids = static_ids.clone()
    runs = []
    for r in range(max(1, repeats)):
        if r:  # back to the state after the prompt: the same positions, the same first token
            rewind_static_cache(cache, prompt)
            static_pos.fill_(prompt)
            static_ids.copy_(first_ids)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(gen):
            if run is not None:
                run()
                static_ids.copy_(static_out)
            else:
                static_ids.copy_(step())
            static_pos.add_(1)
        if cuda:
            torch.cuda.synchronize()
        runs.append(batch * gen / (time.perf_counter() - t0))
    tps = statistics.median(runs)
    prof = None
    if profile_step and run is not None:
        try:
            prof = profile_replays(run)
        except Exception as e:  # the profiler is a diagnostic: never lose the measurement to it
            prof = {"error": repr(e)}
    return Decode(tps, runs, prof)


@torch.no_grad()
def breakdown(model, batch: int, steps: int = 4) -> dict:
    """Per-token CUDA time (us) by kernel class over a few eager decode steps."""
    dev = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_cache_len=64)
    ids = torch.randint(0, model.config.vocab_size, (batch, 8), device=dev)
    model(ids, past_key_values=cache, cache_position=torch.arange(8, device=dev), use_cache=True)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            model(ids[:, :1], past_key_values=cache, cache_position=torch.tensor([8 + i], device=dev), use_cache=True)
        torch.cuda.synchronize()
    return by_class(prof.key_averages(), steps)


def default_configs(fuse: bool) -> str:
    """--configs' default: every width and group, folded (lutmm.layerfold, the fastest decode) where the
    projections are fused, which folding needs."""
    return ",".join(f"{b}:{g}" + (":fold" if fuse else "") for b in (4, 3, 2) for g in (128, 64))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--configs", default=None,
                    help="bits:group[:plain|:fold],... (plain: gate/up fused without the silu(gate) * up epilogue, "
                         "inductor's SiLU kernel after it; fold: lutmm.layerfold, the norms and residual adds "
                         "inside the projections: A/Bs in one process; default: 4, 3, 2 bits x g128, g64, each "
                         ":fold, without :fold under --no-fuse)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed runs of --gen steps per model and batch (one compile and capture); the median is "
                         "reported, with the range (run-to-run spread at batch 1 on the H100: ~2%%)")
    ap.add_argument("--attn", default="gqa-kernel",
                    help="attention for bf16 and lutmm alike, or a comma list (each measured on the same models, "
                         "an A/B in one run): gqa = lutmm.attention (K/V read once per KV head), "
                         "gqa-kernel (default) = the same with decode steps through lutmm's CUDA decode-attention "
                         "kernel (H100, 8B, over gqa: 3-bit +6-7%%, bf16 -3%% to +5%% over two runs; docs/performance-log.md item 49), "
                         "sdpa = transformers' own (repeats K/V for every query head under a mask)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile replays of the captured decode step: CUDA time by kernel class")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the decode step (inductor, no cudagraphs) before capturing it")
    ap.add_argument("--inductor-pdl", action=argparse.BooleanOptionalAction, default=None,
                    help="with --compile (default on there, for bf16 and lutmm alike), inductor's Triton kernels use "
                         "programmatic dependent launch (torch._inductor.config.triton.enable_pdl, env "
                         "TORCHINDUCTOR_ENABLE_PDL=1): they signal the next kernel early, so lutmm's kernels build "
                         "their table and start their weight loads while the norm / SiLU kernel before them finishes "
                         "(H100, 3-bit batch 1: +6-11%%, bf16 +4%%: docs/performance-log.md item 47)")
    ap.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                    help="fuse q/k/v and gate/up into one linear each (default; --no-fuse: HF's 7 linears per layer)")
    ap.add_argument("--unfused-bf16", action="store_true",
                    help="with --fuse, keep the bf16 baseline as HF's stock (unfused) model")
    ap.add_argument("--lm-head", action="store_true",
                    help="also quantize the lm_head (same bits and group; `lutmm quantize --skip` with no names does "
                         "this for real checkpoints, RTN: docs/quality.md)")
    args = ap.parse_args()
    attns = args.attn.split(",")
    if not attns or any(a not in ATTNS for a in attns):
        ap.error(f"--attn: a comma list of {', '.join(ATTNS)}, got {args.attn!r}")
    if args.inductor_pdl and not args.compile:
        ap.error("--inductor-pdl needs --compile (it changes the kernels inductor generates)")
    args.inductor_pdl = args.compile and args.inductor_pdl is not False
    if args.inductor_pdl:
        import torch._inductor.config as inductor_config
        if not hasattr(inductor_config.triton, "enable_pdl"):
            ap.error(f"--inductor-pdl: torch {torch.__version__} has no torch._inductor.config.triton.enable_pdl")
        inductor_config.triton.enable_pdl = True
    cuda = args.device.startswith("cuda")
    if args.configs is None:
        args.configs = default_configs(args.fuse)
    configs = []
    for c in args.configs.split(","):
        parts = c.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("plain", "fold")):
            ap.error(f"--configs: bits:group[:plain|:fold], got {c!r}")
        if parts[2:] == ["fold"] and not args.fuse:
            ap.error(f"--configs {c}: :fold needs --fuse")
        configs.append((int(parts[0]), int(parts[1]), parts[2] if len(parts) == 3 else ""))
    fuse_bf16 = args.fuse and not args.unfused_bf16
    projections = {(True, True): "fused q/k/v + gate/up (lutmm and bf16)",
                   (True, False): "fused q/k/v + gate/up for lutmm; bf16 baseline unfused (stock HF)",
                   (False, False): "unfused (7 linears per layer)"}[(args.fuse, fuse_bf16)]
    print(f"# {torch.cuda.get_device_name() if cuda else 'CPU'} | model {args.model} | lutmm {lutmm.__version__} "
          f"| projections: {projections} | attention: {args.attn}"
          + (" | inductor PDL" if args.inductor_pdl else ""))
    rows = []

    def measure(label, model):
        for attn in attns:
            set_attention(model, attn)
            # A fresh dynamo per model and attention (the attention function is traced into the compiled
            # step): each batch size compiles the step anew, and after 8 compilations dynamo stops
            # compiling and runs eagerly (the fifth model of a run measured 1.65x instead of ~2.4x).
            torch._dynamo.reset()
            measure_attn(label + (f" [{attn}]" if len(attns) > 1 else ""), model)

    def measure_attn(label, model):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for b in args.batches:
            t0 = time.perf_counter()
            tps, runs, prof = decode_tokens_per_s(model, b, args.prompt, args.gen, graph=not args.no_graph,
                                                  compile_step=args.compile, profile_step=args.profile,
                                                  repeats=args.repeats)
            if args.compile:
                print(f"{'':>14} (compile + measure: {time.perf_counter() - t0:.0f} s)", flush=True)
            eager = decode_tokens_per_s(model, b, args.prompt, min(args.gen, 32), graph=False).tokens_per_s
            mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
            rows.append((label, b, tps, eager, mem))
            mode = ("compiled " if args.compile else "") + ("eager" if args.no_graph or not cuda else "graph")
            if len(runs) > 1:
                mode += f", median of {len(runs)}: {min(runs):.1f} .. {max(runs):.1f}"
            print(f"{label:>14} batch {b:>3}: {tps:9.1f} tok/s ({mode})  {eager:9.1f} tok/s (eager)  "
                  f"peak {mem:6.2f} GiB", flush=True)
            if prof is not None:
                print(f"{'':>14} captured step, batch {b} (us per step): {prof}", flush=True)
        if cuda:
            print(f"{'':>14} per-token CUDA time, batch 1 (us): {breakdown(model, 1)}")

    model = build(args.model, args.device, attns[0])
    if fuse_bf16:
        fuse(model)
    measure("bf16", model)
    for bits, g, variant in configs:
        del model
        if cuda:
            torch.cuda.empty_cache()
        model = build(args.model, args.device, attns[0])
        if variant == "fold":  # norm weights into the projections (random weights: only the norms change)
            from lutmm.layerfold import fold_layers, fold_norm_weights
            fold_norm_weights(model)
        swap_to_lutmm(model, bits, g, lm_head=args.lm_head)
        if args.fuse:
            fuse(model, gated=variant != "plain")
        if variant == "fold":
            fold_layers(model)
        if cuda:
            torch.cuda.empty_cache()
        measure(f"lutmm {bits}b g{g}" + ("+head" if args.lm_head else "") + (f" {variant}" if variant else ""), model)
    def attn_of(label):  # "" for a single attention
        return label[label.index("["):] if "[" in label else ""

    base = {(attn_of(l), b): t for (l, b, t, _, _) in rows if l.startswith("bf16")}
    print(f"\nprojections: {projections}")
    print(f"{'model':>14} {'batch':>5} {'tok/s':>9} {'x bf16':>7} {'eager tok/s':>11} {'peak GiB':>8}")
    for label, b, tps, eager, mem in rows:
        print(f"{label:>14} {b:>5} {tps:9.1f} {tps / base[(attn_of(label), b)]:7.2f} {eager:11.1f} {mem:8.2f}")


if __name__ == "__main__":
    main()
