"""`pgolf quant RUN_DIR` (re-quantize a finished run) and `pgolf artifact inspect FILE`."""

import json
from pathlib import Path

import torch

from pgolf.config import (
    QuantConfig,
    RunConfig,
    add_override_argument,
    apply_overrides,
    config_from_dict,
    config_to_dict,
)
from pgolf.errors import UserError
from pgolf.fileio import atomic_write_bytes, atomic_write_text, replace_together
from pgolf.quant.artifact import inspect_artifact
from pgolf.quant.explain import explain_rows, format_explain
from pgolf.quant.pipeline import encode_state
from pgolf.quant.size import format_size_report
from pgolf.runrecord import QuantRecord, RunRecord, read_run_record, record_file_text
from pgolf.tensorfile import read_tensors


def run_quant_config(run_dir: Path, overrides: list[str]) -> QuantConfig:
    """The run's QuantConfig (from config.json when present), with "quant.field=value" overrides applied."""
    cfg = RunConfig()
    config_path = run_dir / "config.json"
    if config_path.exists():
        try:
            cfg.quant = config_from_dict(json.loads(config_path.read_text()).get("quant", {}), QuantConfig)
        except json.JSONDecodeError:
            raise UserError(f"{config_path}: not valid JSON") from None
    bad = [o for o in overrides if not o.startswith("quant.")]
    if bad:
        raise UserError(f"override(s) {bad} are not in the quant section (quant.field=value)")
    return apply_overrides(cfg, overrides).quant


def quant_read_run_record(run_dir: Path) -> RunRecord | None:
    """RUN_DIR/record.json (pgolf.runrecord.read_run_record), or None when the run has none."""
    path = run_dir / "record.json"
    return read_run_record(path) if path.exists() else None


def requantized_record(record: RunRecord, report: dict, cfg: QuantConfig) -> RunRecord:
    """The run record describing the new model.pgq: its bytes, timings and quant settings; the metrics of
    the old artifact (round trip, sliding, TTT) become null (`pgolf eval RUN_DIR` scores the new one)."""
    record = RunRecord.from_json_dict(json.loads(record_file_text(record)), "run record")  # a copy
    b = report["bytes"]
    record.bytes.update(code=b["code"], artifact=b["artifact"], total=b["total"], cap=b["cap"])
    record.compliance.bytes_total = b["total"]
    record.timings.update(quantize_s=report["timings"]["quantize_s"], serialize_s=report["timings"]["serialize_s"])
    for key in ("roundtrip_loss", "roundtrip_bpb", "sliding_loss", "sliding_bpb", "ttt_loss", "ttt_bpb",
                "quant_delta"):
        record.metrics[key] = None
    record.quant = QuantRecord(warnings=report["warnings"], fit=report["fit"], fit_k=report["fit_k"],
                               matrix_k=report["matrix_k"], fit_k_s=report["timings"].get("fit_k_s"),
                               sections=report["sections"], requantized=config_to_dict(cfg))
    record.config["quant"] = config_to_dict(cfg)
    return record


def print_quant_report(report: dict) -> None:
    for line in report["warnings"]:
        print(f"warning: {line}")
    for method, reason in report["skipped_codecs"].items():
        print(f"skipped {method}: {reason}")
    if report["fit"] and report["fit"].get("fitted") is False:
        print(f"does not fit: {report['fit']['reason']}")
    elif report["fit"] and report["fit"]["pruned"]:
        f = report["fit"]
        print(f"fit to budget: pruned {f['pruned']:,} of {f['candidates']:,} ±1 values in {f['steps']} steps, "
              f"{f['bytes_before']:,} -> {f['bytes_after']:,} B")
    if report["fit_k"]:
        k = report["fit_k"]
        print(f"matrix SDClip k = {k['k']:.3f} (chosen to fill the budget: {k['entropy_bits_per_value']:.3f} "
              f"bits/value of entropy, codec ratio {k['ratio']:.4f}, {report['timings']['fit_k_s']:.1f}s)")


