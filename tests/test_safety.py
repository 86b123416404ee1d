"""No silent wrong numbers and no lost runs: the tokenizer against the shards' manifest, run names that never
overwrite a finished run, checksummed tensor files, `pgolf quant` that keeps a good artifact, OS errors as one
line with the results kept, --no-quant on --resume, the saved file audit `pgolf check` reads, and what
--resume says when there is nothing to resume."""

import errno
import itertools
import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch
from conftest import TOKENIZER_1024, WIKI_DIR, write_wiki_shards

from pgolf import fileio
from pgolf.cli import build_parser, main
from pgolf.config import apply_overrides, config_to_dict
from pgolf.data.manifest import DataManifestError, check_data_manifest
from pgolf.errors import UserError
from pgolf.fileio import OutputError
from pgolf.runlog import file_sha256, make_run_dir
from pgolf.tensorfile import read_tensors, write_tensors
from pgolf.train import loop
from pgolf.train.commands import build_train_config
from pgolf.train.loop import train_run

pytestmark = pytest.mark.shared
MODEL_SETS = ["model.num_layers=2", "model.model_dim=32", "model.num_heads=2", "model.num_kv_heads=1",
              "model.xsa_last_n=1", "model.rope_dims=8", "model.bigram_buckets=64", "model.ve_dim=8",
              "model.bigram_dim=8"]


def small_cfg(data, out, name, **train):
    from pgolf.recipes import recipe_tiny

    cfg = recipe_tiny()
    apply_overrides(cfg, MODEL_SETS)
    cfg.data.path, cfg.data.tokenizer = str(data), str(TOKENIZER_1024)
    cfg.out_dir, cfg.name = str(out), name
    cfg.train.seq_len, cfg.train.batch_tokens = 32, 256
    cfg.train.max_steps, cfg.train.warmdown_iters, cfg.train.log_every = 6, 2, 1
    cfg.train.ema_decay, cfg.train.qat_start_scale = 0.0, 0.0
    cfg.quant.enabled = False
    cfg.eval.sliding_stride, cfg.eval.ttt, cfg.eval.batch_seqs = 0, False, 8
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def ticking_clock():
    state = {"t": 0.0}

    def clock():
        state["t"] += 1.0
        return state["t"]
    return clock


def tmp_files(folder):
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def wiki_data(tmp_path_factory):
    return write_wiki_shards(tmp_path_factory.mktemp("wiki"), 1_200, 40_000)


@pytest.fixture(scope="module")
def finished_run(wiki_data, tmp_path_factory):
    """A finished run with checkpoints (one a simulated second), its config and record."""
    out = tmp_path_factory.mktemp("runs")
    cfg = small_cfg(wiki_data, out, "done", checkpoint_every_s=1.0)
    record = train_run(cfg, clock=ticking_clock(), final_eval=False)
    assert record["status"] == "ok"
    return out / "done", cfg


def copy_run(finished_run, tmp_path):
    src, cfg = finished_run
    dst = tmp_path / "runs" / src.name
    shutil.copytree(src, dst)
    cfg = small_cfg(cfg.data.path, tmp_path / "runs", src.name, checkpoint_every_s=1.0)
    return dst, cfg


def flip_byte(path, offset_from_end: int = 5):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x40
    path.write_bytes(bytes(data))


# --- 1. the tokenizer against the data's manifest.json

@pytest.fixture(scope="module")
def two_tokenizer_data(tmp_path_factory):
    """Shards built by `pgolf data build` with tokenizer A, and a tokenizer B of the same vocabulary size."""
    from pgolf.data.build import build_split_shards
    from pgolf.data.corpus import iter_documents
    from pgolf.data.tokenizer import train_sentencepiece_bpe

    folder = tmp_path_factory.mktemp("twotok")
    docs = list(itertools.islice(iter_documents([WIKI_DIR / "docs_000.jsonl.xz"]), 120))
    corpus = folder / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:60]))
    tok_a = train_sentencepiece_bpe(docs[:60], 384, folder / "a" / "tok_a.model")
    tok_b = train_sentencepiece_bpe(docs[60:], 384, folder / "b" / "tok_b.model")
    import sentencepiece as spm

    sizes = {spm.SentencePieceProcessor(model_file=str(t)).get_piece_size() for t in (tok_a, tok_b)}
    assert sizes == {384} and tok_a.read_bytes() != tok_b.read_bytes()
    data = folder / "shards"
    build_split_shards([corpus], tok_a, 5, data, workers=1, progress=False)
    return data, tok_a, tok_b


