"""Calibrated quantization (lutmm.quality / lutmm.gptq): GPTQ, learned scales, weighted k-means, the sequential
whole-model driver, the quantize CLI, and a perplexity regression gate on mini-llama (docs/quality.md)."""
import argparse
import json
import os

import pytest
import torch

import lutmm
from lutmm import gptq as G

pytest.importorskip("transformers")

from lutmm import cli, quality  # noqa: E402


def _layer(N=128, K=256, n=2048, seed=0):
    """A weight and the second-moment matrix of strongly correlated inputs with uneven channel scales."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=gen) * 0.05
    mix = torch.randn(K, K, generator=gen) / K ** 0.5 + torch.eye(K)
    X = (torch.randn(n, K, generator=gen) @ mix) * torch.linspace(0.2, 3.0, K)
    return W, X, X.T @ X


@pytest.mark.parametrize("bits,g", [(4, 64), (3, 32), (2, 128)])
def test_gptq_lowers_output_error_vs_rtn(bits, g):
    W, X, H = _layer()
    table = lutmm.make_table("nf", bits)
    rtn = lutmm.dequantize(lutmm.quantize(W, bits, g, "nf"))
    codes, scales = G.gptq_quantize(W, H, bits, g, table, percdamp=0.01)
    assert codes.dtype == torch.uint8 and scales.dtype == torch.float16 and scales.shape == (W.shape[0], W.shape[1] // g)
    assert int(codes.max()) < 2 ** bits
    w_hat = G.dequant(codes, scales, table, g)
    e_rtn = (X @ (W - rtn).T).pow(2).sum()
    e_gptq = (X @ (W - w_hat).T).pow(2).sum()
    assert abs(G.output_error(W, w_hat, H) / float(e_gptq) - 1) < 1e-3
    assert e_gptq < 0.9 * e_rtn, (float(e_gptq), float(e_rtn))
    # the packed format round-trips what GPTQ chose
    qw = lutmm._api.pack(codes, scales, table, bits, g)
    assert torch.equal(lutmm.dequantize(qw), w_hat)


def test_gptq_act_order_and_fixed_scales():
    W, X, H = _layer(seed=1)
    table = lutmm.make_table("int", 3)
    scales = G.searched_scales(W, 3, 64, table, torch.diag(H))
    for act_order in (False, True):
        codes, s = G.gptq_quantize(W, H, 3, 64, table, scales=scales, act_order=act_order)
        assert torch.equal(s.float(), scales.half().float())
        e = G.output_error(W, G.dequant(codes, s, table, 64), H)
        e_rtn = G.output_error(W, G.dequant(G.rtn_codes(W, scales, table, 64), scales, table, 64), H)
        assert e < e_rtn


def test_learned_scales_not_worse_than_init():
    W, X, H = _layer(seed=2)
    table = lutmm.make_table("nf", 3)
    init = G.searched_scales(W, 3, 64, table, torch.diag(H))
    e0 = G.output_error(W, G.dequant(G.rtn_codes(W, init, table, 64), init, table, 64), H)
    codes, scales, info = G.learn_scales(W, H, table, init, 64, steps=60)
    e1 = G.output_error(W, G.dequant(codes, scales, table, 64), H)
    assert scales.dtype == torch.float16
    assert e1 <= e0 * (1 + 1e-5)
    assert info["loss_final"] <= info["loss_init"]
    assert e1 < 0.995 * e0  # on correlated inputs the training does find better scales


def test_weighted_kmeans_lowers_weighted_error():
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(256, 512, generator=gen) * 0.02
    W[:, :64] += torch.randn(256, 64, generator=gen).pow(3) * 0.02  # heavy-tailed, important columns
    imp = torch.ones(512)
    imp[:64] = 50.0

    def werr(qw):
        return float(((lutmm.dequantize(qw) - W).pow(2) * imp).sum())

    nf = lutmm.quantize(W, 3, 64, "nf", importance=imp)
    km = lutmm.quantize(W, 3, 64, "kmeans", importance=imp)
    km_unweighted = lutmm.quantize(W, 3, 64, "kmeans")
    assert werr(km) < werr(nf)
    assert werr(km) <= werr(km_unweighted) * 1.001
    both = G.weighted_kmeans(W, 3, 64, imp, inits=("nf", "int"))
    assert both.table_kind == "kmeans"
    assert werr(both) <= min(werr(km), werr(G.weighted_kmeans(W, 3, 64, imp, inits=("int",)))) * (1 + 1e-6)


def test_refit_lowers_damped_output_error():
    from lutmm import refit as R

    W, X, H = _layer(seed=4)
    Hd = R.damped(H, 0.1)
    for bits in (2, 3):
        table = lutmm.make_table("nf", bits)
        codes, scales = G.gptq_quantize(W, H, bits, 64, table, percdamp=0.1)
        e0 = G.output_error(W, G.dequant(codes, scales, table, 64), Hd)
        t1 = R.refit_table(W, Hd, codes, scales, table, 64)
        e1 = G.output_error(W, G.dequant(codes, scales, t1, 64), Hd)
        s2 = R.refit_scales(W, Hd, codes, t1, 64, scales)
        e2 = G.output_error(W, G.dequant(codes, s2, t1, 64), Hd)
        assert t1.shape == (2 ** bits,) and s2.dtype == torch.float16 and s2.shape == scales.shape
        assert e1 <= e0 * (1 + 1e-5) and e2 <= e1 * (1 + 1e-3)  # fp16 rounding of the scales
        c3, s3, t3, info = R.gptq_refit(W, H, bits, 64, table, percdamp=0.1, rounds=2)
        e3 = G.output_error(W, G.dequant(c3, s3, t3, 64), Hd)
        assert abs(info["errors"][0] / e0 - 1) < 1e-4 and e3 <= min(info["errors"]) * (1 + 1e-5)
        assert e3 < (0.9 if bits == 2 else 0.97) * e0, (bits, e3 / e0)
        qw = lutmm._api.pack(c3, s3, t3, bits, 64)
        assert torch.equal(lutmm.dequantize(qw), G.dequant(c3, s3, t3, 64))


@pytest.mark.parametrize("bits,g,rounds", [(3, 32, 0), (4, 128, 0), (2, 64, 1)])
def test_gptq_select_keeps_least_error(bits, g, rounds):
    from lutmm.refit import damped

    W, X, H = _layer(seed=5)
    imp, Hd = torch.diag(H) / X.shape[0], damped(H, 0.01)
    qw, errors = quality.gptq_select(W, H, bits, g, imp, percdamp=0.01, refit_rounds=rounds)
    # every candidate's error, recomputed independently: GPTQ onto NF and onto the weighted k-means table
    tables = {"nf": lutmm.make_table("nf", bits), "kmeans": G.weighted_kmeans(W, bits, g, imp, inits=("nf",)).table}
    expect = {k: G.output_error(W, G.dequant(*G.gptq_quantize(W, H, bits, g, t, percdamp=0.01), t, g), Hd)
              for k, t in tables.items()}
    assert set(errors) == ({"nf", "kmeans", "custom"} if rounds else {"nf", "kmeans"})  # never the int grid
    for k, e in expect.items():
        assert abs(errors[k] / e - 1) < 1e-5, (k, errors[k], e)
    chosen = G.output_error(W, lutmm.dequantize(qw), Hd)
    assert qw.table_kind == min(errors, key=errors.get)
    assert abs(chosen / min(errors.values()) - 1) < 1e-5 and all(chosen <= e * (1 + 1e-5) for e in errors.values())
    if rounds:  # the refit starts from the better table and keeps its best round: never worse
        assert errors["custom"] <= min(expect.values()) * (1 + 1e-5)
    method = "gptq+select" + ("+refit" if rounds else "")
    same = quality.quantize_weight(W, H, X.shape[0], bits, g, method, refit_rounds=rounds)
    assert torch.equal(lutmm.dequantize(same), lutmm.dequantize(qw))
    with pytest.raises(ValueError):
        quality.quantize_weight(W, H, X.shape[0], bits, g, method, table="int")


def test_default_calib_order(tmp_path, monkeypatch):
    own = tmp_path / "own.txt"
    own.write_text("text")
    monkeypatch.setenv("LUTMM_CALIB", str(own))
    assert cli.default_calib() == (own, False)
    monkeypatch.setenv("LUTMM_CALIB", str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="not a file"):
        cli.default_calib()
    monkeypatch.delenv("LUTMM_CALIB")
    gcide = tmp_path / cli.IN_DOMAIN_CALIB
    gcide.parent.mkdir(parents=True)
    gcide.write_text("Gord \\Gord\\, n.\n")
    monkeypatch.chdir(tmp_path)
    assert cli.default_calib() == (gcide.resolve(), False)
    gcide.unlink()
    path, fallback = cli.default_calib()
    assert path is None or (fallback and path.name == "valid.txt") or "gcide" in path.name


class _ReusingLayer(torch.nn.Module):
    """A layer whose second linear's input is a new tensor allocated right after the first linear's input was
    freed, so the allocator hands it the same address (as o_proj's input and the MLP's normed input can meet
    in a decoder layer), and whose last two linears share one input (as gate and up do)."""

    def __init__(self, K=64):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(K, K, bias=False) for _ in range(3))

    def forward(self, h):
        y = self.a(h * 3.0)            # the product is freed once a has run
        z = h * 2.0                    # same size: typically the freed block again
        return y + self.b(z) + self.c(z)


def test_input_groups_do_not_follow_reused_addresses():
    torch.manual_seed(0)
    layer = _ReusingLayer()
    lins = {"a": layer.a, "b": layer.b, "c": layer.c}
    for _ in range(20):  # the allocator reuses the block on some tries at least; the grouping must never merge
        assert quality._input_groups(layer, lins, torch.randn(5, 64), {}) == [["a"], ["b", "c"]]


def test_parse_method():
    assert quality.parse_method("gptq+kmeans") == {"gptq", "kmeans"}
    assert quality.parse_method("gptq+kmeans+refit") == {"gptq", "kmeans", "refit"}
    assert quality.parse_method("gptq+select+refit") == {"gptq", "select", "refit"}
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    method = next(a for a in sub.choices["quantize"]._actions if a.dest == "method")
    assert tuple(method.choices) == quality.METHODS  # the CLI offers exactly the methods quality.py implements
    for m in quality.METHODS:
        quality.parse_method(m)
    for bad in ("", "gptq+foo", "rtn+gptq", "refit", "kmeans+refit", "gptq+learned+refit", "select",
                "gptq+select+kmeans", "gptq+learned+select", "rtn+select"):
        with pytest.raises(ValueError):
            quality.parse_method(bad)


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(open(cli.__file__, encoding="utf-8").read() * 2)
    return p


@pytest.mark.parametrize("method", ["gptq+kmeans", "learned", "kmeans", "gptq+kmeans+refit", "gptq+select"])
def test_calibrated_tiny_model(method, calib_text):
    from lutmm.evaluate import ByteTokenizer
    from lutmm.nn import LUTLinear
    from test_nn import tiny_llama

    base = tiny_llama(tie=False)
    x = torch.randint(0, 256, (1, 64))
    model = tiny_llama(tie=False)
    stats = {}
    quality.quantize_model_calibrated(model, ByteTokenizer(), 4, 64, method=method, calib=calib_text,
                                      calib_tokens=1024, seqlen=128, progress=False, stats=stats, learn_steps=10)
    lut = [n for n, m in model.named_modules() if isinstance(m, LUTLinear)]
    assert len(lut) == stats["layers"] == 14 and stats["skipped"] == ["lm_head"]
    qc = model.config.quantization_config
    kinds = {"learned": {"nf"}, "gptq+kmeans+refit": {"custom"}, "gptq+select": {"nf", "kmeans", "custom"}}
    assert qc["modules"] == lut and qc["bits"] == 4 and qc["table"] in kinds.get(method, {"kmeans"})
    assert qc["method"] == method
    with torch.no_grad():
        y0, y1 = base(x).logits.float(), model(x).logits.float()
        assert torch.isfinite(y1).all()
        assert (y1 - y0).norm() < 0.2 * y0.norm()
        quality.densify(model)
        assert torch.allclose(model(x).logits.float(), y1, atol=1e-2, rtol=1e-2)


def test_calibration_is_seeded(calib_text):
    from lutmm.evaluate import ByteTokenizer

    a = quality.calibration_ids(ByteTokenizer(), calib_text, 1000, 100, seed=5)
    assert a.shape == (10, 100)
    assert torch.equal(a, quality.calibration_ids(ByteTokenizer(), calib_text, 1000, 100, seed=5))
    assert not torch.equal(a, quality.calibration_ids(ByteTokenizer(), calib_text, 1000, 100, seed=6))


def test_calibration_and_perplexity_name_bad_text_files(calib_text, tmp_path):
    from lutmm.evaluate import ByteTokenizer, perplexity

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait ".encode("latin-1") * 200)
    with pytest.raises(ValueError, match=r"calib: .*latin1.txt is not UTF-8 text \(invalid continuation byte"):
        quality.calibration_ids(ByteTokenizer(), bad, 1000, 100)
    with pytest.raises(ValueError, match=r"calib: .*nope.txt does not exist"):
        quality.calibration_ids(ByteTokenizer(), tmp_path / "nope.txt", 1000, 100)
    with pytest.raises(ValueError, match="n_tokens: got 0, expected >= 1"):
        quality.calibration_ids(ByteTokenizer(), calib_text, 0, 100)
    with pytest.raises(ValueError, match=r"text_path: .*latin1.txt is not UTF-8 text"):
        perplexity(torch.nn.Identity(), ByteTokenizer(), bad)


def test_cli_quantize_method_errors(tmp_path, capsys):
    for extra in (["--method", "gptq+kmeans", "--table", "int"], ["--method", "gptq+select", "--table", "int"],
                  ["--method", "gptq", "--absmax"],
                  ["--method", "gptq", "--damp", "0"], ["--table", "nf", "--damp", "0.1"]):
        assert cli.main(["quantize", str(tmp_path), str(tmp_path / "o")] + extra) == 2
        assert "error" in capsys.readouterr().err
    assert cli.main(["quantize", str(tmp_path), str(tmp_path / "o"), "--method", "gptq",
                     "--calib", str(tmp_path / "missing.txt")]) == 2
    assert "not a file" in capsys.readouterr().err


# ---- the quality gate on mini-llama ---------------------------------------------------------------------------
# The CLI default method (gptq+kmeans) calibrated on 8192 tokens (seed 0), scored on the first 4096 held-out tokens
# (they resolve about +-0.2 points, see docs/quality.md); the gates add a margin for BLAS/CPU differences.
#   wikitext: 4-bit g64 on WikiText-2 valid with damping 1.0, what `lutmm quantize` falls back to without the
#             in-domain text (CI): measured +0.60% over bf16 on the same tokens (RTN NF +0.76%, RTN int +0.44%).
#   gcide:    3-bit g64 on the in-domain GCIDE text (scripts/get_calib.sh; skipped when it is not there), default
#             damping (0.01): measured +1.87% (RTN NF +3.68%, RTN int +4.22% on these tokens); +1.66% alone and
#             in the full suite since the grouping fix of session 22 (the suite had given +2.61% before it).
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GATES = {  # calib -> (bits, extra CLI arguments, measured, gate)
    "wikitext": (4, ["--damp", "1.0"], 0.0060, 0.0100),
    "gcide": (3, [], 0.0187, 0.0260),
}


@pytest.mark.parametrize("calib", sorted(GATES))
def test_quality_gate_mini_llama(calib, shared_dir, tmp_path, capsys):
    from lutmm.evaluate import perplexity
    from transformers import AutoModelForCausalLM

    src = os.path.join(shared_dir, "models", "mini-llama")
    heldout = os.path.join(shared_dir, "data", "heldout.txt")
    calib_path = {"wikitext": os.path.join(shared_dir, "data", "wikitext-2", "valid.txt"),
                  "gcide": os.path.join(REPO, "build", "calib", "gcide-train.txt")}[calib]
    if not os.path.isfile(calib_path):
        pytest.skip(f"{calib_path} not there (scripts/get_calib.sh not run)")
    bits, extra, measured, gate = GATES[calib]
    out = tmp_path / "q"
    assert cli.main(["quantize", src, str(out), "--bits", str(bits), "--group-size", "64", "--calib-tokens", "8192",
                     "--calib", calib_path, "--quiet"] + extra) == 0
    text = capsys.readouterr().out
    assert f"(gptq+kmeans, calibrated on 8192 tokens of {calib_path}" in text
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["table"] == "kmeans" and len(qc["modules"]) == 42 and qc["bits"] == bits
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    p_ref = perplexity(base, src, heldout, max_tokens=4096, ahead=2, progress=False)
    model = lutmm.checkpoint.load_model(str(out), device="cpu", dtype=torch.bfloat16)
    p_q = perplexity(model, src, heldout, max_tokens=4096, ahead=2, progress=False)
    rel = p_q / p_ref - 1
    print(f"{bits}-bit g64 default method, {calib} calibration: {p_q:.3f} vs bf16 {p_ref:.3f} ({100 * rel:+.2f}%, "
          f"measured {100 * measured:+.2f}%)")
    assert rel < gate, f"quality regression: {100 * rel:+.2f}% vs bf16 (gate {100 * gate:+.2f}%)"
