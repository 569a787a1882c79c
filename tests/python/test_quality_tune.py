"""End-to-end table tuning (lutmm.refit.tune_tables, methods gptq+tune / gptq+utune): only the tables move, the
calibration KL goes down, the uniform control stays a uniform grid, and a tuned int start is no longer the int grid."""
import pytest
import torch

import lutmm
from lutmm import gptq as G

pytest.importorskip("transformers")

from lutmm import cli, quality  # noqa: E402
from lutmm.refit import tune_tables  # noqa: E402


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(open(cli.__file__, encoding="utf-8").read() * 2)
    return p


def _quantized(calib_text, table="int"):
    """A tiny Llama quantized 3-bit g32 with GPTQ onto `table`: (teacher, model, results, calibration ids)."""
    import copy

    from lutmm.evaluate import ByteTokenizer
    from test_nn import tiny_llama

    teacher = tiny_llama(tie=False, dtype=torch.float32)
    model = copy.deepcopy(teacher)
    ids = quality.calibration_ids(ByteTokenizer(), calib_text, 2048, 128, seed=0)
    results = {}
    for name, lin in quality.quantizable_linears(model, 32, ["lm_head"]):
        W = lin.weight.detach().float()
        t = lutmm.make_table(table, 3)
        codes, scales = G.gptq_quantize(W, W.T @ W + torch.eye(W.shape[1]), 3, 32, t)  # any H will do here
        results[name] = lutmm._api.pack(codes, scales, t, 3, 32, table)
        with torch.no_grad():
            lin.weight.copy_(G.dequant(codes, scales, t, 32))
    return teacher, model, results, ids


@pytest.mark.parametrize("uniform", [False, True])
def test_tune_tables_lowers_kl_and_moves_only_tables(uniform, calib_text):
    teacher, model, results, ids = _quantized(calib_text)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    tuned, info = tune_tables(model, teacher, ids, results, steps=30, lr=5e-3, batch=8, uniform=uniform)
    assert not info["kept_start"] and info["kl_after"] < info["kl_before"], info
    # the model's own parameters (the dequantized start) are back untouched, requires_grad as it was
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1]
    t0 = lutmm.make_table("int", 3)
    for n, t in tuned.items():
        assert t.shape == t0.shape and torch.isfinite(t).all()
        assert not torch.equal(t, t0)  # a tuned table is never the plain int grid
        d = torch.diff(torch.sort(t).values)
        if uniform:  # a + b * int grid: still evenly spaced
            assert torch.allclose(d, d.mean().expand_as(d), rtol=1e-4, atol=1e-6)
    if not uniform:  # free tables end up uneven somewhere
        assert any(float(torch.diff(torch.sort(t).values).std()) > 1e-4 for t in tuned.values())


def test_tune_method_tiny_model(calib_text):
    from lutmm.evaluate import ByteTokenizer
    from test_nn import tiny_llama

    base = tiny_llama(tie=False)
    x = torch.randint(0, 256, (1, 64))
    plain, tuned = tiny_llama(tie=False), tiny_llama(tie=False)
    kw = dict(calib=calib_text, calib_tokens=1024, seqlen=128, progress=False, table="int")
    quality.quantize_model_calibrated(plain, ByteTokenizer(), 3, 32, method="gptq", **kw)
    stats = {}
    quality.quantize_model_calibrated(tuned, ByteTokenizer(), 3, 32, method="gptq+tune", stats=stats,
                                      tune_steps=20, tune_lr=5e-3, **kw)
    assert stats["tune"]["kl_after"] < stats["tune"]["kl_before"]
    qc = tuned.config.quantization_config
    assert qc["method"] == "gptq+tune" and qc["table"] == "custom"
    from lutmm.nn import lut_modules
    qw = lambda m: m.quantized_weight()  # noqa: E731
    p, t = dict(lut_modules(plain)), dict(lut_modules(tuned))
    assert set(p) == set(t) and len(t) == 14
    for n in t:  # same GPTQ codes and scales as plain gptq onto int; only the table differs
        assert torch.equal(qw(t[n]).codes(), qw(p[n]).codes())
        assert torch.equal(qw(t[n]).scales(), qw(p[n]).scales())
        assert t[n].table_kind == "custom" and not torch.equal(t[n].table, p[n].table)
    with torch.no_grad():
        y0, y1 = base(x).logits.float(), tuned(x).logits.float()
        assert torch.isfinite(y1).all() and (y1 - y0).norm() < 0.3 * y0.norm()


def test_parse_tune_methods():
    assert quality.parse_method("gptq+tune") == {"gptq", "tune"}
    assert quality.parse_method("gptq+kmeans+tune") == {"gptq", "kmeans", "tune"}
    for bad in ("tune", "kmeans+tune", "gptq+tune+utune", "rtn+tune", "utune"):
        with pytest.raises(ValueError):
            quality.parse_method(bad)
