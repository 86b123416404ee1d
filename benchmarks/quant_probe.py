"""Probe how quantization settings trade artifact bytes against error on a trained run (GPU).

Reads RUN_DIR/model.pgw and hessians.pgw, quantizes the matrices under several settings and prints, per
setting: order-0 entropy of the stored integers (bits/value), the estimated bytes of the int sections,
lzma-6 bytes of the matrix section measured on the first 4 MB, the Hessian-weighted error, and the time.
Also prints the shape of the weight distribution (max/std per row). Usage:
    python benchmarks/quant_probe.py RUN_DIR
"""

import lzma
import sys
import time
from pathlib import Path

import torch

from pgolf.config import QuantConfig
from pgolf.dist import cuda_sync
from pgolf.quant.gptq import gptq_quantize_batch, hessian_error, rtn_quantize
from pgolf.quant.policy import policy_table
from pgolf.tensorfile import read_tensors

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def entropy_bits(q: torch.Tensor) -> float:
    counts = torch.bincount(q.flatten().long() + 128).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())


def probe(run_dir: Path, min_numel: int = 65_536) -> None:
    state, _ = read_tensors(run_dir / "model.pgw")
    hess, _ = read_tensors(run_dir / "hessians.pgw")
    cfg = QuantConfig(passthrough_numel=min_numel)
    mats = [n for n, r in policy_table(state, cfg).items() if r.kind == "matrix"]
    ratio = torch.cat([(state[n].abs().amax(1) / state[n].std(1)).flatten() for n in mats])
    print(f"{len(mats)} matrices, {sum(state[n].numel() for n in mats):,} values; row max/std: "
          f"median {ratio.median():.2f}, p90 {ratio.quantile(0.9):.2f}")
    settings = [("gptq", "sdclip", 12.85, 6), ("gptq", "sdclip", 5.0, 6), ("gptq", "search", 12.85, 6),
                ("rtn", "sdclip", 12.85, 6), ("rtn", "search", 12.85, 6), ("gptq", "sdclip", 12.85, 5),
                ("gptq", "search", 12.85, 5)]
    for method, clip, k, nbits in settings:
        t0 = time.perf_counter()
        qs, err = [], 0.0
        for n in mats:
            w = state[n].float().to(DEVICE)
            h = hess[n].float().to(DEVICE) if n in hess else torch.eye(w.shape[1], device=DEVICE)
            if method == "gptq":
                q, s, _ = gptq_quantize_batch(w[None], h[None], nbits, clip, k, 0.01, 128, True)
                q, s = q[0], s[0]
            else:
                q, s = rtn_quantize(w, nbits, clip, k)
            err += float(hessian_error(w, q.float() * s.float()[:, None], h).sum())
            qs.append(q.flatten().cpu())
        cuda_sync()
        dt = time.perf_counter() - t0
        allq = torch.cat(qs)
        bits = entropy_bits(allq)
        sample = allq[: 4 << 20].numpy().tobytes()
        lz = len(lzma.compress(sample, preset=6)) / len(sample)
        est_mb = allq.numel() * bits / 8 / 1e6
        print(f"int{nbits} {method:4s} {clip:7s} k={k:5.2f}  entropy {bits:.3f} b/v  est {est_mb:6.2f} MB"
              f"  lzma6 {lz * 8:.3f} b/v ({allq.numel() * lz / 1e6:6.2f} MB)  H-err {err:.4g}  {dt:.1f}s")


if __name__ == "__main__":
    probe(Path(sys.argv[1]), *(int(a) for a in sys.argv[2:3]))
