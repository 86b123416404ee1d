"""`pgolf eval` and `pgolf check` end to end on a tiny GPT saved as model.pgw, with the challenge tokenizer."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, TOKENIZER_1024

from pgolf.cli import main
from pgolf.config import apply_overrides, config_to_dict
from pgolf.data.shards import write_shard
from pgolf.model.gpt import GPT
from pgolf.recipes import recipe_tiny
from pgolf.tensorfile import write_tensors

pytestmark = pytest.mark.shared
SETS = ["--set", "model.num_layers=2", "--set", "model.model_dim=32", "--set", "model.num_heads=2",
        "--set", "model.num_kv_heads=1", "--set", "model.xsa_last_n=1", "--set", "model.rope_dims=8",
        "--set", "model.bigram_buckets=64", "--set", "model.ve_dim=8", "--set", "model.bigram_dim=8",
        "--set", "train.seq_len=32", "--set", "train.batch_tokens=256",
        "--set", "eval.sliding_stride=8", "--set", "eval.ttt_chunk_tokens=64", "--set", "eval.batch_seqs=4",
        "--set", "eval.ttt_batch_seqs=2"]


@pytest.fixture
def run_dir(tmp_path):
    import sentencepiece as spm

    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(TOKENIZER_1024, data / TOKENIZER_1024.name)
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_1024))
    ids = [sp.bos_id()] + sp.encode("The quick brown fox jumps over the lazy dog. " * 12)
    write_shard(data / "fineweb_val_000000.bin", np.array(ids[:200], dtype=np.uint16))
    cfg = recipe_tiny()
    apply_overrides(cfg, SETS[1::2])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    torch.manual_seed(0)
    write_tensors(run / "model.pgw", GPT(cfg.model).state_dict())
    return run, data


def test_eval_prints_and_writes_eval_json(run_dir, capsys):
    run, data = run_dir
    assert main(["eval", str(run / "model.pgw"), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "plain" in out and "sliding" in out and "ttt" in out
    report = json.loads((run / "eval.json").read_text())
    assert set(report["results"]) == {"plain", "sliding", "ttt"}
    assert report["results"]["sliding"]["tokens"] == 199 and report["results"]["ttt"]["updates"] > 0


def test_check_passes_a_real_model_and_fails_a_val_read_in_training(run_dir, capsys):
    run, data = run_dir
    # the file audit a training run saves: its shard opens by phase (pgolf.train.finish.RunFileAudit)
    (run / "file_audit.json").write_text(json.dumps([["train", str(data / "fineweb_train_000000.bin")],
                                                     ["eval", str(data / "fineweb_val_000000.bin")]]))
    assert main(["check", str(run), "--data", str(data), "--tokens", "129", "--method", "ttt"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 6 and "FAIL  " not in out and "== ttt" in out  # 5 checks + the verdict
    (run / "file_audit.json").write_text(json.dumps([["train", str(data / "fineweb_val_000000.bin")]]))
    assert main(["check", str(run), "--data", str(data), "--tokens", "129", "--method", "plain"]) == 1
    assert "was opened in phase 'train'" in capsys.readouterr().out


def test_eval_on_two_gloo_ranks_matches_one_rank(run_dir, tmp_path):
    run, data = run_dir
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main(["eval", str(run / "model.pgw"), "--data", str(data), "--out", str(one)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pgolf", "eval",
           str(run / "model.pgw"), "--data", str(data), "--out", str(two)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["world_size"], b["world_size"]) == (1, 2)
    for name in ("plain", "sliding", "ttt"):
        ra, rb = a["results"][name], b["results"][name]
        assert (rb["tokens"], rb["bytes"]) == (ra["tokens"], ra["bytes"]), name
        assert rb["nll_sum"] == pytest.approx(ra["nll_sum"], rel=1e-6), name
        assert rb["val_bpb"] == pytest.approx(ra["val_bpb"], rel=1e-6), name


def test_eval_of_a_pgq_with_the_frontier_eval_scores_documents_and_receipts_everything(run_dir, capsys):
    import sentencepiece as spm

    from pgolf.quant.pipeline import export_artifact

    run, data = run_dir
    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER_1024))
    ids = []
    for text in ("The quick brown fox jumps.", "Over the lazy dog, twice over.", "A third and longer document "
                 "about foxes and dogs and what they do all day.", "Short one."):
        ids += [sp.bos_id()] + sp.encode(text)
    write_shard(data / "fineweb_val_000000.bin", np.array(ids, dtype=np.uint16))
    cfg = recipe_tiny()
    apply_overrides(cfg, SETS[1::2])
    torch.manual_seed(0)
    export_artifact(GPT(cfg.model), None, cfg.quant, run / "model.pgq", 0)
    sets = ["eval.ttt_doc_chunk=8", "eval.ttt_doc_batch=2", "eval.ttt_lora_rank=4", "eval.ttt_prefix_frac=0.5"]
    assert main(["eval", str(run / "model.pgq"), "--data", str(data), "--eval-recipe", "frontier"]
                + [x for kv in sets for x in ("--set", kv)]) == 0
    out = capsys.readouterr().out
    assert "receipt (seconds)" in out and "read + decompress + dequantize" in out and "pass: ttt" in out
    report = json.loads((run / "eval.json").read_text())
    assert set(report["results"]) == {"plain", "ttt"}  # no sliding pass: TTT is the score
    ttt = report["results"]["ttt"]
    assert ttt["documents"] == 4 and ttt["phases"] >= 1 and ttt["tokens"] == len(ids) - 1
    receipt = report["receipt"]
    assert receipt["total_s"] == pytest.approx(sum(v for k, v in receipt.items() if k != "total_s"))
    assert {"setup_load_s", "setup_compile_warmup_s", "eval_plain_s", "eval_ttt_s"} <= set(receipt)
