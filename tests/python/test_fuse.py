"""Fused projections (issue 7): lutmm.concat_rows and lutmm.nn.fuse_projections (CPU; GPU test skips)."""
import copy
import os
import warnings

import pytest
import torch

import lutmm
from conftest import gpu

transformers = pytest.importorskip("transformers")
from lutmm.fuse import FusedGateUpLlamaMLP, FusedQKVLlamaAttention, LUTGatedLinear, is_fused  # noqa: E402
from lutmm.nn import LUTLinear, fuse_projections, quantize_model  # noqa: E402


# ---- concat_rows: exact byte concatenation of the packed layout --------------------------------------------
def _assert_same_quantized(a: lutmm.QuantizedWeight, b: lutmm.QuantizedWeight):
    assert a.shape == b.shape and a.bits == b.bits and a.group_size == b.group_size
    assert torch.equal(a.packed, b.packed) and torch.equal(a.packed_scales, b.packed_scales)
    assert torch.equal(a.table, b.table)
    assert torch.equal(lutmm.dequantize(a), lutmm.dequantize(b))


@pytest.mark.parametrize("bits,g,table", [(4, 64, "nf"), (3, 32, "int"), (2, 128, "nf"), (4, None, "int"),
                                          (3, 64, [-1.0, -0.6, -0.3, -0.1, 0.1, 0.3, 0.6, 1.0])])
@pytest.mark.parametrize("rows", [(64, 32, 32), (16, 48, 40)])  # the last part may be any N
def test_concat_rows_equals_quantizing_the_concatenation(bits, g, table, rows):
    torch.manual_seed(sum(rows) + bits)
    ws = [torch.randn(n, 256) * (i + 1) for i, n in enumerate(rows)]
    parts = [lutmm.quantize(w, bits=bits, group_size=g, table=table) for w in ws]
    fused = lutmm.concat_rows(parts)
    _assert_same_quantized(fused, lutmm.quantize(torch.cat(ws), bits=bits, group_size=g, table=table))
    assert fused.table_kind == parts[0].table_kind
    # and the product is the concatenation of the products
    x = torch.randn(3, 256)
    torch.testing.assert_close(lutmm.matmul(x, fused), torch.cat([lutmm.matmul(x, p) for p in parts], -1),
                               rtol=1e-6, atol=1e-5)


def test_concat_rows_of_one_part_is_that_part():
    qw = lutmm.quantize(torch.randn(40, 128), bits=4, group_size=32)
    _assert_same_quantized(lutmm.concat_rows([qw]), qw)


def _qw(N=32, K=128, bits=4, g=64, table="nf", seed=0):
    torch.manual_seed(seed)
    return lutmm.quantize(torch.randn(N, K), bits=bits, group_size=g, table=table)


@pytest.mark.parametrize("other,match", [
    (lambda: _qw(bits=3), r"parts\[1\]: bits = 3, but parts\[0\] has bits = 4"),
    (lambda: _qw(g=32), r"parts\[1\]: group_size = 32, but parts\[0\] has group_size = 64"),
    (lambda: _qw(K=256), r"parts\[1\]: K = 256, but parts\[0\] has K = 128"),
    (lambda: _qw(table="int"), r"parts\[1\]: its value table differs"),
    (lambda: _qw(table="kmeans", seed=1), r"per-layer k-means tables do not"),
    (lambda: lutmm.QuantizedWeight(_qw().packed, _qw().packed_scales.float(), _qw().table, 4, 64, (32, 128)),
     r"parts\[1\]: .*packed_scales dtype torch.float32, expected torch.uint8 / torch.float16"),
    (lambda: lutmm.QuantizedWeight(_qw().packed[:-1], _qw().packed_scales, _qw().table, 4, 64, (32, 128)),
     r"parts\[1\]: 2047 packed bytes"),
    (lambda: _qw().to("meta"), r"parts\[1\]: on meta, but parts\[0\] is on cpu"),
    (lambda: 3, r"parts\[1\]: expected a QuantizedWeight, got int"),
])
def test_concat_rows_refuses_mismatched_parts(other, match):
    with pytest.raises(ValueError, match=match):
        lutmm.concat_rows([_qw(), other()])


def test_concat_rows_refuses_unaligned_rows_and_nothing():
    with pytest.raises(ValueError, match=r"parts\[0\]: N = 40 is not a multiple of 16"):
        lutmm.concat_rows([_qw(N=40), _qw()])
    lutmm.concat_rows([_qw(), _qw(N=40)])  # the last part may be ragged
    with pytest.raises(ValueError, match="at least one"):
        lutmm.concat_rows([])


