"""Muon: momentum, then Newton-Schulz orthogonalisation of each 2D update, for the block matrices.

The step follows the challenge baseline: Nesterov momentum on the (averaged) gradient, five quintic
Newton-Schulz iterations, a sqrt(max(1, rows/cols)) scale, decoupled weight decay, `p -= lr * update`.

There is no DDP in pgolf: Muon does its own communication, and 1 GPU and N GPUs run the same code.
Same-shape matrices form a bucket. A bucket's gradients are stacked (the stack padded to a multiple of
world_size) and reduce-scattered (averaged), so each rank owns a slice of the stack: it keeps the momentum
for that slice only, orthogonalises it in one batched call, and all-gathers the updates. Every bucket's
reduce-scatter is launched up front (`launch_reduce_scatter`), and each all-gather runs while the next
bucket is orthogonalised. At world_size 1 the slice is the whole stack and no collective runs.

Two options of the 2026 frontier record (shared/reference/frontier.md §4.1-4.2), both off by default:
`row_normalize` (MuonEq-R: each row of the Nesterov update divided by its L2 norm, floored at 1e-7, before
Newton-Schulz) and `polar_express` (a per-iteration (a, b, c) schedule, POLAR_EXPRESS_COEFFS, in place of the
one quintic NS_COEFFS; iterations past the schedule's end reuse its last entry).

`muon_reference_step` is the plain per-matrix version the batched, sharded step is tested against.
"""

import math

import torch
import torch.distributed as dist

from pgolf.errors import UserError

# Quintic Newton-Schulz coefficients (a, b, c): X <- a X + b (X X^T) X + c (X X^T)^2 X.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# Polar Express (PR #1344 of the challenge): one minimax-tuned (a, b, c) per iteration, for 5 iterations.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
ROW_NORM_FLOOR = 1e-7  # MuonEq-R: a row's L2 norm is floored here before dividing


def ns_coefficients(steps: int, polar_express: bool = False) -> list[tuple[float, float, float]]:
    """The (a, b, c) of each of `steps` iterations: NS_COEFFS every time, or the Polar Express schedule
    (its last entry repeated past its end)."""
    if not polar_express:
        return [NS_COEFFS] * steps
    last = len(POLAR_EXPRESS_COEFFS) - 1
    return [POLAR_EXPRESS_COEFFS[min(k, last)] for k in range(steps)]


def row_normalize_(update: torch.Tensor) -> torch.Tensor:
    """MuonEq-R, in place: each row (last dim) of a float32 update divided by max(its L2 norm, 1e-7)."""
    return update.div_(update.norm(dim=-1, keepdim=True).clamp_min(ROW_NORM_FLOOR))


def newton_schulz5(G: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None,
                   polar_express: bool = False) -> torch.Tensor:
    """Approximately orthogonalise G (..., rows, cols); leading dims are a batch.

    The iteration pushes every singular value into roughly [0.7, 1.2] rather than exactly 1, which is all
    Muon needs. dtype None runs in bfloat16 on CUDA and float32 elsewhere; the result has that dtype.
    Each iteration is three batched matmuls, the polynomial's scalars folded into them (baddbmm's beta and
    alpha), so a step issues 3 kernels per iteration instead of 8; `newton_schulz5_reference` is the plain
    formula it is tested against. polar_express: the per-iteration coefficients (ns_coefficients).
    """
    X, tall = _ns_prepare(G, dtype)
    batch_shape = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])
    for a, b, c in ns_coefficients(steps, polar_express):
        A = torch.bmm(X, X.mT)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2
        X = torch.baddbmm(X, B, X, beta=a)  # a X + B X
    X = X.reshape(*batch_shape, *X.shape[-2:])
    return X.mT if tall else X


def newton_schulz5_reference(G: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None,
                             polar_express: bool = False) -> torch.Tensor:
    """newton_schulz5 written term by term (the challenge baseline's form)."""
    X, tall = _ns_prepare(G, dtype)
    for a, b, c in ns_coefficients(steps, polar_express):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


def _ns_prepare(G: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, bool]:
    """G in the iteration's dtype, wide (rows <= cols), scaled to Frobenius norm ~1; and whether it was tall."""
    if G.ndim < 2:
        raise UserError(f"newton_schulz5: expected a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    if dtype is None:
        dtype = torch.bfloat16 if G.is_cuda else torch.float32
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    return X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7), tall


def muon_shape_scale(rows: int, cols: int) -> float:
    """Update scale that gives tall and wide matrices comparable per-element step sizes."""
    return math.sqrt(max(1.0, rows / cols))


