"""`pgolf demo`: the whole pipeline on CPU from nothing but the installed package and Python itself.

Corpus from the standard library's own documentation -> a SentencePiece tokenizer -> challenge-format shards
-> a tiny model trained on them -> GPTQ artifact with exact byte accounting -> plain, sliding-window and
score-first TTT evaluation -> a report of the run. Everything lands in one folder (default runs/demo).
"""

import json
import time
from pathlib import Path

from pgolf.config import add_override_argument, apply_overrides
from pgolf.data.build import build_split_shards
from pgolf.data.stdlib_corpus import write_stdlib_corpus
from pgolf.data.tokenizer import train_tokenizer_from_docs
from pgolf.recipes import get_recipe

DEMO_VOCAB_SIZE = 512
DEMO_VAL_DOCS = 40


def add_demo_commands(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the whole pipeline on CPU on text that ships with Python")
    p.add_argument("--out", default="runs/demo", help="folder for the corpus, shards, run and report")
    p.add_argument("--steps", type=int, default=300, help="training steps of the tiny model")
    add_override_argument(p, "config override on the tiny recipe")
    p.set_defaults(func=cmd_demo)


def prepare_demo_data(out: Path) -> Path:
    """Corpus, tokenizer and shards under out/; reuses what an earlier demo already built."""
    data_dir = out / "data"
    manifest = data_dir / "manifest.json"
    if manifest.exists():
        return data_dir
    corpus = out / "stdlib_docs.jsonl"
    docs, nbytes = write_stdlib_corpus(corpus)
    print(f"[demo] corpus: {docs} documents, {nbytes:,} bytes of Python's own documentation -> {corpus}")
    tokenizer = out / "tokenizer.model"
    train_tokenizer_from_docs([corpus], DEMO_VOCAB_SIZE, tokenizer)
    print(f"[demo] tokenizer: SentencePiece BPE, {DEMO_VOCAB_SIZE} pieces -> {tokenizer}")
    build_split_shards([corpus], tokenizer, DEMO_VAL_DOCS, data_dir, progress=False)
    print(f"[demo] shards: {data_dir}")
    return data_dir


def demo_config(data_dir: Path, out: Path, steps: int, overrides: list[str]):
    cfg = get_recipe("tiny")
    cfg.model.vocab_size = DEMO_VOCAB_SIZE
    cfg.data.path = str(data_dir)
    cfg.out_dir = str(out)
    cfg.name = "run"
    cfg.train.max_steps = steps
    cfg.train.warmdown_iters = max(1, steps // 3)
    cfg.train.val_every = max(1, steps // 6)  # a validation curve beside the training loss in the report
    return apply_overrides(cfg, overrides)


def cmd_demo(args) -> int:
    from pgolf.experiments.report import report_single_run
    from pgolf.train.loop import train_run

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = prepare_demo_data(out)
    cfg = demo_config(data_dir, out, args.steps, args.overrides)
    run_dir = out / cfg.name
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    record = train_run(cfg)
    report = report_single_run(run_dir, out / "report")
    print_demo_summary(record, report, time.perf_counter() - started)
    return 0 if record.get("status") == "ok" else 1


def print_demo_summary(record: dict, report: Path, seconds: float) -> None:
    m, b = record.get("metrics", {}), record.get("bytes", {})
    rows = [("pre-quant val_bpb", m.get("prequant_bpb")), ("roundtrip val_bpb", m.get("roundtrip_bpb")),
            ("sliding val_bpb", m.get("sliding_bpb")), ("TTT val_bpb", m.get("ttt_bpb")),
            ("quant_delta", m.get("quant_delta")), ("total bytes", b.get("total"))]
    print("\n[demo] results")
    for label, value in rows:
        shown = "-" if value is None else (f"{value:,}" if isinstance(value, int) else f"{value:.4f}")
        print(f"  {label:<20} {shown}")
    legality = record.get("compliance", {}).get("legality")
    if legality:
        print("  legality            " + json.dumps(legality))
    print(f"[demo] report: {report}   ({seconds:.0f} s in all)")
