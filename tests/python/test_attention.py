"""lutmm.attention: grouped-query attention without repeated K/V gives the stock `sdpa` attention's
outputs (prefill with its causal mask, decode steps through a static cache with its padding mask)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402

from lutmm.attention import NAME, gqa_sdpa_attention, use_gqa_attention  # noqa: E402


def _model(heads=8, kv_heads=2):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=300, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).float().eval()


def _decode(model, ids, steps):
    """Prefill through a static cache, then `steps` greedy decode steps; returns every logits tensor."""
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + steps + 5)
    out = model(ids, past_key_values=cache, cache_position=torch.arange(ids.shape[1]), use_cache=True)
    logits = [out.logits]
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    for i in range(steps):
        out = model(nxt, past_key_values=cache, cache_position=torch.tensor([ids.shape[1] + i]), use_cache=True)
        logits.append(out.logits)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    return logits


@pytest.mark.parametrize("kv_heads", [2, 8])  # 4 query heads per KV head; plain multi-head
def test_matches_stock_sdpa_through_prefill_and_static_cache_decode(kv_heads):
    model = _model(kv_heads=kv_heads)
    ids = torch.randint(0, 300, (3, 11))
    with torch.no_grad():
        ref = _decode(model, ids, 4)
        no_cache = model(ids).logits
        use_gqa_attention(model)
        assert model.config._attn_implementation == NAME
        got = _decode(model, ids, 4)
        got_no_cache = model(ids).logits
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_no_cache, no_cache, rtol=1e-4, atol=1e-4)  # causal without a mask tensor


def test_folded_heads_equal_repeated_kv_with_a_mask():
    torch.manual_seed(1)
    b, hkv, g, lq, s, d = 2, 3, 4, 5, 9, 16
    q, k, v = torch.randn(b, hkv * g, lq, d), torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    mask = torch.rand(b, 1, lq, s) > 0.3
    mask[..., 0] = True  # every row attends somewhere
    module = torch.nn.Module()
    out, w = gqa_sdpa_attention(module, q, k, v, mask, scaling=0.25)
    assert w is None and out.shape == (b, lq, hkv * g, d)
    kr, vr = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_decode_path_matches_sdpa_with_bool_and_float_masks():
    torch.manual_seed(2)
    b, hkv, g, s, d = 3, 2, 4, 7, 8
    q, k, v = torch.randn(b, hkv * g, 1, d), torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)
    mask = torch.rand(b, 1, 1, s) > 0.4
    mask[..., 0] = True
    kr, vr = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=mask).transpose(1, 2)
    module = torch.nn.Module().eval()
    for m in (mask, torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))):
        out, _ = gqa_sdpa_attention(module, q, k, v, m)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out, _ = gqa_sdpa_attention(module, q, k, v, None)  # no mask: every position
    ref = torch.nn.functional.scaled_dot_product_attention(q, kr, vr).transpose(1, 2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_rejects_what_it_cannot_do():
    module = torch.nn.Module()
    q, k = torch.randn(1, 6, 2, 8), torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        gqa_sdpa_attention(module, q, k, k, None)
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="per-head masks"):
        gqa_sdpa_attention(module, q, k, k, torch.ones(1, 4, 2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention weights"):
        gqa_sdpa_attention(module, q, k, k, None, output_attentions=True)


def test_gpu_bf16_matches_stock_sdpa():
    """On the GPU in bf16 (SDPA picks its fused kernels there): the same logits up to bf16 rounding."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: GPU test skipped")
    model = _model(heads=8, kv_heads=2).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 300, (4, 13), device="cuda")

    def run():
        cache = StaticCache(config=model.config, max_cache_len=24)
        out = model(ids, past_key_values=cache, cache_position=torch.arange(13, device="cuda"), use_cache=True)
        nxt = ids[:, :1]
        steps = [out.logits.float()]
        for i in range(3):
            o = model(nxt, past_key_values=cache, cache_position=torch.tensor([13 + i], device="cuda"), use_cache=True)
            steps.append(o.logits.float())
        return steps

    with torch.no_grad():
        ref = run()
        use_gqa_attention(model)
        got = run()
    for r, g in zip(ref, got):
        assert (g - r).abs().max().item() <= 0.03 * r.abs().max().item()
