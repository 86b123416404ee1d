"""The run record (RUN_DIR/record.json) as a typed tree: one schema, one writer, one reader.

RunRecord and its sections are dataclasses; their fields are the record's keys, in the file's order. Item
access reads and writes the same fields (record["metrics"]["roundtrip_bpb"] is record.metrics.roundtrip_bpb),
so code that fills the record by key keeps working, but a key outside the schema is an error there and when
a file is read. `record_file_text` is the one serialisation (runlog.write_record writes it atomically);
`read_run_record` the one reader: it checks the schema version, the keys and the value types, and migrates
records of schema 1 (the files from before the version field: the same keys, some blocks absent).

Adding a field: give it a default here and bump RECORD_SCHEMA only when old files would read differently.
"""

import dataclasses
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin

from pgolf.errors import UserError

RECORD_SCHEMA = 2  # 1: the records from before this field (no "schema" key)
RECORD_FILE_NAME = "record.json"


class RecordSection:
    """A block of the run record: a dataclass whose fields are the block's keys, also readable and writable
    by key. Setting a key the block does not have raises KeyError; a dict set on a block-valued key becomes
    that block (checked key by key)."""

    def _field(self, key: str) -> dataclasses.Field:
        for f in dataclasses.fields(self):
            if f.name == key:
                return f
        raise KeyError(f"run record block {type(self).__name__} has no field {key!r}")

    def __getitem__(self, key: str):
        return getattr(self, self._field(key).name)

    def __setitem__(self, key: str, value) -> None:
        section = section_type(self._field(key).type)
        if section is not None and isinstance(value, dict):
            value = section.from_dict(value, f"{type(self).__name__}.{key}")
        setattr(self, key, value)

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def get(self, key: str, default=None):
        return getattr(self, key) if key in self.keys() else default

    def update(self, other=(), **values) -> None:
        for key, value in dict(other, **values).items():
            self[key] = value

    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, RecordSection) else v for k, v in self.items()}

    @classmethod
    def from_dict(cls, data, where: str = ""):
        """The block of `data` (a dict); missing keys take their defaults, unknown keys and values of the
        wrong type are UserErrors naming `where`.key."""
        where = where or cls.__name__
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(data).__name__}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise UserError(f"{where}: unknown key(s) {unknown} (not in the run record schema {RECORD_SCHEMA})")
        values = {}
        for key, value in data.items():
            kind = names[key].type
            section = section_type(kind)
            if section is not None and isinstance(value, dict):
                values[key] = section.from_dict(value, f"{where}.{key}")
            else:
                check_record_value(value, kind, f"{where}.{key}")
                values[key] = value
        return cls(**values)


def section_type(kind):
    """The RecordSection class a field annotation holds (Section or Section | None), else None."""
    for option in get_args(kind) or (kind,):
        if isinstance(option, type) and issubclass(option, RecordSection):
            return option
    return None


def check_record_value(value, kind, where: str) -> None:
    """UserError unless value fits the annotation (int, float, str, bool, dict, list, or X | None; a float
    field takes an int; bool is never taken for a number)."""
    options = get_args(kind) if get_origin(kind) in (Union, types.UnionType) else (kind,)
    for option in options:
        option = get_origin(option) or option
        if option is Any or (option is type(None) and value is None):
            return
        if option is type(None) or isinstance(value, bool) != (option is bool):
            continue
        if isinstance(value, option) or (option is float and isinstance(value, int)):
            return
    names = " | ".join(getattr(get_origin(o) or o, "__name__", str(o)) for o in options)
    raise UserError(f"{where}: expected {names}, got {type(value).__name__} {value!r:.60}")


@dataclass
class TrainRecord(RecordSection):
    steps: int | None = None
    ms_per_step: float | None = None
    tokens_per_s: float | None = None
    train_tokens: int | None = None
    stop_reason: str | None = None
    params: int | None = None
    qat_clip_k: float | None = None  # the SDClip k late QAT trained against (None: QAT never on)
    averaged: str | None = None  # the weights evaluated: "ema", "swa" or "none" (swap_in_averaged)


@dataclass
class MetricsRecord(RecordSection):
    """Validation scores of the run's stages (nats per token, bits per byte); null when not computed."""
    prequant_loss: float | None = None
    prequant_bpb: float | None = None
    roundtrip_loss: float | None = None
    roundtrip_bpb: float | None = None
    sliding_loss: float | None = None
    sliding_bpb: float | None = None
    ttt_loss: float | None = None
    ttt_bpb: float | None = None
    quant_delta: float | None = None


