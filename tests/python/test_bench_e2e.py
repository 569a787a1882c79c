"""Smoke test of the end-to-end harness (bench/bench_e2e.py) on a tiny Llama, CPU, no CUDA graph."""
import importlib.util
import os

import pytest
import torch

from conftest import REPO


def _load():
    spec = importlib.util.spec_from_file_location("bench_e2e", os.path.join(REPO, "bench", "bench_e2e.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_model_swaps_every_decoder_linear_and_decodes():
    e2e = _load()
    model = e2e.build("tiny", "cpu")
    assert e2e.swap_to_lutmm(model, 4, 64) == 2 * 7  # q, k, v, o, gate, up, down per layer
    from lutmm.nn import LUTLinear
    assert sum(isinstance(m, LUTLinear) for m in model.modules()) == 14
    assert isinstance(model.lm_head, torch.nn.Linear)
    tps, runs, prof = e2e.decode_tokens_per_s(model, batch=2, prompt=8, gen=3, graph=False, profile_step=True)
    assert tps > 0 and runs == [tps]  # one timed run by default
    assert prof is None  # the step profile needs a captured CUDA graph
    # --repeats: timed runs from the same state (cache rewound), their median reported
    res = e2e.decode_tokens_per_s(model, batch=2, prompt=8, gen=3, graph=False, repeats=3)
    assert isinstance(res, e2e.Decode) and res.profile is None
    runs = res.samples
    assert len(runs) == 3 and all(r > 0 for r in runs) and res.tokens_per_s == sorted(runs)[1]


def test_fused_tiny_models_decode_like_unfused():
    """bench_e2e fuses by default: lutmm and bf16 models drop to 4 linear calls per layer and decode alike."""
    e2e = _load()
    from lutmm.nn import LUTLinear
    for quantize in (False, True):
        torch.manual_seed(0)
        model = e2e.build("tiny", "cpu")
        if quantize:
            e2e.swap_to_lutmm(model, 4, 64)
        ids = torch.randint(0, model.config.vocab_size, (2, 6))
        with torch.no_grad():
            ref = model(ids).logits
            assert e2e.fuse(model) == 2 * 3  # per layer: q/k/v 3 -> 1 and gate/up 2 -> 1
            fused = model(ids).logits
        kind = LUTLinear if quantize else torch.nn.Linear
        linears = [n for n, m in model.named_modules() if isinstance(m, kind) and "lm_head" not in n]
        assert len(linears) == 2 * 4 and any(n.endswith("qkv_proj") for n in linears)
        # bf16: concatenated weights, cuBLAS sums alike up to rounding; lutmm: the gated MLP rounds
        # silu(gate) * up once from fp32 (lutmm.gated), where the unfused MLP rounds gate, up, SiLU and product
        torch.testing.assert_close(fused, ref, rtol=0, atol=2e-2 * ref.abs().max().item() if quantize else 2e-2)
        assert e2e.decode_tokens_per_s(model, batch=2, prompt=8, gen=3, graph=False).tokens_per_s > 0


def test_gqa_attention_decodes_like_transformers_sdpa():
    """--attn gqa (the default) and sdpa give the same greedy tokens on the tiny model."""
    e2e = _load()
    toks = {}
    for attn in ("sdpa", "gqa"):
        torch.manual_seed(0)
        model = e2e.build("tiny", "cpu", attn).float()
        assert model.config._attn_implementation == ("lutmm_gqa" if attn == "gqa" else "sdpa")
        ids = torch.randint(0, model.config.vocab_size, (2, 6))
        with torch.no_grad():
            toks[attn] = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(toks["sdpa"], toks["gqa"])


def test_cli_fuse_flag_is_reported(capsys, monkeypatch):
    e2e = _load()
    for flag, expect in (([], "fused q/k/v + gate/up (lutmm and bf16)"), (["--no-fuse"], "unfused (7 linears")):
        monkeypatch.setattr("sys.argv", ["bench_e2e.py", "--model", "tiny", "--device", "cpu", "--gen", "1",
                                         "--prompt", "4", "--batches", "1", "--configs", "4:64", "--no-graph",
                                         *flag])
        e2e.main()
        out = capsys.readouterr().out
        assert f"projections: {expect}" in out and "lutmm 4b g64" in out and "attention: gqa" in out


def test_lm_head_option_quantizes_the_head_too():
    e2e = _load()
    from lutmm.nn import LUTLinear
    model = e2e.build("tiny", "cpu")
    assert e2e.swap_to_lutmm(model, 4, 64, lm_head=True) == 2 * 7 + 1
    assert isinstance(model.lm_head, LUTLinear)
    assert e2e.decode_tokens_per_s(model, batch=1, prompt=8, gen=2, graph=False).tokens_per_s > 0


def test_breakdown_classes_kernels_by_name():
    e2e = _load()
    lin, att, other = "quantized/dense linears", "attention", "other"
    for name, want in (("void lutmm::gpu::lut::lut_stream_kernel<4, 1, __nv_bfloat16>", lin),
                       ("nvjet_tst_128x64_64x8_1x1_v_bz_TNT", lin), ("sm90_xmma_gemm_bf16bf16", lin),
                       ("void pytorch_flash::flash_fwd_splitkv_kernel<...>", att),
                       ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", att),  # a CUTLASS kernel, yet attention
                       ("triton_per_fused__softmax_0", att), ("triton_poi_fused_add_mul_silu_3", other),
                       ("void lutmm::gpu::(anonymous namespace)::attn_mma_kernel<__nv_bfloat16, 128>", att),
                       ("void lutmm::gpu::(anonymous namespace)::attn_combine_kernel<__half, 64>", att),
                       ("void at::native::index_copy_kernel", other)):
        assert e2e.kernel_class(name) == want, name


def test_breakdown_sums_per_step_by_class_and_lists_the_largest():
    e2e = _load()
    from types import SimpleNamespace as E
    events = [E(key="void lutmm::gpu::lut::lut_stream_kernel<4, 1>", count=8, device_time_total=400.0),
              E(key="cudnn_generated_fort_native_sdpa_sm90_flash_fprop", count=4, device_time_total=100.0),
              E(key="triton_poi_fused_add_mul_silu_3", count=4, device_time_total=60.0),
              E(key="idle", count=4, device_time_total=0.0)]  # no device time: left out
    out = e2e.by_class(events, steps=4, top=2)
    assert out["quantized/dense linears"] == 100.0 and out["attention"] == 25.0 and out["other"] == 15.0
    assert out["top kernels (us per step, calls per step)"] == [
        (100.0, 2, "lut_stream_kernel<4, 1>"),  # short_name: namespaces dropped, template arguments kept
        (25.0, 1, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop")]
    assert "top kernels (us per step, calls per step)" not in e2e.by_class(events, steps=4)


def test_inductor_pdl_needs_compile():
    """--inductor-pdl changes the kernels inductor generates: without --compile it is an error, not a no-op."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_e2e.py"), "--device", "cpu", "--inductor-pdl"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "--inductor-pdl needs --compile" in r.stderr


def test_attention_list_measures_each_on_the_same_models(capsys, monkeypatch):
    """--attn gqa,sdpa: one row per (model, attention, batch), each lutmm row divided by the bf16 row of
    its own attention; an unknown name is an error naming the choices."""
    e2e = _load()
    monkeypatch.setattr("sys.argv", ["bench_e2e.py", "--model", "tiny", "--device", "cpu", "--gen", "1", "--prompt", "4",
                                     "--batches", "1", "--configs", "4:64", "--no-graph", "--attn", "gqa,sdpa"])
    e2e.main()
    out = capsys.readouterr().out
    table = out[out.index("x bf16"):].splitlines()[1:]
    labels = [line.split(" 1 ")[0].strip() for line in table if line.strip()]
    assert labels == ["bf16 [gqa]", "bf16 [sdpa]", "lutmm 4b g64 [gqa]", "lutmm 4b g64 [sdpa]"]
    rows = [line.split() for line in table if line.strip()]
    assert all(float(r[-4]) > 0 for r in rows)  # tok/s
    assert [r[-3] for r in rows[:2]] == ["1.00", "1.00"]  # each bf16 row is its own attention's base
    monkeypatch.setattr("sys.argv", ["bench_e2e.py", "--device", "cpu", "--attn", "gqa,flash"])
    with pytest.raises(SystemExit):
        e2e.main()
    assert "--attn: a comma list of gqa, gqa-kernel, sdpa" in capsys.readouterr().err


def test_folded_tiny_model_decodes():
    """--configs bits:group:fold (lutmm.layerfold): norms and residual adds inside the projections."""
    e2e = _load()
    from lutmm.layerfold import FoldedLlamaDecoderLayer, fold_layers, fold_norm_weights
    torch.manual_seed(0)
    model = e2e.build("tiny", "cpu").float()
    fold_norm_weights(model)
    e2e.swap_to_lutmm(model, 4, 64)
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    e2e.fuse(model)
    with torch.no_grad():
        ref = model(ids).logits
        assert fold_layers(model) == 2
        got = model(ids).logits
    assert all(type(m) is FoldedLlamaDecoderLayer for m in model.model.layers)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert e2e.decode_tokens_per_s(model, batch=2, prompt=8, gen=3, graph=False).tokens_per_s > 0


def test_default_configs_are_folded_when_fused():
    e2e = _load()
    assert e2e.default_configs(True).split(",") == ["4:128:fold", "4:64:fold", "3:128:fold", "3:64:fold",
                                                    "2:128:fold", "2:64:fold"]
    assert e2e.default_configs(False) == "4:128,4:64,3:128,3:64,2:128,2:64"  # --no-fuse: fold needs fusion


def test_fold_without_fusion_is_refused_before_any_model_is_built(monkeypatch, capsys):
    e2e = _load()
    monkeypatch.setattr(e2e, "build", lambda *a, **k: pytest.fail("built a model before checking --configs"))
    monkeypatch.setattr("sys.argv", ["bench_e2e.py", "--device", "cpu", "--no-fuse", "--configs", "4:64:fold"])
    with pytest.raises(SystemExit):
        e2e.main()
    assert "--configs 4:64:fold: :fold needs --fuse" in capsys.readouterr().err
