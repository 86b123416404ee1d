"""The seed systems' missing pieces (shared/reference/seed-systems.md, issue 26): bf16 embedding masters (M1),
the BOS-masking switch (M6), the auxiliary projections' init (M7) and optimizer group (M12), per-rank
gradient clipping (M13), the coprime-stride multi-shard sampler (M10) and the self-generated calibration (M11).
Each is off by default; each test fails without its piece."""

import copy
import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pgolf.config import ConfigError, ModelConfig, apply_overrides
from pgolf.data import loader
from pgolf.data.loader import COPRIME_MIX, CoprimeShardStream, TrainTokenStream, batch_document_ids
from pgolf.data.shards import FILE_AUDIT, write_shard
from pgolf.dist import init_process_group
from pgolf.errors import UserError
from pgolf.model.features import SMEAR_BOS_ID, SmearGate, bigram_bucket_ids
from pgolf.model.gpt import GPT
from pgolf.optim.builder import build_optimizers
from pgolf.recipes import recipe_tiny
from pgolf.tensorfile import read_tensors, write_tensors
from pgolf.train.averaging import EMAWeights
from tests.test_optim import TinyNet, optim_cfg, rank_grads


def small_model_cfg(**kw) -> ModelConfig:
    cfg = copy.deepcopy(recipe_tiny().model)
    cfg.num_layers, cfg.model_dim, cfg.vocab_size = 2, 32, 64
    cfg.bigram_buckets, cfg.bigram_dim, cfg.ve_last_n, cfg.ve_dim = 32, 8, 1, 8
    cfg.fused_qk = False
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


def batch(vocab: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (4, 33), generator=gen)
    ids[:, 10] = SMEAR_BOS_ID
    return ids[:, :-1], ids[:, 1:]


# ---- M1: model.embed_param_dtype -----------------------------------------------------------------------

def test_bf16_embedding_masters_train_and_keep_fp32_elsewhere():
    torch.manual_seed(0)
    model = GPT(small_model_cfg(embed_param_dtype="bfloat16"))
    tables = {"tok_emb.weight", "bigram.embed.weight", "value_embed.embed.weight"}
    for name, p in model.named_parameters():
        assert p.dtype == (torch.bfloat16 if name in tables else torch.float32), name
    assert all(p.dtype == torch.float32 for p in GPT(small_model_cfg()).parameters())  # the default
    ema = EMAWeights(model, 0.9)
    assert all(s.dtype == torch.float32 for s in ema.shadow)
    opt = build_optimizers(model, recipe_tiny().optim)
    x, y = batch()
    losses = []
    for _ in range(3):
        loss = model(x, y)
        loss.backward()
        opt.step(0.3)
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and math.isfinite(losses[-1])
    assert model.tok_emb.weight.dtype == torch.bfloat16  # the step kept the master dtype
    fresh = GPT(small_model_cfg(embed_param_dtype="bfloat16"))
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x))


# ---- M6: model.bos_mask ------------------------------------------------------------------------------

def test_bos_mask_off_lets_the_previous_token_into_a_bos_position():
    x, _ = batch()
    masked, unmasked = bigram_bucket_ids(x, 32), bigram_bucket_ids(x, 32, bos_mask=False)
    assert (masked[:, 10] == 31).all() and (unmasked[:, 10] != 31).any()
    assert (unmasked[:, 0] == 31).all() and torch.equal(masked[:, 11:], unmasked[:, 11:])
    h = torch.randn(4, 32, 8)
    on, off = SmearGate(8)(h, x), SmearGate(8, bos_mask=False)(h, x)
    assert torch.equal(on[:, 10], h[:, 10]) and not torch.allclose(off[:, 10], h[:, 10])
    assert torch.equal(on[:, 0], off[:, 0]) and torch.equal(on[:, 11:], off[:, 11:])
    torch.manual_seed(1)
    model = GPT(small_model_cfg())
    torch.nn.init.normal_(model.bigram.embed.weight)
    loose = GPT(small_model_cfg(bos_mask=False))
    loose.load_state_dict(model.state_dict())
    a, b = model(x), loose(x)
    assert torch.equal(a[:, :10], b[:, :10]) and not torch.allclose(a[:, 10], b[:, 10])


