"""After training: the run record, the validation data, and `finish_run` (quantize, evaluate, record.json).

`finish_run` is the one hook between training and the quant / eval concerns. Each step runs only when its
module is in the package and the config enables it; a metric that was not computed stays null.
"""

import copy
import json
import sys
from pathlib import Path

import torch

from pgolf.config import RunConfig, config_hash, config_to_dict
from pgolf.data.bytes import ByteSidecar
from pgolf.data.loader import load_val_tokens
from pgolf.data.shards import FILE_AUDIT, resolve_shard_files, shard_token_count
from pgolf.dist import DistEnv, all_gather_text, barrier, print0
from pgolf.eval.legality import FILE_AUDIT_NAME, check_val_not_opened, read_file_audit
from pgolf.eval.receipts import compliance_summary, format_compliance_table, format_timing_receipt
from pgolf.eval.runner import eval_log, passes_from_config, run_pass, run_passes
from pgolf.fileio import OutputError
from pgolf.runlog import write_json_atomic, write_record
from pgolf.runrecord import BytesRecord, RunRecord
from pgolf.train.clock import PhaseTimer

# The PhaseTimer phases a run records as timings["<phase>_s"] (quantize_s and serialize_s come from the export).
TIMER_PHASES = ("compile_warmup", "compile_warmup_eval", "train_loop", "calibration", "eval_decompress", "eval_plain",
                "eval_sliding", "eval_ttt", "eval_roundtrip")
# The eval phases a run's compliance counts: the artifact's read (decompress + dequantize) and every pass.
EVAL_PHASES = ("eval_decompress", "eval_roundtrip", "eval_sliding", "eval_ttt")


def new_record(cfg: RunConfig, env: dict, run_dir) -> RunRecord:
    """The run record of a run starting now (pgolf.runrecord: every field present, null until computed)."""
    return RunRecord(run_id=Path(run_dir).name, recipe=cfg.recipe, config=config_to_dict(cfg),
                     config_hash=config_hash(cfg), seed=cfg.train.seed, status="failed", env=env,
                     bytes=BytesRecord(cap=cfg.quant.size_cap))


class RunFileAudit:
    """The shard opens of one run: FILE_AUDIT's records since the run began (every rank's, gathered when
    saved), after those a resumed run's earlier processes saved in RUN_DIR/file_audit.json. `pgolf check`
    reads that file; `save` is collective (every rank calls it), `save(gather=False)` this rank's alone."""

    def __init__(self, run_dir, resume: bool):
        self.path = Path(run_dir) / FILE_AUDIT_NAME
        self.start = len(FILE_AUDIT.records())
        self.prior = read_file_audit(self.path).records if resume and self.path.is_file() else []

    def records(self, gather: bool = True) -> list[tuple[str, str]]:
        own = FILE_AUDIT.records()[self.start:]
        ranks = [json.loads(t) for t in all_gather_text(json.dumps(own))] if gather else [own]
        seen: dict[tuple[str, str], None] = {}
        for rec in self.prior + [tuple(r) for rank in ranks for r in rank]:
            seen.setdefault((str(rec[0]), str(rec[1])), None)
        return list(seen)

    def opened(self, phase: str | None = None) -> list[str]:
        return [p for ph, p in self.records(gather=False) if phase is None or ph == phase]

    def save(self, is_main: bool, gather: bool = True) -> None:
        records = self.records(gather)
        if is_main:
            write_json_atomic(self.path, [list(r) for r in records])


def save_failed_run(run_dir, record: RunRecord, audit: RunFileAudit | None, error: BaseException) -> None:
    """After an exception in a run: record.json with status "failed" and the error, and the file audit (this
    rank's), written where possible; what cannot be written goes to stderr, so no computed number is lost."""
    record.status = "failed"
    record.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    try:
        if audit is not None:
            audit.save(True, gather=False)
        write_record(run_dir, record)
        print(f"pgolf: run {run_dir} failed; its record (status 'failed') is in {Path(run_dir) / 'record.json'}",
              file=sys.stderr)
    except OutputError as e:
        print(f"pgolf: {e}; the run record follows:", file=sys.stderr)
        kept = record.to_dict()
        print(json.dumps({k: kept[k] for k in ("run_id", "status", "error", "train", "metrics", "bytes", "timings")},
                         default=str), file=sys.stderr)


