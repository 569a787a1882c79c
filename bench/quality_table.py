"""Regenerates the perplexity table of docs/quality.md: mini-llama, every decoder linear quantized (lm_head /
embeddings kept), bits x group size x method, perplexity on held-out text relative to bf16.

    python3 bench/quality_table.py                                  # the full table (~2 hours on 2 CPU cores)
    python3 bench/quality_table.py --bits 4 --groups 64 --methods nf gptq+kmeans --max-tokens 8192
    python3 bench/quality_table.py --calib wikitext --damp 1.0      # the WikiText-2-calibrated table
    python3 bench/quality_table.py --bits 3 --groups 32 --methods gptq-int gptq+select --seeds 0 1 2
                                                                    # several calibration seeds: mean and range
    python3 bench/quality_table.py --report --bits 3 --groups 32 --methods gptq-int gptq+kmeans+refit \
        --seeds $(seq 0 19)                                         # tables of the rows already there (no runs)

Calibration (--calib): "gcide" = build/calib/gcide-train.txt (scripts/get_calib.sh), "wikitext" = WikiText-2
valid, or a file; the default is gcide when it is there, else wikitext.

Rows are appended to --json as they finish and rows already there are skipped, so an interrupted run resumes
and several runs may share one json (each row is added under a file lock, the json's name + .lock);
calibrated rows record their --seeds seed (rows without one are seed 0). The first table printed is the first
seed's; with several seeds a second one gives each cell's mean and range over them, and a third each LUT
method against the best int method paired by seed (same calibration windows): int - LUT, its standard error
and on how many seeds the LUT row is lower.
Scoring: 512-token windows, ahead=2 (mini-llama predicts token t+2, see lutmm.evaluate). Quantized models
are scored through a dense fp32 copy of each dequantized weight (lutmm.quality.densify), which computes what
the CPU LUTLinear path computes (fp32 matmul on the dequantized weight) without re-dequantizing every call.
"""
from __future__ import annotations

import argparse
import collections
import copy
import fcntl
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
# name -> (lutmm quantize --method, table, absmax)
METHODS = {
    "int-absmax": ("rtn", "int", True), "int": ("rtn", "int", False),
    "nf-absmax": ("rtn", "nf", True), "nf": ("rtn", "nf", False),
    "kmeans": ("kmeans", "kmeans", False), "learned": ("learned", "nf", False),
    "gptq-int": ("gptq", "int", False), "gptq": ("gptq", "nf", False),
    "gptq+kmeans": ("gptq+kmeans", "kmeans", False), "learned+kmeans": ("learned+kmeans", "kmeans", False),
    "gptq+kmeans+refit": ("gptq+kmeans+refit", "kmeans", False),
    "gptq+select": ("gptq+select", "nf", False), "gptq+select+refit": ("gptq+select+refit", "nf", False),
}
DEFAULT_METHODS = ["int", "nf", "kmeans", "gptq-int", "gptq", "gptq+kmeans", "gptq+kmeans+refit", "gptq+select"]
OLD_ROWS_CALIB = ("wikitext", 1.0)  # rows written before --calib / --damp existed
GCIDE = REPO / "build" / "calib" / "gcide-train.txt"  # scripts/get_calib.sh


def command(name, bits, g, args, seed=0) -> str:
    method, table, absmax = METHODS[name]
    cmd = f"lutmm quantize ../shared/models/mini-llama OUT --bits {bits} --group-size {g} --method {method}"
    if method == "rtn" or not {"kmeans", "select"} & set(method.split("+")):  # those pick their own table
        cmd += f" --table {table}"
    if absmax:
        cmd += " --absmax"
    if method != "rtn":
        cmd += f" --calib-tokens {args.calib_tokens} --seed {seed} --damp {args.damp:g}"
        cmd += " --calib ../shared/data/wikitext-2/valid.txt" if args.calib == "wikitext" else (
            " --calib build/calib/gcide-train.txt" if args.calib == "gcide" else f" --calib {args.calib}")
    return cmd


def calib_of(r):
    """(calibration label, damping, seed) of a row; None for uncalibrated rows."""
    if r["calib_tokens"] == 0:
        return None
    return r.get("calib", OLD_ROWS_CALIB[0]), r.get("damp", OLD_ROWS_CALIB[1]), r.get("seed", 0)