# ---- M7: model.aux_proj_init ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["pgolf", "ortho", "ortho_scaled"])
def test_aux_projection_init(mode):
    torch.manual_seed(2)
    cfg = small_model_cfg(aux_proj_init=mode)
    model = GPT(cfg)
    ve, bigram = model.value_embed.proj.weight, model.bigram.proj.weight
    gain = 1 / math.sqrt(2 * cfg.num_layers) if mode == "ortho_scaled" else 1.0
    for w in (bigram,) if mode == "pgolf" else (bigram, ve):
        singular = torch.linalg.svdvals(w)
        assert torch.allclose(singular, torch.full_like(singular, gain), atol=1e-5), mode
    assert (ve == 0).all() == (mode == "pgolf")
    with pytest.raises(ConfigError, match="aux_proj_init"):
        apply_overrides(recipe_tiny(), ["model.aux_proj_init=scaled"])


# ---- M12: optim.aux_proj_group --------------------------------------------------------------------------

def test_aux_projections_move_to_the_scalar_adamw():
    model = GPT(small_model_cfg())
    aux = {id(p) for p in (model.bigram.proj.weight, model.value_embed.proj.weight)}
    default = build_optimizers(model, recipe_tiny().optim)
    assert aux <= {id(p) for p in default.muon.ordered_params()}
    cfg = copy.deepcopy(recipe_tiny().optim)
    cfg.aux_proj_group, cfg.scalar_lr, cfg.scalar_wd = "scalar", 0.025, 0.04
    opt = build_optimizers(model, cfg)
    assert not aux & {id(p) for p in opt.muon.ordered_params()}
    scalar = next(g for g in opt.adamw.param_groups if g["group"] == "scalar")
    assert aux <= {id(p) for p in scalar["params"]} and (scalar["lr"], scalar["weight_decay"]) == (0.025, 0.04)
    with pytest.raises(UserError, match="no auxiliary projections"):
        build_optimizers(TinyNet(), optim_cfg(aux_proj_group="scalar"))


# ---- M13: optim.clip_scope ------------------------------------------------------------------------------

CLIP, CLIP_STEPS = 2.0, 2


def clip_worker(rank: int, world_size: int, out_dir: str, scope: str) -> None:
    init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                       world_size=world_size)
    try:
        torch.manual_seed(100)
        model = TinyNet(tie_embeddings=False)
        opt = build_optimizers(model, optim_cfg(clip_scope=scope), rank=rank, world_size=world_size)
        for step in range(CLIP_STEPS):
            for name, p in model.named_parameters():
                p.grad = rank_grads(model, rank, step)[name]
            opt.step(grad_clip=CLIP)
            opt.zero_grad()
        write_tensors(os.path.join(out_dir, f"{scope}{rank}.pgt"),
                      {n: p.detach() for n, p in model.named_parameters()}, {})
    finally:
        dist.destroy_process_group()


def clipped(grads: dict) -> dict:
    norm = torch.stack([g.norm() for g in grads.values()]).norm()
    return {k: g * min(1.0, CLIP / (float(norm) + 1e-6)) for k, g in grads.items()}


def test_local_clip_scales_each_ranks_grads_before_averaging():
    with tempfile.TemporaryDirectory(prefix="pgolf-clip-") as out_dir:
        mp.spawn(clip_worker, args=(2, out_dir, "local"), nprocs=2, join=True)
        local, _ = read_tensors(os.path.join(out_dir, "local0.pgt"))
    torch.manual_seed(100)
    model = TinyNet(tie_embeddings=False)
    global_model = copy.deepcopy(model)
    opt, global_opt = build_optimizers(model, optim_cfg()), build_optimizers(global_model, optim_cfg())
    for step in range(CLIP_STEPS):
        g0, g1 = clipped(rank_grads(model, 0, step)), clipped(rank_grads(model, 1, step))
        r0, r1 = rank_grads(model, 0, step), rank_grads(model, 1, step)
        for name, p in model.named_parameters():
            p.grad = (g0[name] + g1[name]) / 2
        for name, p in global_model.named_parameters():
            p.grad = (r0[name] + r1[name]) / 2
        opt.step(grad_clip=0.0)  # already clipped, rank by rank
        global_opt.step(grad_clip=CLIP)
        opt.zero_grad()
        global_opt.zero_grad()
    for name, p in model.named_parameters():
        assert torch.allclose(local[name], p.detach(), atol=1e-5), name
    assert any(not torch.allclose(local[n], p.detach(), atol=1e-4) for n, p in global_model.named_parameters())