def cmd_quant(args) -> int:
    """Re-quantize RUN_DIR/model.pgw. The run's own model.pgq is replaced, together with record.json, only
    when the new artifact fits the cap; an --out elsewhere is written either way."""
    run_dir = Path(args.run_dir)
    weights = run_dir / "model.pgw"
    if not weights.exists():
        raise UserError(f"{weights}: not found (is {run_dir} a finished run directory?)")
    cfg = run_quant_config(run_dir, args.overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # GPTQ runs where the tensors are
    state = {k: v.to(device) for k, v in read_tensors(weights)[0].items()}
    hessian_path = run_dir / "hessians.pgw"
    hessians = read_tensors(hessian_path)[0] if hessian_path.exists() else None
    if hessians is not None:
        hessians = {k: v.to(device) for k, v in hessians.items()}
    if hessians is None and cfg.method == "gptq":
        print(f"note: {hessian_path} not found; every matrix falls back to round-to-nearest")
    record = quant_read_run_record(run_dir)
    code_bytes = args.code_bytes
    if code_bytes is None:
        code_bytes = (record.bytes.code if record is not None else None) or 0
    run_artifact = run_dir / "model.pgq"
    out = Path(args.out) if args.out else run_artifact
    own = out.resolve() == run_artifact.resolve()
    report, blob = encode_state(state, hessians, cfg, code_bytes)
    if args.explain:
        report["explain"] = explain_rows(state, blob, cfg, hessians)
        print(format_explain(report["explain"]))
    print_quant_report(report)
    fits = report["bytes"]["fits"]
    if own and not fits:
        print(f"not written: the new artifact is over the cap by {-report['bytes']['headroom']:,} B; "
              f"{out}{' and record.json are' if record else ' is'} unchanged")
    elif own and record is not None:
        new_record = requantized_record(record, report, cfg)
        replace_together([(out, blob), (run_dir / "record.json", record_file_text(new_record).encode())])
    else:
        atomic_write_bytes(out, blob)
    if fits or not own:
        print(f"wrote {out} (quantize {report['timings']['quantize_s']:.1f}s, "
              f"serialize {report['timings']['serialize_s']:.1f}s)" + ("; record.json updated, its round-trip "
              "metrics cleared (pgolf eval scores the new artifact)" if own and record is not None else ""))
    print(format_size_report(report["bytes"]))
    if args.json:
        report["path"] = str(out) if fits or not own else None
        atomic_write_text(args.json, json.dumps({"config": config_to_dict(cfg), **report}, indent=1, default=str))
    return 0 if fits else 1


def cmd_artifact_inspect(args) -> int:
    rows = inspect_artifact(args.file)
    print(f"{'name':<40} {'shape':>14} {'kind':<12} {'bits':>4} {'bytes':>11}  codec")
    for r in rows:
        shape = "x".join(str(d) for d in r["shape"]) or "()"
        bits = r["bits"] or "-"
        print(f"{r['name']:<40} {shape:>14} {r['kind']:<12} {bits:>4} {r['bytes']:>11,}  {r['codec']}")
    size = Path(args.file).stat().st_size
    by_kind: dict[str, int] = {}
    for r in rows:
        by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + r["bytes"]
    print("totals: " + ", ".join(f"{k} {v:,} B" for k, v in sorted(by_kind.items()))
          + f"; file {size:,} B ({len(rows)} tensors; table and headers {size - sum(by_kind.values()):,} B)")
    return 0


def add_quant_commands(subparsers) -> None:
    p = subparsers.add_parser("quant", help="re-quantize a finished run's float weights into model.pgq")
    p.add_argument("run_dir", help="run directory holding model.pgw (and hessians.pgw for GPTQ)")
    add_override_argument(p, "quant override (quant.FIELD=VALUE)")
    p.add_argument("--code-bytes", type=int, default=None, help="code bytes to count (default: record.json)")
    p.add_argument("--out", default="", help="artifact path (default RUN_DIR/model.pgq)")
    p.add_argument("--json", default="", help="also write the full export report as JSON here")
    p.add_argument("--explain", action="store_true",
                   help="print every tensor's quantization rule, stored bytes and round-trip error")
    p.set_defaults(func=cmd_quant)

    a = subparsers.add_parser("artifact", help="work with quantized artifacts")
    asub = a.add_subparsers(dest="artifact_command", metavar="ACTION")
    i = asub.add_parser("inspect", help="per-tensor bytes, bits and codec of an artifact")
    i.add_argument("file")
    i.set_defaults(func=cmd_artifact_inspect)
