"""The optimizer set of a run: Muon for the block matrices, AdamW for everything else.

`build_optimizers(model, cfg, rank, world_size)` reads `model.param_groups()`:

| group    | optimizer | lr                                                   | weight decay |
|----------|-----------|------------------------------------------------------|--------------|
| `matrix` | Muon      | `matrix_lr`                                          | `muon_wd`    |
| `embed`  | AdamW     | `tied_embed_lr` if `model.cfg.tie_embeddings` else `embed_lr` | `embed_wd` (< 0: `adam_wd`) |
| `head`   | AdamW     | `head_lr`                                            | `adam_wd`    |
| `scalar` | AdamW     | `scalar_lr`                                          | `scalar_wd`  |

With `aux_proj_group=scalar` the bigram and VE projections (`model.aux_projection_weights()`) move from
`matrix` to `scalar`, as #1176 trains them.

By default scalars (gains, scales, gates, skip weights) get no weight decay (`scalar_wd` 0): most start at 1
or at a tuned value, and decay pulls them toward 0; the seeds and the frontier record decay them a little
(0.02-0.04), and the record gives the embedding its own 0.085 (`embed_wd`). Muon takes
`muon_row_normalize` (MuonEq-R) and `muon_polar_express` (pgolf.optim.muon).

There is no DDP wrapper. `OptimizerSet.step` averages the gradients itself: AdamW's by coalesced async
all-reduces, Muon's by the reduce-scatter of its sharded step. Clipping (`clip_scope=global`) uses the global
norm of the averaged gradients, exact across ranks; `clip_scope=local` clips each rank's own gradients by
their own norm before anything is averaged, as #1176 does (the same thing on one process). On one process (or
without an initialised process group) no collective runs.
"""

import torch
import torch.distributed as dist

from pgolf.config import OptimConfig
from pgolf.errors import UserError
from pgolf.optim.muon import Muon
from pgolf.optim.schedules import muon_momentum_at

OPTIM_GROUP_KEYS = ("matrix", "embed", "head", "scalar")
ALLREDUCE_BUCKET_BYTES = 32 * 1024 * 1024


def optim_distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def check_param_groups(model, groups: dict) -> None:
    """Every model parameter is in exactly one group, and only known group keys appear."""
    unknown = sorted(set(groups) - set(OPTIM_GROUP_KEYS))
    if unknown:
        raise AssertionError(f"param_groups() returned unknown group(s) {unknown}; valid: {OPTIM_GROUP_KEYS}")
    seen: dict[int, str] = {}
    for key, params in groups.items():
        for p in params:
            if id(p) in seen:
                raise AssertionError(f"a parameter is in both param group {seen[id(p)]!r} and {key!r}")
            seen[id(p)] = key
    names = {id(p): n for n, p in model.named_parameters()}
    missing = sorted(n for i, n in names.items() if i not in seen)
    if missing:
        raise AssertionError(f"parameters in no optimizer group: {missing}")
    foreign = len(set(seen) - set(names))
    if foreign:
        raise AssertionError(f"{foreign} parameter(s) in param_groups() are not the model's")


