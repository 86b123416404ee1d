"""Time GPTQ + LQER + serialisation of a frontier-size model on one GPU, and the bytes it gives (issue 24).

With RUN_DIR (holding model.pgw and hessians.pgw of a finished frontier run) the real weights and Hessians
are used; without, the frontier recipe's 36 M-parameter GPT with bell-shaped random weights (std 0.02,
heavy-tailed rows) and Hessians from two batches of random tokens (not timed). The quant settings are the
frontier recipe's (per-role sigmas, int7 embeddings, int8 gates, LQER top-3, role groups, fit_k), each
--set override applied on top. Prints, per variant (the recipe's, then quant.group_by=bits for
comparison), the export's timings (fit_k_s, quantize_s = GPTQ + LQER, serialize_s), the artifact bytes and
whether code + artifact fits; writes the reports as JSON to $OUT (or the current folder). Usage:
    python benchmarks/quant_frontier.py [RUN_DIR] [--code-bytes N] [--set quant.FIELD=VALUE ...]
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch

from pgolf.config import apply_overrides
from pgolf.dist import cuda_sync
from pgolf.model.gpt import GPT
from pgolf.quant.hessian import collect_hessians
from pgolf.quant.pipeline import encode_state
from pgolf.recipes import get_recipe
from pgolf.tensorfile import read_tensors

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def synthetic_state(cfg) -> tuple[dict, dict]:
    """The frontier GPT with trained-looking weights and calibration Hessians from random tokens."""
    torch.manual_seed(0)
    model = GPT(cfg.model).to(DEVICE)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2 and p.numel() > 65_536:
                rows = torch.distributions.StudentT(4.0).sample(p.shape).to(DEVICE)
                p.copy_(0.02 * rows * (0.5 + torch.rand(p.shape[0], 1, device=DEVICE)))
    batches = [torch.randint(0, cfg.model.vocab_size, (8, 2048), device=DEVICE) for _ in range(2)]
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
        hessians = collect_hessians(model, batches, passthrough_numel=cfg.quant.passthrough_numel)
    return {k: v.detach() for k, v in model.state_dict().items()}, hessians


def run_variant(label: str, state: dict, hessians: dict, qcfg, code_bytes: int) -> dict:
    cuda_sync()
    t0 = time.perf_counter()
    report, blob = encode_state(state, hessians, qcfg, code_bytes)
    cuda_sync()
    wall = time.perf_counter() - t0
    t = report["timings"]
    lqer = [r["name"] for r in report["tensors"] if "lqer" in r]
    print(f"{label}: total {wall:.1f}s (fit_k {t['fit_k_s']:.1f}s, GPTQ+LQER {t['quantize_s']:.1f}s, "
          f"serialise {t['serialize_s']:.1f}s); artifact {len(blob):,} B + code {code_bytes:,} B = "
          f"{report['bytes']['total']:,} B ({'fits' if report['bytes']['fits'] else 'OVER'}); "
          f"matrix k {report['matrix_k']:.3f}; LQER on {lqer}")
    for s in report["sections"]:
        print(f"    {s['name']:<16} {s['layout']:<12} {s['method']:<16} {s['length']:>11,} B")
    return {"label": label, "wall_s": wall, **{k: v for k, v in report.items() if k != "tensors"},
            "lqer": lqer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default="")
    parser.add_argument("--code-bytes", type=int, default=32_000)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = apply_overrides(get_recipe("frontier"), args.overrides)
    if args.run_dir:
        run = Path(args.run_dir)
        state = {k: v.to(DEVICE) for k, v in read_tensors(run / "model.pgw")[0].items()}
        hessians = {k: v.to(DEVICE) for k, v in read_tensors(run / "hessians.pgw")[0].items()}
    else:
        state, hessians = synthetic_state(cfg)
    print(f"{sum(v.numel() for v in state.values()):,} parameters, {len(hessians)} Hessians, on {DEVICE}")
    reports = [run_variant(f"group_by={cfg.quant.group_by}", state, hessians, cfg.quant, args.code_bytes)]
    if cfg.quant.group_by != "bits":
        bits = apply_overrides(cfg, ["quant.group_by=bits"]).quant
        reports.append(run_variant("group_by=bits", state, hessians, bits, args.code_bytes))
    out = Path(os.environ.get("OUT", "."))
    (out / "quant_frontier.json").write_text(json.dumps(reports, indent=1, default=str))


if __name__ == "__main__":
    main()
