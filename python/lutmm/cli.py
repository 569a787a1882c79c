"""The `lutmm` command line (also `python3 -m lutmm`).

    lutmm demo                                   quantize a model, generate, perplexity and speed vs bf16
    lutmm quantize MODEL_DIR OUT_DIR --bits 4 --group-size 64 [--method gptq+kmeans --calib FILE]
    lutmm eval DIR --text FILE                   perplexity (DIR: a HF model or a lutmm checkpoint)
    lutmm generate DIR --prompt TEXT             greedy continuation
    lutmm upgrade DIR OUT_DIR                    rewrite a lutmm checkpoint in the current format version
    lutmm bench [--quick]                        kernel benchmark (needs a CUDA GPU)
    lutmm info                                   versions, build, GPU
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

from .nn import MODEL_GROUP_SIZES
from .quality import METHODS as QUANT_METHODS  # `lutmm quantize --method` choices (one list, in quality.py)

NO_GPU_BENCH = "no CUDA device: kernel benchmark needs a GPU"
CPU_FALLBACK = "CPU fallback: no CUDA device, speed numbers are CPU reference timings"
DEFAULT_PROMPT = "The Python interpreter"
IN_DOMAIN_CALIB = "build/calib/gcide-train.txt"  # written by scripts/get_calib.sh (lutmm.calib_text)
FALLBACK_DAMP = 1.0  # GPTQ damping for the WikiText-2 fallback (out of mini-llama's domain, docs/quality.md)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---- helpers ---------------------------------------------------------------------------------------------
def _device(arg: Optional[str]) -> torch.device:
    if arg:
        return torch.device(arg)
    import lutmm

    return torch.device("cuda") if lutmm.gpu_available() else torch.device("cpu")


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _search_up(rel: str, starts) -> Optional[Path]:
    """The first existing START/rel or ANCESTOR/rel over the given start directories."""
    for start in starts:
        start = Path(start).resolve()
        for base in (start, *start.parents):
            p = base / rel
            if p.exists():
                return p
    return None


def _starts():
    return [Path.cwd(), Path(__file__).resolve().parent]


def find_shared() -> Optional[Path]:
    """The shared assets folder: $LUTMM_SHARED, else a `shared/` with models/mini-llama in the working
    directory, the package source or one of their parents (the repo's ../shared)."""
    env = os.environ.get("LUTMM_SHARED")
    if env and (Path(env) / "models" / "mini-llama").is_dir():
        return Path(env)
    p = _search_up("shared/models/mini-llama", _starts())
    return p.parent.parent if p else None


def find_bench_script() -> Optional[Path]:
    env = os.environ.get("LUTMM_REPO")
    if env and (Path(env) / "bench" / "bench_kernel.py").is_file():
        return Path(env) / "bench" / "bench_kernel.py"
    return _search_up("bench/bench_kernel.py", _starts())


def tiny_random_llama(seed: int = 0):
    """A 2-layer random Llama (hidden 128, vocab 256 = bytes) for when no real model is around."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()


def _load_failed(arg: str, path, e: Exception) -> ValueError:
    """The one-line error for a model directory that Hugging Face could not load: the argument, the directory
    and, for a corrupt or truncated safetensors file (whose own message names no file), that file."""
    from safetensors import SafetensorError

    if isinstance(e, SafetensorError):
        from .checkpoint import read_header, weight_files
        try:
            read_header(weight_files(Path(path)))  # raises ValueError naming the first bad file
        except ValueError as bad:
            return ValueError(f"{arg}: cannot load the model in {path}: {bad}")
    return ValueError(f"{arg}: cannot load the model in {path} ({type(e).__name__}: {e})")


def _load(path: str, device, dtype):
    from safetensors import SafetensorError

    from .checkpoint import load_model

    try:
        return load_model(path, device=device, dtype=dtype)
    except (SafetensorError, OSError) as e:  # a plain HF directory through from_pretrained (lutmm ones: ValueError)
        raise _load_failed("DIR", path, e) from None


def _from_pretrained(arg: str, path, dtype):
    """A plain Hugging Face causal LM directory (MODEL_DIR of quantize, --model of demo), checked first."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except (SafetensorError, OSError) as e:
        raise _load_failed(arg, path, e) from None


def _check_model_dir(arg: str, path) -> Path:
    """A Hugging Face model directory to quantize: exists, has a config.json and is not a lutmm checkpoint
    (quantizing one finds no linear layers left and writes a meaningless copy)."""
    from .checkpoint import is_lutmm_checkpoint

    p = Path(path)
    if not p.exists():
        raise ValueError(f"{arg}: {path} does not exist")
    if not p.is_dir():
        raise ValueError(f"{arg}: {path} is not a directory (expected a Hugging Face model directory)")
    if not (p / "config.json").is_file():
        raise ValueError(f"{arg}: {path} has no config.json (expected a Hugging Face model directory)")
    if is_lutmm_checkpoint(p):
        raise ValueError(f"{arg}: {path} is already a lutmm checkpoint (quantization_config.quant_method "
                         "\"lutmm\"); quantize the original Hugging Face model (lutmm upgrade rewrites a checkpoint)")
    return p


def _check_out_dir(out, src) -> None:
    """OUT_DIR of quantize: not the source model directory (any spelling: compared resolved and by samefile),
    no file in it that is a source file (a link), not an existing file. An existing directory is written into."""
    from .checkpoint import TOKENIZER_FILES, WEIGHTS_NAME

    given, out, src = out, Path(out), Path(src)
    if out.resolve() == src.resolve() or (out.exists() and os.path.samefile(out, src)):
        raise ValueError(f"OUT_DIR: {given} is the source model directory itself ({src.resolve()}); write the "
                         "checkpoint elsewhere")
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT_DIR: {given} exists and is not a directory")
    for name in (WEIGHTS_NAME, "config.json", *TOKENIZER_FILES):
        o, s = out / name, src / name
        if o.exists() and s.exists() and os.path.samefile(o, s):
            raise ValueError(f"OUT_DIR: {o} is the source model's {name} (a link to it); writing it would "
                             "overwrite the source model")
    for parent in out.parents:  # the nearest existing ancestor must be a directory
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"OUT_DIR: {given} cannot be created, {parent} is not a directory")
            break


