"""What quantizing the lm_head alone costs in quality: mini-llama held-out perplexity with every other weight
in bf16 and the lm_head (untied from the embeddings, which stay bf16) quantized RTN with searched scales.

    python3 bench/quality_lm_head.py [--bits 4] [--groups 128 64] [--table nf]

(`lutmm quantize --skip` with no names quantizes an untied lm_head the same way; a tied one is refused with a
warning, since a checkpoint stores the shared weight once.)
"""
import argparse
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lutmm
from lutmm.evaluate import perplexity
from lutmm.nn import LUTLinear

SHARED = os.environ.get("LUTMM_SHARED", os.path.join(os.path.dirname(__file__), "..", "..", "shared"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(SHARED, "models", "mini-llama"))
    ap.add_argument("--text", default=os.path.join(SHARED, "data", "heldout.txt"))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--groups", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--table", default="nf")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    base = perplexity(model, tok, args.text, ahead="auto", progress=False)
    print(f"bf16: {base:.3f}")
    head = model.lm_head
    for g in args.groups:
        qw = lutmm.quantize(head.weight.detach().float().clone(), args.bits, g, args.table, search_scale=True)
        model.lm_head = LUTLinear.from_quantized(qw)
        p = perplexity(model, tok, args.text, ahead="auto", progress=False)
        print(f"lm_head only, {args.bits}-bit g{g} {args.table}: {p:.3f} ({(p / base - 1) * 100:+.2f}%)", flush=True)
    model.lm_head = head


if __name__ == "__main__":
    main()