# ---- fuse_projections on Llama models ------------------------------------------------------------------------
def tiny_llama(bias=False, seed=0, dtype=torch.bfloat16):
    """A random 2-layer Llama: hidden 128, intermediate 256, 4 heads (2 KV heads of 32)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attention_bias=bias, mlp_bias=bias, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    if bias:  # HF initialises biases to zero: make them matter
        randomize_params(model, ".bias", lambda p: p.normal_(0, 0.5))
    return model


def randomize_params(model, suffix, init):
    """init(p) in place for every parameter whose name ends with suffix (HF initialises biases to zero and
    norm weights to one: make them matter)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(suffix):
                init(p)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _greedy(model, ids, n=6, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("bits,g,table", [(4, 64, "nf"), (3, 32, "int"), (2, 128, "nf")])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_quantized_llama_is_bitwise_equal(bits, g, table, bias):
    model = quantize_model(tiny_llama(bias=bias), bits=bits, group_size=g, table=table, progress=False)
    ids = torch.randint(0, 256, (2, 9))
    ref, ref_tokens = _logits(model, ids), _greedy(model, ids)
    attn_before = model.model.layers[0].self_attn.q_proj.quantized_weight()

    report = fuse_projections(model, gated=False)  # concatenation only: exact (the gated epilogue: below)
    assert (report.attention, report.mlp, report.gated, report.skipped, report.linear_calls_saved) == (2, 2, 0, [], 6)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert isinstance(attn, FusedQKVLlamaAttention) and isinstance(mlp, FusedGateUpLlamaMLP) and is_fused(model)
    assert not any(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj"))
    assert not any(hasattr(mlp, n) for n in ("gate_proj", "up_proj"))
    assert attn.qkv_sizes == (128, 64, 64) and attn.qkv_proj.out_features == 256
    assert mlp.gate_up_sizes == (256, 256) and mlp.gate_up_proj.out_features == 512
    assert (attn.qkv_proj.bias is not None) == bias
    # the first 128 rows of the fused weight are q_proj's, byte for byte
    q_bytes = attn_before.packed.numel()
    assert torch.equal(attn.qkv_proj.packed[:q_bytes], attn_before.packed)
    assert sum(isinstance(m, LUTLinear) for m in model.modules()) == 2 * 4

    assert torch.equal(_logits(model, ids), ref)
    assert torch.equal(_greedy(model, ids), ref_tokens)


def test_fused_decode_with_static_cache_matches_unfused():
    model = quantize_model(tiny_llama(), bits=4, group_size=64, progress=False)
    ids = torch.randint(0, 256, (1, 5))
    ref = _greedy(model, ids, 8, cache_implementation="static")
    fuse_projections(model, gated=False)
    assert torch.equal(_greedy(model, ids, 8, cache_implementation="static"), ref)


@pytest.mark.parametrize("bits,g,table", [(4, 64, "nf"), (3, 32, "int"), (2, 128, "nf")])
def test_gated_mlp_matches_unfused(bits, g, table):
    """SiLU MLPs of LUT weights get a LUTGatedLinear (gate and up interleaved by 8, silu(gate) * up from the
    matmul's fp32 result, rounded once): the logits agree with the unfused model's up to that rounding."""
    model = quantize_model(tiny_llama(), bits=bits, group_size=g, table=table, progress=False)
    mlp0 = model.model.layers[0].mlp
    gate_w, up_w = mlp0.gate_proj.dequantize(), mlp0.up_proj.dequantize()
    ids = torch.randint(0, 256, (2, 9))
    ref = _logits(model, ids).float()
    report = fuse_projections(model)
    assert (report.attention, report.mlp, report.gated, report.skipped) == (2, 2, 2, [])
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp, FusedGateUpLlamaMLP) and type(mlp.gate_up_proj) is LUTGatedLinear
    assert mlp.gate_up_proj.out_features == 512 and mlp.gate_up_sizes == (256, 256)
    w = mlp.gate_up_proj.dequantize()  # rows 16j .. 16j + 7: gate 8j .., rows 16j + 8 ..: up 8j ..
    assert torch.equal(w.view(32, 2, 8, 128)[:, 0].reshape(256, 128), gate_w)
    assert torch.equal(w.view(32, 2, 8, 128)[:, 1].reshape(256, 128), up_w)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    want = (torch.nn.functional.silu(x.float() @ gate_w.T) * (x.float() @ up_w.T)).bfloat16()
    assert torch.equal(mlp.gate_up_proj(x), want)  # the CPU kernel: fp32 product, one rounding
    got = _logits(model, ids).float()
    assert (got - ref).abs().max() <= 2e-2 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_gated_false_and_non_silu_mlps_keep_the_concatenation():
    model = quantize_model(tiny_llama(), bits=4, group_size=64, progress=False)
    assert fuse_projections(model, gated=False).gated == 0
    assert type(model.model.layers[0].mlp.gate_up_proj) is LUTLinear
    model = tiny_llama()
    model.config.hidden_act = "gelu"  # the MLPs' act_fn is already built: only the rule is checked
    for layer in model.model.layers:
        layer.mlp.config = model.config
    quantize_model(model, bits=4, group_size=64, progress=False)
    report = fuse_projections(model)
    assert (report.mlp, report.gated) == (2, 0)
    assert type(model.model.layers[1].mlp.gate_up_proj) is LUTLinear


def test_why_not_gated_names_the_reason_and_fuse_follows_it():
    """_why_not_gated: None where gate/up can be one LUTGatedLinear, else the reason _gated_lut raises;
    fuse_projections picks the gated or the concatenated fusion by it, without trying one first."""
    from lutmm.fuse import GATE_UP, _gated_lut, _why_not_gated

    def mods(model, layer=0):
        return [getattr(model.model.layers[layer].mlp, n) for n in GATE_UP]

    model = quantize_model(tiny_llama(), bits=4, group_size=64, progress=False)
    mlp = model.model.layers[0].mlp
    assert _why_not_gated(mlp, mods(model)) is None
    assert type(_gated_lut(mlp, mods(model))) is LUTGatedLinear

    dense = tiny_llama()
    biased = quantize_model(tiny_llama(bias=True), bits=4, group_size=64, progress=False)
    gate, up = mods(model)
    odd = [LUTLinear.from_quantized(lutmm.quantize(torch.randn(36, 128), bits=4, group_size=64))
           for _ in range(2)]  # I = 36: not a multiple of 8
    other_table = LUTLinear.from_quantized(lutmm.quantize(up.dequantize(), bits=4, group_size=64, table="int"))
    hooked = quantize_model(tiny_llama(), bits=4, group_size=64, progress=False)
    mods(hooked)[1].register_forward_pre_hook(lambda *a: None)
    cases = [
        (dense.model.layers[0].mlp, mods(dense), "not LUTLinear"),
        (biased.model.layers[0].mlp, mods(biased), "a bias"),
        (hooked.model.layers[0].mlp, mods(hooked), "forward hooks"),
        (mlp, [gate, other_table], "the value tables differ"),
        (mlp, odd, "36 rows, expected a multiple of 8"),
    ]
    for m, pair, reason in cases:
        why = _why_not_gated(m, pair)
        assert why is not None and reason in why, (reason, why)
        with pytest.raises(ValueError) as e:
            _gated_lut(m, pair)
        assert str(e.value) == why  # _gated_lut raises exactly that reason

    gelu = copy.copy(mlp)  # the same projections under a GELU config (act_fn is already built: only the rule)
    gelu.config = copy.copy(mlp.config)
    gelu.config.hidden_act = "gelu"
    assert _why_not_gated(gelu, mods(model)) == "activation 'gelu', not SiLU"

    report = fuse_projections(hooked, warn=False)  # layer 0: no gated path, and the concatenation refuses hooks
    hook_reason = _why_not_gated(hooked.model.layers[0].mlp, mods(hooked))
    assert (report.mlp, report.gated, report.skipped) == (1, 1, [("model.layers.0.mlp", hook_reason)])
    assert type(hooked.model.layers[1].mlp.gate_up_proj) is LUTGatedLinear


def test_dense_bf16_llama_fuses_into_nn_linear():
    model = tiny_llama()
    ids = torch.randint(0, 256, (2, 7))
    ref = _logits(model, ids)
    report = fuse_projections(model)
    assert (report.attention, report.mlp) == (2, 2)
    fused = model.model.layers[1].self_attn.qkv_proj
    assert type(fused) is torch.nn.Linear and fused.weight.shape == (256, 128)
    assert fused.weight.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(model, ids), ref, rtol=0, atol=1e-2 * ref.abs().max().item())