def test_another_tokenizer_of_the_same_vocab_size_is_refused_by_train_eval_and_check(two_tokenizer_data,
                                                                                     tmp_path, capsys):
    data, tok_a, tok_b = two_tokenizer_data
    assert check_data_manifest(data, tok_a)["checked"] is True
    cfg = small_cfg(data, tmp_path, "wrong")
    cfg.model.vocab_size, cfg.data.tokenizer = 384, str(tok_b)
    with pytest.raises(DataManifestError) as err:
        train_run(cfg, final_eval=False)
    line = str(err.value)
    assert "\n" not in line and str(tok_b) in line and str(data / "manifest.json") in line
    assert file_sha256(tok_b) in line and file_sha256(tok_a) in line
    assert not (tmp_path / "wrong").exists()  # refused before a run directory was made

    from pgolf.model.gpt import GPT

    run = tmp_path / "evalrun"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    write_tensors(run / "model.pgw", GPT(cfg.model).state_dict())
    for command in (["eval", str(run)], ["check", str(run), "--tokens", "65"]):
        capsys.readouterr()
        assert main([*command, "--data", str(data), "--set", f"data.tokenizer={tok_b}"]) == 2
        err_text = capsys.readouterr().err
        assert err_text.count("\n") == 1 and "is not the one the shards were built with" in err_text


def test_data_verify_compares_the_shards_with_the_manifest(two_tokenizer_data, tmp_path, capsys):
    data, _, _ = two_tokenizer_data
    copy = tmp_path / "shards"
    shutil.copytree(data, copy)
    assert main(["data", "verify", str(copy)]) == 0
    shard = copy / "fineweb_train_000000.bin"
    tokens = np.fromfile(shard, dtype="<u2", offset=1024)
    tokens[3] = (int(tokens[3]) + 1) % 384  # still a valid shard, not the one that was built
    from pgolf.data.shards import write_shard

    write_shard(shard, tokens)
    capsys.readouterr()
    assert main(["data", "verify", str(copy)]) == 2
    assert f"{shard}: sha256" in capsys.readouterr().err


def test_data_without_a_manifest_still_trains_and_the_record_says_so(finished_run, capsys):
    run, _ = finished_run
    env = json.loads((run / "record.json").read_text())["env"]
    assert env["data_manifest"]["checked"] is False and "manifest.json" in env["data_manifest"]["note"]


# --- 2. run names

