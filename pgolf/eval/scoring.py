"""The fast scoring path of the plain, sliding and TTT evaluations: the reference path's numbers, in a
fraction of its time on a GPU.

The reference path (`pgolf.eval.bpb.score_rows`) gathers each batch on the host, copies it over, runs the
model's full forward (logits for every position) eagerly and adds the batch's sums, a few host syncs per batch.
This path scores the same windows in the same batches, with the same per-token arithmetic:

- the token stream and the window table live on the model's device: a batch's (B, T) inputs are gathered
  there, with no copy from the host and no host sync per batch;
- the blocks run on the whole window, the last block (but for its keys and values) and the head only on
  the positions the batch scores: its last `keep` positions (`stride` for sliding windows; the whole window
  for the plain windows, the first sliding window and a short stream). A model offering the split
  `forward_hidden(ids, keep)` / `head_logits(hidden)` (pgolf.model.gpt.GPT) computes those positions alone;
  any other model runs its forward, cut;
- NLL sums stay on the device (float64, one reduction per batch as the reference); token and byte counts come
  from the window table, on the host, once; the caller reads the result once, at the end;
- the scoring forward can be torch.compile'd with static shapes (dynamic=False). A batch's signature is
  (window length, keep) (rows are padded to batch_seqs), so an evaluation has a few: the bulk, the first
  batch (keep = length) and the tail window (shorter). In "auto" mode only the signatures with at least
  SCORE_COMPILE_MIN_BATCHES batches are compiled, and any this process has compiled already (pgolf.eval.
  warmup compiles the bulk signatures before the timed passes); the rest run the same function eagerly, so
  that a rare shape never costs a compile.

Scorer modes: "auto" (compiled on CUDA for the frequent signatures, eager elsewhere), "compiled" (every
signature compiled, on any device: for tests), "eager" (this path, never compiled) and "reference".
"""

import contextlib
import time
import warnings
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pgolf.config_rules import COMPILE_SCOPES
from pgolf.dist import cuda_sync
from pgolf.errors import UserError

SCORER_MODES = ("auto", "compiled", "eager", "reference")
# On one H100 (docs/benchmarks.md) a cold compile of the record model's scoring forward took 39 s, and a
# batch of 32 windows of 2048 tokens then took 17.4 ms instead of 57.9 ms eagerly: ~1,000 batches repay it
# (a sliding pass over the 3.23 M wiki-sp1024 val tokens has 1,577).
SCORE_COMPILE_MIN_BATCHES = 1024


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def eval_autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def scorer_for(eval_cfg) -> str:
    """The scorer mode an EvalConfig asks for: "auto" when eval.compile is on, else "eager"."""
    return "auto" if eval_cfg.compile else "eager"


def check_scorer(scorer: str) -> str:
    if scorer not in SCORER_MODES:
        raise UserError(f"scorer={scorer!r} is not one of {'|'.join(SCORER_MODES)}")
    return scorer


def check_compile_scope(scope: str) -> str:
    """For callers that pass a scope without a validated config (validate_config checks eval.compile_scope)."""
    if scope not in COMPILE_SCOPES:
        raise UserError(f"eval.compile_scope={scope!r} is not one of {'|'.join(COMPILE_SCOPES)}")
    return scope


def call_block(block, x, x0, cos, sin, ve, keep, doc_mask=None):
    """One transformer block: the function the "blocks" scope compiles (GPT.routed_blocks)."""
    return block(x, x0, cos, sin, ve, keep, doc_mask)


# Graphs of call_block one process may hold: a scoring forward's block structures (the first block, plain,
# XSA, XSA + value embedding, the last block cut to `keep`) and a TTT step's, forward and backward. Dynamo's
# default of 8 per function would run the rest eagerly.
BLOCK_GRAPH_LIMIT = 32


def compile_blocks_only(fn, options: dict | None = None, dynamic: bool = False):
    """fn(model, *args) eagerly, but with each of the model's blocks through one compiled call_block
    (Inductor `options`, if any, and `dynamic` go to both compiles).

    Blocks of the same structure (XSA or not, a value embedding or not) share one compiled graph, since
    their per-layer constants are tensors (GPT.Block.ln_factor): a model of 11 layers compiles a few small
    graphs instead of one large one, a fraction of the compile time, and the embedding, skips and head run
    eagerly. A model without GPT.routed_blocks is compiled whole."""
    extra = {"options": options} if options else {}
    whole = torch.compile(fn, dynamic=dynamic, **extra)
    block_call = torch.compile(call_block, dynamic=dynamic, **extra)

    def run(model, *args, **kwargs):
        if not callable(getattr(model, "routed_blocks", None)):
            return whole(model, *args, **kwargs)
        limit = max(torch._dynamo.config.recompile_limit, BLOCK_GRAPH_LIMIT)
        with model.routed_blocks(block_call), torch._dynamo.config.patch(recompile_limit=limit):
            return fn(model, *args, **kwargs)

    return run


# One compiled callable per (function, scope) in a process, and the signatures each has compiled: the
# evaluation's passes reuse what pgolf.eval.warmup compiled before them (Dynamo's caches live on the
# function; its guards take any model of the same structure, so a copy with other weights hits them).
_COMPILED: dict = {}
WARM_SIGNATURES: set = set()