@dataclass
class BytesRecord(RecordSection):
    code: int | None = None
    artifact: int | None = None
    total: int | None = None
    cap: int | None = None


@dataclass
class TimingsRecord(RecordSection):
    """Seconds of each phase ("<phase>_s" of the PhaseTimer; quantize_s and serialize_s from the export)."""
    compile_warmup_s: float | None = None
    compile_warmup_eval_s: float | None = None
    train_loop_s: float | None = None
    calibration_s: float | None = None
    quantize_s: float | None = None
    serialize_s: float | None = None
    eval_decompress_s: float | None = None  # the evaluation's read of the artifact (decompress + dequantize)
    eval_plain_s: float | None = None
    eval_sliding_s: float | None = None
    eval_ttt_s: float | None = None
    eval_roundtrip_s: float | None = None


@dataclass
class EvalRecord(RecordSection):
    """How many validation tokens the evaluations scored, of how many in the split, and their bytes."""
    val_tokens: int | None = None
    val_split_tokens: int | None = None
    val_subset: bool | None = None
    bytes_source: str | None = None  # "sidecar" | "lut" (CaseOps data only)
    val_bytes: int | None = None
    val_lut_bytes: int | None = None


@dataclass
class ComplianceRecord(RecordSection):
    train_plus_calibration_s: float | None = None
    eval_s: float | None = None
    eval_with_warmup_s: float | None = None  # eval_s plus the eval graphs' compile warm-up
    bytes_total: int | None = None
    legality: dict = field(default_factory=dict)  # check name -> passed
    checks: list | None = None  # pgolf.eval.receipts.compliance_summary's rows
    passed: bool | None = None


@dataclass
class QuantRecord(RecordSection):
    """What the export reported (pgolf.quant.pipeline.export_artifact); `requantized` after `pgolf quant`."""
    warnings: list = field(default_factory=list)
    fit: dict | None = None
    fit_k: dict | None = None
    matrix_k: Any = None
    fit_k_s: float | None = None
    sections: Any = None
    requantized: dict | None = None


@dataclass
class RunRecord(RecordSection):
    """RUN_DIR/record.json. status: "failed" until the run ends ("ok", or "nan" after a non-finite loss)."""
    schema: int = RECORD_SCHEMA
    run_id: str | None = None
    recipe: str | None = None
    config: dict = field(default_factory=dict)
    config_hash: str | None = None
    seed: int | None = None
    status: str = "failed"
    env: dict = field(default_factory=dict)
    train: TrainRecord = field(default_factory=TrainRecord)
    metrics: MetricsRecord = field(default_factory=MetricsRecord)
    bytes: BytesRecord = field(default_factory=BytesRecord)
    timings: TimingsRecord = field(default_factory=TimingsRecord)
    eval: EvalRecord = field(default_factory=EvalRecord)
    compliance: ComplianceRecord = field(default_factory=ComplianceRecord)
    quant: QuantRecord | None = None
    error: str | None = None  # "<type>: <first line>" of what ended a failed run
    metrics_error: str | None = None  # why metrics.jsonl stopped being written, if it did

    @classmethod
    def from_json_dict(cls, data, where: str) -> "RunRecord":
        """A record read from a file: the schema version checked (schema 1 migrated), then every key."""
        if not isinstance(data, dict):
            raise UserError(f"{where}: not a run record (a JSON {type(data).__name__}, not an object)")
        schema = data.get("schema", 1)
        if schema not in (1, RECORD_SCHEMA):
            raise UserError(f"{where}: run record schema {schema!r} is not one this pgolf reads (1 or "
                            f"{RECORD_SCHEMA}); a newer pgolf wrote it?")
        if "status" not in data:
            raise UserError(f"{where}: run record has no 'status' field")
        return cls.from_dict(dict(data, schema=RECORD_SCHEMA), where)


def record_file_text(record: RunRecord | dict) -> str:
    """The text of record.json: the record's keys in schema order, indented (a dict is checked first)."""
    if not isinstance(record, RunRecord):
        record = RunRecord.from_json_dict(record, "run record")
    return json.dumps(record.to_dict(), indent=2, default=str) + "\n"


def read_run_record(path) -> RunRecord:
    """RUN_DIR/record.json (or the file at path) as a RunRecord; a missing, unreadable or off-schema file is
    a UserError naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORD_FILE_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no run record here") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a valid JSON run record ({e})") from None
    return RunRecord.from_json_dict(data, str(path))