def load_val_data(cfg: RunConfig, val_files, tokenizer_path, cache: dict) -> tuple[torch.Tensor, object]:
    """Validation tokens (read inside FILE_AUDIT phase "eval") and their byte source (the val byte sidecar where
    the data has one, else the byte LUT: pgolf.data.sidecar.load_val_byte_source), loaded once per run.

    This is where eval.val_tokens cuts the stream: every evaluation of the run (pre-quant, round trip,
    sliding, TTT) scores the tokens returned here. cache["split_tokens"] keeps the size of the whole split."""
    if "tokens" not in cache:
        import sentencepiece as spm

        from pgolf.data.sidecar import load_val_byte_source

        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
        with FILE_AUDIT.phase("eval"):
            cache["tokens"] = load_val_tokens(val_files, vocab_size=cfg.model.vocab_size,
                                              max_tokens=cfg.eval.val_tokens)
            cache["split_tokens"] = sum(shard_token_count(p) for p in resolve_shard_files(val_files))
            # the val byte sidecar where the data has one (CaseOps: required), cut as the tokens; else the LUT
            cache["lut"] = load_val_byte_source(resolve_shard_files(val_files), cache["tokens"], sp,
                                                cfg.model.vocab_size)
        n, split = cache["tokens"].numel(), cache["split_tokens"]
        if n < split:
            print0(f"eval: scoring the first {n:,} of {split:,} validation tokens (eval.val_tokens; a subset "
                   "score, not comparable with a whole-split one)")
    return cache["tokens"], cache["lut"]


def fill_eval_scope(record: dict, cache: dict) -> None:
    """State in the record how many validation tokens the evaluations scored, and of how many in the split."""
    if "tokens" not in cache:
        return
    n, split = int(cache["tokens"].numel()), int(cache["split_tokens"])
    record["eval"] = {"val_tokens": n, "val_split_tokens": split, "val_subset": n < split}
    if isinstance(cache["lut"], ByteSidecar):  # CaseOps data: both denominators (plain data's record is unchanged)
        record["eval"].update(val_byte_denominators(cache["tokens"], cache["lut"]))


def val_byte_denominators(tokens: torch.Tensor, source) -> dict:
    """The bytes of the val_tokens - 1 targets every evaluation scores: "bytes_source" (sidecar | lut),
    "val_bytes" (the denominator of the run's bpb) and, with a sidecar, "val_lut_bytes" (the tokenizer LUT's)."""
    from pgolf.data.bytes import byte_lut_of
    from pgolf.eval.bpb import stream_byte_cumsum

    out = {"bytes_source": "sidecar" if isinstance(source, ByteSidecar) else "lut",
           "val_bytes": int(stream_byte_cumsum(tokens, source)[-1])}
    if isinstance(source, ByteSidecar):
        out["val_lut_bytes"] = int(stream_byte_cumsum(tokens, byte_lut_of(source))[-1])
    return out


def eval_seq_len(cfg: RunConfig) -> int:
    return cfg.eval.seq_len or cfg.train.seq_len


def evaluate_prequant(model, cfg: RunConfig, val_files, tokenizer_path, denv, cache: dict) -> dict:
    """The config's plain pass (pgolf.eval.runner; document-isolated with eval.doc_isolated) of the model over
    the validation tokens (the first eval.val_tokens, or all)."""
    tokens, lut = load_val_data(cfg, val_files, tokenizer_path, cache)
    with FILE_AUDIT.phase("eval"):
        return run_pass(model, tokens, lut, passes_from_config(cfg, final_eval=False)[0], denv.rank, denv.world_size)


def timed(timer: PhaseTimer, name: str, fn, *args, **kwargs):
    with timer.phase(name):
        return fn(*args, **kwargs)


def run_code_bytes(cfg: RunConfig, run_dir: Path, code_bytes: int | None, is_main: bool) -> int | None:
    """Bytes of the submission script: given by the exported script itself, else generated into the run dir."""
    if code_bytes is not None:
        return int(code_bytes)
    from pgolf.export.amalgamate import export_script

    path = run_dir / "train_gpt.py"
    if is_main:
        export_script(cfg, path)
    barrier()
    return path.stat().st_size


def quantize_and_roundtrip(cfg: RunConfig, model, hessians: dict, run_dir: Path, timer: PhaseTimer,
                           record: dict, is_main: bool):
    """export_artifact -> model.pgq on rank 0; returns a copy of the model holding the round-tripped weights."""
    from pgolf.quant.artifact import read_artifact
    from pgolf.quant.pipeline import export_artifact

    artifact = run_dir / "model.pgq"
    code = record["bytes"]["code"] or 0
    report = export_artifact(model, hessians or None, cfg.quant, artifact, code) if is_main else None
    barrier()
    if report is not None:
        record["timings"]["quantize_s"] = report["timings"]["quantize_s"]
        record["timings"]["serialize_s"] = report["timings"]["serialize_s"]
        record["bytes"]["artifact"] = report["bytes"]["artifact"]
        record["quant"] = {"warnings": report.get("warnings", []), "fit": report.get("fit"),
                           "fit_k": report.get("fit_k"), "matrix_k": report.get("matrix_k"),
                           "fit_k_s": report["timings"].get("fit_k_s"),
                           "sections": report.get("sections")}
    quantized = copy.deepcopy(model)
    with timer.phase("eval_decompress"):  # the evaluation's read of the artifact: decompress and dequantize
        restored = read_artifact(artifact)
    current = quantized.state_dict()
    quantized.load_state_dict({k: v.to(dtype=current[k].dtype, device=current[k].device)
                               for k, v in restored.items() if k in current}, strict=False)
    return quantized