class OptimizerSet:
    """Muon + AdamW with one step, one zero_grad, one lr scale and one flat state dict."""

    def __init__(self, muon: Muon | None, adamw: torch.optim.AdamW | None, param_names: dict[int, str],
                 world_size: int, clip_scope: str = "global"):
        if clip_scope not in ("global", "local"):
            raise UserError(f"optim.clip_scope={clip_scope!r} is not one of global|local")
        self.clip_scope = clip_scope
        self.muon = muon
        self.adamw = adamw
        self.param_names = param_names
        self.world_size = world_size
        self.lr_scale = 1.0
        self.muon_momentum = muon.param_groups[0]["momentum"] if muon is not None else 0.0
        self.last_grad_norm: torch.Tensor | None = None  # set by step() when clipping

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [opt for opt in (self.muon, self.adamw) if opt is not None]

    def __iter__(self):
        return iter(self.optimizers)

    def adam_params(self) -> list[torch.nn.Parameter]:
        if self.adamw is None:
            return []
        return [p for g in self.adamw.param_groups for p in g["params"]]

    def all_params(self) -> list[torch.nn.Parameter]:
        muon = [p for g in self.muon.param_groups for p in g["params"]] if self.muon is not None else []
        return muon + self.adam_params()

    @torch.no_grad()
    def clip_local_grads(self, grad_clip: float) -> None:
        """optim.clip_scope=local: scale this rank's own grads to norm <= grad_clip before any averaging."""
        grads = [p.grad for p in self.all_params() if p.grad is not None]
        if not grads:
            return
        norm = torch.stack(torch._foreach_norm([g.float() for g in grads])).square().sum().sqrt()
        self.last_grad_norm = norm
        torch._foreach_mul_(grads, (grad_clip / (norm + 1e-6)).clamp(max=1.0))

    @torch.no_grad()
    def step(self, grad_clip: float = 0.0) -> None:
        """Average grads across ranks, clip (0 = off; to the global norm, or each rank's own first with
        clip_scope=local), step AdamW and Muon."""
        if grad_clip > 0 and self.clip_scope == "local":
            self.clip_local_grads(grad_clip)
            grad_clip = 0.0
        if self.muon is not None:
            self.muon.launch_reduce_scatter()
        adam_grads = [p.grad for p in self.adam_params() if p.grad is not None]
        self._all_reduce_mean(adam_grads)
        scale = None
        if grad_clip > 0:
            norm = self._global_grad_norm(adam_grads)
            self.last_grad_norm = norm
            scale = (grad_clip / (norm + 1e-6)).clamp(max=1.0)
            if adam_grads:
                torch._foreach_mul_(adam_grads, scale.to(adam_grads[0].device))
        if self.adamw is not None:
            self.adamw.step()
        if self.muon is not None:
            self.muon.step(grad_scale=scale)

    def _all_reduce_mean(self, grads: list[torch.Tensor]) -> None:
        """Average grads over ranks: flat buckets per (device, dtype), all launched async, then unpacked."""
        if not grads or not optim_distributed(self.world_size):
            return
        buckets: list[list[torch.Tensor]] = []
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for g in grads:
            by_kind.setdefault((g.device, g.dtype), []).append(g)
        for same in by_kind.values():
            current, size = [], 0
            for g in same:
                if current and size + g.numel() * g.element_size() > ALLREDUCE_BUCKET_BYTES:
                    buckets.append(current)
                    current, size = [], 0
                current.append(g)
                size += g.numel() * g.element_size()
            buckets.append(current)
        launched = []
        for bucket in buckets:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            launched.append((bucket, flat, dist.all_reduce(flat, op=dist.ReduceOp.SUM, async_op=True)))
        for bucket, flat, work in launched:
            work.wait()
            flat.div_(self.world_size)
            for g, part in zip(bucket, flat.split([g.numel() for g in bucket]), strict=True):
                g.copy_(part.view_as(g))

    def _global_grad_norm(self, adam_grads: list[torch.Tensor]) -> torch.Tensor:
        """sqrt(sum of squares) over every averaged grad; Muon's sharded part is summed across ranks."""
        device = self._device()
        sq = torch.zeros((), dtype=torch.float32, device=device)
        if self.muon is not None:
            sq = sq + self.muon.local_grad_sq_norm().to(device)
            if optim_distributed(self.world_size):
                dist.all_reduce(sq, op=dist.ReduceOp.SUM)
        if adam_grads:
            norms = torch._foreach_norm([g.float() for g in adam_grads])
            sq = sq + torch.stack(norms).to(device).square().sum()
        return sq.sqrt()

    def _device(self) -> torch.device:
        for opt in self.optimizers:
            return opt.param_groups[0]["params"][0].device
        return torch.device("cpu")

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def set_lr_scale(self, s: float) -> None:
        """Every group's lr becomes its base lr times s."""
        self.lr_scale = float(s)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * self.lr_scale

    def set_muon_momentum(self, m: float) -> None:
        self.muon_momentum = float(m)
        if self.muon is not None:
            for g in self.muon.param_groups:
                g["momentum"] = self.muon_momentum

    def state_dict(self) -> dict:
        """Flat {key: tensor or number}, keyed by parameter name. Collective when Muon is sharded: every
        rank must call it (each gets the whole state)."""
        out: dict = {"lr_scale": self.lr_scale, "muon_momentum": self.muon_momentum}
        if self.muon is not None:
            for p, buf in zip(self.muon.ordered_params(), self.muon.full_momentum(), strict=True):
                if buf is not None:
                    out[f"muon/momentum/{self.param_names[id(p)]}"] = buf
        if self.adamw is not None:
            for p in self.adam_params():
                for key, value in self.adamw.state.get(p, {}).items():
                    out[f"adamw/{key}/{self.param_names[id(p)]}"] = value.detach().clone()
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned (tensors may come back on the CPU)."""
        for key in ("lr_scale", "muon_momentum"):
            if key not in state:
                raise UserError(f"optimizer state has no {key!r}")
        if self.muon is not None:
            self.muon.load_full_momentum(
                [state.get(f"muon/momentum/{self.param_names[id(p)]}") for p in self.muon.ordered_params()])
        if self.adamw is not None:
            self._load_adamw(state)
        self.set_lr_scale(float(state["lr_scale"]))
        self.set_muon_momentum(float(state["muon_momentum"]))

    def _load_adamw(self, state: dict) -> None:
        adam_state = {}
        for i, p in enumerate(self.adam_params()):
            name = self.param_names[id(p)]
            entry = {k: state[f"adamw/{k}/{name}"] for k in ("step", "exp_avg", "exp_avg_sq")
                     if f"adamw/{k}/{name}" in state}
            if entry and len(entry) != 3:
                raise UserError(f"optimizer state for {name!r} has only {sorted(entry)}")
            if entry:
                adam_state[i] = entry
        groups = self.adamw.state_dict()["param_groups"]
        self.adamw.load_state_dict({"state": adam_state, "param_groups": groups})


def build_optimizers(model, cfg: OptimConfig, rank: int = 0, world_size: int = 1) -> OptimizerSet:
    """Muon over the `matrix` group, one AdamW over `embed` / `head` / `scalar` (see the module docstring)."""
    groups = regroup_aux_projections(model, model.param_groups(), cfg.aux_proj_group)
    check_param_groups(model, groups)
    names = {id(p): n for n, p in model.named_parameters()}
    tied = bool(model.cfg.tie_embeddings)
    muon = None
    if groups.get("matrix"):
        muon = Muon(groups["matrix"], lr=cfg.matrix_lr, momentum=muon_momentum_at(0, cfg),
                    ns_steps=cfg.muon_ns_steps, weight_decay=cfg.muon_wd, rank=rank, world_size=world_size,
                    row_normalize=cfg.muon_row_normalize, polar_express=cfg.muon_polar_express)
        muon.param_groups[0]["base_lr"] = cfg.matrix_lr
    adam_groups = []
    embed_wd = cfg.adam_wd if cfg.embed_wd < 0 else cfg.embed_wd
    for key, lr, wd in (("embed", cfg.tied_embed_lr if tied else cfg.embed_lr, embed_wd),
                        ("head", cfg.head_lr, cfg.adam_wd),
                        ("scalar", cfg.scalar_lr, cfg.scalar_wd)):
        if groups.get(key):
            adam_groups.append({"params": list(groups[key]), "lr": lr, "base_lr": lr, "weight_decay": wd,
                                "group": key})
    adamw = None
    if adam_groups:
        on_cuda = all(p.is_cuda for g in adam_groups for p in g["params"])
        adamw = torch.optim.AdamW(adam_groups, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                                  fused=True if on_cuda else None)
    return OptimizerSet(muon, adamw, names, world_size, clip_scope=cfg.clip_scope)


def regroup_aux_projections(model, groups: dict, where: str) -> dict:
    """optim.aux_proj_group: the model's auxiliary projections (aux_projection_weights) stay in `matrix`
    (Muon) or move to `scalar` (AdamW at scalar_lr / scalar_wd)."""
    if where == "matrix":
        return groups
    if where != "scalar":
        raise UserError(f"optim.aux_proj_group={where!r} is not one of matrix|scalar")
    aux = model.aux_projection_weights() if hasattr(model, "aux_projection_weights") else None
    if aux is None:
        raise UserError(f"optim.aux_proj_group=scalar: {type(model).__name__} names no auxiliary projections")
    ids = {id(p) for p in aux}
    out = dict(groups)
    out["matrix"] = [p for p in groups.get("matrix", []) if id(p) not in ids]
    out["scalar"] = list(groups.get("scalar", [])) + list(aux)
    return out


@torch.no_grad()
def broadcast_parameters(model) -> None:
    """Copy rank 0's parameters and buffers to every rank (no-op on one process)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)
