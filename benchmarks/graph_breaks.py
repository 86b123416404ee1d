"""How torch.compile cuts a recipe's training step into graphs, and why (torch._dynamo.explain).

Builds the recipe's model (shrunk with --set where a CPU should run it), takes one batch of the shape the
training loop feeds it (document ids too with train.doc_mask) and prints one JSON line: the graphs, the graph
breaks with their reasons and source lines, and the ops per graph. Each break costs a trip through Python and
splits Inductor's fusion. On CPU with gradients the document mask is the dense one (pgolf.model.doc_attention),
so run it on the GPU for the flex path. Usage:
    python benchmarks/graph_breaks.py --recipe frontier --set model.num_layers=4 --set model.model_dim=128 \
        [--seq-len 256] [--rows 2] [--loops] [--no-grad]
"""

import argparse
import json
import sys

import torch

from pgolf.config import apply_overrides
from pgolf.data.loader import TRAIN_BOS_ID, batch_document_ids
from pgolf.recipes import recipe_config
from pgolf.train.loop import autocast_context, build_model


def training_batch(cfg, rows: int, seq_len: int, device) -> tuple:
    """Random tokens with a BOS every ~seq_len/3 tokens (several documents a row), and their targets."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(2, cfg.model.vocab_size, (rows, seq_len), generator=gen)
    x[:, ::max(1, seq_len // 3)] = TRAIN_BOS_ID
    y = torch.roll(x, -1, dims=1)
    return x.to(device), y.to(device)


def explain_step(model, x, y, doc_mask: bool, grad: bool):
    def step(x, y):
        kwargs = {"doc_ids": batch_document_ids(x, TRAIN_BOS_ID)} if doc_mask else {}
        with autocast_context(x.device):
            return model(x, y, **kwargs)

    with torch.set_grad_enabled(grad):
        return torch._dynamo.explain(step)(x, y)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="frontier")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--seq-len", type=int, default=0, help="0 = train.seq_len")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--loops", action="store_true", help="with depth recurrence switched on")
    parser.add_argument("--no-grad", action="store_true")
    args = parser.parse_args()
    cfg = apply_overrides(recipe_config(args.recipe), args.overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(cfg, device)
    if args.loops and hasattr(model, "set_recurrence"):
        model.set_recurrence(True)
    x, y = training_batch(cfg, args.rows, args.seq_len or cfg.train.seq_len, device)
    out = explain_step(model, x, y, cfg.train.doc_mask, not args.no_grad)
    breaks = [{"reason": str(b.reason).splitlines()[0],
               "where": [f"{f.filename.rsplit('/', 2)[-2:]}:{f.lineno}" for f in b.user_stack[-2:]]}
              for b in out.break_reasons]
    print(json.dumps({"recipe": args.recipe, "device": device.type, "graphs": out.graph_count,
                      "graph_breaks": out.graph_break_count, "ops_per_graph": [len(ops) for ops in out.ops_per_graph],
                      "breaks": breaks}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
