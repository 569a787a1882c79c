"""lutmm.attention: grouped-query attention without repeated K/V gives the stock `sdpa` attention's
outputs (prefill with its causal mask, decode steps through a static cache with its padding mask)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache  # noqa: E402

from lutmm.attention import NAME, NAME_KERNEL, gqa_sdpa_attention, use_gqa_attention  # noqa: E402
from lutmm.generation import rewind_static_cache  # noqa: E402


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


@pytest.mark.parametrize("decode_kernel", [False, True])  # on the CPU both decode through the plain ops
@pytest.mark.parametrize("kv_heads", [2, 8])  # 4 query heads per KV head; plain multi-head
def test_matches_stock_sdpa_through_prefill_and_static_cache_decode(kv_heads, decode_kernel):
    model = _model(kv_heads=kv_heads)
    ids = torch.randint(0, 300, (3, 11))
    with torch.no_grad():
        ref = _decode(model, ids, 4)
        no_cache = model(ids).logits
        use_gqa_attention(model, decode_kernel=decode_kernel)
        assert model.config._attn_implementation == (NAME_KERNEL if decode_kernel else NAME)
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


def _decode_inputs(b, hkv, g, s, d, dtype, device="cpu", s_max=None, mask_kind="rows"):
    gen = torch.Generator().manual_seed(b * 1000 + s)
    q = torch.randn(b, hkv, g, d, generator=gen).to(dtype)
    kv = torch.randn(2, b, hkv, s_max or s, d, generator=gen).mul(2).to(dtype)
    k, v = kv[0, :, :, :s], kv[1, :, :, :s]  # views into a longer cache when s_max > s
    mask = None
    if mask_kind == "rows":
        mask = torch.rand(b, s, generator=gen) > 0.3
        mask[:, 0] = True
    elif mask_kind == "one":
        mask = torch.ones(1, s, dtype=torch.bool)
        mask[:, s * 3 // 4:] = False
    to = (lambda t: None if t is None else t.to(device))
    return to(q), to(k), to(v), to(mask)


def test_decode_op_cpu_matches_cpp_reference_and_plain_path():
    from lutmm import _core
    from lutmm.attention import gqa_decode_attention
    b, hkv, g, s, d = 3, 2, 4, 70, 64
    q, k, v, mask = _decode_inputs(b, hkv, g, s, d, torch.bfloat16, s_max=80)
    out = gqa_decode_attention(q, k, v, mask, 0.125)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    # C++ reference (fp64 sums) on contiguous copies
    kc, vc, qc, mc = k.contiguous(), v.contiguous(), q.contiguous(), mask.to(torch.uint8).contiguous()
    ref = torch.empty_like(qc)
    _core.reference_decode_attention(2, [b, hkv, g, s, d], [hkv * s * d, s * d, hkv * s * d, s * d, s],
                                     [qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), mc.data_ptr(), ref.data_ptr()],
                                     0.125)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=0.02)
    # the attention function's plain decode path (query heads h * G + j, [B, L, Hq, D] out)
    plain, _ = gqa_sdpa_attention(torch.nn.Module().eval(), q.float().reshape(b, hkv * g, 1, d), k.float(), v.float(),
                                  mask[:, None, None, :], scaling=0.125)
    torch.testing.assert_close(out.float().reshape(b, 1, hkv * g, d), plain, rtol=0, atol=0.02)
    # a row with nothing to attend gives NaN, as the plain path's softmax does
    mask[1] = False
    assert torch.isnan(gqa_decode_attention(q, k, v, mask, 0.125)[1]).all()


def test_decode_op_lowers_in_inductor():
    """torch.compile (inductor) lowers the op as a fallback kernel: an argument named `kernel` collided
    with the lowering's own (every compiled model with the decode kernel failed; found on the GPU)."""
    from lutmm.attention import gqa_decode_attention
    q, k, v, mask = _decode_inputs(2, 2, 4, 40, 64, torch.float32)
    fn = lambda q, k, v, m: gqa_decode_attention(q, k, v, m, 0.125) * 2.0  # noqa: E731
    torch.testing.assert_close(torch.compile(fn, backend="inductor")(q, k, v, mask), fn(q, k, v, mask))


def test_decode_op_rejects_bad_arguments():
    from lutmm.attention import gqa_decode_attention
    q, k, v, mask = _decode_inputs(2, 2, 4, 10, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="do not match"):
        gqa_decode_attention(q, k[:, :1], v[:, :1], mask, 1.0)
    with pytest.raises(ValueError, match="mask must be bool"):
        gqa_decode_attention(q, k, v, mask.float(), 1.0)
    with pytest.raises(ValueError, match="dtypes differ"):
        gqa_decode_attention(q, k.half(), v, mask, 1.0)