def test_local_clip_on_one_process_is_the_global_clip():
    torch.manual_seed(3)
    a = TinyNet()
    b = copy.deepcopy(a)
    opts = [build_optimizers(a, optim_cfg(clip_scope="local")), build_optimizers(b, optim_cfg())]
    for model, opt in zip((a, b), opts, strict=True):
        for name, p in model.named_parameters():
            p.grad = rank_grads(model, 0, 0)[name] * 10
        opt.step(grad_clip=1.0)
    assert torch.allclose(opts[0].last_grad_norm, opts[1].last_grad_norm)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6)


# ---- M10: data.sampler=coprime --------------------------------------------------------------------------

SHARD_SIZES = (700, 1300, 2100, 900, 1600)


@pytest.fixture
def shards(tmp_path):
    """Shards whose token at offset o of shard i is 10,000 * i + o: a window names its shard and offset."""
    for i, n in enumerate(SHARD_SIZES):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", (10_000 * i + np.arange(n)).astype(np.uint16))
    return str(tmp_path / "fineweb_train_*.bin")


def windows_of(x: torch.Tensor) -> list[tuple[int, int]]:
    return [(int(row[0]) // 10_000, int(row[0]) % 10_000) for row in x]


def test_coprime_windows_are_contiguous_and_walk_every_block_once_per_epoch(shards):
    stream = loader.train_token_stream("coprime", shards)
    seen: dict[int, list[int]] = {}
    first_mix = None
    for _ in range(30):
        x, y = stream.next_batch(16 * 32, 32)
        assert x.shape == y.shape == (16, 32) and torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(y[:, -1] - x[:, 0], torch.full((16,), 32))  # one shard's consecutive tokens
        shards_in = {s for s, _ in windows_of(x)}
        first_mix = first_mix or len(shards_in)
        for s, offset in windows_of(x):
            seen.setdefault(s, []).append(offset)
    assert first_mix == min(COPRIME_MIX[0], len(SHARD_SIZES))
    for s, offsets in seen.items():
        phase = offsets[0] % 32
        blocks = (SHARD_SIZES[s] - phase - 1) // 32
        epoch = offsets[:blocks]
        assert len(set(epoch)) == len(epoch) and all(o % 32 == phase for o in epoch), s
        if len(offsets) >= blocks:  # a full walk: every block of the phase once
            assert sorted(epoch) == [phase + 32 * b for b in range(blocks)], s
    assert len(seen) == len(SHARD_SIZES)
    assert windows_of(loader.train_token_stream("sequential", shards).next_batch(512, 32)[0])[1] == (0, 32)


def test_coprime_batches_do_not_depend_on_the_rank_split_and_resume_exactly(shards):
    whole = CoprimeShardStream(shards)
    ranks = [CoprimeShardStream(shards, r, 2) for r in range(2)]
    for _ in range(3):
        x, _ = whole.next_batch(1024, 32, 2)
        x2, _ = whole.next_batch(1024, 32, 2)
        parts = [stream.next_batch(1024, 32)[0] for stream in ranks]
        assert sorted(windows_of(torch.cat([x, x2]))) == sorted(windows_of(torch.cat(parts)))
    state = whole.state_dict()
    expected = [whole.next_doc_batch(1024, 32, 2) for _ in range(4)]
    resumed = CoprimeShardStream(shards)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next_doc_batch(1024, 32, 2)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        assert torch.equal(got[2], batch_document_ids(got[0]))
    with pytest.raises(UserError, match="sequential"):
        TrainTokenStream(shards).load_state_dict(state)
    with pytest.raises(UserError, match="coprime"):
        resumed.load_state_dict(TrainTokenStream(shards).state_dict())


def test_coprime_opens_every_shard_through_the_audit_and_checks_the_vocab(shards):
    FILE_AUDIT.clear()
    with FILE_AUDIT.phase("train"):
        CoprimeShardStream(shards).next_batch(512, 32)
    assert len(set(FILE_AUDIT.opened("train"))) == len(SHARD_SIZES)
    with pytest.raises(UserError, match="vocab_size"):
        CoprimeShardStream(shards, vocab_size=40_000)


def test_self_generated_calibration_samples_the_model_s_own_distribution():
    from pgolf.quant.hessian import generate_calibration, next_token_logits

    torch.manual_seed(0)
    model = GPT(small_model_cfg()).train()
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised projections would make every distribution alike
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    a = generate_calibration(model, 2, 3, 12, 0.8, seed=5)
    assert model.training  # left as it was
    assert [x.shape for x in a] == [(3, 12), (3, 12)] and all(x.dtype == torch.int64 for x in a)
    assert all(int(x.min()) >= 0 and int(x.max()) < 64 for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, generate_calibration(model, 2, 3, 12, 0.8, seed=5), strict=True))
    assert not torch.equal(a[0], generate_calibration(model, 1, 3, 12, 0.8, seed=6)[0])
    greedy = generate_calibration(model, 1, 4, 10, 1e-4, seed=7)[0]  # near zero temperature: the argmax path
    with torch.no_grad():
        model.eval()
        for t in range(1, 10):
            assert torch.equal(greedy[:, t], next_token_logits(model, greedy[:, :t]).argmax(dim=-1)), t
    with pytest.raises(UserError, match="calib_temperature=0"):
        generate_calibration(model, 1, 1, 4, 0.0, seed=0)


@pytest.mark.shared  # real text from ../shared's corpus and tokenizer
def test_a_run_with_self_calibration_reads_no_shard_for_its_hessians(tmp_path, monkeypatch):
    from pgolf.quant.hessian import collect_hessians, generate_calibration
    from pgolf.train import loop
    from pgolf.train.calibration import CALIB_SEED_STRIDE
    from pgolf.train.loop import train_run
    from tests.conftest import write_wiki_shards
    from tests.test_train_loop import small_cfg

    (tmp_path / "wiki").mkdir()
    data = write_wiki_shards(tmp_path / "wiki", 1_500, 40_000)
    cfg = small_cfg(data, tmp_path, "selfcal", max_steps=3)
    cfg.quant.enabled, cfg.quant.calib_batches, cfg.quant.calib_seqs = True, 2, 2
    cfg.quant.calib_source, cfg.quant.calib_temperature = "self", 0.9
    batches_read = []
    real_stream = loop.train_token_stream

    def counting_stream(*args, **kwargs):
        stream = real_stream(*args, **kwargs)
        real_next = stream.next_batch
        stream.next_batch = lambda *a, **k: batches_read.append(FILE_AUDIT.current_phase) or real_next(*a, **k)
        return stream

    monkeypatch.setattr(loop, "train_token_stream", counting_stream)
    record = train_run(cfg, final_eval=False)
    assert record["status"] == "ok" and "calibration" not in batches_read and len(batches_read) >= 3
    hessians, meta = read_tensors(tmp_path / "selfcal" / "hessians.pgw")
    assert meta["source"] == "self"
    weights, _ = read_tensors(tmp_path / "selfcal" / "model.pgw")
    model = GPT(cfg.model)
    model.load_state_dict(weights)
    inputs = generate_calibration(model, 2, 2, cfg.train.seq_len, 0.9, cfg.train.seed + CALIB_SEED_STRIDE * 0)
    again = collect_hessians(model, inputs, passthrough_numel=cfg.quant.passthrough_numel)
    assert set(again) == set(hessians) and len(hessians) > 0
    assert all(torch.allclose(again[k], hessians[k], rtol=1e-5, atol=1e-7) for k in hessians)