def finish_run(cfg: RunConfig, model, hessians: dict, run_dir, env: dict, timer: PhaseTimer, record: dict,
               *, denv=None, val_files=None, tokenizer_path=None, val_cache=None, final_eval: bool = True,
               code_bytes: int | None = None, audit: RunFileAudit | None = None) -> dict:
    """Quantize (when cfg.quant.enabled), evaluate the round-tripped model
    (plain, sliding, TTT as configured), fill record metrics / bytes / timings / compliance, write record.json."""
    denv = denv or DistEnv()
    run_dir = Path(run_dir)
    val_cache = {} if val_cache is None else val_cache
    metrics = record["metrics"]
    eval_model = model
    if cfg.quant.enabled:
        record["bytes"]["code"] = run_code_bytes(cfg, run_dir, code_bytes, denv.is_main)
    if cfg.quant.enabled:
        eval_model = quantize_and_roundtrip(cfg, model, hessians, run_dir, timer, record, denv.is_main)
        res = timed(timer, "eval_roundtrip", evaluate_prequant, eval_model, cfg, val_files, tokenizer_path, denv,
                    val_cache)
        metrics["roundtrip_loss"], metrics["roundtrip_bpb"] = res["val_loss"], res["val_bpb"]
        if metrics["prequant_bpb"] is not None:
            metrics["quant_delta"] = res["val_bpb"] - metrics["prequant_bpb"]
    final = [spec for spec in passes_from_config(cfg) if spec.kind != "plain"] if final_eval else []
    if final:
        tokens, lut = load_val_data(cfg, val_files, tokenizer_path, val_cache)
        with FILE_AUDIT.phase("eval"):
            run = run_passes(eval_model, tokens, lut, final, denv.rank, denv.world_size, phase=timer.phase,
                             log=eval_log if denv.is_main else None)
        for name, res in run.results.items():
            metrics[f"{name}_loss"], metrics[f"{name}_bpb"] = res.val_loss, res.val_bpb
    fill_eval_scope(record, val_cache)
    fill_timings(record, timer)
    fill_compliance(cfg, record, audit)
    if audit is not None:
        audit.save(denv.is_main)
    record["status"] = "ok"
    if denv.is_main:
        write_record(run_dir, record)
    return record


def fill_compliance(cfg: RunConfig, record: dict, audit=None) -> None:
    """The compliance summary (budgets, bytes, the file-audit legality check on `audit`, by default every
    FILE_AUDIT record of this process) into the record; printed on rank 0.

    The causality, normalization and score-before-update checks need extra forward passes: `pgolf check`
    runs them on a finished run."""
    audit = check_val_not_opened(FILE_AUDIT if audit is None else audit, cfg.data.val_pattern)
    total = record["bytes"]["total"]
    summary = compliance_summary(record["timings"], total if total is not None else 0, [audit],
                                 train_cap_s=cfg.train.wallclock_s or 600.0, eval_cap_s=cfg.eval.time_budget_s,
                                 size_cap=cfg.quant.size_cap)
    record["compliance"].update(summary)
    print0(format_timing_receipt({k: v for k, v in record["timings"].items() if v is not None}))
    print0(format_compliance_table(summary))


def timer_timings(timer: PhaseTimer) -> dict:
    """{"<phase>_s": seconds} of the TIMER_PHASES the timer has run."""
    r = timer.receipt()
    return {f"{phase}_s": r[phase] for phase in TIMER_PHASES if phase in r}


def fill_timings(record: dict, timer: PhaseTimer) -> None:
    """Copy the timer's receipt into the record's timings and compliance blocks."""
    r = timer.receipt()
    record["timings"].update(timer_timings(timer))
    b = record["bytes"]
    if b["artifact"] is not None and b["code"] is not None:
        b["total"] = b["artifact"] + b["code"]
    c = record["compliance"]
    c["train_plus_calibration_s"] = r.get("train_loop", 0.0) + r.get("calibration", 0.0)
    c["eval_s"] = sum(r.get(k, 0.0) for k in EVAL_PHASES) if any(k in r for k in EVAL_PHASES) else None
    # the stricter total: the evaluation's compile warm-up too (frontier.md §8.7 reports both)
    c["eval_with_warmup_s"] = None if c["eval_s"] is None else c["eval_s"] + r.get("compile_warmup_eval", 0.0)
    c["bytes_total"] = b["total"]
