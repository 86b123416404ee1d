"""The results database: one SQLite row per run, filled from run records (record.json), never from logs.

`ingest_record` upserts a run by its run_id and drops any other row that points at the same run directory,
so ingesting twice, or re-ingesting a run that was restarted, leaves exactly one row per run.
"""

import csv
import json
import sqlite3
import time
from pathlib import Path

from pgolf.errors import UserError
from pgolf.runrecord import RunRecord, read_run_record

# (column, SQL type, path into record.json); a path of None is filled by ingest_record itself.
RESULT_COLUMNS = [
    ("run_id", "TEXT PRIMARY KEY", ("run_id",)),
    ("sweep", "TEXT", None),
    ("run_dir", "TEXT", None),
    ("recipe", "TEXT", ("recipe",)),
    ("config_json", "TEXT", ("config",)),
    ("config_hash", "TEXT", ("config_hash",)),
    ("seed", "INTEGER", ("seed",)),
    ("status", "TEXT", ("status",)),
    ("prequant_loss", "REAL", ("metrics", "prequant_loss")),
    ("prequant_bpb", "REAL", ("metrics", "prequant_bpb")),
    ("roundtrip_loss", "REAL", ("metrics", "roundtrip_loss")),
    ("roundtrip_bpb", "REAL", ("metrics", "roundtrip_bpb")),
    ("sliding_loss", "REAL", ("metrics", "sliding_loss")),
    ("sliding_bpb", "REAL", ("metrics", "sliding_bpb")),
    ("ttt_loss", "REAL", ("metrics", "ttt_loss")),
    ("ttt_bpb", "REAL", ("metrics", "ttt_bpb")),
    ("quant_delta", "REAL", ("metrics", "quant_delta")),
    ("val_tokens", "INTEGER", ("eval", "val_tokens")),
    ("val_split_tokens", "INTEGER", ("eval", "val_split_tokens")),
    ("steps", "INTEGER", ("train", "steps")),
    ("ms_per_step", "REAL", ("train", "ms_per_step")),
    ("tokens_per_s", "REAL", ("train", "tokens_per_s")),
    ("stop_reason", "TEXT", ("train", "stop_reason")),
    ("compile_warmup_s", "REAL", ("timings", "compile_warmup_s")),
    ("compile_warmup_eval_s", "REAL", ("timings", "compile_warmup_eval_s")),
    ("train_loop_s", "REAL", ("timings", "train_loop_s")),
    ("calibration_s", "REAL", ("timings", "calibration_s")),
    ("quantize_s", "REAL", ("timings", "quantize_s")),
    ("serialize_s", "REAL", ("timings", "serialize_s")),
    ("eval_plain_s", "REAL", ("timings", "eval_plain_s")),
    ("eval_sliding_s", "REAL", ("timings", "eval_sliding_s")),
    ("eval_ttt_s", "REAL", ("timings", "eval_ttt_s")),
    ("bytes_code", "INTEGER", ("bytes", "code")),
    ("bytes_artifact", "INTEGER", ("bytes", "artifact")),
    ("bytes_total", "INTEGER", ("bytes", "total")),
    ("bytes_cap", "INTEGER", ("bytes", "cap")),
    ("env_json", "TEXT", ("env",)),
    ("overrides_json", "TEXT", None),
    ("created_at", "TEXT", None),
]
RESULT_COLUMN_NAMES = [c[0] for c in RESULT_COLUMNS]
JSON_COLUMNS = ("config_json", "env_json")


