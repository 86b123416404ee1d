"""benchmarks/quant_variant_row.py: the row of one re-quantization (issue 24's variants on the device)."""

import importlib.util
import json

from conftest import REPO


def load_script():
    spec = importlib.util.spec_from_file_location("quant_variant_row", REPO / "benchmarks" / "quant_variant_row.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_row_takes_the_delta_against_the_runs_prequant_bpb(tmp_path, capsys):
    files = {"record.json": {"metrics": {"prequant_bpb": 1.09}},
             "quant.json": {"bytes": {"total": 15_990_000, "fits": True}, "fit_k": {"k": 12.5},
                            "timings": {"quantize_s": 4.0, "fit_k_s": 9.0, "serialize_s": 20.0}},
             "eval.json": {"results": {"plain": {"val_bpb": 1.095, "tokens": 100, "seconds": 2.0}}}}
    for name, body in files.items():
        (tmp_path / name).write_text(json.dumps(body))
    assert load_script().main(["quant.lqer_top_k=8"] + [str(tmp_path / n) for n in files]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["variant"] == "quant.lqer_top_k=8" and abs(row["quant_delta"] - 0.005) < 1e-12
    assert (row["bytes_total"], row["fits"], row["fit_k"], row["serialize_s"]) == (15_990_000, True, 12.5, 20.0)


def test_a_failed_variant_still_gets_a_row_of_nulls(tmp_path, capsys):
    (tmp_path / "record.json").write_text(json.dumps({"metrics": {"prequant_bpb": 1.09}}))
    (tmp_path / "quant.json").write_text("{not json")
    args = ["-", str(tmp_path / "record.json"), str(tmp_path / "quant.json"), str(tmp_path / "missing.json")]
    assert load_script().main(args) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["prequant_bpb"] == 1.09 and row["roundtrip_bpb"] is None and row["quant_delta"] is None
    assert row["bytes_total"] is None
