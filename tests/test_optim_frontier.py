"""The frontier record's optimizer options (shared/reference/frontier.md §4): MuonEq-R row normalisation,
Polar-Express Newton-Schulz coefficients, separate embed / scalar AdamW weight decay, the MIN_LR floor."""

import copy
import dataclasses
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from test_optim import TinyNet, optim_cfg, rank_grads, set_random_grads

from pgolf.config import OptimConfig, RunConfig, TrainConfig
from pgolf.dist import init_process_group
from pgolf.errors import UserError
from pgolf.export.hyperparams import env_name_for, env_table
from pgolf.optim.builder import broadcast_parameters, build_optimizers
from pgolf.optim.muon import (
    NS_COEFFS,
    POLAR_EXPRESS_COEFFS,
    Muon,
    muon_reference_step,
    newton_schulz5,
    newton_schulz5_reference,
    ns_coefficients,
    row_normalize_,
)
from pgolf.optim.schedules import lr_scale, warmdown_scale
from pgolf.recipes import RECIPES
from pgolf.tensorfile import read_tensors, write_tensors

FRONTIER = dict(muon_row_normalize=True, muon_polar_express=True, embed_wd=0.085, scalar_wd=0.02)


def conditioned(shape, seed: int, log_lo: float = -2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A matrix of the given shape with singular values logspace(log_lo, 0), and its singular bases."""
    gen = torch.Generator().manual_seed(seed)
    U, _, Vh = torch.linalg.svd(torch.randn(shape, generator=gen), full_matrices=False)
    return U @ torch.diag(torch.logspace(log_lo, 0, min(shape))) @ Vh, U, Vh


# ---- Newton-Schulz coefficients -----------------------------------------------------------------------

def test_coefficient_schedules():
    assert ns_coefficients(5) == [NS_COEFFS] * 5
    assert ns_coefficients(5, polar_express=True) == list(POLAR_EXPRESS_COEFFS)
    assert ns_coefficients(3, polar_express=True) == list(POLAR_EXPRESS_COEFFS[:3])
    # past the schedule's end its last (converged) entry repeats
    assert ns_coefficients(7, polar_express=True)[5:] == [POLAR_EXPRESS_COEFFS[-1]] * 2
    assert POLAR_EXPRESS_COEFFS[0] == (8.156554524902461, -22.48329292557795, 15.878769915207462)


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (96, 16)])
def test_polar_express_orthogonalises_closer_than_the_quintic(shape):
    G, U, Vh = conditioned(shape, seed=0)
    quintic = torch.linalg.svdvals(newton_schulz5(G, 5))
    X = newton_schulz5(G, 5, polar_express=True)
    polar = torch.linalg.svdvals(X)
    assert polar.min() > 0.84 and polar.max() < 1.15, (polar.min().item(), polar.max().item())
    assert (polar - 1).abs().mean() < 0.6 * (quintic - 1).abs().mean()
    D = U.mT @ X @ Vh.mT  # singular vectors kept: diagonal in G's bases
    assert (D - torch.diag(torch.diagonal(D))).abs().max() < 1e-4


@pytest.mark.parametrize("shape", [(24, 40), (3, 40, 24), (2, 3, 16, 16)])
def test_polar_express_fused_matmuls_match_the_plain_formula(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    fused = newton_schulz5(G, polar_express=True)
    plain = newton_schulz5_reference(G, polar_express=True)
    assert torch.allclose(fused, plain, atol=1e-5)
    assert not torch.allclose(fused, newton_schulz5(G), atol=1e-2)  # other coefficients really ran


def test_default_coefficients_are_the_quintic_bit_for_bit():
    G = torch.randn(4, 24, 40, generator=torch.Generator().manual_seed(2))
    X = G / (G.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    a, b, c = NS_COEFFS
    for _ in range(5):
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    assert torch.equal(newton_schulz5_reference(G), X)
    assert torch.equal(newton_schulz5(G, polar_express=False), newton_schulz5(G))


# ---- MuonEq-R ------------------------------------------------------------------------------------------

def test_row_normalize_gives_unit_rows_and_keeps_zero_rows():
    u = torch.randn(3, 6, 5) * torch.logspace(-3, 3, 6)[:, None]
    u[1, 2] = 0.0
    out = row_normalize_(u.clone())
    norms = out.norm(dim=-1)
    assert torch.allclose(norms[0], torch.ones(6), atol=1e-6)
    assert norms[1, 2] == 0.0 and torch.isfinite(out).all()
    assert torch.allclose(out, u / u.norm(dim=-1, keepdim=True).clamp_min(1e-7))


@pytest.mark.parametrize("row_normalize,polar_express", [(True, False), (False, True), (True, True)])
def test_muon_batched_matches_reference_with_frontier_options(row_normalize, polar_express):
    gen = torch.Generator().manual_seed(3)
    shapes = [(16, 16)] * 4 + [(32, 16)] * 3 + [(16, 48)]
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ref = [p.detach().clone() for p in params]
    plain = [p.detach().clone() for p in params]
    bufs, plain_bufs = [torch.zeros_like(p) for p in ref], [torch.zeros_like(p) for p in ref]
    opt = Muon(params, lr=0.05, momentum=0.9, ns_steps=5, weight_decay=0.2, row_normalize=row_normalize,
               polar_express=polar_express)
    for _ in range(4):
        # rows of very different scales: what the row normalisation changes
        grads = [torch.randn(s, generator=gen) * torch.logspace(-2, 2, s[0])[:, None] for s in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()
        muon_reference_step(ref, grads, bufs, lr=0.05, momentum=0.9, wd=0.2, ns_steps=5,
                            row_normalize=row_normalize, polar_express=polar_express)
        muon_reference_step(plain, grads, plain_bufs, lr=0.05, momentum=0.9, wd=0.2, ns_steps=5)
    for p, r in zip(params, ref, strict=True):
        assert torch.allclose(p.detach(), r, atol=1e-5)
    assert max((p.detach() - q).abs().max().item() for p, q in zip(params, plain, strict=True)) > 1e-3


def test_optimizer_set_passes_the_muon_options():
    opt = build_optimizers(TinyNet(), optim_cfg(**FRONTIER))
    group = opt.muon.param_groups[0]
    assert group["row_normalize"] and group["polar_express"]
    default = build_optimizers(TinyNet(), optim_cfg()).muon.param_groups[0]
    assert not default["row_normalize"] and not default["polar_express"]


# ---- weight-decay groups -------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [True, False])
def test_embed_and_scalar_weight_decay(tie):
    cfg = optim_cfg(adam_wd=0.05, embed_wd=0.085, scalar_wd=0.02)
    by_name = {g["group"]: g for g in build_optimizers(TinyNet(tie_embeddings=tie), cfg).adamw.param_groups}
    assert by_name["embed"]["weight_decay"] == 0.085
    assert by_name["scalar"]["weight_decay"] == 0.02
    assert tie or by_name["head"]["weight_decay"] == 0.05
    # defaults: the embed group follows adam_wd, scalars get none (every recipe as before)
    assert OptimConfig().embed_wd < 0 and OptimConfig().scalar_wd == 0.0
    by_name = {g["group"]: g for g in build_optimizers(TinyNet(tie_embeddings=tie), optim_cfg()).adamw.param_groups}
    assert by_name["embed"]["weight_decay"] == optim_cfg().adam_wd and by_name["scalar"]["weight_decay"] == 0.0


def test_frontier_optimizer_set_matches_hand_built_adamw_and_reference_muon():
    torch.manual_seed(4)
    model = TinyNet(tie_embeddings=False)
    twin = copy.deepcopy(model)
    cfg = optim_cfg(**FRONTIER)
    opt = build_optimizers(model, cfg)
    groups = twin.param_groups()
    adam = torch.optim.AdamW([{"params": groups["embed"], "lr": cfg.embed_lr, "weight_decay": 0.085},
                              {"params": groups["head"], "lr": cfg.head_lr, "weight_decay": cfg.adam_wd},
                              {"params": groups["scalar"], "lr": cfg.scalar_lr, "weight_decay": 0.02}],
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    matrices, bufs = groups["matrix"], [torch.zeros_like(p) for p in groups["matrix"]]
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        grads = set_random_grads(model, gen)
        for name, p in twin.named_parameters():
            p.grad = grads[name].clone()
        opt.step()
        adam.step()
        muon_reference_step(matrices, [p.grad for p in matrices], bufs, lr=cfg.matrix_lr, momentum=cfg.muon_momentum,
                            wd=cfg.muon_wd, ns_steps=cfg.muon_ns_steps, row_normalize=True, polar_express=True)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5), name


# ---- the MIN_LR floor ----------------------------------------------------------------------------------

def record_lr_mul(frac: float, warmdown_frac: float, min_lr: float) -> float:
    """The frontier record's multiplier as frontier.md §4.4 states it."""
    if frac >= 1.0 - warmdown_frac:
        return max((1.0 - frac) / warmdown_frac, min_lr)
    return 1.0


def test_lr_floor_matches_the_record_schedule():
    cfg = TrainConfig(wallclock_s=600.0, calib_reserve_s=0.5, warmdown_frac=0.85, min_lr=0.1)
    budget = 599.5
    for frac in (0.0, 0.1, 0.15, 0.3, 0.5, 0.9, 0.914, 0.916, 0.99, 1.0, 1.2):
        assert lr_scale(100, frac * budget, cfg) == pytest.approx(record_lr_mul(frac, 0.85, 0.1), abs=1e-9), frac
    assert lr_scale(100, budget, cfg) == 0.1  # the floor holds to the end, where the plain warmdown is 0
    assert warmdown_scale(100, budget, cfg) == 0.0


@pytest.mark.parametrize("cfg", [TrainConfig(wallclock_s=100.0, calib_reserve_s=10.0, warmdown_iters=20),
                                 TrainConfig(wallclock_s=600.0, warmdown_frac=0.25),
                                 TrainConfig(wallclock_s=0.0, max_steps=1000, warmdown_iters=200)])
def test_lr_floor_in_every_schedule_and_off_by_default(cfg):
    floored = dataclasses.replace(cfg, min_lr=0.3)
    for step, elapsed in ((0, 0.0), (100, 45.0), (190, 85.5), (900, 500.0), (1000, 600.0), (210, 95.0)):
        plain = lr_scale(step, elapsed, cfg)
        assert plain == warmdown_scale(step, elapsed, cfg)  # min_lr 0: the schedule as it was
        assert lr_scale(step, elapsed, floored) == max(0.3, plain)
    for bad in (-0.1, 1.5):
        with pytest.raises(UserError, match="train.min_lr"):
            lr_scale(0, 0.0, dataclasses.replace(cfg, min_lr=bad))


# ---- config and export ---------------------------------------------------------------------------------

def test_every_recipe_but_frontier_leaves_the_frontier_options_off():
    for name, make in RECIPES.items():
        if name in ("frontier", "pr1948"):  # tests/test_frontier_recipe.py and test_recipes.py check them
            continue
        cfg = make()
        o, t, m = cfg.optim, cfg.train, cfg.model
        assert not (o.muon_row_normalize or o.muon_polar_express or m.fused_ce)
        # the seeds of the #414 lineage decay their scalars (0.04: shared/reference/seed-systems.md)
        assert o.embed_wd < 0 and o.scalar_wd == (0.04 if name in ("pr493", "pr535", "pr1062") else 0.0)
        assert t.min_lr == 0.0


def test_export_env_names_follow_the_frontier_script():
    names = {key: env_name_for(key) for key in ("optim.muon_row_normalize", "optim.embed_wd", "optim.scalar_wd",
                                                 "train.min_lr", "model.fused_ce")}
    assert names == {"optim.muon_row_normalize": "MUON_ROW_NORMALIZE", "optim.embed_wd": "EMBED_WD",
                     "optim.scalar_wd": "SCALAR_WD", "train.min_lr": "MIN_LR", "model.fused_ce": "FUSED_CE_ENABLED"}
    assert env_name_for("optim.muon_polar_express") == "OPTIM_MUON_POLAR_EXPRESS"
    env_table(RunConfig())  # no two fields share an env var


# ---- two processes (gloo, CPU): the sharded step with the options -------------------------------------

FRONTIER_STEPS = 3


def frontier_worker(rank: int, world_size: int, out_dir: str) -> None:
    init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                       world_size=world_size)
    try:
        torch.manual_seed(100)
        model = TinyNet(tie_embeddings=False)
        broadcast_parameters(model)
        opt = build_optimizers(model, optim_cfg(**FRONTIER), rank=rank, world_size=world_size)
        for step in range(FRONTIER_STEPS):
            for name, p in model.named_parameters():
                p.grad = rank_grads(model, rank, step)[name]
            opt.step(grad_clip=4.0)
            opt.zero_grad()
        write_tensors(os.path.join(out_dir, f"rank{rank}.pgt"),
                      {n: p.detach() for n, p in model.named_parameters()}, {})
    finally:
        dist.destroy_process_group()


def test_two_process_sharded_frontier_step_equals_single_process():
    with tempfile.TemporaryDirectory(prefix="pgolf-optim-frontier-") as out_dir:
        mp.spawn(frontier_worker, args=(2, out_dir), nprocs=2, join=True)
        r0, _ = read_tensors(os.path.join(out_dir, "rank0.pgt"))
        r1, _ = read_tensors(os.path.join(out_dir, "rank1.pgt"))
    torch.manual_seed(100)
    model = TinyNet(tie_embeddings=False)
    opt = build_optimizers(model, optim_cfg(**FRONTIER))
    for step in range(FRONTIER_STEPS):
        g0, g1 = rank_grads(model, 0, step), rank_grads(model, 1, step)
        for name, p in model.named_parameters():
            p.grad = (g0[name] + g1[name]) / 2
        opt.step(grad_clip=4.0)
        opt.zero_grad()
    for name, p in model.named_parameters():
        assert torch.equal(r0[name], r1[name]), name
        assert torch.allclose(r0[name], p.detach(), atol=1e-5), name