def row_key(r):
    """What makes two rows the same measurement (a run skips rows whose key is in the json)."""
    return (r["bits"], r["group_size"], r["method"], r["max_tokens"], r["calib_tokens"], r["text"], calib_of(r))


def add_rows(path, new_rows) -> list:
    """Adds new_rows to the json list at `path` (those whose row_key is already there are dropped) and returns
    the file's rows. Under an exclusive lock (`path`.lock) the file is read again first and replaced
    atomically, so runs sharing one json (two jobs at a time on 2 cores) keep each other's rows."""
    path = Path(path)
    with open(str(path) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(path.read_text()) if path.is_file() else []
        have, n = {row_key(r) for r in rows}, len(rows)
        for r in new_rows:
            if row_key(r) not in have:
                rows.append(r)
                have.add(row_key(r))
        if len(rows) > n:
            tmp = Path(f"{path}.tmp{os.getpid()}")
            tmp.write_text(json.dumps(rows, indent=1))
            os.replace(tmp, path)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", default=os.environ.get("LUTMM_SHARED", str(REPO.parent / "shared")))
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=sorted(METHODS))
    ap.add_argument("--text", default=None, help="evaluation text (default: shared/data/heldout.txt)")
    ap.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens (default: all)")
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--seeds", "--seed", type=int, nargs="+", default=[0],
                    help="calibration sampling seeds; each calibrated cell runs once per seed (default 0)")
    ap.add_argument("--calib", default=None, help="gcide, wikitext or a text file (default: gcide when there)")
    ap.add_argument("--damp", type=float, default=0.01, help="GPTQ damping x mean diag H (default 0.01)")
    ap.add_argument("--json", default=str(REPO / "bench" / "quality_table.json"))
    ap.add_argument("--markdown", default=None, help="also write the markdown table here")
    ap.add_argument("--report", action="store_true",
                    help="only print the tables from the rows already in --json (no model, no quantization)")
    args = ap.parse_args()
    args.text = args.text or str(Path(args.shared) / "data" / "heldout.txt")
    if args.calib is None:
        args.calib = "gcide" if GCIDE.is_file() else "wikitext"
    if args.report:
        return report(args)

    from transformers import AutoModelForCausalLM

    from lutmm.evaluate import perplexity
    from lutmm.nn import lut_modules
    from lutmm.quality import densify, quantize_model_calibrated

    model_dir = Path(args.shared) / "models" / "mini-llama"
    text = args.text
    calib = {"gcide": str(GCIDE), "wikitext": str(Path(args.shared) / "data" / "wikitext-2" / "valid.txt")}.get(
        args.calib, args.calib)
    if not Path(calib).is_file():
        sys.exit(f"--calib: {calib} is not a file (gcide: run scripts/get_calib.sh)")
    print(f"calibration: {calib}, damping {args.damp:g}", flush=True)
    rows = add_rows(args.json, [])
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).eval()
    ref = [r for r in rows if r["method"] == "bf16" and r["max_tokens"] == args.max_tokens and r["text"] == text]
    if not ref:
        t0 = time.perf_counter()
        ppl = perplexity(base, str(model_dir), text, max_tokens=args.max_tokens, ahead=2, progress=False)
        ref = [{"bits": 16, "group_size": 0, "method": "bf16", "max_tokens": args.max_tokens, "calib_tokens": 0,
                "text": text, "ppl": ppl, "quant_s": 0.0, "eval_s": time.perf_counter() - t0}]
        rows = add_rows(args.json, ref)
    ref_ppl = ref[0]["ppl"]
    print(f"bf16: {ref_ppl:.3f}", flush=True)
    for bits, g, name in itertools.product(args.bits, args.groups, args.methods):
        method, table, absmax = METHODS[name]
        for seed in (args.seeds if method != "rtn" else [0]):
            row = {"bits": bits, "group_size": g, "method": name, "max_tokens": args.max_tokens,
                   "calib_tokens": args.calib_tokens if method != "rtn" else 0, "text": text}
            if method != "rtn":
                row.update(calib=args.calib, damp=args.damp, seed=seed)
            if row_key(row) in {row_key(r) for r in add_rows(args.json, [])}:  # done, also by another run
                continue
            m = copy.deepcopy(base)
            t0 = time.perf_counter()
            quantize_model_calibrated(m, str(model_dir), bits, g, method=method, table=table, calib=calib,
                                      calib_tokens=args.calib_tokens, seed=seed, search_scale=not absmax,
                                      progress=False, **({} if method == "rtn" else {"percdamp": args.damp}))
            row["quant_s"] = time.perf_counter() - t0
            row["threads"] = torch.get_num_threads()  # the sums' order, hence GPTQ's choices, depend on it
            if "select" in method:  # how many layers took each candidate table
                row["tables"] = dict(collections.Counter(mod.table_kind for _, mod in lut_modules(m)))
            densify(m)
            t0 = time.perf_counter()
            row["ppl"] = perplexity(m, str(model_dir), text, max_tokens=args.max_tokens, ahead=2, progress=False)
            row["eval_s"] = time.perf_counter() - t0
            row["command"] = command(name, bits, g, args, seed)
            rows = add_rows(args.json, [row])
            print(f"{bits}-bit g{g:<4} {name:<17} seed {seed} ppl {row['ppl']:8.3f} "
                  f"{100 * (row['ppl'] / ref_ppl - 1):+7.2f}%  quantize {row['quant_s']:5.1f} s "
                  f"{row.get('tables', '')}", flush=True)
            del m
    print_tables(add_rows(args.json, []), ref_ppl, args)


