"""Time one compiled scoring forward (a batch of sliding windows) in each variant: the whole model compiled or
its blocks only, and the last block cut to the scored positions (GPT.forward_hidden's keep) or run on every
position with the output cut afterwards. Prints ms per batch (CUDA events, median of --iters after warm-up)
and each variant's largest NLL difference from the first.

    python benchmarks/scoring_forward.py [ARTIFACT [--config C]] [--recipe record] [--batch 32] [--keep 64]
        [--iters 50]

Without an artifact a randomly initialised model of --recipe runs (the times do not depend on the weights).
"""

import argparse
import statistics
from pathlib import Path

import torch

from pgolf.eval.scoring import StaticShapeCompile, eval_autocast, split_tail_nll


def uncut_tail_nll(model, x, y, keep):
    """split_tail_nll with every block on the whole window: the head alone on the kept positions."""
    logits = model.head_logits(model.forward_hidden(x)[:, x.size(1) - keep:])
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y[:, x.size(1) - keep:].reshape(-1),
                                            reduction="none")
    return nll.view(x.size(0), keep).float()


VARIANTS = {"cut last block, blocks": (split_tail_nll, "blocks"), "uncut, blocks": (uncut_tail_nll, "blocks"),
            "cut last block, model": (split_tail_nll, "model"), "uncut, model": (uncut_tail_nll, "model")}


def load_model(args):
    from pgolf.eval.commands import eval_load_config, eval_load_model, eval_resolve_artifact
    from pgolf.model.gpt import GPT
    from pgolf.recipes import get_recipe

    if args.artifact:
        artifact = eval_resolve_artifact(Path(args.artifact))
        cfg = eval_load_config(artifact, "", args.config, [], "")
        return eval_load_model(artifact, cfg, torch.device("cuda")), cfg
    cfg = get_recipe(args.recipe)
    torch.manual_seed(0)
    return GPT(cfg.model).cuda().eval(), cfg


def time_variant(fn, scope, model, x, y, keep, iters):
    compiled = StaticShapeCompile(fn, {"s"}, "scoring forward", scope)
    with torch.inference_mode(), eval_autocast(x.device):
        out = compiled("s", model, x, y, keep)
        for _ in range(3):
            compiled("s", model, x, y, keep)
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            compiled("s", model, x, y, keep)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times), compiled.first_call_s, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", nargs="?", default="")
    ap.add_argument("--config", default="")
    ap.add_argument("--recipe", default="record")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--keep", type=int, default=64)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args(argv)
    model, cfg = load_model(args)
    seq_len = cfg.eval.seq_len or cfg.train.seq_len
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randint(cfg.model.vocab_size, (args.batch, seq_len), generator=gen).cuda() for _ in range(2))
    first = None
    print(f"{'variant':<24}  {'ms/batch':>9}  {'first call s':>12}  {'max |dNLL|':>10}")
    for name, (fn, scope) in VARIANTS.items():
        ms, first_s, out = time_variant(fn, scope, model, x, y, args.keep, args.iters)
        first = out if first is None else first
        print(f"{name:<24}  {ms:9.2f}  {first_s:12.1f}  {float((out - first).abs().max()):10.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