def shared_compile(fn, scope: str, dynamic: bool = False):
    """The process's compiled callable of fn in this scope, static or dynamic shapes (created on first use)."""
    key = (fn, check_compile_scope(scope), dynamic)
    if key not in _COMPILED:
        _COMPILED[key] = (torch.compile(fn, dynamic=dynamic) if scope == "model"
                          else compile_blocks_only(fn, dynamic=dynamic))
    return _COMPILED[key]


def reset_shared_compiles() -> None:
    """Forget the compiled callables and warm signatures (tests; a new torch.compile takes effect)."""
    _COMPILED.clear()
    WARM_SIGNATURES.clear()


def signatures_to_compile(fn, scope: str, counts: Counter, min_count: int | None) -> set:
    """The signatures of counts ({signature: calls}) worth compiling: those called at least min_count times,
    and those this process has compiled already (they cost no compile now); none when min_count is None."""
    if min_count is None:
        return set()
    return {s for s, n in counts.items() if n >= min_count or (fn, scope, s) in WARM_SIGNATURES}


def compile_min_count(scorer: str, device: torch.device, auto_min: int) -> int | None:
    """The fewest calls of one signature that earn it a compile; None: nothing is compiled."""
    if scorer == "compiled":
        return 1
    if scorer == "auto" and device.type == "cuda":
        return auto_min
    return None


def load_compiler(scorer: str, device: torch.device) -> float:
    """Import Dynamo and Inductor now when this scorer compiles on this device; the seconds it took.

    A process's first torch.compile wrapper imports them: about 10 s on the device machine (docs/benchmarks.md).
    A training process has paid that before its evaluation; `pgolf eval` pays it in its setup, beside loading
    the artifact, and reports it there, so that its passes are timed as they run after training."""
    if compile_min_count(scorer, device, 1) is None:
        return 0.0
    t0 = time.perf_counter()
    torch.compile(load_compiler)  # creating the wrapper loads the compiler stack; nothing is compiled
    return time.perf_counter() - t0


def has_head_split(model) -> bool:
    return callable(getattr(model, "forward_hidden", None)) and callable(getattr(model, "head_logits", None))


def split_tail_nll(model, x: torch.Tensor, y: torch.Tensor, keep: int) -> torch.Tensor:
    """NLL (B, keep) float32 of each row's last `keep` positions: the blocks on the whole window but the
    last, which with the head runs on those positions only (forward_hidden's `keep`)."""
    logits = model.head_logits(model.forward_hidden(x, keep))
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y[:, x.size(1) - keep:].reshape(-1),
                          reduction="none")
    return nll.view(x.size(0), keep).float()


def cached_nll(model, x: torch.Tensor, y: torch.Tensor, cache) -> torch.Tensor:
    """NLL (B, T) float32 of every position of x, rows that continue those a pgolf.model.kv_cache.KVCache has
    read (the cache then holds these too): document TTT's cached context."""
    logits = model.head_logits(model.forward_hidden(x, cache=cache))
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none").view(x.shape)


def full_tail_nll(model, x: torch.Tensor, y: torch.Tensor, keep: int) -> torch.Tensor:
    """The same through the model contract's forward (every position), cut to the last `keep`."""
    return model(x, y, reduction="none")[:, x.size(1) - keep:].float()


def scoring_function(model):
    """What the fast path calls for a batch: fn(model, x, y, keep) -> NLL (B, keep)."""
    return split_tail_nll if has_head_split(model) else full_tail_nll


class StaticShapeCompile:
    """fn(*args) compiled with static shapes (dynamic=False) for the listed signatures only; every other
    signature runs fn eagerly. If a compiled call fails, a warning says why and fn runs eagerly from then on
    (the eager function is the reference; an error of its own still raises).

    `scope` "model" compiles fn whole (fn(model, ...) taking the model first), "blocks" only the model's
    blocks (compile_blocks_only); `dynamic` compiles with dynamic shapes instead (one graph serves a
    signature's every shape: the document-TTT step's). `first_call_s` sums the wall seconds of each compiled
    signature's first call, the GPU synchronised around it: the compile of its forward (a backward, compiled
    at its first backward pass, is not in it) plus one call's work. An evaluation reports it, so that its time splits
    into compiling and scoring."""

    def __init__(self, fn, signatures, name: str, scope: str = "model", dynamic: bool = False):
        self.fn, self.name, self.scope = fn, name, check_compile_scope(scope)
        self.signatures = set(signatures)
        self.compiled = shared_compile(fn, scope, dynamic) if self.signatures else None
        self.first_call_s = 0.0
        self._called = set()

    def __call__(self, signature, *args):
        if signature not in self.signatures:
            return self.fn(*args)
        if signature not in self._called:
            self._called.add(signature)
            cuda_sync()
            t0 = time.perf_counter()
            out = self._call_compiled(*args)
            cuda_sync()
            self.first_call_s += time.perf_counter() - t0
            if self.signatures:  # still compiled: no fallback happened
                WARM_SIGNATURES.add((self.fn, self.scope, signature))
            return out
        return self._call_compiled(*args)

    def _call_compiled(self, *args):
        try:
            return self.compiled(*args)
        except Exception as e:  # noqa: BLE001 - a compiler failure of any kind: fall back to the reference
            first_line = (str(e).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"{self.name}: torch.compile failed ({type(e).__name__}: {first_line}); running eagerly",
                          RuntimeWarning, stacklevel=2)
            self.signatures.clear()
            return self.fn(*args)