def test_a_finished_run_is_never_overwritten_without_overwrite(finished_run, tmp_path):
    run, cfg = copy_run(finished_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(UserError, match="already holds a finished run .*--overwrite"):
        train_run(cfg, final_eval=False)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    # an unfinished run of that name is refused too (its checkpoints would mix into the new run)
    (run / "record.json").unlink()
    with pytest.raises(UserError, match="unfinished run .*--resume"):
        make_run_dir(cfg)
    # with overwrite the old run is gone, checkpoints included, before the new one writes anything
    assert make_run_dir(cfg, overwrite=True) == run and list(run.iterdir()) == []


def test_overwrite_replaces_a_finished_run_end_to_end(finished_run, tmp_path):
    run, cfg = copy_run(finished_run, tmp_path)
    cfg.train.checkpoint_every_s = 0.0
    record = train_run(cfg, final_eval=False, overwrite=True)
    assert record["status"] == "ok" and not (run / "checkpoint").exists()


def test_default_names_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    from pgolf.recipes import recipe_tiny

    monkeypatch.setattr(loop.time, "strftime", lambda fmt: "20260101-000000")
    cfg = recipe_tiny()
    cfg.out_dir, cfg.name = str(tmp_path), ""
    dirs = [make_run_dir(cfg) for _ in range(3)]
    assert [d.name for d in dirs] == ["tiny-20260101-000000", "tiny-20260101-000000-2", "tiny-20260101-000000-3"]
    with pytest.raises(UserError, match="one folder name"):
        cfg.name = ".."
        make_run_dir(cfg)


# --- 3. checksums and atomic writes

def test_a_flipped_byte_in_a_tensor_file_is_refused_naming_it(tmp_path):
    path = tmp_path / "model.pgw"
    write_tensors(path, {"w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3)}, {"step": 1})
    flip_byte(path, 100)
    with pytest.raises(UserError, match=f"{path}: damaged: tensor 'w' fails its checksum"):
        read_tensors(path)
    write_tensors(path, {"w": torch.ones(10)})
    data = bytearray(path.read_bytes())
    data[30] ^= 1  # inside the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="damaged header"):
        read_tensors(path)


def test_files_of_the_first_tensor_format_still_read(tmp_path):
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    header = json.dumps({"meta": {"step": 2}, "tensors": [{"name": "w", "dtype": "float32", "shape": [2, 3],
                                                          "offset": 0, "nbytes": 24}]}).encode()
    path = tmp_path / "old.pgw"
    path.write_bytes(b"PGTENS01" + struct.pack("<Q", len(header)) + header + w.numpy().tobytes())
    tensors, meta = read_tensors(path)
    assert torch.equal(tensors["w"], w) and meta == {"step": 2}


def test_eval_of_damaged_weights_is_one_line_naming_the_file(finished_run, tmp_path, capsys):
    run, _ = copy_run(finished_run, tmp_path)
    flip_byte(run / "model.pgw", 50)
    assert main(["eval", str(run / "model.pgw"), "--data", str(finished_run[1].data.path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.pgw: damaged" in err


def test_resume_from_a_damaged_checkpoint_is_refused(finished_run, tmp_path):
    run, cfg = copy_run(finished_run, tmp_path)
    (run / "record.json").unlink()  # as if it had been killed
    last = sorted((run / "checkpoint").glob("step_*"))[-1] / "rank_0.pgw"
    flip_byte(last, 7)
    with pytest.raises(UserError, match=f"{last}: damaged"):
        train_run(cfg, resume=str(run), clock=ticking_clock(), final_eval=False)
    assert json.loads((run / "record.json").read_text())["status"] == "failed"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "model.pgw"
    write_tensors(path, {"w": torch.ones(4)})
    good = path.read_bytes()

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, "replace", full_disk)
    with pytest.raises(OutputError, match=f"{path}: cannot write \\(No space left on device\\)"):
        write_tensors(path, {"w": torch.zeros(4)})
    assert path.read_bytes() == good and tmp_files(tmp_path) == []


# --- 4. pgolf quant keeps the good artifact when the new one does not fit

def test_quant_over_the_cap_keeps_the_run_s_artifact_and_record(finished_run, tmp_path, capsys):
    run, _ = copy_run(finished_run, tmp_path)
    assert main(["quant", str(run), "--set", "quant.method=rtn"]) == 0  # a good model.pgq, the record updated
    good, record = (run / "model.pgq").read_bytes(), json.loads((run / "record.json").read_text())
    assert record["bytes"]["artifact"] == len(good) and record["quant"]["requantized"]["method"] == "rtn"
    assert record["metrics"]["roundtrip_bpb"] is None and record["metrics"]["prequant_bpb"] is not None
    capsys.readouterr()
    over = ["--set", "quant.method=rtn", "--set", "quant.fit_k=false", "--set", f"quant.size_cap={len(good) // 2}"]
    assert main(["quant", str(run), *over]) == 1
    assert "not written" in capsys.readouterr().out
    assert (run / "model.pgq").read_bytes() == good
    assert main(["quant", str(run), "--set", "quant.fit_k=true", "--set", "quant.size_cap=2000"]) == 2  # refused
    assert (run / "model.pgq").read_bytes() == good
    assert json.loads((run / "record.json").read_text()) == record and tmp_files(run) == []


# --- 5. OS errors: one line, results kept, no temporary files

def test_eval_into_a_read_only_folder_prints_its_results_and_one_error_line(finished_run, tmp_path, capsys,
                                                                            monkeypatch):
    run, cfg = copy_run(finished_run, tmp_path)

    def read_only(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))

    monkeypatch.setattr(fileio.os, "replace", read_only)
    assert main(["eval", str(run / "model.pgw"), "--data", cfg.data.path]) == 2
    captured = capsys.readouterr()
    assert "plain" in captured.out and json.loads(captured.out.strip().splitlines()[-1])["results"]["plain"]
    assert captured.err.count("\n") == 1 and "eval.json: cannot write (Read-only file system)" in captured.err
    assert tmp_files(run) == [] and not (run / "eval.json").exists()


def test_a_full_disk_at_the_weights_fails_the_run_with_a_record(wiki_data, tmp_path, monkeypatch):
    real_replace = os.replace

    def full_at_weights(src, dst):
        if str(dst).endswith("model.pgw"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", full_at_weights)
    with pytest.raises(OutputError, match="model.pgw: cannot write"):
        train_run(small_cfg(wiki_data, tmp_path, "full"), final_eval=False)
    record = json.loads((tmp_path / "full" / "record.json").read_text())
    assert record["status"] == "failed" and "No space left on device" in record["error"]
    assert record["metrics"]["prequant_bpb"] is not None  # computed before the failure: kept
    assert tmp_files(tmp_path) == [] and (tmp_path / "full" / "file_audit.json").is_file()


def test_an_os_error_reaching_the_cli_is_one_line(monkeypatch, capsys):
    import pgolf.eval.commands as commands

    def read_only(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/runs/x/eval.json")

    monkeypatch.setattr(commands, "eval_resolve_artifact", read_only)
    assert main(["eval", "anything"]) == 2
    assert capsys.readouterr().err == "pgolf: error: /runs/x/eval.json: Read-only file system\n"


# --- 7. --no-quant with --resume

def test_no_quant_applies_to_a_resumed_run(finished_run, tmp_path):
    run, cfg = copy_run(finished_run, tmp_path)
    saved = json.loads((run / "config.json").read_text())
    saved["quant"]["enabled"] = True
    (run / "config.json").write_text(json.dumps(saved))
    args = build_parser().parse_args(["train", "--resume", str(run), "--no-quant"])
    assert build_train_config(args).quant.enabled is False
    args = build_parser().parse_args(["train", "--resume", str(run)])
    assert build_train_config(args).quant.enabled is True


# --- 8. the no-val-in-training check reads the run's saved file audit

def test_check_passes_on_a_run_s_own_audit(finished_run, capsys):
    run, cfg = finished_run
    audit = json.loads((run / "file_audit.json").read_text())
    assert any(ph == "train" and "fineweb_train_" in p for ph, p in audit)
    assert any(ph == "eval" and "fineweb_val_" in p for ph, p in audit)
    capsys.readouterr()
    assert main(["check", str(run), "--tokens", "65", "--method", "plain"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("no_val_in_training"))
    assert "PASS" in row and "none matches" in row


def test_check_fails_a_run_that_read_a_val_shard_in_training(wiki_data, tmp_path, monkeypatch, capsys):
    from pgolf.data.shards import FILE_AUDIT, read_shard

    real_step = loop.train_step
    val = wiki_data / "fineweb_val_000000.bin"

    def leaky_step(*args, **kwargs):
        with FILE_AUDIT.phase("train"):
            read_shard(val)  # a recipe that peeks at the validation data while it trains
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", leaky_step)
    record = train_run(small_cfg(wiki_data, tmp_path, "leak", max_steps=2), final_eval=False)
    assert record["compliance"]["legality"] == {"no_val_in_training": False}
    monkeypatch.setattr(loop, "train_step", real_step)
    capsys.readouterr()
    assert main(["check", str(tmp_path / "leak"), "--tokens", "65", "--method", "plain"]) == 1
    out = capsys.readouterr().out
    assert f"validation file {val.resolve()} was opened in phase 'train'" in out


def test_check_fails_without_a_saved_audit(finished_run, tmp_path, capsys):
    run, _ = copy_run(finished_run, tmp_path)
    (run / "file_audit.json").unlink()
    assert main(["check", str(run), "--tokens", "65", "--method", "plain"]) == 1
    assert "no file_audit.json in" in capsys.readouterr().out


def test_a_resumed_run_keeps_the_audit_of_its_first_process(finished_run, tmp_path):
    run, cfg = copy_run(finished_run, tmp_path)
    (run / "record.json").unlink()
    first = json.loads((run / "file_audit.json").read_text())
    (run / "file_audit.json").write_text(json.dumps(first + [["train", "/elsewhere/fineweb_train_000009.bin"]]))
    cfg.train.max_steps = 8
    train_run(cfg, resume=str(run), clock=ticking_clock(), final_eval=False)
    assert ["train", "/elsewhere/fineweb_train_000009.bin"] in json.loads((run / "file_audit.json").read_text())


# --- 12. --resume with nothing to resume

def test_resume_without_checkpoints_says_how_to_enable_them(wiki_data, tmp_path, capsys):
    run = tmp_path / "nockpt"
    run.mkdir()
    cfg = small_cfg(wiki_data, tmp_path, "nockpt")
    (run / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing to resume" in err
    assert "checkpoints are off by default" in err and "--set train.checkpoint_every_s=" in err


def test_resuming_a_finished_run_is_refused(finished_run, tmp_path):
    run, cfg = copy_run(finished_run, tmp_path)
    with pytest.raises(UserError, match="has finished .*--overwrite"):
        train_run(cfg, resume=str(run), final_eval=False)