def _tokenizer(arg: Optional[str], default_dir):
    """The tokenizer of --tokenizer (else of the model directory), loaded once before any work uses it; a file
    `tokenizers` cannot parse (its bare Exception names no file) is a one-line error naming the file."""
    from .evaluate import load_tokenizer

    path = arg or default_dir
    try:
        return load_tokenizer(str(path))
    except ValueError:  # no tokenizer.json: load_tokenizer's own one-line error
        raise
    except Exception as e:
        p = Path(path)
        f = p / "tokenizer.json" if p.is_dir() else p
        raise ValueError(f"{'--tokenizer' if arg else 'tokenizer'}: {f} is not a valid tokenizer JSON file "
                         f"({type(e).__name__}: {e})") from None


def _int_or_none(s: str):
    try:
        return int(s)
    except ValueError:
        return None


def _ahead_arg(s: str):
    if s == "auto":
        return s
    v = _int_or_none(s)
    if v not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected 1, 2 or auto, got {s!r}")
    return v


def _int_at_least(lo: int):
    """An argparse type: an integer >= lo (counts: tokens, windows)."""
    def parse(s: str) -> int:
        v = _int_or_none(s)
        if v is None or v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {s!r}")
        return v
    parse.__name__ = f"integer >= {lo}"  # argparse names the type in its own messages
    return parse


_positive_int = _int_at_least(1)
_GROUP_SIZES_HELP = ", ".join(map(str, MODEL_GROUP_SIZES)) + " or -1 (one group per row)"  # --group-size


