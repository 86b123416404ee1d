"""Document TTT (eval.ttt_mode=doc_lora): each document scored alone, score-first, by a per-document LoRA, with
phased global SGD over the already-scored documents (frontier.md §8; the 2026-04-27 record's phased TTT).

- Documents (pgolf.eval.documents) are sorted by length and cut into batches of eval.ttt_doc_batch; the queue
  runs the batch of the longest documents first. Batches go to the ranks round-robin.
- A batch walks its documents in chunks of eval.ttt_doc_chunk predictions. Chunk c of a document scores its
  predictions [cC, e) (e = min((c+1)C, preds)) from the window doc[s:e], s = max(0, e - seq_len): context never
  leaves the document. The active documents' windows are stacked (padded past each end: causal attention keeps
  padding out of every scored position), one forward gives the scores (the last block's queries and MLP and
  the head run on the windows' last min(C, width) positions only, which hold every scored one: chunk_keep),
  then (for the documents with a later chunk) the loss of the same forward, the mean NLL of the chunk's
  positions per document summed over documents, takes one AdamW step of the adapters (pgolf.eval.doc_lora):
  every token is scored before an update sees it.
- Each batch resets the adapters' B to zero with a fresh AdamW state (A is kept with eval.ttt_warm_a).
- Phases: the first round(eval.ttt_prefix_frac * documents) documents in queue order are the prefix; when the
  scored documents cross each of eval.ttt_phases boundaries of it, one epoch of SGD on the whole base model runs
  over the scored prefix so far (cumulative, document-masked rows of seq_len, chunks of
  eval.ttt_global_chunk_tokens, cosine lr from eval.ttt_global_lr), then fresh adapters continue the queue.
- Speed and time: with eval.ttt_doc_compile the chunk steps run one compiled graph (chunk_nll); past
  eval.ttt_time_limit_s the rest is scored without adapting and without phases; a progress line goes to the
  caller's `log` every PROGRESS_EVERY_S.

The event trace lists, per step, the spans of targets scored ("score") and the spans of tokens an update used
("update": a document's targets start+1 .. start+e; its BOS input is the document boundary itself), so that
pgolf.eval.legality replays it; "per_token_score_step" orders the scores for the flip test, since documents are
scored in queue order, not stream order.
"""

import copy
import math
import time
from dataclasses import dataclass, field

import torch

from pgolf.data.loader import TRAIN_BOS_ID, batch_document_ids
from pgolf.dist import all_reduce_max
from pgolf.errors import UserError
from pgolf.eval.bpb import (
    BpbAccumulator,
    PerTokenScores,
    check_eval_inputs,
    lut_bytes_report,
    rank_span,
    stream_byte_cumsum,
)
from pgolf.eval.doc_lora import BatchedLora, LoraRowModel, parse_lora_targets
from pgolf.eval.documents import find_documents
from pgolf.eval.receipts import SecondsSplit
from pgolf.eval.scoring import (
    cached_nll,
    check_scorer,
    eval_autocast,
    full_tail_nll,
    model_device,
    scoring_function,
)