@torch.no_grad()
def muon_reference_step(params, grads, bufs, lr: float, momentum: float, wd: float, ns_steps: int,
                        row_normalize: bool = False, polar_express: bool = False) -> None:
    """One Muon step, one matrix at a time, no batching or sharding, the plain Newton-Schulz; updates params
    and bufs in place."""
    for p, g, buf in zip(params, grads, bufs, strict=True):
        buf.mul_(momentum).add_(g)
        g = g + momentum * buf
        if row_normalize:
            g = g / g.norm(dim=-1, keepdim=True).clamp_min(ROW_NORM_FLOOR)
        update = newton_schulz5_reference(g, ns_steps, polar_express=polar_express)
        p.mul_(1.0 - lr * wd)
        p.add_(update.to(p.dtype), alpha=-lr * muon_shape_scale(p.size(-2), p.size(-1)))


def _all_gather_tensor(output: torch.Tensor, inp: torch.Tensor):
    """Async all-gather into one tensor (all_gather_single in new torch, all_gather_into_tensor before)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, inp, async_op=True)


def _reduce_scatter_sum(output: torch.Tensor, inp: torch.Tensor):
    """Async summing reduce-scatter (reduce_scatter_single in new torch, reduce_scatter_tensor before)."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return scatter(output, inp, op=dist.ReduceOp.SUM, async_op=True)


class MuonBucket:
    """Same-shape matrices of one param group, and this rank's slice of their stack."""

    def __init__(self, group_index: int, params: list, rank: int, world_size: int):
        self.group_index = group_index
        self.params = params
        self.shape = tuple(params[0].shape)
        self.padded = math.ceil(len(params) / world_size) * world_size
        self.per_rank = self.padded // world_size
        self.start = rank * self.per_rank  # first stack index this rank owns
        self.momentum = None  # (per_rank, rows, cols) float32, created on the first step
        self.pending = None  # (work handle or None, local grad slice) between launch and step


