"""The work of a document-TTT pass (eval.ttt_mode=doc_lora) on a validation split, and one chunk step's time.

Counts, with pgolf.eval.ttt_doc's own queue, phases and windows, what the pass computes on the split: documents,
batches, chunk steps, token positions through the blocks (every stacked window is recomputed each chunk) and
through the head (the windows' last chunk_keep positions), and the tokens of the global SGD phases. With
--time-rows it also times one chunk step (forward through the adapters, backward, AdamW) of the recipe's model
on this machine's device, the cut forward against the full one (the scorer "reference") and against the cached
context's step (eval.ttt_doc_context=cache: the chunk alone, a KV cache of the window's rest). One JSON line. Usage:
    python benchmarks/doc_ttt_work.py --data /tmp/caseops --recipe frontier [--set eval.ttt_doc_chunk=96] \
        [--time-rows 4 --time-width 2048 --repeats 3]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from pgolf.config import apply_overrides
from pgolf.config_rules import validate_config
from pgolf.data.loader import load_val_tokens
from pgolf.dist import cuda_sync
from pgolf.eval.doc_lora import BatchedLora, parse_lora_targets
from pgolf.eval.documents import find_documents
from pgolf.eval.scoring import cached_nll, eval_autocast, full_tail_nll, scoring_function
from pgolf.eval.ttt_doc import (
    DocTttState,
    batch_chunks,
    chunk_batch,
    chunk_keep,
    doc_batches,
    phase_points,
    prefix_doc_count,
)
from pgolf.model.kv_cache import KVCache
from pgolf.recipes import recipe_config
from pgolf.train.loop import build_model, set_training_kernels


def pass_work(tokens: torch.Tensor, e, seq_len: int) -> dict:
    """What the pass computes on this stream, chunk by chunk, as pgolf.eval.ttt_doc runs it (with
    eval.ttt_doc_context=cache: each chunk's own positions through the blocks, the earlier ones' keys cached)."""
    cached = e.ttt_doc_context == "cache"
    docs = find_documents(tokens)
    queue = doc_batches(docs, e.ttt_doc_batch)
    st = DocTttState(None, tokens, None, e, seq_len, None, None, None, None, None)
    steps = block_positions = head_positions = 0
    few_rows = {4: 0, 16: 0}  # steps with at most 4 / 16 documents active: the ones a GPU runs least full
    for batch in queue:
        batch_docs = [docs[j] for j in batch]
        for c, active in batch_chunks(batch_docs, e.ttt_doc_chunk):
            x, *_ = chunk_batch(st, [batch_docs[j] for j in active], c, cached)
            steps += 1
            for limit in few_rows:
                few_rows[limit] += x.size(0) <= limit
            block_positions += x.numel()
            head_positions += x.numel() if cached else x.size(0) * chunk_keep(st, x.size(1))
    points = phase_points(queue, prefix_doc_count(e.ttt_prefix_frac, len(docs)), e.ttt_phases)
    order = [j for b in queue for j in b]
    bounds = [n for ns in points.values() for n in ns]
    global_tokens = sum(docs[j][1] for n in bounds for j in order[:n])
    return {"documents": len(docs), "val_tokens": int(tokens.numel()), "batches": len(queue), "chunk_steps": steps,
            **{f"steps_with_at_most_{k}_docs": n for k, n in few_rows.items()},
            "block_positions": block_positions, "head_positions": head_positions,
            "positions_per_val_token": round(block_positions / max(1, tokens.numel()), 2),
            "phases": len(bounds), "global_sgd_tokens": global_tokens}


def time_chunk_step(cfg, rows: int, width: int, repeats: int, device) -> dict:
    """Seconds of one chunk step at (rows, width), the cut forward and the full one, after one warm-up each."""
    e = cfg.eval
    model = build_model(cfg, device).eval()
    set_training_kernels(model, cfg, False)  # the evaluated model: no training-only kernels
    for p in model.parameters():
        p.requires_grad_(False)
    lora = BatchedLora(model, rows, e.ttt_lora_rank, e.ttt_lora_alpha, parse_lora_targets(e.ttt_lora_targets))
    lora.attach()
    opt = torch.optim.AdamW(lora.parameters(), lr=e.ttt_lr, betas=(0.0, e.ttt_adam_beta2), eps=1e-10)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(2, cfg.model.vocab_size, (rows, width), generator=gen).to(device)
    y = torch.roll(x, -1, dims=1)
    keep = min(e.ttt_doc_chunk, width)
    out = {f"step_s_{name}": adapter_step_seconds(lambda _, fn=fn: fn(model, x, y, keep).sum(), opt, repeats)
           for name, fn in (("cut", scoring_function(model)), ("full", full_tail_nll))}
    out["step_s_cached"] = time_cached_step(model, opt, x, y, keep, repeats)
    lora.detach()
    out["full_over_cut"] = round(out["step_s_full"] / out["step_s_cut"], 3)
    out["cut_over_cached"] = round(out["step_s_cut"] / out["step_s_cached"], 3)
    return out


def adapter_step_seconds(loss_fn, opt, repeats: int, prepare=lambda: None) -> float:
    """The fastest of `repeats` timed adapter steps (loss_fn(prepare()) under the eval autocast, backward,
    AdamW) after one untimed warm-up; prepare() runs outside the timing, the GPU synchronised around it."""
    device = opt.param_groups[0]["params"][0].device
    seconds = []
    for _ in range(repeats + 1):
        state = prepare()
        cuda_sync()
        t0 = time.perf_counter()
        with eval_autocast(device):
            loss = loss_fn(state).float()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        cuda_sync()
        seconds.append(time.perf_counter() - t0)
    return round(min(seconds[1:]), 4)


def time_cached_step(model, opt, x, y, chunk: int, repeats: int) -> float:
    """Seconds of the same chunk step with eval.ttt_doc_context=cache: the chunk's positions alone, the
    window's earlier ones read from a KV cache (filled once, untimed, and copied for every repeat)."""
    width = x.size(1)
    filled = KVCache(width)
    if width > chunk:
        with torch.no_grad(), eval_autocast(x.device):
            model.forward_hidden(x[:, :width - chunk], cache=filled)
    rows = torch.arange(x.size(0), device=x.device)
    tail = (x[:, width - chunk:], y[:, width - chunk:])
    return adapter_step_seconds(lambda cache: cached_nll(model, *tail, cache).sum(), opt, repeats,
                                lambda: filled.select(rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a split folder with fineweb_val_*.bin")
    ap.add_argument("--recipe", default="frontier")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--time-rows", type=int, default=0, help="time one chunk step of this many documents")
    ap.add_argument("--time-width", type=int, default=0, help="its window (default: the eval window)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    cfg = apply_overrides(recipe_config(args.recipe), args.overrides)
    validate_config(cfg)
    seq_len = cfg.eval.seq_len or cfg.train.seq_len
    tokens = load_val_tokens(str(Path(args.data) / "fineweb_val_0*.bin"), cfg.model.vocab_size).long()
    row = {"recipe": args.recipe, "chunk": cfg.eval.ttt_doc_chunk, "window": seq_len,
           "doc_batch": cfg.eval.ttt_doc_batch, **pass_work(tokens, cfg.eval, seq_len)}
    if args.time_rows > 0:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        row.update({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "time_rows": args.time_rows, "time_width": args.time_width or seq_len,
                    **time_chunk_step(cfg, args.time_rows, args.time_width or seq_len, args.repeats, device)})
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
