"""Time GPTQ + LQER + serialisation of a frontier-size model, and the bytes it gives (issue 24).

With RUN_DIR (holding model.pgw and hessians.pgw of a finished frontier run) the real weights and Hessians
are used; without, the frontier recipe's 36 M-parameter GPT with bell-shaped random weights (Student-t(4)
values, std 0.02 times a per-row scale in [0.5, 1.5)) and Hessians from two batches of random tokens (not
timed; --state FILE keeps them for the next run). The quant settings are the frontier recipe's (per-role
sigmas, int7 embeddings, int8 gates, LQER top-3, role groups, fit_k), each --set override applied on top.
Prints, per variant (the recipe's, then quant.group_by=bits unless --recipe-only), the export's timings
(fit_k_s, quantize_s = GPTQ + LQER, serialize_s), the artifact bytes and whether code + artifact fits,
then one JSON line: the stages' seconds, the artifact's sha256, the seconds of the "ST" order's row
distances (l1_distances_s: on the GPU where there is one) and per stage the codec work (batches, jobs,
cache hits, pieces, their thread CPU seconds), with the stage projected onto each --project N threads
(its time outside the codecs plus simulated_s) and as one job at a time (the serial search the Compressor
replaced: each job's chunks in parallel, jobs one after another). --workers 1 --no-cache is the plain
serial form; --profile FILE writes cProfile stats of the first variant. Writes the reports as JSON to $OUT
(or the current folder).
Usage:
    python benchmarks/quant_frontier.py [RUN_DIR] [--code-bytes N] [--set quant.FIELD=VALUE ...]
        [--state FILE] [--workers N] [--no-cache] [--project N ...] [--profile FILE] [--recipe-only]
"""

import argparse
import cProfile
import hashlib
import heapq
import json
import os
import pstats
import sys
import time
from pathlib import Path

import torch

from pgolf.config import apply_overrides
from pgolf.dist import cuda_sync
from pgolf.model.gpt import GPT
from pgolf.quant import grouping
from pgolf.quant.codecs import CODEC_COST, Compressor
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


def simulated_s(batches: list[dict], stage: str, workers: int) -> float:
    """Seconds the codec work of one stage's batches (Compressor.batches) takes on `workers` threads: each
    batch queued once the batches it waited for are done (those of earlier stages at 0), each free thread
    taking the queued piece Compressor would (urgent first, then the costliest) for its measured CPU time."""
    mine = [i for i, b in enumerate(batches) if b["stage"] == stage]
    end = {i: 0.0 for i, b in enumerate(batches) if b["stage"] != stage}
    left, done = {}, set(end)
    free, queue, waiting, release, pending = [0.0] * workers, [], [], 0.0, list(mine)
    while True:
        while pending and all(a in done for a in batches[pending[0]]["after"]):
            i = pending.pop(0)
            release = max([release] + [end[a] for a in batches[i]["after"]])
            left[i], end[i] = len(batches[i]["pieces"]), release
            for n, (_, codec, size, cpu) in enumerate(batches[i]["pieces"]):
                cost = CODEC_COST.get(codec, 1.0) * size
                heapq.heappush(waiting, (release, not batches[i]["urgent"], -cost, i, n, cpu))
            if not left[i]:
                done.add(i)
        if not waiting and not queue:
            return max([0.0] + [end[i] for i in mine])
        now = heapq.heappop(free)
        while waiting and waiting[0][0] <= now:
            heapq.heappush(queue, heapq.heappop(waiting)[1:])
        if not queue:
            heapq.heappush(free, waiting[0][0])
            continue
        _, _, i, _, cpu = heapq.heappop(queue)
        heapq.heappush(free, now + cpu)
        end[i], left[i] = max(end[i], now + cpu), left[i] - 1
        if not left[i]:
            done.add(i)


def codec_summary(comp: Compressor, timings: dict, project: list[int]) -> dict:
    """Per stage: the codec batches' counts and seconds, and the stage projected onto each of `project`
    threads and as one job at a time (see the module docstring)."""
    out = {}
    for stage, total in timings.items():
        batches = [b for b in comp.batches if b["stage"] == stage]
        pieces = [p for b in batches for p in b["pieces"]]
        busy, reach = 0.0, float("-inf")
        for a, z in sorted((b["begin"], b["begin"] + b["wall_s"]) for b in batches):
            busy += max(0.0, z - max(a, reach))  # the stage's time with some batch in flight
            reach = max(reach, z)
        jobs: dict[tuple, float] = {}
        for i, b in enumerate(batches):
            for job, _, _, cpu in b["pieces"]:
                jobs[(i, job)] = max(jobs.get((i, job), 0.0), cpu)
        outside = total - busy
        out[stage] = {"batches": len(batches), "jobs": sum(b["jobs"] for b in batches),
                      "hits": sum(b["hits"] for b in batches), "pieces": len(pieces),
                      "codec_cpu_s": round(sum(p[3] for p in pieces), 2), "codec_wall_s": round(busy, 2),
                      "outside_s": round(outside, 2),
                      "projected_s": {str(w): round(outside + simulated_s(comp.batches, stage, w), 2)
                                      for w in project},
                      "one_job_at_a_time_s": round(outside + sum(jobs.values()), 2)}
    return out


