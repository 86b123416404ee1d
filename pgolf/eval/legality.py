"""The legality harness: the checks any eval method (plain, sliding, TTT) must pass (PG#1017's C1-C4, and the bytes).

- causality (C1): flipping token t changes no score of a target before t (the score of t itself may change:
  its target changed). For score-first TTT this holds too: an update that used t only touches later chunks.
  At sampled scored positions, the score must also equal the score of the prefix alone (catches a model
  that reads its own target, which no flip of an earlier target can show).
- normalization (C2): at sampled scored positions, the scored distribution, read back through the same
  scoring call with every vocabulary id as the stream's next token, sums to 1. TTT's adapted model is
  probed at the moment it scores.
- score_before_update (C3, C4): from the TTT event trace, no update uses a token before it was scored; from
  the trace and the per-token counts, every target is scored exactly once.
- byte_denominator: the result's bytes are those of its byte source (the tokenizer's LUT, or the data's
  per-token sidecar, pgolf.data.bytes) summed over exactly the targets it scored: a CaseOps run that fell back
  to the LUT, or a scorer that counts a target twice or not at all, fails here.
- no_val_in_training: no file matching the validation pattern was opened in the train or calibration phase
  (pgolf.data.shards.FILE_AUDIT; for a finished run, the audit `pgolf train` saved as RUN_DIR/file_audit.json).

`eval_fn(model, val_tokens, lut, return_per_token=True, inspect=probe) -> dict` with "per_token_nll",
"per_token_count" and, for TTT, "trace": the real methods take these keywords (bind the rest with a lambda).
"""

import fnmatch
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pgolf.data.bytes import byte_lut_of, target_byte_counts
from pgolf.errors import UserError
from pgolf.eval.bpb import score_token_nll

FILE_AUDIT_NAME = "file_audit.json"  # a run's shard opens, [[phase, path], ...], written by pgolf train


@dataclass
class CheckResult:
    name: str
    passed: bool
    detail: str


class ScoreProbe:
    """An `inspect` hook: at scored batch calls 0, 1, 3, 7, ... (so late, adapted models are seen too) it
    probes a few scored positions t of the batch and records, per position,
    - the sum over the vocabulary of exp(-score) when the stream's token at t + 1 is set to each id v (as
      target, and as the next input where the window holds it): 1 for a normalized scorer;
    - |score - score from the prefix alone| (the window cut right after t): 0 for a causal scorer, whatever
      the model reads of the target token or later tokens shows up here."""

    def __init__(self, vocab_size: int, max_probes: int = 4, positions: int = 2, vocab_block: int = 256):
        self.vocab_size, self.max_probes = vocab_size, max_probes
        self.positions, self.vocab_block = positions, vocab_block
        self.calls = 0
        self.probes: list[tuple[float, float]] = []  # (|sum p - 1|, |score - prefix-only score|)

    def __call__(self, model, x, y, nll, mask) -> None:
        call = self.calls
        self.calls += 1
        if len(self.probes) >= self.max_probes or (call + 1) & call:  # only at calls 2^k - 1
            return
        where = mask.nonzero().cpu()
        if where.numel() == 0:
            return
        for k in torch.linspace(0, where.shape[0] - 1, self.positions).round().long().unique().tolist():
            row, t = (int(v) for v in where[k])
            self.probes.append(self.probe_position(model, x[row], y[row], t, float(nll[row, t])))

    def probe_position(self, model, x_row, y_row, t: int, scored: float) -> tuple[float, float]:
        cut = min(t + 2, x_row.numel())
        nll_all = []
        for v0 in range(0, self.vocab_size, self.vocab_block):
            ids = torch.arange(v0, min(v0 + self.vocab_block, self.vocab_size), device=x_row.device)
            xs = x_row[None, :cut].repeat(ids.numel(), 1)
            ys = y_row[None, :cut].repeat(ids.numel(), 1)
            ys[:, t] = ids
            if t + 1 < cut:
                xs[:, t + 1] = ids
            nll_all.append(score_token_nll(model, xs, ys)[:, t].double())
        total = float(torch.exp(-torch.cat(nll_all)).sum())
        prefix = float(score_token_nll(model, x_row[None, :t + 1], y_row[None, :t + 1])[0, t])
        return abs(total - 1.0), abs(prefix - scored)


def scored_before(base: dict, t: int) -> torch.Tensor:
    """The targets a flip of token t must leave unchanged: those before t that were scored no later than t
    was (by "per_token_score_step" where the method scores out of stream order, document TTT's queue; else
    every target 1 .. t - 1). A target scored after t may move: score-first adaptation used t by then."""
    n = base["per_token_nll"].numel()
    earlier = torch.zeros(n, dtype=torch.bool)
    earlier[1:t] = True
    step = base.get("per_token_score_step")
    if step is not None:
        earlier &= step <= step[t]
    return earlier