def test_decode_step_and_op_reject_bad_arguments_by_name():
    from lutmm.attention import gqa_decode_attention, gqa_decode_step
    b, hkv, heads, s_len, d = 2, 2, 4, 10, 64
    qkv = torch.randn(b, (heads + 2 * hkv) * d)
    cos, sin = torch.randn(1, d), torch.randn(1, d)
    kc, vc = torch.zeros(b, hkv, s_len, d), torch.zeros(b, hkv, s_len, d)
    pos = torch.tensor([3])
    out = gqa_decode_step(qkv, cos, sin, kc, vc, pos, None, 0.125, heads)  # valid: runs, writes position 3
    assert out.shape == (b, hkv, heads // hkv, d) and kc[:, :, 3].abs().sum() > 0 and kc[:, :, 4].abs().sum() == 0
    with pytest.raises(ValueError, match=r"cos / sin must be \[B or 1, D = 64\], got \(1, 32\)"):
        gqa_decode_step(qkv, cos[:, :32], sin[:, :32], kc, vc, pos, None, 0.125, heads)
    empty = torch.zeros(b, 0, s_len, d)
    with pytest.raises(ValueError, match="must be >= 1"):
        gqa_decode_step(qkv, cos, sin, empty, empty, pos, None, 0.125, heads)
    q, k, v, mask = _decode_inputs(2, 2, 4, 10, 64, torch.float32)
    with pytest.raises(ValueError, match="dtype torch.int32, expected float16, bfloat16 or float32"):
        gqa_decode_attention(q.int(), k.int(), v.int(), mask, 1.0)


def _gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: GPU test skipped")


@pytest.mark.parametrize("variant", [0, 1, 2])  # auto, mma (split + combine), wide (a CTA per KV head)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,mask_kind", [((1, 8, 4, 392, 128), "one"), ((16, 8, 4, 392, 128), "rows"),
                                             ((2, 8, 8, 3000, 128), "rows"), ((3, 4, 1, 65, 64), None),
                                             ((2, 2, 5, 1, 64), "rows")])
def test_gpu_decode_kernel_matches_cpu(shape, mask_kind, dtype, variant):
    _gpu()
    from lutmm.attention import gqa_decode_attention
    b, hkv, g, s, d = shape
    q, k, v, mask = _decode_inputs(b, hkv, g, s, d, dtype, device="cuda", s_max=s + 16, mask_kind=mask_kind)
    got = gqa_decode_attention(q, k, v, mask, d ** -0.5, variant)
    again = gqa_decode_attention(q, k, v, mask, d ** -0.5, variant)
    assert torch.equal(got, again)  # deterministic
    ref = gqa_decode_attention(q.cpu(), k.cpu(), v.cpu(), None if mask is None else mask.cpu(), d ** -0.5)
    tol = 0.02 if dtype == torch.bfloat16 else 3e-3
    torch.testing.assert_close(got.cpu().float(), ref.float(), rtol=0, atol=tol * ref.float().abs().max().item())


def test_gpu_decode_kernel_in_a_model_under_compile_and_cuda_graph(monkeypatch):
    """use_gqa_attention (decode_kernel=True by default): decode steps go through the kernel (counted), and the logits
    equal the plain path's up to bf16 rounding, compiled and replayed from a CUDA graph."""
    _gpu()
    import lutmm.attention as la
    calls = []
    real = la.gqa_decode_attention
    monkeypatch.setattr(la, "gqa_decode_attention", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)  # head dim 64, G = 4
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 300, (2, 9), device="cuda")

    def run():
        cache = StaticCache(config=model.config, max_cache_len=20)
        model(ids, past_key_values=cache, cache_position=torch.arange(9, device="cuda"), use_cache=True)
        nxt, pos = ids[:, :1].clone(), torch.tensor([9], device="cuda")
        step = lambda: model(nxt, past_key_values=cache, cache_position=pos, use_cache=True).logits.float()
        return [step()], step, pos, cache

    with torch.no_grad():
        use_gqa_attention(model, decode_kernel=False)
        assert model.config._attn_implementation == la.NAME
        ref, _, _, _ = run()
        assert not calls
        use_gqa_attention(model)
        assert model.config._attn_implementation == la.NAME_KERNEL
        got, step, pos, cache = run()
        assert len(calls) == 2  # one decode step, two layers
        torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0.03 * ref[0].abs().max().item())
        compiled = torch.compile(step)
        for _ in range(2):
            compiled()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = compiled()
        # The cache layers write at their own count of positions (lutmm.generation.rewind_static_cache):
        # both runs must write where they attend, position 10.
        pos.fill_(10)
        rewind_static_cache(cache, 10)
        graph.replay()
        rewind_static_cache(cache, 10)
        eager = step()
        torch.testing.assert_close(out, eager, rtol=0, atol=0.03 * eager.abs().max().item())


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_decode_op_passes_opcheck(device):
    """torch.library.opcheck: schema, fake implementation (shape, strides: q arrives non-contiguous from the
    transposed query heads), autograd registration and torch.compile tracing agree with the real one."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: GPU test skipped")
    import lutmm.attention  # noqa: F401  (registers the op)
    q, k, v, mask = _decode_inputs(2, 2, 4, 40, 64, torch.bfloat16, device=device)
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    op = torch.ops.lutmm.gqa_decode_attention.default
    for args in ((q, k, v, mask, 0.125), (q_strided, k, v, None, 0.125)):
        torch.library.opcheck(op, args)
        # opcheck compares shapes and dtypes, not strides: the fake must also give the real strides
        from torch._subclasses.fake_tensor import FakeTensorMode
        with FakeTensorMode() as mode:
            fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        assert fake.stride() == op(*args).stride()