def selected(rows, args) -> list:
    """The rows of the cells and methods asked for (--bits, --groups, --methods), and the bf16 rows."""
    return [r for r in rows if r["method"] == "bf16" or (r["bits"] in args.bits and r["group_size"] in args.groups
                                                         and r["method"] in args.methods)]


def report(args) -> int:
    """--report: the tables of the rows in --json for the given cells, methods and seeds; nothing is run. The
    bf16 row is matched by the text's file name (rows record absolute paths, which differ between machines)."""
    rows = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else []
    name = Path(args.text).name
    ref = [r for r in rows if r["method"] == "bf16" and r["max_tokens"] == args.max_tokens
           and Path(r["text"]).name == name]
    if not ref:
        sys.exit(f"--report: no bf16 row for {name} (max_tokens {args.max_tokens}) in {args.json}")
    print_tables(rows, ref[0]["ppl"], args)
    return 0


def print_tables(rows, ref_ppl, args) -> None:
    """Prints the tables of the selected rows (and writes them to --markdown)."""
    md = markdown(selected(rows, args), ref_ppl, args)
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md)


INT_METHODS = ("int-absmax", "int", "gptq-int")  # uniform-grid baselines; every other column is a LUT method


def paired(int_ppl: dict, lut_ppl: dict, ref_ppl: float):
    """int - LUT over the seeds both have ({seed: perplexity} each), in points of the bf16 perplexity:
    (mean, standard error of the mean, seeds where the LUT row is lower, n); None below two common seeds."""
    seeds = sorted(set(int_ppl) & set(lut_ppl))
    if len(seeds) < 2:
        return None
    d = [100 * (int_ppl[s] - lut_ppl[s]) / ref_ppl for s in seeds]
    return statistics.mean(d), statistics.stdev(d) / len(d) ** 0.5, sum(x > 0 for x in d), len(d)


