"""train.doc_mask: document-masked causal attention (flex attention with a per-batch BlockMask, a dense-mask
fallback, a plain reference), the loader's document ids, the isolation of documents in a packed row, and
training steps through train_run."""

import warnings

import numpy as np
import pytest
import torch

from pgolf.data.loader import TRAIN_BOS_ID, TrainTokenStream, batch_document_ids
from pgolf.data.shards import write_shard
from pgolf.model import doc_attention as doc_attention_module
from pgolf.model.doc_attention import (
    dense_doc_mask,
    doc_attention_mask,
    doc_block_mask,
    doc_flex_attention,
    doc_masked_attention,
    doc_reference_attention,
)
from pgolf.model.gpt import GPT
from pgolf.recipes import recipe_tiny

BOS = TRAIN_BOS_ID


@pytest.fixture(autouse=True)
def quiet_eager_flex():
    """flex_attention warns once that it runs unfused outside torch.compile: expected on CPU."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention.*")
        yield


def packed_rows(t: int, seed: int) -> torch.Tensor:
    """(3, t) token rows (ids 2..30 and BOS): row 0 starts mid-document and holds a document of length 1
    (two BOS in a row) and one ending the row with length 1; row 1 is one document from a BOS; row 2 has
    random BOS positions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, 31, (3, t), generator=g)
    x[0, [5, 6, t // 2, t - 1]] = BOS
    x[1, 0] = BOS
    x[2, torch.randperm(t, generator=g)[: t // 8]] = BOS
    return x


def test_block_mask_matches_the_dense_mask_tile_by_tile():
    x = packed_rows(256, seed=1)  # tile 128: full, partial and skipped tiles all occur
    doc = batch_document_ids(x)
    dense = dense_doc_mask(doc)[:, 0]
    bm = doc_block_mask(doc)
    assert bm.BLOCK_SIZE == (128, 128)
    as_dense = bm.to_dense()[:, 0].bool()  # (B, n, n): tiles the attention visits (full or partial)
    tiles = dense.view(3, 2, 128, 2, 128).any(dim=(2, 4))
    assert torch.equal(as_dense, tiles)
    # a full tile is one where every pair is allowed
    full = torch.zeros(3, 2, 2, dtype=torch.bool)
    for b in range(3):
        for qi in range(2):
            for j in range(int(bm.full_kv_num_blocks[b, 0, qi])):
                full[b, qi, int(bm.full_kv_indices[b, 0, qi, j])] = True
    every = dense.view(3, 2, 128, 2, 128).all(dim=2).all(dim=3)
    assert torch.equal(full, every & ~torch.eye(2, dtype=torch.bool))


@pytest.mark.parametrize("t", [48, 200, 256])  # 48 and 200 are padded to whole tiles
def test_flex_and_dense_mask_agree_with_the_reference(t):
    torch.manual_seed(0)
    x = packed_rows(t, seed=t)
    doc = batch_document_ids(x)
    q = torch.randn(3, t, 4, 16)
    k, v = torch.randn(3, t, 2, 16), torch.randn(3, t, 2, 16)  # GQA: 4 query heads on 2 KV heads
    ref = doc_reference_attention(q, k, v, doc)
    flex = doc_flex_attention(q, k, v, doc_block_mask(doc))  # no gradients: flex runs on CPU
    torch.testing.assert_close(flex, ref, atol=2e-6, rtol=1e-5)
    # the dense-mask path (CPU with gradients): values and gradients
    qs, ks, vs = (a.clone().requires_grad_() for a in (q, k, v))
    qr, kr, vr = (a.clone().requires_grad_() for a in (q, k, v))
    mask = doc_attention_mask(doc)
    assert isinstance(mask, torch.Tensor)
    out = doc_masked_attention(qs, ks, vs, mask)
    out_ref = doc_reference_attention(qr, kr, vr, doc)
    torch.testing.assert_close(out, out_ref, atol=2e-6, rtol=1e-5)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (out_ref * w).sum().backward()
    for a, b in ((qs, qr), (ks, kr), (vs, vr)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5)


def test_the_block_mask_is_built_outside_compiled_graphs():
    """Traced into a graph, Inductor's code for the mask gave NaN gradients on the GPU (the module docstring):
    a compiled caller must get it from an eager call, not from ops of its own graph."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def caller(doc):
        mask = doc_block_mask(doc)
        return mask.kv_num_blocks.sum() + doc.sum()

    doc = batch_document_ids(packed_rows(200, seed=3))
    torch._dynamo.reset()
    out = torch.compile(caller, backend=recording_backend)(doc)
    assert int(out) == int(caller(doc))
    traced = [str(node.target) for gm in graphs for node in gm.graph.nodes]
    assert graphs and not any("argsort" in name or "sort" in name for name in traced), traced
    assert doc_block_mask(doc).seq_lengths == (256, 256)  # 200 positions padded to two tiles


def test_reference_masks_across_documents():
    """The reference itself: a length-1 document reads only itself, a document's first token only itself."""
    x = torch.tensor([[5, 6, BOS, BOS, 7, 8]])
    doc = batch_document_ids(x)
    assert doc.tolist() == [[0, 0, 1, 2, 2, 2]]
    q = torch.randn(1, 6, 2, 4)
    k, v = torch.randn(1, 6, 1, 4), torch.randn(1, 6, 1, 4)
    out = doc_reference_attention(q, k, v, doc)
    for i in (0, 2, 3):  # tokens with no earlier token in their document read their own value
        torch.testing.assert_close(out[0, i], v[0, i].expand(2, 4))
    plain = torch.softmax((q[0, 5] @ k[0, 3:6, 0].T) / 2.0, dim=-1) @ v[0, 3:6, 0]
    torch.testing.assert_close(out[0, 5], plain)


def tiny_model(seed: int = 0) -> GPT:
    """recipe_tiny's model (GQA 4/2, XSA on 2 layers, value embedding, bigram, smear) with every weight
    perturbed, so that the zero-initialized projections carry attention across positions."""
    cfg = recipe_tiny().model
    cfg.num_layers = 3
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def document_spans(row: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each segment of a row: at 0 and at every BOS."""
    starts = sorted({0} | {int(i) for i in torch.nonzero(row == BOS).flatten()})
    return list(zip(starts, starts[1:] + [row.numel()], strict=True))


@pytest.mark.parametrize("grad", [False, True])
def test_each_document_of_a_packed_row_scores_as_if_alone(grad):
    """The isolation property, through flex attention (no gradients) and the dense mask (gradients on)."""
    model = tiny_model()
    x = packed_rows(64, seed=3)
    with torch.set_grad_enabled(grad):
        packed = model.logits(x, batch_document_ids(x))
        dense = model.logits(x)
        checked = 0
        for b in range(x.size(0)):
            for s, e in document_spans(x[b]):
                alone = model.logits(x[b:b + 1, s:e])[0]
                torch.testing.assert_close(packed[b, s:e], alone, atol=2e-4, rtol=1e-4)
                checked += 1
        assert checked > 10
        # without doc ids the later documents do see their predecessors (the test can fail)
        s, e = document_spans(x[0])[3]
        assert (dense[0, s:e] - model.logits(x[0:1, s:e])[0]).abs().max() > 1e-2


def test_one_document_rows_equal_the_dense_model_and_grads_flow():
    model = tiny_model(seed=1)
    x = torch.randint(2, 31, (2, 32))
    x[:, 0] = BOS
    doc = batch_document_ids(x)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(x, doc), model.logits(x), atol=1e-5, rtol=1e-5)
    y = torch.randint(2, 31, (2, 32))
    model(x, y, doc_ids=doc).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(x, y).backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    with pytest.raises(ValueError, match="doc_ids"):
        model.forward_hidden(x, keep=4, doc_ids=doc)
    with pytest.raises(ValueError, match="doc_ids"):
        model.forward_hidden(x, doc_ids=doc[:, :8])


def write_docs_shard(path, lengths, seed):
    """A shard of documents of the given lengths (BOS + length - 1 tokens); returns the tokens."""
    rng = np.random.default_rng(seed)
    parts = [np.concatenate(([BOS], rng.integers(2, 1000, n - 1))) for n in lengths]
    tokens = np.concatenate(parts).astype(np.uint16)
    write_shard(path, tokens)
    return tokens


def test_loader_document_ids_follow_bos_and_resume(tmp_path):
    rng = np.random.default_rng(0)
    write_docs_shard(tmp_path / "fineweb_train_000000.bin", rng.integers(1, 90, 60), seed=1)
    write_docs_shard(tmp_path / "fineweb_train_000001.bin", rng.integers(1, 90, 40), seed=2)
    pattern = str(tmp_path / "fineweb_train_*.bin")
    stream = TrainTokenStream(pattern)
    for _ in range(3):
        x, y, doc = stream.next_doc_batch(512, 64, 2)
        assert doc.dtype == torch.int32 and doc.shape == x.shape == (4, 64)
        step_up = torch.diff(doc, dim=1, prepend=torch.zeros(4, 1, dtype=torch.int32))
        assert torch.equal(step_up == 1, x == BOS) and int(step_up.max()) <= 1 and int(step_up.min()) >= 0
        stream.next_doc_batch(512, 64, 2)
    state = stream.state_dict()
    after = [stream.next_doc_batch(512, 64, 2) for _ in range(4)]
    resumed = TrainTokenStream(pattern)
    resumed.load_state_dict(state)
    for a, b in zip(after, [resumed.next_doc_batch(512, 64, 2) for _ in range(4)], strict=True):
        for ta, tb in zip(a, b, strict=True):
            assert torch.equal(ta, tb)
    # two ranks: disjoint rows of the same span, each with the ids of its own rows
    one = TrainTokenStream(pattern).next_doc_batch(512, 64, 1)
    ranks = [TrainTokenStream(pattern, r, 2).next_doc_batch(512, 64, 1) for r in range(2)]
    assert torch.equal(torch.cat([r[0] for r in ranks]), one[0])
    assert torch.equal(torch.cat([r[2] for r in ranks]), one[2])


@pytest.mark.shared
def test_training_steps_with_doc_mask_pass_document_ids(tmp_path, monkeypatch):
    from pgolf.train.loop import train_run
    from tests.conftest import TOKENIZER_1024, write_wiki_shards

    data = write_wiki_shards(tmp_path, 1_500, 30_000)
    cfg = recipe_tiny()
    cfg.data.path, cfg.data.tokenizer = str(data), str(TOKENIZER_1024)
    cfg.out_dir, cfg.name = str(tmp_path / "runs"), "docmask"
    cfg.model.num_layers = 2
    cfg.train.seq_len, cfg.train.batch_tokens, cfg.train.grad_accum = 64, 2048, 2
    cfg.train.max_steps, cfg.train.warmdown_iters, cfg.train.log_every = 3, 2, 1
    cfg.train.doc_mask = True
    cfg.quant.enabled = False
    cfg.eval.sliding_stride, cfg.eval.ttt, cfg.eval.val_tokens = 0, False, 1024
    seen = []
    real = doc_attention_module.doc_attention_mask

    def spy(doc_ids):
        seen.append(doc_ids.clone())
        return real(doc_ids)

    monkeypatch.setattr(doc_attention_module, "doc_attention_mask", spy)
    record = train_run(cfg, final_eval=False)
    assert record["status"] == "ok" and record["train"]["steps"] == 3
    assert len(seen) == 6  # every micro-step, and no evaluation forward
    expected = TrainTokenStream(str(data / cfg.data.train_pattern))
    boundaries = 0
    for got in seen:
        x, _, doc = expected.next_doc_batch(2048, 64, 2)
        assert torch.equal(got, doc)
        boundaries += int((x == BOS).sum())
    assert boundaries >= 3  # the shard's first documents are long: BOS at 3,084, 3,221, 5,483


@pytest.mark.gpu
def test_compiled_doc_mask_model_on_cuda_matches_the_reference():
    """The flag-on model compiled on CUDA (flex attention's fused kernel) against the same model with the dense
    mask, eager: logits and gradients; and flex attention alone against the reference, with gradients."""
    torch.manual_seed(0)
    x = packed_rows(256, seed=5).cuda()
    doc = batch_document_ids(x)
    q = torch.randn(3, 256, 4, 64, device="cuda", requires_grad=True)
    k = torch.randn(3, 256, 2, 64, device="cuda", requires_grad=True)
    v = torch.randn(3, 256, 2, 64, device="cuda", requires_grad=True)
    out = doc_flex_attention(q, k, v, doc_block_mask(doc))
    ref = doc_reference_attention(q, k, v, doc)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    w = torch.randn_like(out)
    flex_grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(flex_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)

    model = tiny_model().cuda()
    y = torch.randint(2, 31, x.shape, device="cuda")
    compiled = torch.compile(model, dynamic=False)
    loss = compiled(x, y, doc_ids=doc)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    hidden = model.run_blocks(model.embed_inputs(x), x, None, dense_doc_mask(doc))
    logits = model.head_logits(hidden)
    ref_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-4)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-3, rtol=1e-3, msg=n)
    x2 = packed_rows(256, seed=6).cuda()  # other documents, same shapes: the same graph serves them
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(x2, y, doc_ids=batch_document_ids(x2)).backward()


def test_the_exported_script_carries_the_module_only_with_the_flag():
    from pgolf.export.amalgamate import module_manifest

    cfg = recipe_tiny()
    names, left_out = module_manifest(cfg)
    assert "pgolf.model.doc_attention" not in names
    assert left_out["pgolf.model.doc_attention"].startswith("cfg.train.doc_mask or ")
    cfg.train.doc_mask = True
    assert "pgolf.model.doc_attention" in module_manifest(cfg)[0]


@pytest.mark.gpu
def test_compiled_flex_takes_rows_that_are_not_whole_tiles_on_cuda():
    """A tail window (1,808 tokens on the proxy's val stream) through the compiled flex kernel: padded to
    whole tiles, it matches the reference (a 16-token tile failed to lower before)."""
    torch.manual_seed(0)
    x = packed_rows(200, seed=7).cuda()
    doc = batch_document_ids(x)
    q = torch.randn(3, 200, 4, 64, device="cuda")
    k, v = torch.randn(3, 200, 2, 64, device="cuda"), torch.randn(3, 200, 2, 64, device="cuda")
    out = doc_flex_attention(q, k, v, doc_block_mask(doc))
    torch.testing.assert_close(out, doc_reference_attention(q, k, v, doc), atol=1e-4, rtol=1e-4)