def _group_size_arg(s: str) -> int:
    """--group-size: what lutmm.nn.check_model_group_size takes (MODEL_GROUP_SIZES or -1), refused at parse time."""
    from .nn import check_model_group_size

    v = _int_or_none(s)
    try:
        check_model_group_size(v if v is not None else s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a group size of {_GROUP_SIZES_HELP}, got {s!r}") from None
    return v


def _device_arg(s: str) -> str:
    """--device: a torch device string that exists here (cuda only with a CUDA device)."""
    try:
        d = torch.device(s)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {s!r} (expected cpu, cuda or cuda:N)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{s!r}: no CUDA device available")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{s!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return s


# ---- subcommands -----------------------------------------------------------------------------------------
def default_calib() -> tuple:
    """(calibration text, is_fallback): $LUTMM_CALIB when set; else the in-domain GCIDE text that
    scripts/get_calib.sh writes to build/calib/gcide-train.txt (searched from the working directory and the
    package source upwards); else WikiText-2 valid of the shared assets (the fallback, is_fallback True);
    (None, True) when there is none. No evaluation text overlaps any of them."""
    env = os.environ.get("LUTMM_CALIB")
    if env:
        if not Path(env).is_file():
            raise ValueError(f"$LUTMM_CALIB: {env} is not a file")
        return Path(env), False
    p = _search_up(IN_DOMAIN_CALIB, _starts())
    if p is not None and p.is_file():
        return p, False
    shared = find_shared()
    p = shared / "data" / "wikitext-2" / "valid.txt" if shared is not None else None
    return (p if p is not None and p.is_file() else None), True


def _quantize_method(args) -> str:
    """--method, else the best calibrated method; only --table / --absmax given (the original interface): rtn."""
    from .quality import DEFAULT_METHOD, parse_method

    if args.method is None:
        return "rtn" if (args.table is not None or args.absmax) else DEFAULT_METHOD
    parts = parse_method(args.method)
    if args.absmax and "rtn" not in parts:
        raise ValueError(f"--absmax is a scale choice of --method rtn, not of {args.method}")
    if "kmeans" in parts and args.table not in (None, "kmeans"):
        raise ValueError(f"--method {args.method} learns a k-means table; --table {args.table} needs a method "
                         f"without kmeans (e.g. {args.method.replace('+kmeans', '')})")
    if "select" in parts and args.table not in (None, "nf"):
        raise ValueError(f"--method {args.method} picks each layer's table itself (NF or weighted k-means, never "
                         f"int); drop --table {args.table}")
    return args.method


def cmd_quantize(args) -> int:
    from .checkpoint import save_quantized
    from .quality import DEFAULT_DAMP, quantize_model_calibrated

    method = _quantize_method(args)
    table = args.table or ("kmeans" if "kmeans" in method else "nf")
    calib, damp, fallback = None, args.damp, False
    if method != "rtn":
        calib, fallback = (Path(args.calib), False) if args.calib else default_calib()
        if calib is None:
            raise ValueError(f"--calib: no calibration text found ({IN_DOMAIN_CALIB}: run scripts/get_calib.sh; "
                             "shared/data/wikitext-2/valid.txt); pass --calib FILE")
        if not calib.is_file():
            raise ValueError(f"--calib: {calib} is not a file")
        if damp is None:
            damp = FALLBACK_DAMP if fallback else DEFAULT_DAMP
    if args.damp is not None and (not args.damp > 0 or "gptq" not in method):
        raise ValueError(f"--damp: got {args.damp} for --method {method}; expected a positive number and a gptq method")
    _check_model_dir("MODEL_DIR", args.model_dir)  # after the option checks, before loading or writing anything
    _check_out_dir(args.out_dir, args.model_dir)
    tokenizer = None if method == "rtn" else _tokenizer(args.tokenizer, args.model_dir)  # calibration text's
    t0 = time.perf_counter()
    model = _from_pretrained("MODEL_DIR", args.model_dir, _DTYPES[args.dtype])
    folded = 0
    if args.fold_norms:  # the norms' weights into q/k/v and gate/up before quantizing (lutmm.layerfold)
        from .layerfold import fold_norm_weights
        folded = fold_norm_weights(model)
        if folded == 0:
            raise ValueError("--fold-norms: the model has no Llama decoder layers (transformers' LlamaDecoderLayer)")
    stats = {}
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    quantize_model_calibrated(model, tokenizer, bits=args.bits,
                              group_size=None if args.group_size == -1 else args.group_size, method=method,
                              table=table, calib=calib, calib_tokens=args.calib_tokens, seed=args.seed,
                              device=device, skip=args.skip, search_scale=not args.absmax,
                              progress=not args.quiet, stats=stats,
                              **({} if method == "rtn" else {"percdamp": damp}))
    out = save_quantized(model, args.out_dir, tokenizer_dir=args.model_dir)
    file_bytes = (out / "model.safetensors").stat().st_size
    how = ("absmax" if args.absmax else "scale search") if method == "rtn" else (
        f"{method}, calibrated on {args.calib_tokens} tokens of {calib}"
        f"{' (WikiText-2 fallback: scripts/get_calib.sh writes in-domain text)' if fallback else ''}, "
        f"seed {args.seed}, damping {damp:g}, on {device}")
    print(f"quantized {stats['layers']} linear layers to {args.bits}-bit g{args.group_size} {table}"
          f" ({how}); skipped: {', '.join(stats['skipped']) or 'none'}")
    ratio = stats["bytes_before"] / max(stats["bytes_after"], 1)
    print(f"quantized weights: {_mb(stats['bytes_before'])} ({args.dtype}) -> {_mb(stats['bytes_after'])} (lutmm), "
          f"{ratio:.2f}x smaller")
    if folded:
        print(f"RMSNorm weights folded into the projections of {folded} layers (generate runs them folded)")
    print(f"wrote {out} (model.safetensors {_mb(file_bytes)}) in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import check_file, perplexity

    check_file(args.text, "--text")
    dev = _device(args.device)
    model = _load(args.dir, dev, _DTYPES[args.dtype])
    tok = _tokenizer(args.tokenizer, args.dir)
    t0 = time.perf_counter()
    ppl = perplexity(model, tok, args.text, window=args.window, max_tokens=args.max_tokens,
                     device=dev, progress=not args.quiet, ahead=args.ahead)
    print(f"perplexity: {ppl:.4f}")
    print(f"({args.window}-token windows, {'first ' + str(args.max_tokens) + ' tokens of ' if args.max_tokens else ''}"
          f"{args.text}, {time.perf_counter() - t0:.1f} s on {dev})")
    return 0


def cmd_generate(args) -> int:
    from .evaluate import generate

    dev = _device(args.device)
    if args.static is None:  # the fast path where it is fast: a replayed CUDA graph
        args.static = dev.type == "cuda"
    if args.compile and not args.static:
        raise ValueError("--compile needs --static (it compiles the static decode step)")
    model = _load(args.dir, dev, _DTYPES[args.dtype])
    tok = _tokenizer(args.tokenizer, args.dir)
    graph = args.static and dev.type == "cuda"  # greedy_static captures the step on CUDA only
    fused = folded = 0
    if graph:  # K/V read once per KV head, decode steps through lutmm's kernel
        from .attention import use_gqa_attention
        from .fuse import fuse_projections
        try:
            use_gqa_attention(model)
        except (RuntimeError, ValueError) as e:  # a model without transformers' AttentionInterface
            print(f"lutmm: keeping the model's own attention ({e})", file=sys.stderr)
        # q/k/v and gate/up as one linear each (exact), and with lutmm's attention each decode step's
        # rotary + KV-cache write inside the attention kernel (lutmm.attention.gqa_decode_step)
        report = fuse_projections(model, warn=False)
        fused = report.attention + report.mlp
        # a checkpoint from `quantize --fold-norms`: each layer's norms and residual adds inside its projections
        from .layerfold import fold_layers
        try:
            folded = fold_layers(model)
        except ValueError:  # norms not folded, MLP not gated LUT, ...: the layers stay as they are
            folded = 0
    t0 = time.perf_counter()
    text = generate(model, tok, args.prompt, args.max_new_tokens, static=args.static,
                    compile=args.compile)
    print(args.prompt + text)
    print(f"(generated in {time.perf_counter() - t0:.2f} s with prefill"
          f"{', graph capture' if graph else ''}"
          f"{f', {fused} modules fused' if fused else ''}"
          f"{f', {folded} layers folded' if folded else ''}"
          f"{', compilation' if args.compile else ''})", file=sys.stderr)
    return 0


def cmd_upgrade(args) -> int:
    import lutmm

    from .checkpoint import load_quantized, read_config, save_quantized, validate_quantization_config
    from .nn import lut_modules

    src, dst = Path(args.dir), Path(args.out_dir)
    if dst.resolve() == src.resolve():
        raise ValueError(f"OUT_DIR: {dst} is the checkpoint itself; write the upgraded copy elsewhere")
    qc = validate_quantization_config(read_config(src).get("quantization_config"))
    t0 = time.perf_counter()
    model = load_quantized(src, dtype=_DTYPES[args.dtype])  # repacks older layouts (checkpoint.upgrade_packed)
    repacked = len(lut_modules(model)) if qc["format_version"] < lutmm.FORMAT_VERSION and qc["bits"] == 3 else 0
    out = save_quantized(model, dst, tokenizer_dir=src)
    print(f"format version {qc['format_version']} -> {lutmm.FORMAT_VERSION}: {repacked} layers repacked "
          f"({qc['bits']}-bit; only 3-bit codes changed layout); wrote {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_bench(args) -> int:
    import runpy

    import lutmm

    if not torch.cuda.is_available():
        print(NO_GPU_BENCH)
        return 0
    if not lutmm.gpu_available():
        print(f"CUDA device present but this lutmm build has no CUDA kernels ({lutmm.build_info()})")
        return 1
    script = find_bench_script()
    if script is None:
        print("bench/bench_kernel.py not found: run from the lutmm repository or set LUTMM_REPO")
        return 1
    argv = sys.argv
    sys.argv = [str(script)] + (["--quick"] if args.quick else []) + (["--json", args.json] if args.json else [])
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        sys.argv = argv
    return 0


def cmd_info(args) -> int:
    import lutmm

    print(f"lutmm {lutmm.__version__} (format version {lutmm.FORMAT_VERSION})")
    print(f"build: {lutmm.build_info()}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import transformers

        print(f"transformers {transformers.__version__}")
    except ImportError:
        print("transformers: not installed (lutmm.nn / checkpoints / CLI model commands need it)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"GPU {i}: {torch.cuda.get_device_name(i)}")
    else:
        print("GPU: none (no CUDA device)")
    print(f"kernels: {'CUDA LUT GEMM available' if lutmm.gpu_available() else 'CPU fallback only'}")
    return 0


def _resolve_demo_model(arg: Optional[str]):
    """(model_dir or None, shared dir or None, description)."""
    if arg:
        return Path(arg), find_shared(), str(arg)
    shared = find_shared()
    if shared is not None:
        return shared / "models" / "mini-llama", shared, str(shared / "models" / "mini-llama")
    return None, None, "built-in tiny random Llama (no shared/models/mini-llama found; set LUTMM_SHARED)"


def cmd_demo(args) -> int:
    from .evaluate import ByteTokenizer, check_file, decode_speed, encode_text, generate, perplexity
    from .nn import quantize_model

    t_start = time.perf_counter()
    dev = _device(args.device)
    model_dir, shared, desc = _resolve_demo_model(args.model)
    if args.model:
        _check_model_dir("--model", model_dir)
    if args.text is not None:
        check_file(args.text, "--text")
    print(f"== lutmm demo: {desc}")
    print(f"   device: {dev}{'' if dev.type == 'cuda' else ' (' + CPU_FALLBACK + ')'}")
    if model_dir is not None:
        base = _from_pretrained("--model" if args.model else "shared model", model_dir, torch.bfloat16).eval()
        tok = _tokenizer(None, model_dir)  # before quantizing: a bad tokenizer fails at once
    else:
        base, tok = tiny_random_llama(), ByteTokenizer()
    text = args.text
    if text is None and shared is not None and (shared / "data" / "heldout.txt").is_file():
        text = str(shared / "data" / "heldout.txt")
    if text is None:  # nothing to read: score this module's source
        text = __file__

    print(f"\n== quantize: {args.bits}-bit, group size {args.group_size}, table {args.table}")
    t0 = time.perf_counter()
    stats = {}
    lut = quantize_model(copy.deepcopy(base), bits=args.bits, group_size=args.group_size, table=args.table,
                         progress=not args.quiet, stats=stats)
    t_quant = time.perf_counter() - t0
    ratio = stats["bytes_before"] / max(stats["bytes_after"], 1)
    print(f"   {stats['layers']} layers in {t_quant:.1f} s; weights {_mb(stats['bytes_before'])} (bf16) -> "
          f"{_mb(stats['bytes_after'])} (lutmm), {ratio:.2f}x smaller; skipped: {', '.join(stats['skipped']) or 'none'}")
    base.to(dev)
    lut.to(dev)

    print(f"\n== greedy generation, prompt {args.prompt!r}")
    for name, m in (("bf16", base), ("lutmm", lut)):
        out = generate(m, tok, args.prompt, args.new_tokens).replace("\n", " ")
        print(f"   {name:>5}: {args.prompt}{out}")

    ids = encode_text(tok, Path(text).read_text(encoding="utf-8"), args.max_tokens)
    print(f"\n== perplexity: first {ids.numel()} tokens of {text}, {args.window}-token windows")
    from .evaluate import detect_ahead

    ahead = args.ahead if args.ahead != "auto" else detect_ahead(base, ids, args.window)
    if ahead == 2:
        print("   (scored 2 tokens ahead: this model was trained to predict token t+2, see lutmm.evaluate)")
    ppl = {}
    for name, m in (("bf16", base), ("lutmm", lut)):
        t0 = time.perf_counter()
        ppl[name] = perplexity(m, tok, text, window=args.window, max_tokens=args.max_tokens, progress=False,
                               ahead=ahead)
        print(f"   {name:>5}: {ppl[name]:.3f}  ({time.perf_counter() - t0:.1f} s)")

    print(f"\n== decode speed: {args.speed_tokens} new tokens, batch 1, greedy with KV cache")
    if dev.type != "cuda":
        print(f"   {CPU_FALLBACK}")
    else:
        print("   (eager Hugging Face decode of a 23M model is bound by kernel launches, not weight bytes: "
              "see bench/ for kernel speed)")
    prompt_ids = ids[:16]
    speed = {"bf16": 0.0, "lutmm": 0.0}
    for _ in range(2):  # alternate, best of each: the first runs also warm up clocks and libraries
        for name, m in (("bf16", base), ("lutmm", lut)):
            speed[name] = max(speed[name], decode_speed(m, prompt_ids, args.speed_tokens, reps=2))
    for name in ("bf16", "lutmm"):
        print(f"   {name:>5}: {speed[name]:.1f} tokens/s")

    print("\n== summary")
    print(f"   {'':>6} {'weights':>10} {'perplexity':>11} {'tokens/s':>9}")
    print(f"   {'bf16':>6} {_mb(stats['bytes_before']):>10} {ppl['bf16']:>11.3f} {speed['bf16']:>9.1f}")
    print(f"   {'lutmm':>6} {_mb(stats['bytes_after']):>10} {ppl['lutmm']:>11.3f} {speed['lutmm']:>9.1f}")
    print(f"   perplexity {100 * (ppl['lutmm'] / ppl['bf16'] - 1):+.2f}%, weights {ratio:.2f}x smaller, "
          f"decode {speed['lutmm'] / speed['bf16']:.2f}x bf16 speed"
          f"{' (CPU reference timings)' if dev.type != 'cuda' else ''}; total {time.perf_counter() - t_start:.0f} s")
    return 0


# ---- parser ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lutmm", description="LUT-quantized LLM weights: quantize, evaluate, run.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name, help_, fn):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        return sp

    def model_opts(sp):
        sp.add_argument("--device", type=_device_arg, default=None,
                        help="cpu or cuda (default: cuda when lutmm kernels are available)")
        sp.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16",
                        help="dtype of activations and non-quantized weights (default bfloat16)")
        sp.add_argument("--tokenizer", default=None, help="tokenizer dir or tokenizer.json (default: DIR)")

    sp = add("quantize", "quantize a Hugging Face causal LM directory to a lutmm checkpoint", cmd_quantize)
    sp.add_argument("model_dir", metavar="MODEL_DIR", help="HF model directory (config.json + safetensors)")
    sp.add_argument("out_dir", metavar="OUT_DIR", help="output directory")
    sp.add_argument("--bits", type=int, choices=(2, 3, 4), default=4)
    sp.add_argument("--group-size", type=_group_size_arg, default=64,
                    help=_GROUP_SIZES_HELP)
    sp.add_argument("--method", choices=QUANT_METHODS, default=None,
                    help="quantization algorithm, see docs/quality.md (default: gptq+kmeans; rtn when only "
                         "--table / --absmax are given)")
    sp.add_argument("--table", choices=("nf", "int", "kmeans"), default=None,
                    help="value table for methods without kmeans (default nf)")
    sp.add_argument("--calib", default=None, metavar="FILE",
                    help="calibration text, never the evaluation text (default: $LUTMM_CALIB, else the in-domain "
                         f"GCIDE dictionary text {IN_DOMAIN_CALIB} written by scripts/get_calib.sh, else the "
                         "fallback shared/data/wikitext-2/valid.txt; the output says which was used)")
    sp.add_argument("--damp", type=float, default=None,
                    help="GPTQ damping, a fraction of mean(diag H) (default 0.01; 1.0 with the WikiText-2 fallback, "
                         "which is out of mini-llama's domain)")
    sp.add_argument("--calib-tokens", type=_positive_int, default=32768, help="calibration tokens (default 32768)")
    sp.add_argument("--seed", type=int, default=0, help="seed for the calibration windows (default 0)")
    sp.add_argument("--device", type=_device_arg, default=None,
                    help="where calibration runs (default: cuda when present, else cpu)")
    sp.add_argument("--tokenizer", default=None, help="tokenizer dir or tokenizer.json (default: MODEL_DIR)")
    sp.add_argument("--skip", nargs="*", default=["lm_head"],
                    help="module name substrings to leave unquantized (default: lm_head)")
    sp.add_argument("--absmax", action="store_true", help="absmax scales instead of the per-group scale search (rtn)")
    sp.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16", help="dtype to load the model in")
    sp.add_argument("--fold-norms", action="store_true",
                    help="Llama: fold the RMSNorm weights into q/k/v and gate/up before quantizing (the same model; "
                         "on CUDA, generate then runs each layer as 4 lutmm calls + attention, lutmm.layerfold)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")

    sp = add("eval", "perplexity of a model (HF directory or lutmm checkpoint) on a text file", cmd_eval)
    sp.add_argument("dir", metavar="DIR")
    sp.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file")
    sp.add_argument("--max-tokens", type=_positive_int, default=None, help="only the first N tokens of the text")
    sp.add_argument("--window", type=_int_at_least(2), default=512,
                    help="tokens per independently scored window (512)")
    sp.add_argument("--ahead", type=_ahead_arg, default="auto",
                    help="tokens ahead each position predicts: 1, 2 or auto (default; see lutmm.evaluate)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    model_opts(sp)

    sp = add("generate", "greedy text generation", cmd_generate)
    sp.add_argument("dir", metavar="DIR")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--max-new-tokens", type=_positive_int, default=32)
    sp.add_argument("--static", action=argparse.BooleanOptionalAction, default=None,
                    help="decode through a static KV cache with the step replayed as one CUDA graph on CUDA and "
                         "lutmm's grouped-query attention (lutmm.generation.greedy_static, lutmm.attention; the "
                         "default on CUDA); --no-static: Hugging Face generate (the default on CPU)")
    sp.add_argument("--compile", action="store_true", help="with --static: torch.compile the decode step first")
    model_opts(sp)

    sp = add("upgrade", "rewrite a lutmm checkpoint (any supported format version) in the current one", cmd_upgrade)
    sp.add_argument("dir", metavar="DIR", help="lutmm checkpoint directory")
    sp.add_argument("out_dir", metavar="OUT_DIR", help="output directory (not DIR)")
    sp.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16",
                    help="dtype of the non-quantized weights as written (default bfloat16)")

    sp = add("bench", "kernel benchmark vs cuBLAS bf16 (needs a CUDA GPU and the repo's bench/ folder)", cmd_bench)
    sp.add_argument("--quick", action="store_true", help="a subset of shapes")
    sp.add_argument("--json", default=None, help="also write all rows to this JSON file")

    add("info", "versions, build, GPU and kernels", cmd_info)

    sp = add("demo", "quantize a model, then compare generation, perplexity and decode speed with bf16", cmd_demo)
    sp.add_argument("--model", default=None,
                    help="HF model directory (default: shared/models/mini-llama, else a built-in random Llama)")
    sp.add_argument("--bits", type=int, choices=(2, 3, 4), default=4)
    sp.add_argument("--group-size", type=_group_size_arg, default=64,
                    help=_GROUP_SIZES_HELP)
    sp.add_argument("--table", choices=("nf", "int", "kmeans"), default="nf")
    sp.add_argument("--prompt", default=DEFAULT_PROMPT)
    sp.add_argument("--new-tokens", type=_positive_int, default=32, help="tokens to generate for the text sample")
    sp.add_argument("--text", default=None, help="text for perplexity (default: shared/data/heldout.txt)")
    sp.add_argument("--max-tokens", type=_positive_int, default=8192, help="perplexity on the first N tokens (8192)")
    sp.add_argument("--window", type=_int_at_least(2), default=512)
    sp.add_argument("--ahead", type=_ahead_arg, default="auto", help="1, 2 or auto (see lutmm.evaluate)")
    sp.add_argument("--speed-tokens", type=_positive_int, default=64, help="tokens to decode for the speed test")
    sp.add_argument("--device", type=_device_arg, default=None, help="cpu or cuda (default: cuda when available)")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 0
    try:
        return args.fn(args)
    except ValueError as e:  # bad input (corrupt checkpoint, bad argument): one line, no traceback
        print(f"lutmm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