def timed_distances(comp: Compressor, spent: dict):
    """grouping.l1_distances, its seconds added to spent[comp.stage] (the row distances of the "ST" order:
    on the GPU where there is one, so a CPU run's serialize_s holds time a GPU machine does not spend)."""
    plain = grouping.l1_distances

    def timed(q):
        t0 = time.perf_counter()
        out = plain(q)
        spent[comp.stage] = spent.get(comp.stage, 0.0) + time.perf_counter() - t0
        return out

    return timed


def run_variant(label: str, state: dict, hessians: dict, qcfg, code_bytes: int, args) -> dict:
    comp = Compressor(args.workers, cache=not args.no_cache)
    profile = cProfile.Profile() if args.profile else None
    plain, distances = grouping.l1_distances, {}
    grouping.l1_distances = timed_distances(comp, distances)
    cuda_sync()
    t0, cpu0 = time.perf_counter(), time.process_time()
    if profile:
        profile.enable()
    report, blob = encode_state(state, hessians, qcfg, code_bytes, comp)
    cuda_sync()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    grouping.l1_distances = plain
    if profile:
        profile.disable()
        profile.dump_stats(args.profile)
        pstats.Stats(profile, stream=sys.stderr).sort_stats("cumulative").print_stats(30)
        args.profile = ""
    t = report["timings"]
    lqer = [r["name"] for r in report["tensors"] if "lqer" in r]
    print(f"{label}: total {wall:.1f}s (fit_k {t['fit_k_s']:.1f}s, GPTQ+LQER {t['quantize_s']:.1f}s, "
          f"serialise {t['serialize_s']:.1f}s); artifact {len(blob):,} B + code {code_bytes:,} B = "
          f"{report['bytes']['total']:,} B ({'fits' if report['bytes']['fits'] else 'OVER'}); "
          f"matrix k {report['matrix_k']:.3f}; LQER on {lqer}")
    for s in report["sections"]:
        print(f"    {s['name']:<16} {s['layout']:<12} {s['method']:<16} {s['length']:>11,} B")
    line = {"label": label, "device": DEVICE, "cpus": os.cpu_count(), "workers": comp.workers,
            "cache": comp.kept is not None, "wall_s": round(wall, 2), "process_cpu_s": round(cpu, 2),
            **{k: round(v, 2) for k, v in t.items()},
            "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
            "l1_distances_s": {k: round(v, 2) for k, v in distances.items()},
            "codec": codec_summary(comp, t, args.project), "load_avg": os.getloadavg()[0]}
    print(json.dumps(line))
    return {**line, **{k: v for k, v in report.items() if k != "tensors"}, "lqer": lqer}


def load_state(args, cfg) -> tuple[dict, dict]:
    """The run's weights and Hessians (RUN_DIR), else the synthetic ones (kept in --state FILE)."""
    if args.run_dir:
        run = Path(args.run_dir)
        return ({k: v.to(DEVICE) for k, v in read_tensors(run / "model.pgw")[0].items()},
                {k: v.to(DEVICE) for k, v in read_tensors(run / "hessians.pgw")[0].items()})
    if args.state and Path(args.state).exists():
        state, hessians = torch.load(args.state, map_location=DEVICE)
        return state, hessians
    state, hessians = synthetic_state(cfg)
    if args.state:
        torch.save((state, hessians), args.state)
    return state, hessians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default="")
    parser.add_argument("--code-bytes", type=int, default=32_000)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--state", default="", help="file keeping the synthetic weights and Hessians")
    parser.add_argument("--workers", type=int, default=0, help="compression threads (0: os.cpu_count())")
    parser.add_argument("--no-cache", action="store_true", help="compress repeated bytes again")
    parser.add_argument("--project", type=int, action="append", default=[], help="threads to project onto")
    parser.add_argument("--profile", default="", help="cProfile stats file for the first variant")
    parser.add_argument("--recipe-only", action="store_true", help="skip the quant.group_by=bits variant")
    args = parser.parse_args()
    args.project = args.project or [16]
    cfg = apply_overrides(get_recipe("frontier"), args.overrides)
    state, hessians = load_state(args, cfg)
    print(f"{sum(v.numel() for v in state.values()):,} parameters, {len(hessians)} Hessians, on {DEVICE}")
    reports = [run_variant(f"group_by={cfg.quant.group_by}", state, hessians, cfg.quant, args.code_bytes, args)]
    if cfg.quant.group_by != "bits" and not args.recipe_only:
        bits = apply_overrides(cfg, ["quant.group_by=bits"]).quant
        reports.append(run_variant("group_by=bits", state, hessians, bits, args.code_bytes, args))
    out = Path(os.environ.get("OUT", "."))
    (out / "quant_frontier.json").write_text(json.dumps(reports, indent=1, default=str))


if __name__ == "__main__":
    main()
