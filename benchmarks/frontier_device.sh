#!/usr/bin/env bash
# The frontier stack's first look on a lent GPU, in one call: the GPU tests of its kernels, the CaseOps wiki
# split built by pgolf (val tokens + byte sidecar, sha256 printed to compare with the anchor's build), then
# `pgolf bench --recipe frontier --proxy 300` with depth recurrence on and off (ms/step, tok/s, warm-up).
# usage (repo root on the device, .whl carried, shared/ copied into the checkout): bash benchmarks/frontier_device.sh
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; D=/tmp/caseops
timeout 170 python3 -m pytest -q -m gpu tests/test_fused_ce.py tests/test_doc_mask.py tests/test_model_frontier.py \
  2>&1 | tail -15 | tee $OUT/gpu_tests.log
[ -f $D/manifest.json ] || timeout 120 python3 -m pgolf data build --caseops --docs shared/data/wiki/docs_000.jsonl.xz \
  shared/data/wiki/docs_001.jsonl.xz --tokenizer shared/data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model \
  --val-docs 500 --out $D 2>&1 | grep -v "doc/s" | tail -3
sha256sum $D/fineweb_val_000000.bin $D/fineweb_val_bytes_000000.bin | tee $OUT/caseops_sha.txt
for rec in "" --no-recurrence; do
  timeout 200 python3 -m pgolf bench --recipe frontier --proxy 300 --data $D --steps 20 --warmup 3 --eval-tokens 0 \
    $rec --json $OUT/bench${rec:+_norecur}.json 2>&1 | tail -12
done