def check_causality(make_model, val_tokens, lut, eval_fn, base: dict, flip_positions, vocab_size: int,
                    atol: float, probe: ScoreProbe, prefix_tol: float) -> CheckResult:
    worst, where, later_changed = 0.0, None, 0
    for t in flip_positions:
        flipped = val_tokens.clone()
        flipped[t] = (flipped[t] + 1) % vocab_size
        out = eval_fn(make_model(), flipped, lut, return_per_token=True)
        a, b = base["per_token_nll"], out["per_token_nll"]
        earlier = scored_before(base, t)
        diff = torch.where(earlier, (a - b).abs().nan_to_num(nan=math.inf), 0.0)
        if bool(earlier.any()) and float(diff.max()) > worst:
            worst, where = float(diff.max()), (t, int(diff.argmax()))
        later_changed += int(((a - b).abs() > atol)[~earlier].sum())
    if where is not None and worst > atol:
        return CheckResult("causality", False, f"flipping token {where[0]} changed the score of earlier target "
                                               f"{where[1]} by {worst:.3g} nats")
    prefix_dev = max((p[1] for p in probe.probes), default=0.0)
    if prefix_dev > prefix_tol:
        return CheckResult("causality", False, f"a score differs by {prefix_dev:.3g} nats from the score of its "
                                               f"prefix alone: it reads its target or later tokens")
    return CheckResult("causality", True, f"{len(flip_positions)} flips: earlier scores unchanged (max |d| "
                                          f"{worst:.1e}, {later_changed} later moved); {len(probe.probes)} "
                                          f"prefix-only rescores within {prefix_dev:.1e}")


def check_normalization(probe: ScoreProbe, tol: float) -> CheckResult:
    if not probe.probes:
        return CheckResult("normalization", False, "no scored position was probed")
    sum_dev = max(p[0] for p in probe.probes)
    return CheckResult("normalization", sum_dev <= tol, f"{len(probe.probes)} positions: max |sum p - 1| "
                                                        f"{sum_dev:.1e} (tol {tol:g})")


def event_spans(ev: dict) -> list[tuple[int, int]]:
    """The inclusive token ranges of a trace event: its "spans" (document TTT: one per document), else
    [first, last] (stream TTT)."""
    return [tuple(sp) for sp in ev["spans"]] if "spans" in ev else [(ev["first"], ev["last"])]


def event_where(ev: dict) -> str:
    return f"chunk {ev['chunk']}" if "chunk" in ev else f"step {ev.get('step')}"


def trace_violations(trace: list, n_tokens: int) -> tuple[torch.Tensor, list[str]]:
    """Replay a TTT event trace: times each target was scored, and the violations found."""
    counts = torch.zeros(n_tokens, dtype=torch.int32)
    problems, updates = [], 0
    for ev in trace:
        if ev["event"] == "score":
            if ev["updates"] != updates:
                problems.append(f"{event_where(ev)} claims update count {ev['updates']}, replay says {updates}")
            for first, last in event_spans(ev):
                counts[first:last + 1] += 1
        elif ev["event"] == "update":
            updates += 1
            for first, last in event_spans(ev):
                used = counts[first:last + 1].clone()
                if first == 0:
                    used[0] = 1  # token 0 is context only, never a target
                if bool((used == 0).any()):
                    first_bad = first + int((used == 0).nonzero()[0])
                    problems.append(f"update {updates} ({event_where(ev)}) used token {first_bad} before it was "
                                    f"scored")
                    break
    return counts, problems


def check_score_before_update(base: dict, n_tokens: int) -> CheckResult:
    problems = []
    count = base.get("per_token_count")
    if count is not None:
        bad = (count[1:] != 1).nonzero()
        if bad.numel():
            t = 1 + int(bad[0])
            problems.append(f"target {t} was scored {int(count[t])} times ({bad.numel()} targets not exactly once)")
    trace = base.get("trace")
    updates = 0
    if trace is not None:
        counts, trace_problems = trace_violations(trace, n_tokens)
        problems += trace_problems
        updates = sum(ev["event"] == "update" for ev in trace)
        if not bool((counts[1:] == 1).all()):
            problems.append("the trace does not score every target exactly once")
    if problems:
        return CheckResult("score_before_update", False, problems[0])
    what = f"{updates} updates, each after the tokens it used were scored" if trace is not None else "no updates"
    return CheckResult("score_before_update", True, f"{n_tokens - 1} targets scored exactly once; {what}")


def check_byte_denominator(base: dict, tokens: torch.Tensor, lut) -> CheckResult:
    """base["bytes"] against the byte source's count of every target base scored (per_token_count > 0)."""
    count = base.get("per_token_count")
    if count is None:
        return CheckResult("byte_denominator", False, "the result has no per-token counts")
    pos = (count[1:] > 0).nonzero().flatten() + 1
    expected = int(target_byte_counts(tokens[pos - 1], tokens[pos], lut, pos).sum())
    what = "sidecar" if byte_lut_of(lut) is not lut else "LUT"
    if int(base["bytes"]) != expected:
        return CheckResult("byte_denominator", False, f"bpb divides by {int(base['bytes']):,} bytes; the {what} "
                                                      f"counts {expected:,} over the {pos.numel():,} scored targets")
    return CheckResult("byte_denominator", True, f"{expected:,} bytes = the {what}'s count over the "
                                                 f"{pos.numel():,} scored targets")


