"""The training step's cold compile, loops off then on, for one train.compile_scope (issue 23's warm-up bar).

Builds the recipe's model at the h100-300s proxy's batch (shrink it with --set on a CPU), then times the
first step with the loops off (its compile), the median of four more on other documents (steady state), the
first step with the loops on (the recurrence's graphs) and four more. Inductor's and Triton's caches point
at a fresh temporary folder, so every graph is compiled here. Run each scope in its own process and compare
the JSON lines:
    python benchmarks/compile_time.py --recipe frontier --scope model  [--set k=v ...]
    python benchmarks/compile_time.py --recipe frontier --scope blocks [--set k=v ...]
"""

import argparse
import json
import os
import sys
import tempfile
import time

CACHE = tempfile.mkdtemp(prefix="pgolf-compile-time-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(CACHE, "inductor")  # before torch reads them
os.environ["TRITON_CACHE_DIR"] = os.path.join(CACHE, "triton")

import torch  # noqa: E402

from pgolf.bench.train_bench import bench_device_name  # noqa: E402
from pgolf.config import apply_overrides  # noqa: E402
from pgolf.config_rules import COMPILE_SCOPES  # noqa: E402
from pgolf.data.loader import TRAIN_BOS_ID, batch_document_ids  # noqa: E402
from pgolf.recipes import recipe_config  # noqa: E402
from pgolf.train.loop import (  # noqa: E402
    autocast_context,
    build_model,
    compile_for_training,
    micro_batch_seqs,
    uses_recurrence,
)


def timed_step(step, x, y, doc_ids) -> float:
    """Seconds of one forward + backward (the GPU's queue drained)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    with autocast_context(x.device):
        loss = step(x, y, doc_ids=doc_ids) if doc_ids is not None else step(x, y)
    loss.backward()
    sync()
    return time.perf_counter() - t0


def training_batch(cfg, rows: int, seq: int, seed: int, device) -> tuple:
    """Random tokens with documents of seeded random lengths (BOS starts each), targets, document ids."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(2, cfg.model.vocab_size, (rows, seq), generator=gen)
    starts = torch.rand(rows, seq, generator=gen) < 3.0 / seq  # about three documents a row
    starts[:, 0] = True
    x[starts] = TRAIN_BOS_ID
    x, y = x.to(device), torch.roll(x, -1, dims=1).to(device)
    return x, y, (batch_document_ids(x, TRAIN_BOS_ID) if cfg.train.doc_mask else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="frontier")
    parser.add_argument("--scope", choices=COMPILE_SCOPES, required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--rows", type=int, default=0, help="0 = the recipe's rows per micro-step on one GPU")
    parser.add_argument("--seq-len", type=int, default=0, help="0 = train.seq_len")
    args = parser.parse_args()
    sets = args.overrides + [f"train.compile_scope={args.scope}", "train.compile=true"]
    cfg = apply_overrides(recipe_config(args.recipe, proxy_s=300.0), sets)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg, device)
    step = compile_for_training(model, cfg)
    seq = args.seq_len or cfg.train.seq_len
    rows = args.rows or micro_batch_seqs(cfg, 1)
    batches = [training_batch(cfg, rows, seq, seed, device) for seed in (0, 1, 2)]
    row = {"recipe": args.recipe, "scope": args.scope, "device": bench_device_name(device),
           "torch": torch.__version__, "rows": rows, "seq_len": seq, "overrides": args.overrides}
    compile_s = 0.0
    for loops in (False, True) if uses_recurrence(cfg) else (False,):
        if uses_recurrence(cfg):
            model.set_recurrence(loops)
        state = "loops_on" if loops else "loops_off"
        first_s = timed_step(step, *batches[0])
        steps = sorted(timed_step(step, *batches[1 + i % 2]) for i in range(4))  # other documents: no recompile
        step_s = 0.5 * (steps[1] + steps[2])
        row[f"{state}_first_s"], row[f"{state}_step_ms"] = round(first_s, 2), round(1000 * step_s, 1)
        compile_s += first_s - step_s
        model.zero_grad(set_to_none=True)
    row["compile_s"] = round(compile_s, 1)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
