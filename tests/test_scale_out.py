"""benchmarks/scale_out.py end to end on CPU: `tiny` trained by one process (grad_accum 2) and by two gloo
ranks, then evaluated on one rank and on two; the curves and the NLL sums must agree."""

import importlib.util
import json

import pytest
from conftest import REPO, write_wiki_shards

pytestmark = pytest.mark.shared


def load_script():
    spec = importlib.util.spec_from_file_location("scale_out", REPO / "benchmarks" / "scale_out.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def wiki_data(tmp_path_factory):
    """A val shard of 5,000 and a train shard of ~40,000 real Wikipedia tokens, beside the tokenizer."""
    return write_wiki_shards(tmp_path_factory.mktemp("wiki"), 5_000, 45_000)


def test_one_process_and_two_ranks_agree(wiki_data, tmp_path, capsys):
    out = tmp_path / "scale"
    argv = ["--recipe", "tiny", "--nproc", "2", "--steps", "4", "--data", str(wiki_data), "--out", str(out),
            "--device", "cpu", "--val-every", "2", "--val-tokens", "4096", "--skip-steps", "1", "--tail-steps", "2",
            "--set", "quant.codec=zlib"]
    assert load_script().main(argv) == 0
    assert "| train loss, mean of the last 2 steps |" in capsys.readouterr().out
    report = json.loads((out / "scale_out.json").read_text())
    assert report["batch_tokens"] == 1024 and report["warmdown_iters"] == 1  # 4096 * 2 / 8; tiny's 60/200 of 4
    assert set(report["commands"]) == {"train_a", "train_b", "eval_1", "eval_n"}
    assert "--nproc_per_node=2" in report["commands"]["train_b"] and report["device"].startswith("cpu")
    train = report["train"]
    assert (train["a"]["grad_accum"], train["b"]["grad_accum"]) == (2, 1)
    assert len(train["a"]["loss"]) == len(train["b"]["loss"]) == 4
    # the same sequences, step for step: the curves differ only by float reduction order
    assert train["loss_agreement"]["max_abs_diff"] < 1e-5, train["loss_agreement"]
    assert list(train["val_loss_diff"]) == ["2"] and abs(train["val_loss_diff"]["2"]) < 1e-5
    assert train["a"]["prequant_loss"] == pytest.approx(train["b"]["prequant_loss"], abs=1e-5)
    # A's calibration batches are B's ranks' rows: the same Hessians, so the same artifact up to float noise
    assert train["a"]["roundtrip_loss"] == pytest.approx(train["b"]["roundtrip_loss"], abs=1e-4)
    for side in ("a", "b"):
        assert train[side]["steady"]["tokens_per_s"] > 0 and train[side]["steady"]["from_step"] == 1
    assert train["throughput_ratio"] > 0
    assert set(report["eval"]) == {"plain", "sliding", "ttt"}
    for name, c in report["eval"].items():
        assert c["counts_equal"] and c["one"]["tokens"] == 4095, name
        assert c["nll_sum_rel_diff"] < 1e-6, (name, c)
    figure = out / "scale_out.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure.unlink()
    assert load_script().main(["--replot", str(out / "scale_out.json")]) == 0  # redrawn from the JSON alone
    assert figure.stat().st_size > 10_000


@pytest.mark.parametrize("extra, message", [
    (["--nproc", "1"], "--nproc 1: must be at least 2"),
    (["--set", "train.grad_accum=4"], "the script sets train.grad_accum itself"),
    (["--batch-tokens", "1000"], "does not split into 2 ranks"),
    (["--replot", "nowhere.json"], "--replot nowhere.json: no such file"),
])
def test_bad_input_is_one_line_naming_the_value(wiki_data, tmp_path, capsys, extra, message):
    argv = ["--recipe", "tiny", "--data", str(wiki_data), "--out", str(tmp_path / "scale"), *extra]
    assert load_script().main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("scale_out: error:") and message in err and "\n" not in err


def test_an_out_folder_holding_a_run_is_refused(wiki_data, tmp_path, capsys):
    (tmp_path / "scale" / "b-2proc").mkdir(parents=True)
    argv = ["--recipe", "tiny", "--data", str(wiki_data), "--out", str(tmp_path / "scale")]
    assert load_script().main(argv) == 2
    assert "already holds b-2proc" in capsys.readouterr().err