def test_kmeans_tables_and_mixed_layers_are_left_unfused_with_a_warning():
    model = quantize_model(tiny_llama(), bits=4, group_size=64, table="kmeans", progress=False,
                           skip=["lm_head", "layers.1.mlp.up_proj"])
    ids = torch.randint(0, 256, (2, 5))
    ref = _logits(model, ids)
    with pytest.warns(UserWarning, match="left 4 modules unfused"):
        report = fuse_projections(model)
    assert (report.attention, report.mlp) == (0, 0)
    reasons = dict(report.skipped)
    assert set(reasons) == {"model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn",
                            "model.layers.1.mlp"}
    assert "k-means" in reasons["model.layers.0.self_attn"]
    assert "expected all LUTLinear or all nn.Linear" in reasons["model.layers.1.mlp"]
    assert not is_fused(model) and hasattr(model.model.layers[0].self_attn, "q_proj")
    assert torch.equal(_logits(model, ids), ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fuse_projections(model, warn=False).skipped  # warn=False: reported, not warned


def test_projections_with_hooks_are_left_alone():
    model = quantize_model(tiny_llama(), bits=4, group_size=64, progress=False)
    model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda *a: None)
    report = fuse_projections(model, warn=False)
    assert (report.attention, report.mlp) == (1, 2)
    assert "hooks" in dict(report.skipped)["model.layers.0.self_attn"]