class Muon(torch.optim.Optimizer):
    """Muon over 2D parameters; see the module docstring for the sharded step.

    All ranks must hold the same parameters in the same order. Params that received no gradient count as
    a zero gradient, so that every rank joins the same collectives.
    """

    def __init__(self, params, lr: float, momentum: float = 0.95, ns_steps: int = 5, weight_decay: float = 0.0,
                 rank: int = 0, world_size: int = 1, row_normalize: bool = False, polar_express: bool = False):
        defaults = dict(lr=lr, momentum=momentum, ns_steps=ns_steps, weight_decay=weight_decay,
                        row_normalize=row_normalize, polar_express=polar_express)
        super().__init__(params, defaults)
        if not 0 <= rank < world_size:
            raise UserError(f"Muon: rank {rank} is outside world_size {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.buckets: list[MuonBucket] = []
        for gi, group in enumerate(self.param_groups):
            by_shape: dict[tuple, list] = {}
            for p in group["params"]:
                if p.ndim != 2:
                    raise UserError(f"Muon: parameter of shape {tuple(p.shape)} is not a matrix")
                by_shape.setdefault(tuple(p.shape), []).append(p)
            for plist in by_shape.values():
                self.buckets.append(MuonBucket(gi, plist, rank, world_size))
        # Largest buckets first: their communication has the most time to hide behind later work.
        self.buckets.sort(key=lambda bk: -bk.padded * bk.params[0].numel())

    def _distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    @torch.no_grad()
    def launch_reduce_scatter(self) -> None:
        """Stack each bucket's grads and start averaging them onto the owning ranks (async)."""
        for bk in self.buckets:
            if bk.pending is not None:
                continue
            p0 = bk.params[0]
            grads = [p.grad for p in bk.params]
            if bk.padded > len(grads) or any(g is None for g in grads):
                zero = torch.zeros(bk.shape, dtype=torch.float32, device=p0.device)
                grads = [zero if g is None else g for g in grads] + [zero] * (bk.padded - len(grads))
            stack = torch.stack(grads).float()  # one copy kernel for the whole bucket
            if self._distributed():
                local = torch.empty((bk.per_rank, *bk.shape), dtype=torch.float32, device=p0.device)
                work = _reduce_scatter_sum(local, stack)
                bk.pending = (work, local)
            else:
                bk.pending = (None, stack)

    def _local_grad(self, bk: MuonBucket) -> torch.Tensor:
        """Wait for a bucket's reduce-scatter; returns this rank's averaged slice (kept for the step)."""
        work, local = bk.pending
        if work is not None:
            work.wait()
            local.div_(self.world_size)
            bk.pending = (None, local)
        return local

    @torch.no_grad()
    def local_grad_sq_norm(self) -> torch.Tensor:
        """Squared norm of this rank's slices of the averaged grads (padding is zero); sum over ranks for all."""
        self.launch_reduce_scatter()
        if not self.buckets:
            return torch.zeros(())
        norms = torch._foreach_norm([self._local_grad(bk) for bk in self.buckets])
        return torch.stack(norms).square().sum()

    @torch.no_grad()
    def step(self, closure=None, grad_scale: torch.Tensor | float | None = None):
        """Momentum + Newton-Schulz on this rank's slices, all-gather, apply. grad_scale (a float or a 0-dim
        tensor, so that clipping needs no host sync) multiplies the averaged grads first."""
        if closure is not None:
            raise UserError("Muon.step does not take a closure")
        self.launch_reduce_scatter()
        in_flight = None  # (bucket, gather handle or None, gathered updates)
        for bk in self.buckets:
            group = self.param_groups[bk.group_index]
            g = self._local_grad(bk)
            bk.pending = None
            if grad_scale is not None:
                g.mul_(grad_scale)
            if bk.momentum is None:
                bk.momentum = torch.zeros_like(g)
            bk.momentum.mul_(group["momentum"]).add_(g)
            g.add_(bk.momentum, alpha=group["momentum"])
            if group["row_normalize"]:
                row_normalize_(g)  # the padding's zero rows stay zero
            update = newton_schulz5(g, group["ns_steps"], polar_express=group["polar_express"])
            if self._distributed():
                gathered = torch.empty((bk.padded, *bk.shape), dtype=update.dtype, device=update.device)
                work = _all_gather_tensor(gathered, update.contiguous())
            else:
                gathered, work = update, None
            if in_flight is not None:
                self._apply(*in_flight)
            in_flight = (bk, work, gathered)
        if in_flight is not None:
            self._apply(*in_flight)

    def _apply(self, bk: MuonBucket, work, gathered: torch.Tensor) -> None:
        if work is not None:
            work.wait()
        group = self.param_groups[bk.group_index]
        lr, wd = group["lr"], group["weight_decay"]
        params = bk.params
        updates = gathered[:len(params)].to(params[0].dtype).unbind(0)
        if wd != 0.0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_add_(params, updates, alpha=-lr * muon_shape_scale(*bk.shape))

    @torch.no_grad()
    def full_momentum(self) -> list[torch.Tensor | None]:
        """Every param's whole momentum buffer (None before the first step), in the order of the buckets'
        params. Collective when sharded: every rank must call it."""
        out = []
        for bk in self.buckets:
            if bk.momentum is None:
                out.extend([None] * len(bk.params))
                continue
            if self._distributed():
                full = torch.empty((bk.padded, *bk.shape), dtype=bk.momentum.dtype, device=bk.momentum.device)
                _all_gather_tensor(full, bk.momentum.contiguous()).wait()
            else:
                full = bk.momentum
            out.extend(full[i].clone() for i in range(len(bk.params)))
        return out

    @torch.no_grad()
    def load_full_momentum(self, buffers: list[torch.Tensor | None]) -> None:
        """Inverse of full_momentum: each rank keeps its own slice."""
        count = sum(len(bk.params) for bk in self.buckets)
        if len(buffers) != count:
            raise UserError(f"Muon momentum state has {len(buffers)} buffers, the optimizer {count} matrices")
        flat = iter(buffers)
        for bk in self.buckets:
            mine = [next(flat) for _ in bk.params]
            if all(b is None for b in mine):
                bk.momentum = None
                continue
            p0 = bk.params[0]
            full = torch.zeros((bk.padded, *bk.shape), dtype=torch.float32, device=p0.device)
            for i, b in enumerate(mine):
                if b is None or tuple(b.shape) != bk.shape:
                    raise UserError(f"Muon momentum for a {bk.shape} matrix is missing or has the wrong shape")
                full[i].copy_(b)
            bk.momentum = full[bk.start:bk.start + bk.per_rank].clone()

    def ordered_params(self) -> list:
        """The params in the order full_momentum / load_full_momentum use."""
        return [p for bk in self.buckets for p in bk.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear grads, and drop a launched reduce-scatter that no step consumed."""
        for bk in self.buckets:
            if bk.pending is not None:
                self._local_grad(bk)
                bk.pending = None
        super().zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """{"momentum": whole buffers in ordered_params order, "groups": hyperparameters}. Collective when
        sharded."""
        keys = ("lr", "momentum", "ns_steps", "weight_decay")
        return {"momentum": self.full_momentum(),
                "groups": [{k: g[k] for k in keys} for g in self.param_groups]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["groups"]) != len(self.param_groups):
            raise UserError(f"Muon state has {len(state['groups'])} param groups, the optimizer "
                            f"{len(self.param_groups)}")
        for group, saved in zip(self.param_groups, state["groups"], strict=True):
            group.update(saved)
        self.load_full_momentum(state["momentum"])
