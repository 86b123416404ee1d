"""The typed run record (pgolf.runrecord): one writer, one reader, the schema version and its migration."""

import json

import pytest

from pgolf.errors import UserError
from pgolf.recipes import recipe_tiny
from pgolf.runlog import read_run_status, write_record
from pgolf.runrecord import RECORD_SCHEMA, RunRecord, read_run_record
from pgolf.train.finish import new_record


def finished_record(tmp_path) -> RunRecord:
    record = new_record(recipe_tiny(), {"torch": "2.13"}, tmp_path / "r1")
    record.status = "ok"
    record.metrics.prequant_bpb = 1.25
    record["metrics"]["roundtrip_bpb"] = 1.5  # by key, as finish_run fills it: the same field
    record["eval"] = {"val_tokens": 100, "val_split_tokens": 200, "val_subset": True}
    record["quant"] = {"warnings": ["w"], "fit_k": {"k": 3.0}}
    record.compliance.update({"train_plus_calibration_s": 1.0, "legality": {"no_val_in_training": True}})
    return record


def test_written_record_reads_back_equal_and_in_schema_order(tmp_path):
    record = finished_record(tmp_path)
    path = write_record(tmp_path, record)
    text = json.loads(path.read_text())
    assert list(text)[:3] == ["schema", "run_id", "recipe"] and text["schema"] == RECORD_SCHEMA
    back = read_run_record(tmp_path)
    assert back == record and back.metrics.roundtrip_bpb == 1.5 and back.eval.val_subset is True
    assert back.quant.fit_k == {"k": 3.0} and back.quant.requantized is None
    assert back.bytes.cap == 16_000_000 and back.config["recipe"] == "tiny"
    assert read_run_status(tmp_path) == "ok"


def test_a_key_outside_the_schema_is_an_error_when_set_and_when_read(tmp_path):
    record = finished_record(tmp_path)
    with pytest.raises(KeyError, match="no field 'val_bpb'"):
        record["metrics"]["val_bpb"] = 1.0
    with pytest.raises(UserError, match=r"metrics: unknown key\(s\) \['val_bpb'\]"):
        record["metrics"] = {"val_bpb": 1.0}
    data = json.loads(json.dumps(record.to_dict()))
    data["train"]["step_count"] = 3
    (tmp_path / "record.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"record\.json\.train: unknown key\(s\) \['step_count'\]"):
        read_run_record(tmp_path / "record.json")
    assert read_run_status(tmp_path) == "unreadable"


def test_wrong_types_newer_schemas_and_broken_files_fail_with_one_line(tmp_path):
    path = tmp_path / "record.json"
    cases = [({"status": "ok", "train": {"steps": "ten"}}, r"train\.steps: expected int \| NoneType, got str"),
             ({"status": "ok", "metrics": {"prequant_bpb": True}}, "prequant_bpb: expected float"),
             ({"schema": RECORD_SCHEMA + 1, "status": "ok"}, f"schema {RECORD_SCHEMA + 1} is not one"),
             ({"run_id": "x"}, "no 'status' field"), ([1, 2], "not a run record")]
    for data, message in cases:
        path.write_text(json.dumps(data))
        with pytest.raises(UserError, match=message) as e:
            read_run_record(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value)
    path.write_text("{not json")
    with pytest.raises(UserError, match="not a valid JSON run record"):
        read_run_record(path)
    with pytest.raises(UserError, match="no run record here"):
        read_run_record(tmp_path / "missing")


def test_schema_1_records_migrate(tmp_path):
    """A record.json from before the schema field: no "schema", no quant / error blocks, an older eval block."""
    old = {"run_id": "old", "recipe": "tiny", "config": {}, "config_hash": "abc", "seed": 1, "status": "ok",
           "env": {}, "train": {"steps": 10, "ms_per_step": 5, "tokens_per_s": 1.0, "train_tokens": 40,
                                "stop_reason": "max_steps", "params": 7},
           "metrics": {"prequant_bpb": 2.0}, "bytes": {"code": 1, "artifact": 2, "total": 3, "cap": 16},
           "timings": {"train_loop_s": 1.0, "eval_roundtrip_s": 0.5}, "compliance": {}}
    (tmp_path / "record.json").write_text(json.dumps(old))
    record = read_run_record(tmp_path)
    assert record.schema == RECORD_SCHEMA and record.train.ms_per_step == 5 and record.quant is None
    assert record.eval.val_tokens is None and record.timings.eval_roundtrip_s == 0.5
    write_record(tmp_path, record)  # rewritten in the current schema
    assert json.loads((tmp_path / "record.json").read_text())["schema"] == RECORD_SCHEMA
