"""The `frontier` recipe end to end on CPU: CaseOps shards built by `pgolf data build --caseops` from a few wiki
documents, then `pgolf train --recipe frontier` shrunk to a tiny model (every frontier flag still on: SmearGate v2,
the sparse attention gate, two-lane residuals, depth recurrence, document masks, MuonEq-R with Polar Express,
the LR floor, the weight-decay groups), quantized and scored with the byte sidecar."""

import itertools
import json
import math

import pytest
from conftest import SHARED, WIKI_DIR

from pgolf.cli import main
from pgolf.data.corpus import iter_documents
from pgolf.recipes import get_recipe

TOKENIZER_CASEOPS = SHARED / "data" / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"

# the recipe's structure at CPU size: 6 layers, layers 2..3 looped twice, the lanes on the decoder's tail
SHRINK = ["model.num_layers=6", "model.model_dim=64", "model.num_heads=4", "model.num_kv_heads=2",
          "model.rope_dims=8", "model.xsa_last_n=6", "model.recur_first=2", "model.recur_last=3",
          "model.parallel_lanes_from=4", "model.residual_dtype=float32", "train.seq_len=128",
          "train.batch_tokens=2048", "train.max_steps=6", "train.log_every=1", "train.compile=false",
          "train.compile_warmup_steps=0", "train.calib_reserve_s=0", "train.device=cpu",
          "quant.calib_batches=1", "quant.passthrough_numel=1024", "eval.val_tokens=1024", "eval.batch_seqs=4",
          "eval.precompile=false", "eval.sliding_stride=64", "eval.ttt_chunk_tokens=512", "eval.ttt_epochs=1",
          "eval.ttt_batch_seqs=4"]


def test_frontier_recipe_carries_the_record_settings():
    cfg = get_recipe("frontier")
    m, o, t, q = cfg.model, cfg.optim, cfg.train, cfg.quant
    assert (m.vocab_size, m.num_layers, m.mlp_mult, m.xsa_last_n, m.qk_gain_init) == (8192, 11, 4.0, 11, 5.0)
    assert (m.recur_first, m.recur_last, m.recur_loops, m.recur_start_frac) == (3, 5, 2, 0.35)
    assert m.smear_gate_v2 and m.sparse_attn_gate and m.parallel_lanes_from == 8 and m.skip_gates
    assert not m.smear_gate and m.bigram_buckets == 0 and m.ve_last_n == 0 and t.qat_start_scale == 0
    assert o.muon_row_normalize and o.muon_polar_express
    assert (o.muon_wd, o.embed_wd, o.scalar_wd) == (0.095, 0.085, 0.02)
    assert (t.warmdown_frac, t.min_lr, t.ema_decay, t.doc_mask) == (0.85, 0.1, 0.9965, True)
    assert (q.matrix_bits, q.embed_bits, q.calib_batches) == (6, 7, 16)
    e = cfg.eval  # frontier.md §8: document-isolated, per-document LoRA phased TTT as the only scored pass
    assert e.doc_isolated and e.ttt and e.ttt_mode == "doc_lora" and e.sliding_stride == 0
    assert (e.ttt_lora_rank, e.ttt_lora_alpha, e.ttt_doc_chunk, e.ttt_doc_batch, e.ttt_lr) == (80, 144.0, 48, 64, 1e-4)
    assert (e.ttt_phases, e.ttt_prefix_frac, e.ttt_global_lr, e.ttt_global_momentum) == (3, 0.05, 0.001, 0.9)


@pytest.mark.shared
@pytest.mark.slow
def test_frontier_trains_on_caseops_shards_through_the_cli(tmp_path):
    docs = list(itertools.islice(iter_documents([WIKI_DIR / "docs_000.jsonl.xz"]), 24))
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    data = tmp_path / "caseops"
    assert main(["data", "build", "--caseops", "--docs", str(source), "--tokenizer", str(TOKENIZER_CASEOPS),
                 "--val-docs", "4", "--out", str(data)]) == 0
    args = ["train", "--recipe", "frontier", "--data", str(data), "--out", str(tmp_path / "runs"), "--name", "f"]
    assert main(args + [x for kv in SHRINK for x in ("--set", kv)]) == 0
    run = tmp_path / "runs" / "f"
    record = json.loads((run / "record.json").read_text())
    assert record["status"] == "ok" and record["train"]["steps"] == 6
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if r["kind"] == "train"]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert record["eval"]["bytes_source"] == "sidecar"
    for key in ("prequant_bpb", "roundtrip_bpb", "sliding_bpb", "ttt_bpb"):
        assert math.isfinite(record["metrics"][key]), key