def open_results_db(path) -> sqlite3.Connection:
    """Open (creating if needed) the results database; rows come back as sqlite3.Row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = sqlite3.connect(path, timeout=30.0)
        cols = ", ".join(f"{name} {typ}" for name, typ, _ in RESULT_COLUMNS)
        con.execute(f"CREATE TABLE IF NOT EXISTS runs ({cols})")
        add_missing_columns(con)
    except sqlite3.DatabaseError as e:
        raise UserError(f"{path}: not a usable results database ({e})") from e
    con.row_factory = sqlite3.Row
    return con


def add_missing_columns(con: sqlite3.Connection) -> None:
    """Bring a database written by an older pgolf up to RESULT_COLUMNS: columns it lacks are added (null)."""
    have = {row[1] for row in con.execute("PRAGMA table_info(runs)")}
    with con:
        for name, typ, _ in RESULT_COLUMNS:
            if name not in have:
                con.execute(f"ALTER TABLE runs ADD COLUMN {name} {typ}")


def _connect(db) -> tuple[sqlite3.Connection, bool]:
    """Accept a path or an open connection; the bool says whether we opened it (and must close it)."""
    if isinstance(db, sqlite3.Connection):
        return db, False
    return open_results_db(db), True


def _dig(record: dict, path: tuple):
    value = record
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def record_to_row(record: RunRecord, run_dir: Path, sweep=None, overrides=None) -> dict:
    """Flatten a run record into one database row (a dict keyed by column name)."""
    record, row = record.to_dict(), {}
    for name, _, path in RESULT_COLUMNS:
        if path is None:
            continue
        value = _dig(record, path)
        if isinstance(value, (dict, list)):
            value = json.dumps(value, sort_keys=True)
        row[name] = value
    row["run_id"] = row["run_id"] or run_dir.name
    row["sweep"] = sweep
    row["run_dir"] = str(run_dir.resolve())
    row["overrides_json"] = json.dumps(overrides or {}, sort_keys=True)
    row["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(run_dir.joinpath("record.json").stat().st_mtime))
    return row


def ingest_record(db, record_path, sweep=None, overrides=None) -> dict:
    """Upsert the run whose record.json is at record_path; returns the row. Idempotent.

    `overrides` are the swept settings of the run (dict key -> value, seed excluded); they name its arm.
    When None, the overrides already stored for this run (if any) are kept.
    """
    record_path = Path(record_path)
    if record_path.is_dir():
        record_path = record_path / "record.json"
    record = read_run_record(record_path)
    con, owned = _connect(db)
    try:
        row = record_to_row(record, record_path.parent, sweep, overrides)
        old = con.execute("SELECT sweep, overrides_json FROM runs WHERE run_id = ?", (row["run_id"],)).fetchone()
        if old is not None:
            row["sweep"] = sweep if sweep is not None else old["sweep"]
            if overrides is None:
                row["overrides_json"] = old["overrides_json"]
        with con:
            con.execute("DELETE FROM runs WHERE run_dir = ? AND run_id != ?", (row["run_dir"], row["run_id"]))
            names = ", ".join(RESULT_COLUMN_NAMES)
            marks = ", ".join("?" for _ in RESULT_COLUMN_NAMES)
            con.execute(f"INSERT OR REPLACE INTO runs ({names}) VALUES ({marks})",
                        [row.get(n) for n in RESULT_COLUMN_NAMES])
        return row
    finally:
        if owned:
            con.close()


def query_runs(db, where: str = "", params=(), sweep=None) -> list[dict]:
    """Rows as dicts (config and env decoded, `overrides` decoded), ordered by sweep, overrides, seed.

    `where` is an SQL condition on the columns (use ? placeholders with `params`); `sweep` filters by name.
    """
    clauses, args = [], list(params)
    if where:
        clauses.append(f"({where})")
    if sweep is not None:
        clauses.append("sweep = ?")
        args.append(sweep)
    sql = "SELECT * FROM runs" + (" WHERE " + " AND ".join(clauses) if clauses else "")
    sql += " ORDER BY sweep, overrides_json, seed, run_id"
    con, owned = _connect(db)
    try:
        try:
            rows = [dict(r) for r in con.execute(sql, args)]
        except sqlite3.OperationalError as e:
            raise UserError(f"query_runs: bad condition {where!r} ({e})") from e
    finally:
        if owned:
            con.close()
    for row in rows:
        for col in JSON_COLUMNS:
            row[col.removesuffix("_json")] = json.loads(row[col]) if row[col] else None
        row["overrides"] = json.loads(row["overrides_json"] or "{}")
    return rows


def export_csv(db, path, sweep=None) -> int:
    """Write every column of the runs table to a CSV file; returns the number of rows written."""
    rows = query_runs(db, sweep=sweep)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(RESULT_COLUMN_NAMES)
        for row in rows:
            writer.writerow([row[n] for n in RESULT_COLUMN_NAMES])
    return len(rows)


def arm_label(overrides: dict) -> str:
    """A short readable name for an arm: its swept settings, or 'base' when it has none."""
    if not overrides:
        return "base"
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(overrides.items()))


def _fmt_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_results_table(rows: list[dict]) -> str:
    """A plain-text table of runs for the terminal."""
    cols = [("run_id", "run"), ("sweep", "sweep"), ("seed", "seed"), ("status", "status"),
            ("prequant_bpb", "pre_bpb"), ("roundtrip_bpb", "rt_bpb"), ("sliding_bpb", "slide_bpb"),
            ("ttt_bpb", "ttt_bpb"), ("quant_delta", "q_delta"), ("steps", "steps"),
            ("ms_per_step", "ms/step"), ("bytes_total", "bytes")]
    table = [[title for _, title in cols]]
    for row in rows:
        table.append([_fmt_cell(row.get(key)) for key, _ in cols])
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
