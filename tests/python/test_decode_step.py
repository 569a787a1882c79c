"""lutmm::gqa_decode_step (rotary + KV-cache write + decode attention in one kernel) and the fused Llama
attention's decode path that uses it: against transformers' own rotary / cache update / attention."""
import pytest
import torch
from transformers.models.llama import modeling_llama as hf_llama

from lutmm import fuse
from lutmm.attention import gqa_decode_attention, gqa_decode_step, use_gqa_attention
from lutmm.fuse import fuse_projections
from conftest import gpu


def _inputs(b=2, hq=8, hkv=2, s=40, d=64, pos=17, dtype=torch.float32, device="cpu", seed=0, cos_rows=None):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, (hq + 2 * hkv) * d, generator=g).to(device, dtype)
    ang = torch.rand(cos_rows or b, d // 2, generator=g) * 6
    ang = torch.cat([ang, ang], -1)  # transformers' layout: the two halves share their angles
    cos, sin = ang.cos().to(device, dtype), ang.sin().to(device, dtype)
    kc = torch.randn(b, hkv, s, d, generator=g).to(device, dtype)
    vc = torch.randn(b, hkv, s, d, generator=g).to(device, dtype)
    mask = torch.arange(s)[None, :].expand(b, s) <= pos
    mask = (mask & (torch.rand(b, s, generator=g) < 0.9)).to(device)
    mask[:, pos] = True
    return qkv, cos, sin, kc, vc, torch.tensor(pos, device=device), mask


def _hf_step(qkv, cos, sin, kc, vc, pos, mask, scale, hq):
    """transformers' path: apply_rotary_pos_emb, StaticLayer-style index_copy_, then attention."""
    b, hkv, s, d = kc.shape
    q = qkv[:, :hq * d].view(b, hq, 1, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(b, hkv, 1, d)
    v = qkv[:, (hq + hkv) * d:].view(b, hkv, 1, d)
    cs = cos.view(-1, 1, d) if cos.shape[0] == b else cos.view(1, 1, d).expand(b, 1, d)
    sn = sin.view(-1, 1, d) if sin.shape[0] == b else sin.view(1, 1, d).expand(b, 1, d)
    qr, kr = hf_llama.apply_rotary_pos_emb(q.float(), k.float(), cs.float(), sn.float())
    kc, vc = kc.clone(), vc.clone()
    kc.index_copy_(2, pos.view(1), kr.to(kc.dtype))
    vc.index_copy_(2, pos.view(1), v.to(vc.dtype))
    out = gqa_decode_attention(qr.to(qkv.dtype).view(b, hkv, hq // hkv, d).cpu(), kc.cpu(), vc.cpu(),
                               mask.cpu(), scale)
    return out, kc, vc


@pytest.mark.parametrize("cos_rows", [None, 1])
def test_cpu_step_matches_transformers_rotary_and_cache_update(cos_rows):
    qkv, cos, sin, kc, vc, pos, mask = _inputs(cos_rows=cos_rows)
    want, want_k, want_v = _hf_step(qkv, cos, sin, kc, vc, pos, mask, 0.125, 8)
    got = gqa_decode_step(qkv, cos, sin, kc, vc, pos, mask, 0.125, 8)
    torch.testing.assert_close(kc, want_k, rtol=1e-6, atol=1e-6)  # the cache was written in place
    assert torch.equal(vc, want_v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_position_outside_the_cache_writes_nothing():
    qkv, cos, sin, kc, vc, _, mask = _inputs(s=16, pos=3)
    k0, v0 = kc.clone(), vc.clone()
    gqa_decode_step(qkv, cos, sin, kc, vc, torch.tensor(16), mask, 0.125, 8)
    assert torch.equal(kc, k0) and torch.equal(vc, v0)


@pytest.mark.parametrize("bad,match", [
    (lambda a: {**a, "qkv": a["qkv"][:, :-8]}, "qkv must be"),
    (lambda a: {**a, "cos": a["cos"][:, :32]}, "cos / sin"),
    (lambda a: {**a, "write_pos": a["write_pos"].int()}, "write_pos"),
    (lambda a: {**a, "heads": 7}, "not a multiple"),
    (lambda a: {**a, "v_cache": a["v_cache"][:, :1]}, "one shape"),
    (lambda a: {**a, "sin": a["sin"].double()}, "one dtype"),
])
def test_bad_step_arguments_name_the_problem(bad, match):
    qkv, cos, sin, kc, vc, pos, mask = _inputs()
    args = dict(qkv=qkv, cos=cos, sin=sin, k_cache=kc, v_cache=vc, write_pos=pos, mask=mask, scale=0.1, heads=8)
    with pytest.raises(ValueError, match=match):
        gqa_decode_step(**bad(args))


@gpu
@pytest.mark.parametrize("b,hq,hkv,s,d,pos,cos_rows,dtype", [
    (1, 32, 8, 384, 128, 200, None, torch.bfloat16),   # 8B heads at batch 1 (kMma + combine)
    (16, 32, 8, 300, 128, 299, 1, torch.bfloat16),     # batch 16, the last position (kWide)
    (3, 8, 2, 1000, 64, 0, None, torch.float16),       # the first position; fp16, D = 64
    (2, 4, 4, 130, 128, 64, None, torch.bfloat16),     # G = 1; a chunk boundary
])
def test_cuda_step_matches_the_cpu_step(b, hq, hkv, s, d, pos, cos_rows, dtype):
    qkv, cos, sin, kc, vc, p, mask = _inputs(b, hq, hkv, s, d, pos, dtype, "cuda", cos_rows=cos_rows)
    kc_cpu, vc_cpu = kc.cpu(), vc.cpu()
    ptr = kc.data_ptr()
    got = gqa_decode_step(qkv, cos, sin, kc, vc, p, mask, d ** -0.5, hq)
    want = gqa_decode_step(qkv.cpu(), cos.cpu(), sin.cpu(), kc_cpu, vc_cpu, p.cpu(), mask.cpu(), d ** -0.5, hq)
    assert kc.data_ptr() == ptr
    assert torch.equal(vc.cpu(), vc_cpu)
    k_err = (kc.cpu().float() - kc_cpu.float()).abs().max().item()
    assert k_err <= 2 ** -6  # the rotated key: fp32 math on both sides, one rounding (an FMA may differ by an ulp)
    assert torch.equal(kc.cpu()[:, :, :pos], kc_cpu[:, :, :pos]) and torch.equal(kc.cpu()[:, :, pos + 1:],
                                                                                  kc_cpu[:, :, pos + 1:])
    err = ((got.cpu().float() - want.float()).norm() / want.float().norm()).item()
    assert err < 1e-2, err


def _llama(seed=0):
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval().cuda()


@gpu
def test_fused_decode_step_gives_the_tokens_of_the_line_by_line_forward(monkeypatch):
    from lutmm.generation import greedy_static
    model = _llama()
    fuse_projections(model)
    use_gqa_attention(model)
    ids = torch.randint(1, 256, (3, 9), device="cuda")
    taken = []  # what _fused_step_inputs answered: the prompt goes line by line, every new token fused
    real = fuse._fused_step_inputs
    monkeypatch.setattr(fuse, "_fused_step_inputs", lambda *a: taken.append(real(*a)) or taken[-1])
    fused = greedy_static(model, ids, 12, graph=False)
    assert taken[0] is None and sum(t is not None for t in taken) == 11 * 2  # 11 decode steps x 2 layers
    monkeypatch.setattr(fuse, "_fused_step_inputs", lambda *a: None)  # transformers' rotary / update / attention
    plain = greedy_static(model, ids, 12, graph=False)
    assert torch.equal(fused, plain)
    from transformers import StaticCache
    cache = StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)  # the cache layers hold their tensors now
    attn, h = model.model.layers[0].self_attn, torch.zeros(3, 1, 256, device="cuda", dtype=torch.bfloat16)
    cos = torch.zeros(1, 1, 64, device="cuda", dtype=torch.bfloat16)
    assert real(attn, h, (cos, cos), None, cache, {}) is not None
    assert real(attn, h, (cos.float(), cos.float()), None, cache, {}) is None  # cos / sin of another dtype
    assert real(attn, h, (cos[..., :32], cos[..., :32]), None, cache, {}) is None
    assert real(attn, torch.zeros(3, 2, 256, device="cuda", dtype=torch.bfloat16), (cos, cos), None, cache, {}) is None
    monkeypatch.setattr(fuse, "_fused_step_inputs", real)
    torch._dynamo.reset()
    assert torch.equal(greedy_static(model, ids, 12, compile=True), plain)  # compiled + CUDA graph: in place


def test_opcheck_cpu():
    """The op's schema (the caches declared mutated), fake implementation and autograd registration agree
    with what the CPU kernel does."""
    qkv, cos, sin, kc, vc, pos, mask = _inputs(b=1, s=20, pos=5)
    torch.library.opcheck(torch.ops.lutmm.gqa_decode_step.default, (qkv, cos, sin, kc, vc, pos, mask, 0.125, 8))
    torch.library.opcheck(torch.ops.lutmm.gqa_decode_step.default, (qkv, cos, sin, kc, vc, pos, None, 0.125, 8))
