"""Calibrated quantization (lutmm.quality / lutmm.gptq): GPTQ, learned scales, weighted k-means, the sequential
whole-model driver, the quantize CLI, and a perplexity regression gate on mini-llama (docs/quality.md)."""
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


def test_parse_method():
    assert quality.parse_method("gptq+kmeans") == {"gptq", "kmeans"}
    for bad in ("", "gptq+foo", "rtn+gptq"):
        with pytest.raises(ValueError):
            quality.parse_method(bad)


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(open(cli.__file__, encoding="utf-8").read() * 2)
    return p


@pytest.mark.parametrize("method", ["gptq+kmeans", "learned", "kmeans"])
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
    assert qc["modules"] == lut and qc["bits"] == 4 and qc["table"] == ("nf" if method == "learned" else "kmeans")
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


def test_cli_quantize_method_errors(tmp_path, capsys):
    for extra in (["--method", "gptq+kmeans", "--table", "int"], ["--method", "gptq", "--absmax"]):
        assert cli.main(["quantize", str(tmp_path), str(tmp_path / "o")] + extra) == 2
        assert "error" in capsys.readouterr().err
    assert cli.main(["quantize", str(tmp_path), str(tmp_path / "o"), "--method", "gptq",
                     "--calib", str(tmp_path / "missing.txt")]) == 2
    assert "not a file" in capsys.readouterr().err


# ---- the quality gate on mini-llama ---------------------------------------------------------------------------
# 4-bit g64, the CLI default method (gptq+kmeans) calibrated on 8192 WikiText-2 valid tokens (seed 0), scored on
# the first 4096 held-out tokens: measured +0.60% over bf16 on the same tokens (RTN NF: +0.76%, RTN int: +0.44%;
# 4096 tokens resolve about +-0.2 points, see docs/quality.md). The gate adds a margin for BLAS/CPU differences.
MEASURED_4B_G64 = 0.0060
GATE_4B_G64 = 0.0100


def test_quality_gate_mini_llama(shared_dir, tmp_path, capsys):
    from lutmm.evaluate import perplexity
    from transformers import AutoModelForCausalLM

    src = os.path.join(shared_dir, "models", "mini-llama")
    heldout = os.path.join(shared_dir, "data", "heldout.txt")
    out = tmp_path / "q"
    assert cli.main(["quantize", src, str(out), "--bits", "4", "--group-size", "64", "--calib-tokens", "8192",
                     "--quiet"]) == 0
    text = capsys.readouterr().out
    assert f"(gptq+kmeans, calibrated on 8192 tokens of {os.path.join(shared_dir, 'data', 'wikitext-2')}" in \
        text.replace(os.path.realpath(shared_dir), shared_dir)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["table"] == "kmeans" and len(qc["modules"]) == 42
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    p_ref = perplexity(base, src, heldout, max_tokens=4096, ahead=2, progress=False)
    model = lutmm.checkpoint.load_model(str(out), device="cpu", dtype=torch.bfloat16)
    p_q = perplexity(model, src, heldout, max_tokens=4096, ahead=2, progress=False)
    rel = p_q / p_ref - 1
    print(f"4-bit g64 default method: {p_q:.3f} vs bf16 {p_ref:.3f} ({100 * rel:+.2f}%)")
    assert rel < GATE_4B_G64, f"quality regression: {100 * rel:+.2f}% vs bf16 (gate {100 * GATE_4B_G64:+.2f}%)"
