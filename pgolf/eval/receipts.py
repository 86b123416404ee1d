"""The timing receipt and the compliance summary of a run.

Accounting (records.md 5.3, user-needs A2): the training budget covers the timed training loop plus the
calibration (Hessian collection) that reads training data; compile warmup is untimed (the training step's,
and with eval.precompile the evaluation's graphs, compiled on random tokens before training), and the GPTQ solve,
compression and serialization come after the budget. The eval budget covers every eval phase that ran
(timing keys starting with "eval_": the artifact's read, decompression and dequantization too), and the receipt
also shows it with the evaluation's compile warm-up added (frontier.md §8.7: report both).
The size cap is code + compressed weights, in decimal bytes.
"""

import contextlib
import time

from pgolf.dist import cuda_sync

TRAIN_PHASE_KEYS = ("train_loop_s", "calibration_s")


def compliance_summary(timings: dict, bytes_total: int, legality_results, train_cap_s: float = 600.0,
                       eval_cap_s: float = 600.0, size_cap: int = 16_000_000) -> dict:
    """The record's "compliance" block plus "checks" (name, passed, figure, limit) and "passed" (all of them).

    `timings` uses the run record's keys (train_loop_s, calibration_s, eval_plain_s, ...); a missing or null
    phase counts 0 s. legality_results: CheckResult objects (or dicts with name / passed / detail).
    """
    t = {k: float(v or 0.0) for k, v in timings.items()}
    train_s = sum(t.get(k, 0.0) for k in TRAIN_PHASE_KEYS)
    eval_s = sum(v for k, v in t.items() if k.startswith("eval_"))
    checks = [
        {"name": "train_loop + calibration", "passed": train_s <= train_cap_s, "figure": f"{train_s:.1f} s",
         "limit": f"<= {train_cap_s:g} s"},
        {"name": "eval phases", "passed": eval_s <= eval_cap_s, "figure": f"{eval_s:.1f} s",
         "limit": f"<= {eval_cap_s:g} s"},
        {"name": "bytes (code + artifact)", "passed": int(bytes_total) <= size_cap, "figure": f"{int(bytes_total):,}",
         "limit": f"<= {size_cap:,}"},
    ]
    legality = {}
    for r in legality_results or []:
        name, passed, detail = (r["name"], r["passed"], r["detail"]) if isinstance(r, dict) else \
            (r.name, r.passed, r.detail)
        legality[name] = bool(passed)
        checks.append({"name": f"legality: {name}", "passed": bool(passed), "figure": detail, "limit": "PASS"})
    return {"train_plus_calibration_s": train_s, "eval_s": eval_s, "bytes_total": int(bytes_total),
            "legality": legality, "checks": checks, "passed": all(c["passed"] for c in checks)}


def format_compliance_table(summary: dict) -> str:
    rows = [(c["name"], "PASS" if c["passed"] else "FAIL", c["limit"], c["figure"]) for c in summary["checks"]]
    widths = [max(len(r[i]) for r in rows + [("check", "result", "limit", "figure")]) for i in range(3)]
    lines = [f"{'check':<{widths[0]}}  {'result':<{widths[1]}}  {'limit':<{widths[2]}}  figure"]
    lines += [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows]
    lines.append(f"overall: {'PASS' if summary['passed'] else 'FAIL'}")
    return "\n".join(lines)


def format_timing_receipt(timings: dict) -> str:
    """One line per phase in seconds, then the training-budget and eval-budget totals."""
    t = {k: float(v) for k, v in timings.items() if v is not None}
    width = max([len(k) for k in t] + [24])
    lines = [f"{k:<{width}}  {v:9.2f} s" for k, v in t.items()]
    lines.append(f"{'= train_loop + calibration':<{width}}  {sum(t.get(k, 0.0) for k in TRAIN_PHASE_KEYS):9.2f} s")
    eval_s = sum(v for k, v in t.items() if k.startswith("eval_"))
    lines.append(f"{'= eval phases':<{width}}  {eval_s:9.2f} s")
    if "compile_warmup_eval_s" in t:  # the stricter total: the evaluation's compile warm-up counted too
        lines.append(f"{'= eval phases + warm-up':<{width}}  {eval_s + t['compile_warmup_eval_s']:9.2f} s")
    return "\n".join(lines)


class SecondsSplit:
    """Where a pass's seconds went: `with split.phase("score_s"): ...` adds the block's wall seconds (the GPU
    synchronised at both ends) to that name. The evaluation's own clock: pgolf.eval depends on no training module."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        cuda_sync()
        t0 = time.perf_counter()
        try:
            yield self
        finally:
            cuda_sync()
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0

    def elapsed(self, name: str) -> float:
        return self.totals.get(name, 0.0)