def markdown(rows, ref_ppl, args) -> str:
    """The table of the first --seeds seed, then (when several seeds are given) the mean and range over them
    of every cell and method that has rows for more than one of them."""
    seed0 = args.seeds[0]
    text_name = Path(args.text or "heldout.txt").name  # one evaluation text per table
    sel = [r for r in rows if r["method"] != "bf16" and r["max_tokens"] == args.max_tokens
           and Path(r["text"]).name == text_name
           and (calib_of(r) is None or (calib_of(r)[:2] == (args.calib, args.damp)
                                        and r["calib_tokens"] == args.calib_tokens))]
    methods = [m for m in METHODS if any(r["method"] == m for r in sel)]
    rel = lambda p: 100 * (p / ref_ppl - 1)  # noqa: E731

    def cell_seed_ppl(bits, g, seeds):
        """method -> {seed: ppl} for the seeds in `seeds` present (the last row of each); uncalibrated rows once,
        under the first seed."""
        out = {}
        for m in methods:
            for sd in seeds:
                r = [x for x in sel if (x["bits"], x["group_size"], x["method"]) == (bits, g, m)
                     and (calib_of(x) is None or calib_of(x)[2] == sd)]
                if r:
                    out.setdefault(m, {})[sd] = r[-1]["ppl"]
                if r and calib_of(r[-1]) is None:
                    break
        return out

    def cell_ppl(bits, g, seeds):
        """method -> [ppl of each seed in `seeds` present]."""
        return {m: list(p.values()) for m, p in cell_seed_ppl(bits, g, seeds).items()}

    def verdict(ppl):
        lut = {m: p for m, p in ppl.items() if m not in INT_METHODS}
        ints = {m: p for m, p in ppl.items() if m in INT_METHODS}
        best_lut = min(lut, key=lut.get) if lut else None
        if not (lut and ints):
            return best_lut, ""
        best_int = min(ints, key=ints.get)
        return best_lut, (f"{best_lut} {rel(lut[best_lut]):+.2f}% vs {best_int} {rel(ints[best_int]):+.2f}%: "
                          + ("LUT" if lut[best_lut] < ints[best_int] else "int"))

    cells = [(bits, g) for bits in sorted({r["bits"] for r in sel}, reverse=True)
             for g in sorted({r["group_size"] for r in sel if r["bits"] == bits})]
    out = ["| bits | group | " + " | ".join(methods) + " | best LUT vs best int |",
           "|---|---|" + "---|" * (len(methods) + 1)]
    for bits, g in cells:
        ppl = {m: p[0] for m, p in cell_ppl(bits, g, [seed0]).items()}
        best_lut, v = verdict(ppl)
        txt = [f"{ppl[m]:.2f} ({rel(ppl[m]):+.2f}%)" if m in ppl else "" for m in methods]
        out.append(f"| {bits} | {g} | " + " | ".join(f"**{t}**" if m == best_lut else t
                                                      for m, t in zip(methods, txt)) + f" | {v} |")
    out.append(f"\nbf16: {ref_ppl:.3f}; calibration: {args.calib}, damping {args.damp:g}, seed {seed0}")
    multi = [(bits, g, ps) for bits, g in cells
             for ps in [{m: p for m, p in cell_ppl(bits, g, args.seeds).items() if len(p) > 1}] if ps]
    if multi:
        ms = [m for m in methods if any(m in ps for _, _, ps in multi)]
        out += ["", f"Mean over seeds {' '.join(map(str, args.seeds))} (min .. max), relative to bf16:", "",
                "| bits | group | " + " | ".join(ms) + " | best LUT vs best int (means) |",
                "|---|---|" + "---|" * (len(ms) + 1)]
        for bits, g, ps in multi:
            mean = {m: sum(p) / len(p) for m, p in ps.items()}
            best_lut, v = verdict(mean)
            txt = [f"{rel(mean[m]):+.2f}% ({rel(min(ps[m])):+.2f} .. {rel(max(ps[m])):+.2f}, n={len(ps[m])})"
                   if m in ps else "" for m in ms]
            out.append(f"| {bits} | {g} | " + " | ".join(f"**{t}**" if m == best_lut else t
                                                          for m, t in zip(ms, txt)) + f" | {v} |")
        # Paired by seed (the same calibration windows): each LUT method against the best int method by mean.
        pair_rows = []
        for bits, g, ps in multi:
            sp = cell_seed_ppl(bits, g, args.seeds)
            ints = [m for m in ps if m in INT_METHODS]
            if not ints:
                continue
            best_int = min(ints, key=lambda m: sum(ps[m]) / len(ps[m]))
            for m in ps:
                st = None if m in INT_METHODS else paired(sp[best_int], sp[m], ref_ppl)
                if st:
                    pair_rows.append(f"| {bits} | {g} | {m} | {best_int} | {st[0]:+.2f} +- {st[1]:.2f} | "
                                     f"{st[2]} of {st[3]} |")
        if pair_rows:
            out += ["", "Paired by seed: int - LUT in points of the bf16 perplexity (mean +- standard error; "
                    "> 0: the LUT method is lower):", "",
                    "| bits | group | LUT method | int method | int - LUT | LUT lower |", "|---|---|---|---|---|---|"]
            out += pair_rows
    return "\n".join(out) + "\n"

if __name__ == "__main__":
    sys.exit(main())
