"""Time the eval scoring paths against each other and check that they agree (GPU; CPU works, slowly).

For each scorer (reference, eager, auto = compiled on CUDA) runs the sliding-window evaluation and, with
--ttt, score-first TTT on the first --tokens tokens, then prints val_loss, val_bpb, seconds and the
difference from the reference path. With an artifact (model.pgq / model.pgw / RUN_DIR) the model, config and
val data are the run's; without one, a randomly initialised model of --recipe reads seeded random tokens
(one byte each), which is enough to compare the paths' numbers and times. Usage:
    python benchmarks/eval_paths.py [ARTIFACT --data DIR] [--recipe record] [--tokens N] [--ttt]
        [--scorers reference,eager,auto] [--set eval.batch_seqs=64 ...]
"""

import argparse
import time
from pathlib import Path

import torch

from pgolf.config import add_override_argument, apply_overrides
from pgolf.data.bytes import ByteLUT
from pgolf.dist import cuda_sync
from pgolf.eval.commands import eval_device, eval_load_config, eval_load_data, eval_load_model, eval_resolve_artifact
from pgolf.eval.sliding import evaluate_sliding
from pgolf.eval.ttt import evaluate_ttt


def random_setup(args):
    from pgolf.model.gpt import GPT
    from pgolf.recipes import get_recipe

    cfg = apply_overrides(get_recipe(args.recipe), args.overrides)
    torch.manual_seed(0)
    model = GPT(cfg.model).to(eval_device(cfg)).eval()
    tokens = torch.randint(0, cfg.model.vocab_size, (args.tokens,), generator=torch.Generator().manual_seed(0))
    v = cfg.model.vocab_size
    lut = ByteLUT(torch.ones(v, dtype=torch.int16), torch.zeros(v, dtype=torch.bool), torch.zeros(v, dtype=torch.bool))
    return cfg, model, tokens, lut


def run_setup(args):
    artifact = eval_resolve_artifact(Path(args.artifact))
    cfg = eval_load_config(artifact, "", "", args.overrides, args.data)
    tokens, lut = eval_load_data(cfg, args.tokens)
    return cfg, eval_load_model(artifact, cfg, eval_device(cfg)), tokens, lut


def synchronized_seconds(fn, *args) -> tuple[dict, float]:
    cuda_sync()
    t0 = time.perf_counter()
    out = fn(*args)
    cuda_sync()
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", nargs="?", default="")
    p.add_argument("--data", default="")
    p.add_argument("--recipe", default="record")
    p.add_argument("--tokens", type=int, default=1_000_000)  # >= 256 batches: auto compiles
    p.add_argument("--ttt", action="store_true")
    p.add_argument("--scorers", default="reference,eager,auto")
    add_override_argument(p)
    args = p.parse_args()
    cfg, model, tokens, lut = run_setup(args) if args.artifact else random_setup(args)
    e = cfg.eval
    seq_len = e.seq_len or cfg.train.seq_len
    methods = {"sliding": lambda sc: evaluate_sliding(model, tokens, lut, seq_len, e.sliding_stride, e.batch_seqs,
                                                      scorer=sc)}
    if args.ttt:
        methods["ttt"] = lambda sc: evaluate_ttt(model, tokens, lut, e, seq_len, scorer=sc)
    print(f"{tokens.numel():,} tokens, seq_len {seq_len}, stride {e.sliding_stride}, batch {e.batch_seqs}, "
          f"device {next(model.parameters()).device}")
    for name, run in methods.items():
        ref = None
        for scorer in args.scorers.split(","):
            res, seconds = synchronized_seconds(run, scorer)
            ref = ref or res
            print(f"{name:<8} {scorer:<10} val_loss {res['val_loss']:.6f}  val_bpb {res['val_bpb']:.6f}  "
                  f"d_bpb {res['val_bpb'] - ref['val_bpb']:+.2e}  {seconds:7.1f} s")


if __name__ == "__main__":
    main()
