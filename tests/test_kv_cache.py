"""pgolf.model.kv_cache: forwards of a row's tokens chunk by chunk through a cache equal one forward of the whole
row, with every feature that reads the previous token or other positions on; the block window and row selection."""

import torch

from pgolf.config import ModelConfig
from pgolf.model.gpt import GPT
from pgolf.model.kv_cache import KVCache, LayerKV


def every_feature_model(seed: int = 0) -> GPT:
    """A small GPT with the frontier's stack and the older position-reading features, gates non-trivial."""
    cfg = ModelConfig(vocab_size=64, num_layers=6, model_dim=32, num_heads=4, num_kv_heads=2, rope_dims=4,
                      xsa_last_n=3, ln_scale=True, smear_gate=True, bigram_buckets=16, bigram_dim=8, ve_last_n=2,
                      ve_dim=8, skip_gates=True, recur_first=2, recur_last=3, recur_loops=1, smear_gate_v2=True,
                      sparse_attn_gate=True, gate_window=4, parallel_lanes_from=4, attention="math")
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():  # zero-initialised gates and projections would hide a wrong previous token
        for name, p in model.named_parameters():
            if "smear" in name or "attn_gate_w" in name or "skip_gates" in name or "bigram" in name:
                p.normal_(0.0, 0.5)
    model.set_recurrence(True)
    return model


def cached_hidden(model: GPT, ids: torch.Tensor, cuts: list[int], window: int) -> torch.Tensor:
    cache, outs, start = KVCache(window), [], 0
    for end in cuts + [ids.size(1)]:
        outs.append(model.forward_hidden(ids[:, start:end], cache=cache))
        start = end
    assert cache.offset == ids.size(1) and torch.equal(cache.last_ids, ids[:, -3:])
    return torch.cat(outs, dim=1)


def test_chunked_forwards_through_the_cache_equal_the_whole_forward():
    model = every_feature_model()
    ids = torch.randint(2, 64, (3, 40))
    ids[1, 17] = 1  # a BOS inside a chunk and one at a chunk's first position: the gates must mask both
    ids[2, 20] = 1
    ids[0, 8] = 1  # a one-token chunk that is a BOS
    with torch.no_grad():
        whole = model.forward_hidden(ids)
        chunked = cached_hidden(model, ids, [7, 8, 10, 20, 33], window=40)
    assert torch.allclose(chunked, whole, atol=1e-5, rtol=1e-5), (chunked - whole).abs().max()


def test_a_wrong_previous_token_would_show():
    """The test above can fail: the same cut with other earlier tokens differs from the whole forward."""
    model = every_feature_model()
    ids = torch.randint(2, 64, (2, 24))
    with torch.no_grad():
        whole = model.forward_hidden(ids)
        cache = KVCache(24)
        model.forward_hidden(ids[:, :12], cache=cache)
        cache.last_ids = torch.zeros_like(cache.last_ids)
        wrong = model.forward_hidden(ids[:, 12:], cache=cache)
    assert not torch.allclose(wrong, whole[:, 12:], atol=1e-4)


def test_the_block_window_reads_window_keys_at_most():
    kv = LayerKV(window=10)
    seen = [kv.extend(torch.randn(2, 4, 1, 3), torch.randn(2, 4, 1, 3))[0].size(1) for _ in range(4)]
    assert seen == [4, 8, 10, 10]  # a forward of T reads window - T earlier keys at most, then its own
    assert kv.k.size(1) == 9 and not kv.k.requires_grad
    k, _ = kv.extend(torch.randn(2, 6, 1, 3), torch.randn(2, 6, 1, 3))
    assert k.size(1) == 10  # 4 earlier + 6 new


def test_a_backward_stops_at_the_cache_and_rows_select():
    model = every_feature_model()
    ids = torch.randint(2, 64, (3, 16))
    cache = KVCache(16)
    model.forward_hidden(ids[:, :8], cache=cache).sum().backward()
    model.zero_grad()
    model.forward_hidden(ids[:, 8:12], cache=cache).sum().backward()  # no second pass through the first graph
    assert model.blocks[0].attn.c_k.weight.grad is not None
    kept = cache.select(torch.tensor([2, 0]))
    with torch.no_grad():
        both = model.forward_hidden(ids[:, 12:], cache=cache)
        picked = model.forward_hidden(ids[[2, 0], 12:], cache=kept)
    assert torch.allclose(picked, both[[2, 0]], atol=1e-6)