def check_val_not_opened(audit, val_pattern: str, phases=("train", "calibration")) -> CheckResult:
    opened = {ph: audit.opened(ph) for ph in phases}
    total = sum(len(v) for v in opened.values())
    for ph, paths in opened.items():
        for p in paths:
            if fnmatch.fnmatch(Path(p).name, val_pattern):
                return CheckResult("no_val_in_training", False, f"validation file {p} was opened in phase {ph!r}")
    return CheckResult("no_val_in_training", True, f"{total} file opens in {'/'.join(phases)}, none matches "
                                                   f"{val_pattern!r}")


class RecordedAudit:
    """A file audit read back from a run directory's file_audit.json: [[phase, path], ...]."""

    def __init__(self, records: list):
        self.records = [(str(ph), str(p)) for ph, p in records]

    def opened(self, phase: str | None = None) -> list[str]:
        return [p for ph, p in self.records if phase is None or ph == phase]


def read_file_audit(path) -> RecordedAudit:
    try:
        return RecordedAudit(json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError):
        raise UserError(f"{path}: not a list of [phase, path] pairs") from None


def check_run_audit(audit: RecordedAudit | None, val_pattern: str, run_dir) -> CheckResult:
    """no_val_in_training from a run's saved audit: FAIL when there is none, or when it shows no training
    read at all (then it is not the audit of a training run), else check_val_not_opened."""
    if audit is None:
        return CheckResult("no_val_in_training", False, f"no {FILE_AUDIT_NAME} in {run_dir}: which shards the "
                                                        f"training read is unknown")
    if not audit.opened("train"):
        return CheckResult("no_val_in_training", False, f"{Path(run_dir) / FILE_AUDIT_NAME} records no shard "
                                                        f"read in the train phase")
    return check_val_not_opened(audit, val_pattern)


def flip_off_bos(tokens: torch.Tensor, t: int, vocab_size: int) -> int:
    """The first position from t whose token neither is a BOS nor becomes one when flipped (token + 1): a flip
    there keeps the documents where they are (document-isolated passes split the stream at BOS tokens)."""
    from pgolf.data.loader import TRAIN_BOS_ID

    while t < tokens.numel() - 1 and TRAIN_BOS_ID in (int(tokens[t]), (int(tokens[t]) + 1) % vocab_size):
        t += 1
    return t


def run_legality_checks(make_model, val_tokens: torch.Tensor, lut, eval_fn, *, audit=None,
                        val_pattern: str = "fineweb_val_*.bin", flip_positions=None, atol: float = 1e-5,
                        norm_tol: float = 1e-4, prefix_tol: float | None = None,
                        max_probes: int = 4, audit_row: CheckResult | None = None) -> list[CheckResult]:
    """Run the checks of one eval method; make_model() returns a fresh model (same weights each call).

    The no_val_in_training row checks `audit` (this process's FILE_AUDIT by default), or is `audit_row` when
    the caller decided it already (pgolf check: check_run_audit on the run's saved file_audit.json).

    prefix_tol (default 1e-4 on CPU, 3e-2 on CUDA where bf16 kernels differ with the sequence length) bounds
    |score - prefix-only score|; atol bounds the change of earlier scores under a flip (same shapes)."""
    if audit is None and audit_row is None:
        from pgolf.data.shards import FILE_AUDIT
        audit = FILE_AUDIT
    tokens = val_tokens.cpu().long()
    n = tokens.numel()
    vocab_size = int(byte_lut_of(lut).base_bytes.numel())
    if flip_positions is None:  # off round chunk edges, and off document boundaries
        flip_positions = sorted({flip_off_bos(tokens, max(2, int(n * f)), vocab_size) for f in (0.37, 0.71)})
    probe = ScoreProbe(vocab_size, max_probes=max_probes)
    model = make_model()
    if prefix_tol is None:
        prefix_tol = 3e-2 if next(model.parameters()).device.type == "cuda" else 1e-4
    base = eval_fn(model, tokens, lut, return_per_token=True, inspect=probe)
    return [
        check_causality(make_model, tokens, lut, eval_fn, base, flip_positions, vocab_size, atol, probe,
                        prefix_tol),
        check_normalization(probe, norm_tol),
        check_score_before_update(base, n),
        check_byte_denominator(base, tokens, lut),
        audit_row if audit_row is not None else check_val_not_opened(audit, val_pattern),
    ]


def format_check_table(results: list[CheckResult]) -> str:
    width = max([len(r.name) for r in results] + [5])
    lines = [f"{'check':<{width}}  result  detail"]
    for r in results:
        lines.append(f"{r.name:<{width}}  {'PASS' if r.passed else 'FAIL':<6}  {r.detail}")
    return "\n".join(lines)
