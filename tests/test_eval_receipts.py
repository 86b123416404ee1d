"""The compliance summary and timing receipt: each cap fails when exceeded, legality FAILs carry through."""

from pgolf.eval.legality import CheckResult
from pgolf.eval.receipts import compliance_summary, format_compliance_table, format_timing_receipt

TIMINGS = {"compile_warmup_s": 40.0, "train_loop_s": 588.0, "calibration_s": 10.0, "quantize_s": 30.0,
           "serialize_s": 5.0, "eval_plain_s": 20.0, "eval_sliding_s": 90.0, "eval_ttt_s": 410.0}
LEGAL = [CheckResult("causality", True, "ok"), CheckResult("normalization", True, "ok")]


def by_name(summary):
    return {c["name"]: c["passed"] for c in summary["checks"]}


def test_a_compliant_run_passes_with_its_figures():
    s = compliance_summary(TIMINGS, 15_900_000, LEGAL)
    assert s["passed"] and s["train_plus_calibration_s"] == 598.0 and s["eval_s"] == 520.0
    assert s["legality"] == {"causality": True, "normalization": True}
    table = format_compliance_table(s)
    assert "598.0 s" in table and "15,900,000" in table and "FAIL" not in table


def test_each_cap_fails_when_exceeded():
    over_train = compliance_summary({**TIMINGS, "calibration_s": 12.7}, 15_900_000, LEGAL)  # 600.7 s
    assert not over_train["passed"] and not by_name(over_train)["train_loop + calibration"]
    assert by_name(over_train)["eval phases"]
    over_eval = compliance_summary({**TIMINGS, "eval_ttt_s": 491.0}, 15_900_000, LEGAL)  # 601 s
    assert not over_eval["passed"] and not by_name(over_eval)["eval phases"]
    over_size = compliance_summary(TIMINGS, 16_000_001, LEGAL)
    assert not over_size["passed"] and not by_name(over_size)["bytes (code + artifact)"]
    assert compliance_summary(TIMINGS, 16_000_000, LEGAL)["passed"]  # the cap itself is allowed


def test_a_failed_legality_check_fails_the_summary():
    s = compliance_summary(TIMINGS, 1000, LEGAL + [{"name": "score_before_update", "passed": False,
                                                    "detail": "update 1 used token 9 before it was scored"}])
    assert not s["passed"] and s["legality"]["score_before_update"] is False
    assert "FAIL" in format_compliance_table(s).splitlines()[-2]


def test_timing_receipt_lists_phases_and_budget_totals():
    text = format_timing_receipt({**TIMINGS, "eval_ttt_s": None})
    assert "train_loop_s" in text and "eval_ttt_s" not in text
    assert "598.00 s" in text and "110.00 s" in text


def test_the_evaluations_compile_warm_up_is_untimed_like_the_training_steps():
    """eval.precompile's graphs are compiled before training, on random tokens: in neither budget."""
    s = compliance_summary({**TIMINGS, "compile_warmup_eval_s": 75.0}, 15_900_000, LEGAL)
    assert s["eval_s"] == 520.0 and s["train_plus_calibration_s"] == 598.0