def assert_compiles_fullgraph(model, ids):
    """torch.compile(fullgraph=True) traces the model's forward and gives its eager logits bitwise."""
    ref = _logits(model, ids)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: model(x).logits, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(ids), ref)


def test_fused_model_compiles_fullgraph():
    model = quantize_model(tiny_llama(), bits=4, group_size=64, progress=False)
    fuse_projections(model)
    assert_compiles_fullgraph(model, torch.randint(0, 256, (2, 6)))


def test_fused_state_dict_round_trip_and_checkpoint_refusal(tmp_path):
    src = quantize_model(tiny_llama(seed=0), bits=4, group_size=64, progress=False)
    fuse_projections(src)
    sd = src.state_dict()
    assert "model.layers.0.self_attn.qkv_proj.packed" in sd and "model.layers.0.mlp.gate_up_proj.packed" in sd
    assert not any(".q_proj." in k or ".gate_proj." in k for k in sd)
    dst = quantize_model(tiny_llama(seed=1), bits=4, group_size=64, progress=False)
    fuse_projections(dst)
    dst.load_state_dict(sd)  # strict
    ids = torch.randint(0, 256, (2, 5))
    assert torch.equal(_logits(dst, ids), _logits(src, ids))
    from lutmm.checkpoint import save_quantized
    with pytest.raises(ValueError, match="fuse after loading"):
        save_quantized(src, tmp_path / "ckpt")


def test_checkpoint_then_fuse_after_loading(tmp_path):
    from lutmm.checkpoint import load_quantized, save_quantized
    from transformers import AutoModelForCausalLM

    model = quantize_model(tiny_llama(), bits=3, group_size=64, progress=False)
    save_quantized(model, tmp_path / "ckpt")
    ids = torch.randint(0, 256, (1, 6))
    ref = _logits(model, ids)
    for loaded in (load_quantized(tmp_path / "ckpt"), AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")):
        assert fuse_projections(loaded, gated=False).attention == 2
        assert torch.equal(_logits(loaded, ids), ref)


def test_mini_llama_quantized_fused_equals_unfused(shared_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(shared_dir, "models", "mini-llama")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    quantize_model(model, bits=4, group_size=64, progress=False)
    ids = AutoTokenizer.from_pretrained(path)("Once upon a time, there was a little", return_tensors="pt").input_ids
    ref, ref_tokens = _logits(model, ids), _greedy(model, ids, 8)
    gated = copy.deepcopy(model)
    report = fuse_projections(model, gated=False)
    n_layers = model.config.num_hidden_layers
    assert (report.attention, report.mlp, report.skipped) == (n_layers, n_layers, [])
    assert torch.equal(_logits(model, ids), ref)
    assert torch.equal(_greedy(model, ids, 8), ref_tokens)
    assert fuse_projections(gated).gated == n_layers  # silu(gate) * up rounded once: close, same tokens
    got = _logits(gated, ids).float()
    assert (got - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()
    assert torch.equal(_greedy(gated, ids, 8), ref_tokens)


def prefilled(model, ids, max_len=32):
    """A static cache holding the prefill of ids (batch x n), and the next step's inputs: the last token again,
    at position n. Call under no_grad."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=max_len)
    n = ids.shape[1]
    model(ids, past_key_values=cache, cache_position=torch.arange(n, device=ids.device), use_cache=True)
    return cache, ids[:, -1:].clone(), torch.tensor([n], device=ids.device)


@gpu
def test_fused_decode_step_cuda_graph_matches_unfused():
    """One decode step (static cache) captured in a CUDA graph: fused logits match the unfused model's."""
    model = quantize_model(tiny_llama(), bits=4, group_size=64, progress=False).cuda()
    ids = torch.randint(0, 256, (2, 8), device="cuda")

    def decode_logits():
        with torch.no_grad():
            cache, token, pos = prefilled(model, ids)

            def step():
                return model(token, past_key_values=cache, cache_position=pos, use_cache=True).logits
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                step()
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step()
            graph.replay()
            torch.cuda.synchronize()
            return out.float().clone()

    ref = decode_logits()
    fuse_projections(model)
    fused = decode_logits()
    assert (fused - ref).abs().max() <= 2e-2 * ref.abs().max()
