"""lutmm.generation.greedy_static: the same tokens as Hugging Face greedy `generate` (static cache,
early stop, eos suppressed before min_new_tokens), on the CPU; on CUDA the replayed graph against the
same loop without it."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from lutmm.generation import greedy_static  # noqa: E402


def _model(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).to(device, dtype).eval()


def _hf(model, ids, n, eos=None, min_new=0):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=min_new,
                          do_sample=False, pad_token_id=eos if eos is not None else 0, eos_token_id=eos,
                          temperature=None, top_p=None, top_k=None)


def test_matches_hf_greedy():
    model = _model()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    got = greedy_static(model, ids, 12)
    assert got.shape == (2, 19)
    assert torch.equal(got, _hf(model, ids, 12))
    assert torch.equal(greedy_static(model, ids, 0), ids)


def test_eos_stops_and_pads_like_hf_and_min_new_tokens_suppresses_it():
    model = _model()
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(2))
    free = greedy_static(model, ids, 10)
    eos = int(free[0, 5 + 3])  # row 0's fourth new token becomes the end-of-sequence token
    got = greedy_static(model, ids, 10, eos_token_id=eos, check_every=2)
    ref = _hf(model, ids, 10, eos=eos)
    assert torch.equal(got[:, :ref.shape[1]], ref)
    assert (got[:, ref.shape[1]:] == eos).all()  # HF stops when every row ended; we may run to a check
    late = greedy_static(model, ids, 10, eos_token_id=eos, min_new_tokens=6)
    ref_late = _hf(model, ids, 10, eos=eos, min_new=6)
    assert torch.equal(late[:, :ref_late.shape[1]], ref_late)
    assert (late[0, 5:11] != eos).all()  # suppressed for the first 6 new tokens


def test_rejects_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="expected \\[batch, prompt\\]"):
        greedy_static(model, torch.zeros(1, 0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        greedy_static(model, torch.zeros(1, 3, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="graph=True needs"):
        greedy_static(model, torch.zeros(1, 3, dtype=torch.long), 4, graph=True)


def test_cuda_graph_replay_matches_the_plain_loop():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: GPU test skipped")
    model = _model("cuda", torch.bfloat16)
    ids = torch.randint(0, 50, (3, 6), device="cuda")
    plain = greedy_static(model, ids, 16, graph=False)
    replayed = greedy_static(model, ids, 16)  # graph on CUDA by default
    assert torch.equal(replayed, plain)


def test_rewind_static_cache_moves_the_next_write():
    """Transformers' StaticCache layers write at their own count of positions, not at cache_position:
    after two warm-up steps the next write lands two positions late unless rewound."""
    from transformers import StaticCache

    from lutmm.generation import rewind_static_cache
    model = _model()
    ids = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(3))
    cache = StaticCache(config=model.config, max_cache_len=12)
    with torch.no_grad():
        model(ids, past_key_values=cache, cache_position=torch.arange(5), use_cache=True)
        tok, pos = ids[:, :1], torch.tensor([5])
        for _ in range(2):  # warm-up steps, as before a CUDA graph capture
            model(tok, past_key_values=cache, cache_position=pos, use_cache=True)
        keys = cache.layers[0].keys
        assert keys[:, :, 6].abs().sum() > 0  # the second warm-up wrote position 6
        rewind_static_cache(cache, 5)
        keys[:, :, 5:].zero_()
        model(tok, past_key_values=cache, cache_position=pos, use_cache=True)
    assert keys[:, :, 5].abs().sum() > 0 and keys[:, :, 6:].abs().sum() == 0
