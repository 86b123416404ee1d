"""Where a training NaN first appears: a few steps of a recipe with every gradient and weight checked (GPU).

Runs the training loop's own pieces (build_model, build_optimizers, the recipe's stream and step) for --steps
steps, compiled with --backend (inductor = the training loop's compile_for_training; aot_eager = the same
graphs without Inductor's code generation; eager = no compile), and prints one JSON line a step: the loss,
the global grad norm, the five largest per-parameter grad norms, every parameter whose grad or weight is not
finite, and the largest weight. When a loss is not finite it scores the same batch with the uncompiled model
(the same weights): finite there means the compiled graph computes something else. Usage:
    python benchmarks/nan_probe.py --recipe frontier --proxy 300 --data /tmp/caseops --steps 4 \
        --backend inductor [--mask-eager] [--set SECTION.FIELD=VALUE ...]
"""

import argparse
import json
import math
import sys

import torch

from pgolf.config import apply_overrides
from pgolf.data.loader import train_token_stream
from pgolf.data.shards import list_shards
from pgolf.dist import init_distributed
from pgolf.optim.builder import build_optimizers
from pgolf.recipes import recipe_config
from pgolf.train.loop import autocast_context, build_model, compile_for_training, seed_everything


def forward_loss(step_model, batch, doc_mask: bool, device) -> torch.Tensor:
    x, y, *doc_ids = [b.to(device) for b in batch]
    with autocast_context(device):
        return step_model(x, y, doc_ids=doc_ids[0]) if doc_mask else step_model(x, y)


def step_report(model, step: int, loss: float) -> dict:
    """Grad and weight health of every parameter, after backward and before the optimizer step."""
    norms, bad_grad, bad_weight, top_weight = {}, [], [], (0.0, "")
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.float()
            n = g.norm().item()
            norms[name] = n
            if not math.isfinite(n):
                bad_grad.append(name)
        w = p.detach().float().abs().max().item()
        if not math.isfinite(w):
            bad_weight.append(name)
        elif w > top_weight[0]:
            top_weight = (w, name)
    total = math.sqrt(sum(n * n for n in norms.values() if math.isfinite(n)))
    top = sorted(((n, k) for k, n in norms.items() if math.isfinite(n)), reverse=True)[:5]
    return {"step": step, "loss": loss, "grad_norm_finite_part": total, "top_grads": [[k, n] for n, k in top],
            "nonfinite_grads": bad_grad, "nonfinite_weights": bad_weight, "max_weight": list(top_weight)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="frontier")
    parser.add_argument("--proxy", type=float, default=300.0)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--backend", choices=("inductor", "aot_eager", "eager"), default="inductor")
    parser.add_argument("--mask-eager", action="store_true",
                        help="build the document BlockMask outside the compiled graph (torch.compiler.disable)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = recipe_config(args.recipe, args.proxy)
    cfg.data.path = args.data
    cfg = apply_overrides(cfg, args.overrides)
    if args.mask_eager:
        import pgolf.model.doc_attention as doc_attention

        doc_attention.doc_attention_mask = torch.compiler.disable(doc_attention.doc_attention_mask)
    denv = init_distributed("auto")
    device, t = denv.device, cfg.train
    seed_everything(t.seed)
    model = build_model(cfg, device)
    if args.backend == "inductor":
        cfg.train.compile = True
        step_model = compile_for_training(model, cfg)
    elif args.backend == "aot_eager":
        step_model = torch.compile(model, backend="aot_eager")
    else:
        step_model = model
    opt = build_optimizers(model, cfg.optim, denv.rank, denv.world_size)
    opt.set_lr_scale(1.0)
    stream = train_token_stream(cfg.data.sampler, list_shards(cfg.data.path, cfg.data.train_pattern),
                                denv.rank, denv.world_size, cfg.model.vocab_size)
    for step in range(1, args.steps + 1):
        fetch = stream.next_doc_batch if t.doc_mask else stream.next_batch
        batch = fetch(t.batch_tokens, t.seq_len, t.grad_accum)
        loss = forward_loss(step_model, batch, t.doc_mask, device)
        loss.backward()
        report = step_report(model, step, loss.item())
        if not math.isfinite(report["loss"]):
            with torch.no_grad():
                report["eager_loss_same_weights"] = forward_loss(model, batch, t.doc_mask, device).item()
        opt.step(cfg.optim.grad_clip)
        opt.zero_grad()
        report["clip_norm"] = None if opt.last_grad_norm is None else opt.last_grad_norm.item()
        print(json.dumps(report), flush=True)
        if report["nonfinite_weights"]:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
