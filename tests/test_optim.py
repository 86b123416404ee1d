"""Optimizer tests: Newton-Schulz, Muon against its per-matrix reference, the AdamW half against
torch.optim.AdamW, group coverage, clipping, exact resume, schedules, and a 2-process gloo run."""

import copy
import math
import os
import tempfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from pgolf.config import OptimConfig, TrainConfig
from pgolf.dist import init_process_group
from pgolf.errors import UserError
from pgolf.optim.builder import broadcast_parameters, build_optimizers
from pgolf.optim.muon import Muon, muon_reference_step, newton_schulz5, newton_schulz5_reference
from pgolf.optim.schedules import lr_scale, muon_momentum_at
from pgolf.tensorfile import read_tensors, write_tensors


class TinyNet(nn.Module):
    """A stand-in for GPT with the param_groups() contract: same-shape matrices in every block."""

    def __init__(self, tie_embeddings: bool = True, vocab: int = 32, dim: int = 16, num_blocks: int = 3):
        super().__init__()
        self.cfg = SimpleNamespace(tie_embeddings=tie_embeddings)
        self.tok_emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList()
        for _ in range(num_blocks):
            blk = nn.Module()
            blk.q = nn.Linear(dim, dim, bias=False)
            blk.k = nn.Linear(dim, dim, bias=False)
            blk.fc = nn.Linear(dim, 2 * dim, bias=False)
            blk.proj = nn.Linear(2 * dim, dim, bias=False)
            blk.gain = nn.Parameter(torch.ones(dim))
            self.blocks.append(blk)
        self.squeeze = nn.Linear(dim, dim // 2, bias=False)  # a bucket of one matrix (padded on 2 ranks)
        self.final_gain = nn.Parameter(torch.ones(dim // 2))
        self.head = None if tie_embeddings else nn.Linear(dim // 2, vocab, bias=False)
        self.unsqueeze = nn.Linear(dim // 2, dim, bias=False)

    def forward(self, ids, targets):
        h = self.tok_emb(ids)
        for blk in self.blocks:
            x = h * blk.gain
            h = h + torch.sigmoid(blk.q(x)) * blk.k(x)
            h = h + blk.proj(torch.relu(blk.fc(h)).square())
        z = self.squeeze(h) * self.final_gain
        logits = self.head(z) if self.head is not None else self.unsqueeze(z) @ self.tok_emb.weight.T
        return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def param_groups(self):
        matrix = [p for blk in self.blocks for p in (blk.q.weight, blk.k.weight, blk.fc.weight, blk.proj.weight)]
        matrix += [self.squeeze.weight, self.unsqueeze.weight]
        return {"matrix": matrix, "embed": [self.tok_emb.weight],
                "head": [self.head.weight] if self.head is not None else [],
                "scalar": [blk.gain for blk in self.blocks] + [self.final_gain]}


def optim_cfg(**kw) -> OptimConfig:
    base = dict(matrix_lr=0.03, scalar_lr=0.02, embed_lr=0.3, tied_embed_lr=0.05, head_lr=0.01,
                muon_momentum=0.9, muon_momentum_warmup_steps=0, muon_wd=0.1, adam_wd=0.05)
    base.update(kw)
    return OptimConfig(**base)


def set_random_grads(model, gen: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    grads = {}
    for name, p in model.named_parameters():
        p.grad = torch.randn(p.shape, generator=gen) * scale
        grads[name] = p.grad.clone()
    return grads


# ---- Newton-Schulz -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (96, 16)])
def test_newton_schulz_is_near_orthogonal(shape):
    gen = torch.Generator().manual_seed(0)
    conditioning = torch.logspace(-2, 0, min(shape))  # condition number 100, far from orthogonal
    G = torch.randn(shape, generator=gen)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    G = U @ torch.diag(conditioning) @ Vh
    X = newton_schulz5(G, steps=5)
    assert X.shape == G.shape and X.dtype == torch.float32
    s = torch.linalg.svdvals(X)
    assert s.min() > 0.6 and s.max() < 1.25, (s.min().item(), s.max().item())
    # The singular vectors are kept: in G's singular bases X is diagonal (X ~ U V^T up to the band).
    D = U.mT @ X @ Vh.mT
    assert (D - torch.diag(torch.diagonal(D))).abs().max() < 1e-4


def test_newton_schulz_batched_equals_per_matrix():
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(5, 24, 40, generator=gen)
    batched = newton_schulz5(G)
    single = torch.stack([newton_schulz5(g) for g in G])
    assert torch.allclose(batched, single, atol=1e-5)
    tall = G.mT.contiguous()
    assert torch.allclose(newton_schulz5(tall), batched.mT, atol=1e-5)


@pytest.mark.parametrize("shape", [(24, 40), (3, 40, 24), (2, 3, 16, 16)])
def test_newton_schulz_fused_matmuls_match_the_plain_formula(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    fused, plain = newton_schulz5(G), newton_schulz5_reference(G)
    assert fused.shape == plain.shape == G.shape
    assert torch.allclose(fused, plain, atol=1e-5)
    assert not torch.allclose(fused, G / G.norm(), atol=1e-2)  # five iterations really ran


@pytest.mark.gpu
def test_newton_schulz_fused_matches_the_plain_formula_in_bfloat16_on_cuda():
    G = torch.randn(11, 512, 1536, generator=torch.Generator().manual_seed(7)).cuda()
    fused, plain = newton_schulz5(G), newton_schulz5_reference(G)
    exact = newton_schulz5_reference(G, dtype=torch.float32)
    assert fused.dtype == plain.dtype == torch.bfloat16
    # The fused form rounds less often (scalars applied in the fp32 GEMM epilogue): no further from fp32.
    assert (fused.float() - exact).abs().max() <= (plain.float() - exact).abs().max() * 1.5 + 1e-3


def test_newton_schulz_bfloat16_close_to_float32():
    G = torch.randn(3, 32, 48, generator=torch.Generator().manual_seed(2))
    X32 = newton_schulz5(G, dtype=torch.float32)
    X16 = newton_schulz5(G, dtype=torch.bfloat16)
    assert X16.dtype == torch.bfloat16
    assert (X16.float() - X32).abs().max() < 0.05


# ---- Muon ----------------------------------------------------------------------------------------------

def test_muon_batched_matches_reference_over_steps():
    gen = torch.Generator().manual_seed(3)
    shapes = [(16, 16)] * 4 + [(32, 16)] * 3 + [(16, 48)]
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ref = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in ref]
    opt = Muon(params, lr=0.05, momentum=0.9, ns_steps=5, weight_decay=0.2)
    assert len(opt.buckets) == 3
    for _ in range(4):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        muon_reference_step(ref, grads, bufs, lr=0.05, momentum=0.9, wd=0.2, ns_steps=5)
    for p, r in zip(params, ref, strict=True):
        assert torch.allclose(p.detach(), r, atol=1e-5)
    # The update is not trivially zero: parameters moved.
    assert not torch.allclose(params[0].detach(), torch.randn(shapes[0], generator=gen))


# ---- OptimizerSet --------------------------------------------------------------------------------------

def reference_sets(model, cfg: OptimConfig):
    """Hand-built torch.optim.AdamW plus reference-Muon state for the same model."""
    groups = model.param_groups()
    embed_lr = cfg.tied_embed_lr if model.cfg.tie_embeddings else cfg.embed_lr
    adam_groups = [{"params": groups["embed"], "lr": embed_lr, "weight_decay": cfg.adam_wd},
                   {"params": groups["head"], "lr": cfg.head_lr, "weight_decay": cfg.adam_wd},
                   {"params": groups["scalar"], "lr": cfg.scalar_lr, "weight_decay": 0.0}]
    adam = torch.optim.AdamW([g for g in adam_groups if g["params"]], betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_eps)
    bufs = [torch.zeros_like(p) for p in groups["matrix"]]
    return adam, groups["matrix"], bufs


@pytest.mark.parametrize("tie", [True, False])
def test_optimizer_set_matches_adamw_and_reference_muon(tie):
    torch.manual_seed(4)
    model = TinyNet(tie_embeddings=tie)
    twin = copy.deepcopy(model)
    cfg = optim_cfg()
    opt = build_optimizers(model, cfg)
    adam, matrices, bufs = reference_sets(twin, cfg)
    gen = torch.Generator().manual_seed(5)
    for step in range(3):
        scale = 1.0 - 0.3 * step
        opt.set_lr_scale(scale)
        for g in adam.param_groups:
            g["lr"] = g.setdefault("base", g["lr"]) * scale
        grads = set_random_grads(model, gen)
        for name, p in twin.named_parameters():
            p.grad = grads[name].clone()
        opt.step()
        adam.step()
        muon_reference_step(matrices, [p.grad for p in matrices], bufs, lr=cfg.matrix_lr * scale,
                            momentum=cfg.muon_momentum, wd=cfg.muon_wd, ns_steps=cfg.muon_ns_steps)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5), name


def test_group_learning_rates_and_weight_decay():
    cfg = optim_cfg()
    for tie, embed_lr in ((True, cfg.tied_embed_lr), (False, cfg.embed_lr)):
        opt = build_optimizers(TinyNet(tie_embeddings=tie), cfg)
        by_name = {g["group"]: g for g in opt.adamw.param_groups}
        assert by_name["embed"]["lr"] == embed_lr and by_name["embed"]["weight_decay"] == cfg.adam_wd
        assert by_name["scalar"]["weight_decay"] == 0.0
        assert ("head" in by_name) == (not tie)
        opt.set_lr_scale(0.25)
        assert by_name["scalar"]["lr"] == pytest.approx(cfg.scalar_lr * 0.25)
        assert opt.muon.param_groups[0]["lr"] == pytest.approx(cfg.matrix_lr * 0.25)
        opt.set_muon_momentum(0.93)
        assert opt.muon.param_groups[0]["momentum"] == 0.93


def test_every_parameter_in_exactly_one_group():
    model = TinyNet(tie_embeddings=False)
    opt = build_optimizers(model, optim_cfg())
    owned = [p for o in opt.optimizers for g in o.param_groups for p in g["params"]]
    assert len(owned) == len({id(p) for p in owned}) == len(list(model.parameters()))

    dropped = TinyNet()
    full = dropped.param_groups
    dropped.param_groups = lambda: {**full(), "scalar": full()["scalar"][:-1]}
    with pytest.raises(AssertionError, match="final_gain"):
        build_optimizers(dropped, optim_cfg())
    doubled = TinyNet()
    both = doubled.param_groups()
    doubled.param_groups = lambda: {**both, "embed": both["embed"] + [doubled.blocks[0].gain]}
    with pytest.raises(AssertionError, match="both"):
        build_optimizers(doubled, optim_cfg())


def test_grad_clipping_uses_the_global_norm():
    torch.manual_seed(6)
    model = TinyNet(tie_embeddings=False)
    twin = copy.deepcopy(model)
    cfg = optim_cfg()
    opt = build_optimizers(model, cfg)
    grads = set_random_grads(model, torch.Generator().manual_seed(7))
    norm = torch.cat([g.flatten() for g in grads.values()]).norm()
    clip = 0.5 * norm.item()
    opt.step(grad_clip=clip)
    assert opt.last_grad_norm.item() == pytest.approx(norm.item(), rel=1e-5)
    # The same step on grads scaled by hand, without clipping, lands on the same weights.
    twin_opt = build_optimizers(twin, cfg)
    for name, p in twin.named_parameters():
        p.grad = grads[name] * (clip / (norm.item() + 1e-6))
    twin_opt.step(grad_clip=0.0)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)
    # Below the threshold nothing is scaled.
    set_random_grads(model, torch.Generator().manual_seed(8))
    before = [p.grad.clone() for p in opt.adam_params()]
    opt.step(grad_clip=1e6)
    assert all(torch.equal(b, p.grad) for b, p in zip(before, opt.adam_params(), strict=True))


def test_state_dict_resumes_exactly(tmp_path):
    torch.manual_seed(9)
    model = TinyNet(tie_embeddings=False)
    cfg = optim_cfg()
    opt = build_optimizers(model, cfg)
    gen = torch.Generator().manual_seed(10)
    for _ in range(2):
        set_random_grads(model, gen)
        opt.step(grad_clip=5.0)
    opt.set_lr_scale(0.7)
    opt.set_muon_momentum(0.91)
    state = opt.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    numbers = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    assert all(isinstance(v, int | float) for v in numbers.values())
    write_tensors(tmp_path / "opt.pgt", tensors, numbers)
    loaded, meta = read_tensors(tmp_path / "opt.pgt")

    resumed_model = copy.deepcopy(model)
    resumed = build_optimizers(resumed_model, cfg)
    resumed.load_state_dict({**loaded, **meta})
    for _ in range(2):
        grads = set_random_grads(model, gen)
        for name, p in resumed_model.named_parameters():
            p.grad = grads[name].clone()
        opt.step(grad_clip=5.0)
        resumed.step(grad_clip=5.0)
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(UserError):
        build_optimizers(copy.deepcopy(model), cfg).load_state_dict({"lr_scale": 1.0})


def test_training_reduces_loss_through_backward():
    torch.manual_seed(11)
    model = TinyNet(tie_embeddings=True)
    opt = build_optimizers(model, optim_cfg())
    ids = torch.randint(0, 32, (8, 12))
    targets = torch.roll(ids, -1, dims=1)
    first = None
    for _ in range(15):
        loss = model(ids, targets)
        first = loss.item() if first is None else first
        loss.backward()
        opt.step(grad_clip=1.0)
        opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert loss.item() < 0.8 * first


def test_builds_and_steps_the_real_gpt(tiny_cfg):
    gpt = pytest.importorskip("pgolf.model.gpt")
    torch.manual_seed(14)
    model = gpt.GPT(tiny_cfg.model)
    opt = build_optimizers(model, tiny_cfg.optim)
    owned = [p for o in opt.optimizers for g in o.param_groups for p in g["params"]]
    assert len(owned) == len({id(p) for p in owned}) == len(list(model.parameters()))
    ids = torch.randint(0, tiny_cfg.model.vocab_size, (2, 16))
    before = [p.detach().clone() for p in opt.muon.ordered_params()]
    model(ids, ids).backward()
    opt.step(grad_clip=tiny_cfg.optim.grad_clip)
    assert math.isfinite(opt.last_grad_norm.item())
    moved = [not torch.equal(b, p) for b, p in zip(before, opt.muon.ordered_params(), strict=True)]
    assert sum(moved) > len(moved) // 2  # zero-initialised pairs (e.g. bigram table -> proj) get no grad yet


@pytest.mark.gpu
def test_cuda_step_close_to_cpu_float32():
    torch.manual_seed(12)
    cpu_model = TinyNet(tie_embeddings=False)
    gpu_model = copy.deepcopy(cpu_model).cuda()
    cpu_opt, gpu_opt = build_optimizers(cpu_model, optim_cfg()), build_optimizers(gpu_model, optim_cfg())
    assert gpu_opt.adamw.param_groups[0]["fused"]
    gen = torch.Generator().manual_seed(13)
    for _ in range(3):
        grads = set_random_grads(cpu_model, gen)
        for name, p in gpu_model.named_parameters():
            p.grad = grads[name].cuda()
        cpu_opt.step(grad_clip=4.0)
        gpu_opt.step(grad_clip=4.0)
    assert gpu_opt.last_grad_norm.item() == pytest.approx(cpu_opt.last_grad_norm.item(), rel=1e-4)
    for p, q in zip(cpu_model.parameters(), gpu_model.parameters(), strict=True):
        assert torch.allclose(p, q.cpu(), atol=5e-3)  # Newton-Schulz runs in bfloat16 on CUDA


# ---- schedules -----------------------------------------------------------------------------------------

def test_lr_scale_with_wallclock_iters():
    # budget 100 s - 10 s reserve = 90 s; 100 steps in 45 s -> 0.45 s/step; warmdown 20 steps = 9 s,
    # so the warmdown runs over [81 s, 90 s].
    cfg = TrainConfig(wallclock_s=100.0, calib_reserve_s=10.0, warmdown_iters=20, warmdown_frac=0.0)
    assert lr_scale(100, 45.0, cfg) == 1.0
    assert lr_scale(180, 81.0, cfg) == pytest.approx(1.0)
    assert lr_scale(190, 85.5, cfg) == pytest.approx(0.5)
    assert lr_scale(200, 90.0, cfg) == 0.0
    assert lr_scale(210, 95.0, cfg) == 0.0
    assert lr_scale(0, 0.0, cfg) == 1.0


def test_lr_scale_with_wallclock_fraction():
    # budget 600 - 0 = 600 s; the last 25 % = 150 s -> warmdown over [450 s, 600 s].
    cfg = TrainConfig(wallclock_s=600.0, calib_reserve_s=0.0, warmdown_frac=0.25)
    assert lr_scale(7, 449.0, cfg) == 1.0
    assert lr_scale(7, 450.0, cfg) == pytest.approx(1.0)
    assert lr_scale(7, 525.0, cfg) == pytest.approx(0.5)
    assert lr_scale(7, 562.5, cfg) == pytest.approx(0.25)
    assert lr_scale(7, 600.0, cfg) == 0.0
    with pytest.raises(UserError, match="calib_reserve_s"):
        lr_scale(1, 1.0, TrainConfig(wallclock_s=10.0, calib_reserve_s=10.0))


def test_lr_scale_without_wallclock():
    cfg = TrainConfig(wallclock_s=0.0, max_steps=1000, warmdown_iters=200)
    assert lr_scale(0, 0.0, cfg) == 1.0
    assert lr_scale(800, 1e9, cfg) == 1.0
    assert lr_scale(900, 0.0, cfg) == pytest.approx(0.5)
    assert lr_scale(950, 0.0, cfg) == pytest.approx(0.25)
    assert lr_scale(1000, 0.0, cfg) == 0.0


def test_muon_momentum_warmup():
    cfg = OptimConfig(muon_momentum=0.95, muon_momentum_warmup_start=0.85, muon_momentum_warmup_steps=500)
    assert muon_momentum_at(0, cfg) == pytest.approx(0.85)
    assert muon_momentum_at(250, cfg) == pytest.approx(0.90)
    assert muon_momentum_at(500, cfg) == pytest.approx(0.95)
    assert muon_momentum_at(5000, cfg) == pytest.approx(0.95)
    assert muon_momentum_at(3, OptimConfig(muon_momentum_warmup_steps=0)) == OptimConfig().muon_momentum


# ---- two processes (gloo, CPU) -------------------------------------------------------------------------

DIST_STEPS = 3


def rank_grads(model, rank: int, step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return {name: torch.randn(p.shape, generator=gen) for name, p in model.named_parameters()}


def dist_worker(rank: int, world_size: int, out_dir: str, backend: str) -> None:
    store = os.path.join(out_dir, "store")  # a file rendezvous: no port to race other processes for
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(100 + rank)  # different init on each rank: broadcast_parameters must fix it
        model = TinyNet(tie_embeddings=False).to(device)
        broadcast_parameters(model)
        opt = build_optimizers(model, optim_cfg(), rank=rank, world_size=world_size)
        for step in range(DIST_STEPS):
            for name, p in model.named_parameters():
                p.grad = rank_grads(model, rank, step)[name].to(device)
            opt.step(grad_clip=4.0)
            opt.zero_grad()
        state = opt.state_dict()  # collective: whole momentum buffers on every rank
        tensors = {f"param/{n}": p.detach() for n, p in model.named_parameters()}
        tensors.update({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
        tensors["grad_norm"] = opt.last_grad_norm.reshape(1)
        write_tensors(os.path.join(out_dir, f"rank{rank}.pgt"), tensors, {})
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.threads"), "w") as f:
        f.write(str(len(gloo_threads())))


def gloo_threads() -> list[str]:
    """Names of this process's gloo threads (Linux): none may survive destroy_process_group."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return []
    names = []
    for t in os.listdir(tasks):
        with open(os.path.join(tasks, t, "comm")) as f:
            names.append(f.read().strip())
    return [n for n in names if "gloo" in n]


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.gpu)])
def test_two_process_sharded_step_equals_single_process(backend):
    if backend == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    # NCCL runs on the GPU, where Newton-Schulz runs in bfloat16: compare to the float32 CPU run loosely.
    atol = 1e-5 if backend == "gloo" else 5e-3
    # A private folder, not tmp_path: concurrent pytest runs of the same user prune each other's basetemp.
    with tempfile.TemporaryDirectory(prefix="pgolf-optim-dist-") as out_dir:
        mp.spawn(dist_worker, args=(2, out_dir, backend), nprocs=2, join=True)
        r0, _ = read_tensors(os.path.join(out_dir, "rank0.pgt"))
        r1, _ = read_tensors(os.path.join(out_dir, "rank1.pgt"))
        threads_left = [open(os.path.join(out_dir, f"rank{r}.threads")).read() for r in range(2)]
    if backend == "gloo" and os.path.isdir("/proc/self/task"):
        assert threads_left == ["0", "0"], f"gloo threads alive after destroy_process_group: {threads_left}"

    torch.manual_seed(100)  # rank 0's init, which the broadcast gave both ranks
    model = TinyNet(tie_embeddings=False)
    opt = build_optimizers(model, optim_cfg())
    for step in range(DIST_STEPS):
        g0, g1 = rank_grads(model, 0, step), rank_grads(model, 1, step)
        for name, p in model.named_parameters():
            p.grad = (g0[name] + g1[name]) / 2
        opt.step(grad_clip=4.0)
        opt.zero_grad()
    state = opt.state_dict()
    assert r0["grad_norm"].item() == pytest.approx(opt.last_grad_norm.item(), rel=1e-5)
    for name, p in model.named_parameters():
        assert torch.equal(r0[f"param/{name}"], r1[f"param/{name}"]), name
        assert torch.allclose(r0[f"param/{name}"], p.detach(), atol=atol), name
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert torch.allclose(r0[key], value, atol=atol), key
            assert torch.equal(r0[key], r1[key]), key
    assert math.isfinite(r0["grad_norm"].item())
