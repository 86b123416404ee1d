"""Where score-first TTT gains: sliding-window and TTT bits per byte of the same artifact, by position in the
validation stream (groups of TTT chunks), from the two passes' per-token scores.

    python benchmarks/ttt_gain_by_chunk.py RUN_DIR/model.pgq --data DIR [--config C] [--set k=v ...]
        [--groups 10] [--json OUT.json]

TTT's weights at chunk c have adapted on chunks 0..c-1, so a gain that grows along the stream says the
adaptation accumulates, and a longer validation split (FineWeb's 1,893 chunks against wiki-sp1024's 99) would
gain more than a short one. Both passes run as `pgolf eval` runs them (eval.precompile honoured).
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from pgolf.config import add_override_argument
from pgolf.eval.bpb import stream_byte_cumsum
from pgolf.eval.commands import eval_device, eval_load_config, eval_load_data, eval_load_model, eval_resolve_artifact
from pgolf.eval.scoring import load_compiler, scorer_for
from pgolf.eval.sliding import evaluate_sliding
from pgolf.eval.ttt import evaluate_ttt

LN2 = math.log(2.0)


def gain_table(sliding_nll: torch.Tensor, ttt_nll: torch.Tensor, target_bytes: torch.Tensor, chunk_tokens: int,
               groups: int) -> list[dict]:
    """Rows of (chunks, tokens, bytes, sliding bpb, TTT bpb, gain) over `groups` equal runs of chunks; the
    tensors are indexed by target position (NaN where nothing is scored: position 0)."""
    n = sliding_nll.numel()
    n_chunks = math.ceil(n / chunk_tokens)
    rows = []
    for g in range(groups):
        c0, c1 = n_chunks * g // groups, n_chunks * (g + 1) // groups
        lo, hi = max(1, c0 * chunk_tokens), min(n, c1 * chunk_tokens)
        if hi <= lo:
            continue
        n_bytes = int(target_bytes[lo:hi].sum())
        s_bits = float(sliding_nll[lo:hi].sum()) / LN2
        t_bits = float(ttt_nll[lo:hi].sum()) / LN2
        rows.append({"chunks": [c0, c1 - 1], "tokens": hi - lo, "bytes": n_bytes, "sliding_bpb": s_bits / n_bytes,
                     "ttt_bpb": t_bits / n_bytes, "gain": (s_bits - t_bits) / n_bytes})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--data", default="")
    ap.add_argument("--recipe", default="")
    ap.add_argument("--config", default="")
    ap.add_argument("--groups", type=int, default=10)
    ap.add_argument("--json", default="")
    add_override_argument(ap)
    args = ap.parse_args(argv)
    artifact = eval_resolve_artifact(Path(args.artifact))
    cfg = eval_load_config(artifact, args.recipe, args.config, args.overrides, args.data)
    e, device = cfg.eval, eval_device(cfg)
    seq_len = e.seq_len or cfg.train.seq_len
    tokens, lut = eval_load_data(cfg, e.val_tokens)
    model = eval_load_model(artifact, cfg, device)
    load_compiler(scorer_for(e), device)
    if e.precompile:
        from pgolf.eval.warmup import warm_eval_compiles

        warm_eval_compiles(model, e, seq_len, cfg.model.vocab_size)
    sliding = evaluate_sliding(model, tokens, lut, seq_len, e.sliding_stride, e.batch_seqs, return_per_token=True,
                               scorer=scorer_for(e), compile_scope=e.compile_scope)
    ttt = evaluate_ttt(model, tokens, lut, e, seq_len, return_per_token=True)
    cum = stream_byte_cumsum(tokens.cpu().long(), lut)
    target_bytes = torch.cat([torch.zeros(1, dtype=torch.int64), cum[1:] - cum[:-1]])
    rows = gain_table(sliding["per_token_nll"], ttt["per_token_nll"], target_bytes, e.ttt_chunk_tokens, args.groups)
    print(f"{'chunks':>11}  {'tokens':>9}  {'sliding bpb':>11}  {'TTT bpb':>9}  {'gain':>8}")
    for r in rows:
        print(f"{r['chunks'][0]:>5}-{r['chunks'][1]:<5}  {r['tokens']:9,}  {r['sliding_bpb']:11.5f}  "
              f"{r['ttt_bpb']:9.5f}  {r['gain']:8.5f}")
    print(f"{'all':>11}  {sliding['tokens']:9,}  {sliding['val_bpb']:11.5f}  {ttt['val_bpb']:9.5f}  "
          f"{sliding['val_bpb'] - ttt['val_bpb']:8.5f}")
    if args.json:
        out = {"artifact": str(artifact), "chunk_tokens": e.ttt_chunk_tokens, "rows": rows,
               "sliding_bpb": sliding["val_bpb"], "ttt_bpb": ttt["val_bpb"],
               "seconds": {"sliding": sliding["seconds"], "ttt": ttt["seconds"]}}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