@dataclass
class WindowBatch:
    first: int  # index of its first window in the scorer's table
    rows: int  # windows in it; the batch is padded to batch_seqs rows with copies of its first window
    length: int  # tokens each window reads
    keep: int  # its last `keep` positions go through the head


def plan_window_batches(windows, first_index: int, batch_seqs: int, keep: int) -> list[WindowBatch]:
    """Consecutive windows of the same length, batch_seqs at a time (the reference's batches); a batch keeps
    `keep` positions when none of its windows scores more, else all of them."""
    batches, i = [], 0
    while i < len(windows):
        length = windows[i][2] - windows[i][0]
        j = i
        while j < len(windows) and j - i < batch_seqs and windows[j][2] - windows[j][0] == length:
            j += 1
        scored = max(w[2] - w[1] for w in windows[i:j])
        batches.append(WindowBatch(first_index + i, j - i, length, min(keep, length) if scored <= keep else length))
        i = j
    return batches


class WindowScorer:
    """Scores groups of (start, score_from, end) windows on the model's device (module docstring).

    `groups` is a list of window lists, scored one group per `score_group` call (TTT scores one chunk at a
    time, adapting the model in between); tokens is the whole stream (CPU or device) and byte_cum its
    pgolf.eval.bpb.stream_byte_cumsum. per_token and inspect are those of the reference path; compile_scope
    is StaticShapeCompile's scope."""

    def __init__(self, model, tokens: torch.Tensor, groups: list, batch_seqs: int, keep: int,
                 byte_cum: torch.Tensor, scorer: str = "auto", per_token=None, inspect=None,
                 compile_scope: str = "model"):
        device = model_device(model)
        self.model, self.per_token, self.inspect = model, per_token, inspect
        self.tokens = tokens.to(device)
        table = torch.tensor([w for group in groups for w in group], dtype=torch.int64).view(-1, 3)
        self.table = table.to(device)
        self.batches, self.counts, first = [], [], 0
        for group in groups:
            self.batches.append(plan_window_batches(group, first, batch_seqs, keep))
            rows = table[first:first + len(group)]
            n_bytes = byte_cum[rows[:, 2]] - byte_cum[rows[:, 1]]
            self.counts.append((int((rows[:, 2] - rows[:, 1]).sum()), int(n_bytes.sum())))
            first += len(group)
        self.row_ids = torch.arange(batch_seqs, device=device)
        self.col_ids = torch.arange(max([b.length for bs in self.batches for b in bs], default=1), device=device)
        min_count = compile_min_count(check_scorer(scorer), device, SCORE_COMPILE_MIN_BATCHES)
        shapes = Counter((b.length, b.keep) for bs in self.batches for b in bs)
        fn = scoring_function(model)
        compiled = signatures_to_compile(fn, compile_scope, shapes, min_count)
        self.forward = StaticShapeCompile(fn, compiled, "scoring forward", compile_scope)

    def score_group(self, g: int, acc) -> None:
        """Score group g's windows in order and add their NLL sum, tokens and bytes to acc."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.table.device)
        for b in self.batches[g]:
            win = self.table[(b.first + self.row_ids).clamp_max(b.first + b.rows - 1)]
            pos = win[:, :1] + self.col_ids[:b.length]
            x, y = self.tokens[pos], self.tokens[pos + 1]
            with eval_autocast(x.device):
                nll = self.forward((b.length, b.keep), self.model, x, y, b.keep)
            tail = self.col_ids[b.length - b.keep:b.length]
            mask = (tail[None] >= win[:, 1:2] - win[:, :1]) & (self.row_ids < b.rows)[:, None]
            loss_sum += torch.where(mask, nll.double(), 0.0).sum()
            if self.per_token is not None or self.inspect is not None:
                self.record(pos[:, b.length - b.keep:], x, y, nll, mask)
        acc.add(loss_sum, *self.counts[g])

    def record(self, tail_pos: torch.Tensor, x, y, nll: torch.Tensor, mask: torch.Tensor) -> None:
        """Per-token scores and the inspect hook, on full (B, T) views (slow: host copies; legality checks)."""
        if self.per_token is not None:
            host_mask = mask.cpu()
            self.per_token.record(tail_pos.cpu()[host_mask] + 1, nll.cpu()[host_mask])
        if self.inspect is not None:
            keep = nll.size(1)
            full_nll = nll.new_zeros(x.shape)
            full_nll[:, x.size(1) - keep:] = nll
            full_mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
            full_mask[:, x.size(1) - keep:] = mask
            self.inspect(self.model, x, y, full_nll, full_mask)