def doc_batches(docs: list[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Document indices sorted by length, cut into batches, the batch of the longest documents first."""
    if batch_size < 1:
        raise UserError(f"eval.ttt_doc_batch={batch_size} must be at least 1")
    order = sorted(range(len(docs)), key=lambda i: (docs[i][1], i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return sorted(batches, key=lambda b: -docs[b[-1]][1])


def prefix_doc_count(prefix_frac: float, n_docs: int) -> int:
    """The prefix the phases train on: the record's 2,500 of 50,000 documents is prefix_frac 0.05."""
    return min(n_docs, round(prefix_frac * n_docs))


def phase_points(queue: list[list[int]], prefix_docs: int, phases: int) -> dict[int, list[int]]:
    """{batch index: [documents, ...]}: after that batch of the queue one global phase per boundary it crossed
    (boundaries floor(prefix * k / phases)), each training on the first `documents` documents in queue order;
    none after the last batch. A batch that crosses several (a small split: the proxy's 25-document prefix lies
    in its first batch of 64) runs their phases back to back, so every phase asked for runs, cumulatively."""
    bounds = sorted({prefix_docs * k // phases for k in range(1, phases + 1)} - {0}) if phases > 0 else []
    points, done, k = {}, 0, 0
    for i, batch in enumerate(queue[:-1]):
        done += len(batch)
        while k < len(bounds) and done >= bounds[k]:
            points.setdefault(i, []).append(bounds[k])
            k += 1
    return points


@dataclass
class DocTttState:
    """What the steps of one document-TTT pass share."""
    work: torch.nn.Module
    tokens: torch.Tensor  # the stream on the model's device
    byte_cum: torch.Tensor  # host, pgolf.eval.bpb.stream_byte_cumsum
    cfg: object  # EvalConfig
    seq_len: int
    acc: BpbAccumulator
    per_token: PerTokenScores | None
    score_step: torch.Tensor | None
    inspect: object
    score_fn: object  # fn(model, x, y, keep) -> NLL (R, keep) of each row's last `keep` positions
    compiled_fn: object = None  # the same compiled (eval.ttt_doc_compile), for chunk_nll's chunks
    trace: list = field(default_factory=list)
    step: int = 0
    updates: int = 0
    deadline: float = math.inf  # perf_counter past which chunks are scored without adapting (eval.ttt_time_limit_s)
    progress: object = None  # DocTttProgress, or None
    seconds: SecondsSplit = field(default_factory=SecondsSplit)  # "score_adapt_s", "global_s"


def chunk_batch(st: DocTttState, docs: list[tuple[int, int]], c: int, cached: bool = False):
    """Stacked windows of chunk c of the documents (all have one): x, y (R, K), the scored mask (R, K), the
    windows' stream start (R,) and, per document, (lo, e) in its own positions. cached: the chunk's own
    positions alone (the earlier ones are in the KV cache)."""
    chunk = st.cfg.ttt_doc_chunk
    spans = [(c * chunk, min((c + 1) * chunk, p)) for _, p in docs]
    starts = [lo if cached else max(0, e - st.seq_len) for lo, e in spans]
    width = max(e - s for (_, e), s in zip(spans, starts, strict=True))
    device = st.tokens.device
    cols = torch.arange(width, device=device)
    first = torch.tensor([d[0] + s for d, s in zip(docs, starts, strict=True)], device=device)
    length = torch.tensor([e - s for (_, e), s in zip(spans, starts, strict=True)], device=device)
    score_from = torch.tensor([lo - s for (lo, _), s in zip(spans, starts, strict=True)], device=device)
    pos = (first[:, None] + cols).clamp_max(st.tokens.numel() - 2)
    valid = cols < length[:, None]
    x = torch.where(valid, st.tokens[pos], 0)
    y = torch.where(valid, st.tokens[pos + 1], 0)
    mask = valid & (cols >= score_from[:, None])
    return x, y, mask, first, spans


def chunk_keep(st: DocTttState, width: int) -> int:
    """The stacked windows' last positions that hold every scored one: min(chunk, width).

    A document still in its chunks has a full window, width K = min((c+1)C, W); one at its last chunk e < (c+1)C
    has width w = min(e, W) <= K and scores its last e - cC <= C positions: from cC >= K - C when e <= W, from
    W - (e - cC) >= W - C = K - C otherwise. So the blocks but the last, and the last block's keys and values,
    run on the whole window; its queries, MLP and the head only on these positions (pgolf.eval.scoring)."""
    return min(st.cfg.ttt_doc_chunk, width)


def record_scores(st: DocTttState, docs, spans, nll, mask, first) -> None:
    """Add chunk's scores to the sums (bytes from the byte source) and, for the legality checks, per token;
    nll and mask are (R, keep), `first` the stream position of each row's first kept column."""
    n_bytes = sum(int(st.byte_cum[d[0] + e] - st.byte_cum[d[0] + lo]) for d, (lo, e) in zip(docs, spans, strict=True))
    st.acc.add(torch.where(mask, nll.double(), 0.0).sum(), sum(e - lo for lo, e in spans), n_bytes)
    st.trace.append({"event": "score", "step": st.step, "updates": st.updates,
                     "spans": [[d[0] + lo + 1, d[0] + e] for d, (lo, e) in zip(docs, spans, strict=True)]})
    if st.per_token is not None:
        host_mask = mask.cpu()
        target = (first[:, None] + torch.arange(mask.size(1), device=first.device)).cpu()[host_mask] + 1
        st.per_token.record(target, nll.detach().cpu()[host_mask])
        st.score_step[target] = st.step


def inspect_chunk(st: DocTttState, lora: BatchedLora, slots, x, y, nll, mask, keep: int, before=None) -> None:
    """The legality probe's look at one row of the chunk, its NLL placed at the row's window positions;
    `before`: the KV cache as this chunk found it (the probe's forwards read that row's copy)."""
    r = st.step % x.size(0)
    full = nll.new_zeros(x.shape)
    full[:, x.size(1) - keep:] = nll
    row_cache = before.select(torch.tensor([r], device=x.device)) if before is not None else None
    with torch.no_grad():
        st.inspect(LoraRowModel(lora, slots[r], row_cache), x[r:r + 1], y[r:r + 1], full[r:r + 1], mask[r:r + 1])


def doc_chunk_step(st: DocTttState, lora: BatchedLora, opt, docs, slots: list[int], c: int, n_chunks,
                   cache=None) -> None:
    """Score chunk c of the active documents, then one adapter step on those with a later chunk; with a
    cache (eval.ttt_doc_context=cache) the chunk's positions alone, reading the earlier ones' keys and values."""
    x, y, mask, first, spans = chunk_batch(st, docs, c, cached=cache is not None)
    adapting = time.perf_counter() < st.deadline
    train_rows = [adapting and c < n - 1 for n in n_chunks]
    before = cache.select(torch.arange(x.size(0), device=x.device)) if cache is not None and st.inspect else None
    if cache is None:
        keep = chunk_keep(st, x.size(1))
        nll = chunk_nll(st, lora, slots, x, y, keep, c, any(train_rows))
    else:
        keep = x.size(1)
        nll = cached_chunk_nll(st, lora, slots, cache, x, y, any(train_rows))
    kept_mask = mask[:, x.size(1) - keep:]
    record_scores(st, docs, spans, nll.detach(), kept_mask, first + (x.size(1) - keep))
    if st.inspect is not None:
        inspect_chunk(st, lora, slots, x, y, nll.detach(), mask, keep, before)
    if any(train_rows):
        per_doc = torch.where(kept_mask, nll, 0.0).sum(dim=1) / st.cfg.ttt_doc_chunk
        (per_doc * torch.tensor(train_rows, device=x.device)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        st.updates += 1
        st.trace.append({"event": "update", "step": st.step, "updates": st.updates,
                         "spans": [[d[0] + 1, d[0] + e]
                                   for d, (_, e), t in zip(docs, spans, train_rows, strict=True) if t]})
    st.step += 1
    if st.progress is not None:
        st.progress.step(st)


def chunk_nll(st: DocTttState, lora: BatchedLora, slots: list[int], x, y, keep: int, c: int, grad: bool):
    """NLL (R, keep) of the chunk's windows through the slots' adapters. The compiled step (st.compiled_fn)
    takes chunks c >= 1 only, where width > keep, one row doubled when alone, gradients on: so that one graph
    (dynamic in rows and width) serves all of them; the first chunk of a batch runs eagerly."""
    compiled = st.compiled_fn is not None and c >= 1
    rows = slots + slots if compiled and len(slots) == 1 else slots
    lora.rows = torch.tensor(rows, device=x.device)
    if len(rows) > x.size(0):
        x, y = x.repeat(2, 1), y.repeat(2, 1)
    with torch.set_grad_enabled(grad or compiled), eval_autocast(x.device):
        nll = (st.compiled_fn if compiled else st.score_fn)(st.work, x, y, keep).float()
    return nll[:len(slots)]


def cached_chunk_nll(st: DocTttState, lora: BatchedLora, slots: list[int], cache, x, y, grad: bool):
    """NLL (R, T) of the chunk's own positions through the slots' adapters, the earlier positions' keys and
    values read from the cache (which then holds these too); eager."""
    lora.rows = torch.tensor(slots, device=x.device)
    with torch.set_grad_enabled(grad), eval_autocast(x.device):
        return cached_nll(st.work, x, y, cache)


def run_doc_batch(st: DocTttState, lora: BatchedLora, docs: list[tuple[int, int]], generator) -> None:
    """Every chunk of one batch of documents, each in its own adapter slot, the adapters reset first; with
    eval.ttt_doc_context=cache one KV cache of the batch, cut to the documents still active."""
    cfg = st.cfg
    lora.reset(cfg.ttt_warm_a, generator)
    opt = torch.optim.AdamW(lora.parameters(), lr=cfg.ttt_lr, betas=(0.0, cfg.ttt_adam_beta2), eps=1e-10,
                            weight_decay=cfg.ttt_weight_decay)
    n_chunks = [math.ceil(p / cfg.ttt_doc_chunk) for _, p in docs]
    cache, rows = None, []
    if cfg.ttt_doc_context == "cache":  # imported here: the exported script carries the module only then
        from pgolf.model.kv_cache import KVCache

        cache, rows = KVCache(st.seq_len), list(range(len(docs)))
    for c, active in batch_chunks(docs, cfg.ttt_doc_chunk):
        if cache is not None and active != rows:
            cache = cache.select(torch.tensor([rows.index(j) for j in active], device=st.tokens.device))
            rows = active
        doc_chunk_step(st, lora, opt, [docs[j] for j in active], active, c, [n_chunks[j] for j in active], cache)


def batch_chunks(docs: list[tuple[int, int]], chunk: int):
    """(c, the batch's documents that have a chunk c) for every chunk index of a batch, in order."""
    n_chunks = [math.ceil(p / chunk) for _, p in docs]
    for c in range(max(n_chunks)):
        yield c, [j for j, n in enumerate(n_chunks) if c < n]


def global_rows(st: DocTttState, docs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The scored documents' (input, target) pairs end to end: each document's own predictions only."""
    xs = [st.tokens[s:s + p] for s, p in docs]
    ys = [st.tokens[s + 1:s + p + 1] for s, p in docs]
    return torch.cat(xs), torch.cat(ys)


def global_sgd_phase(st: DocTttState, docs: list[tuple[int, int]], rank: int, world_size: int) -> None:
    """One epoch of SGD with momentum on the whole base model over the documents' pairs, in chunks of
    eval.ttt_global_chunk_tokens (one step each, its rows of seq_len split over the ranks, document-masked)."""
    from pgolf.eval.ttt import ttt_lr_at, ttt_sum_grads

    cfg, work = st.cfg, st.work
    x_all, y_all = global_rows(st, docs)
    n = x_all.numel()
    n_chunks = max(1, math.ceil(n / cfg.ttt_global_chunk_tokens))
    params = [p for p in work.parameters()]
    for p in params:
        p.requires_grad_(True)
        p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD(params, lr=cfg.ttt_global_lr, momentum=cfg.ttt_global_momentum)
    work.train()
    for ci in range(n_chunks):
        lo, hi = ci * cfg.ttt_global_chunk_tokens, min((ci + 1) * cfg.ttt_global_chunk_tokens, n)
        rows = [(a, min(a + st.seq_len, hi)) for a in range(lo, hi, st.seq_len)]
        r0, r1 = rank_span(len(rows), rank, world_size)
        for a, b in rows[r0:r1]:
            x, y = x_all[None, a:b], y_all[None, a:b]
            with eval_autocast(x.device):
                nll = work(x, y, reduction="none", doc_ids=batch_document_ids(x, TRAIN_BOS_ID)).float()
            (nll.sum() / (hi - lo)).backward()
        ttt_sum_grads(params)
        if cfg.ttt_grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.ttt_grad_clip)
        for g in opt.param_groups:
            g["lr"] = ttt_lr_at(ci, n_chunks, cfg.ttt_global_lr)
        opt.step()
        opt.zero_grad(set_to_none=False)
    work.eval()
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    st.updates += 1
    st.trace.append({"event": "update", "step": st.step, "updates": st.updates, "phase": True,
                     "spans": [[s + 1, s + p] for s, p in docs]})
    st.step += 1


def new_lora(st: DocTttState, seed: int) -> BatchedLora:
    cfg = st.cfg
    lora = BatchedLora(st.work, cfg.ttt_doc_batch, cfg.ttt_lora_rank, cfg.ttt_lora_alpha,
                       parse_lora_targets(cfg.ttt_lora_targets), seed)
    lora.attach()
    return lora


def run_queue(st: DocTttState, queue: list[list[int]], docs, points: dict, rank: int, world_size: int) -> int:
    """This rank's batches of the queue (every world_size-th) and, at the phase points, the global phases (on
    every rank); the phases run. One set of adapters serves the whole pass: switched off for the phases, then
    drawn afresh, in place (a compiled step keeps its graphs)."""
    generator = torch.Generator().manual_seed(0)
    lora, phases_run = new_lora(st, 0), 0
    for i, batch in enumerate(queue):
        if i % world_size == rank:
            with st.seconds.phase("score_adapt_s"):
                run_doc_batch(st, lora, [docs[j] for j in batch], generator)
            if st.progress is not None:
                st.progress.docs_done += len(batch)
        if i in points and before_deadline(st):
            lora.active = False
            scored = [j for b in queue[:i + 1] for j in b]
            for n_docs in points[i]:
                with st.seconds.phase("global_s"):
                    global_sgd_phase(st, [docs[j] for j in scored[:n_docs]], rank, world_size)
                phases_run += 1
            lora.active = True
            lora.reset(False, torch.Generator().manual_seed(phases_run))
    lora.detach()
    return phases_run


def before_deadline(st: DocTttState) -> bool:
    """Whether every rank is still inside eval.ttt_time_limit_s (a collective only when a limit is set)."""
    if st.deadline == math.inf:
        return True
    return all_reduce_max(1.0 if time.perf_counter() >= st.deadline else 0.0) == 0.0


PROGRESS_EVERY_S = 30.0  # seconds between two progress lines of a pass


class DocTttProgress:
    """A line through `log` at most every PROGRESS_EVERY_S: chunk steps and documents done, the running bpb
    (read from the device then only) and the seconds so far; `log` None: nothing (no host sync either)."""

    def __init__(self, log, total_steps: int, n_docs: int):
        self.log, self.total, self.n_docs, self.every_s = log, total_steps, n_docs, PROGRESS_EVERY_S
        self.t0 = self.last = time.perf_counter()
        self.docs_done = self.steps_done = 0

    def step(self, st: DocTttState) -> None:
        self.steps_done += 1
        now = time.perf_counter()
        if now - self.last < self.every_s:
            return
        self.last = now
        bpb = st.acc.result()["val_bpb"]
        adapting = "" if now < st.deadline else ", past eval.ttt_time_limit_s: scoring only"
        self.log(f"doc TTT: step {self.steps_done}/{self.total}, {self.docs_done}/{self.n_docs} documents, "
                 f"bpb so far {bpb:.5f}, {now - self.t0:.0f} s{adapting}")


def doc_step_scorer(model, cfg, scorer: str):
    """(fn(model, x, y, keep), its StaticShapeCompile or None): the chunk step's cut forward (chunk_keep), or
    the full one for the scorer "reference"; with eval.ttt_doc_compile, where the scorer compiles on this device
    ("auto" on CUDA, "compiled" anywhere), also that function torch.compile'd with dynamic shapes (one graph for
    every rows x width: chunk_nll; in scope "blocks" the blocks only), falling back to it eagerly if a compile
    fails."""
    from pgolf.eval.scoring import StaticShapeCompile, compile_min_count

    fn = full_tail_nll if check_scorer(scorer) == "reference" else scoring_function(model)
    if (not cfg.ttt_doc_compile or cfg.ttt_doc_context == "cache" or scorer == "reference"
            or compile_min_count(scorer, model_device(model), 1) is None):
        return fn, None
    return fn, StaticShapeCompile(fn, ["any"], "document-TTT step", cfg.compile_scope, dynamic=True)


def evaluate_doc_ttt(model, val_tokens: torch.Tensor, lut, cfg, seq_len: int, rank: int = 0, world_size: int = 1,
                     return_per_token: bool = False, inspect=None, scorer: str | None = None, log=None) -> dict:
    """Phased per-document LoRA TTT (module docstring) on a copy of the model; `cfg` is an EvalConfig, seq_len
    the window. The result adds "documents", "prefix_docs", "phases", "updates", the event "trace" and the
    seconds of scoring with adaptation ("score_adapt_s") and of the global phases ("global_s"). The chunk step
    is doc_step_scorer's (eager unless eval.ttt_doc_compile); `log(line)`, if given, gets a progress line every
    30 s. Past eval.ttt_time_limit_s (> 0) the remaining chunks are scored without adapting and no phase runs."""
    check_eval_inputs(val_tokens, seq_len, 1)
    if cfg.ttt_doc_chunk < 1:
        raise UserError(f"eval.ttt_doc_chunk={cfg.ttt_doc_chunk} must be at least 1")
    t0 = time.perf_counter()
    tokens = val_tokens.cpu().long()
    docs = find_documents(tokens)
    queue = doc_batches(docs, cfg.ttt_doc_batch)
    prefix = prefix_doc_count(cfg.ttt_prefix_frac, len(docs))
    points = phase_points(queue, prefix, cfg.ttt_phases)
    work = copy.deepcopy(model).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    device = model_device(work)
    per_token = PerTokenScores(tokens.numel()) if return_per_token else None
    score_fn, compiled = doc_step_scorer(work, cfg, scorer or "eager")
    st = DocTttState(work, tokens.to(device), stream_byte_cumsum(tokens, lut), cfg, seq_len, BpbAccumulator(device),
                     per_token, torch.full((tokens.numel(),), -1, dtype=torch.int64) if per_token else None, inspect,
                     score_fn, (lambda *args: compiled("any", *args)) if compiled is not None else None)
    if cfg.ttt_time_limit_s > 0:
        st.deadline = t0 + cfg.ttt_time_limit_s
    mine = [b for i, b in enumerate(queue) if i % world_size == rank]
    if log is not None:
        st.progress = DocTttProgress(log, sum(max(math.ceil(docs[j][1] / cfg.ttt_doc_chunk) for j in b) for b in mine),
                                     sum(len(b) for b in mine))
    phases_run = run_queue(st, queue, docs, points, rank, world_size)
    st.acc.all_reduce()
    out = st.acc.result()
    compile_s = compiled.first_call_s if compiled is not None else 0.0
    out.update({"seconds": time.perf_counter() - t0, "compile_s": compile_s, "documents": len(docs),
                "batches": len(queue), "prefix_docs": prefix, "phases": phases_run, "updates": st.updates,
                "trace": st.trace, "time_limited": time.perf_counter() >= st.deadline,
                "score_adapt_s": st.seconds.elapsed("score_adapt_s"), "global_s": st.seconds.elapsed("global_s")})
    out.update(lut_bytes_report(tokens, lut, [(s, s, s + p) for s, p in docs], out["nll_sum"]))
    if per_token is not None:
        out.update(per_token.as_dict())
        out["per_token_score_step"] = st.score_step
    return out
