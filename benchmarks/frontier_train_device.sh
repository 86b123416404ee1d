#!/usr/bin/env bash
# `pgolf train --recipe frontier --proxy 300` on the CaseOps wiki split, in one call of a lent GPU: builds the
# split (its sha256 must match docs/benchmarks.md), trains, quantizes and scores the round trip; --no-eval leaves
# the sliding/TTT passes to a separate `pgolf eval` call. Brings back the run's record, metrics, config, the
# artifact and the val shards (so a later call can evaluate without rebuilding).
# usage (repo root on the device, .whl carried, shared/ in the checkout): bash benchmarks/frontier_train_device.sh [--set k=v ...]
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; D=/tmp/caseops; T0=$(date +%s)
TOK=shared/data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model
[ -f $D/manifest.json ] || timeout 150 python3 -m pgolf data build --caseops --docs shared/data/wiki/docs_000.jsonl.xz \
  shared/data/wiki/docs_001.jsonl.xz --tokenizer $TOK --val-docs 500 --out $D 2>&1 | grep --line-buffered -v "doc/s" | tail -2
echo "build done at $(( $(date +%s) - T0 )) s"; sha256sum $D/fineweb_val_000000.bin | cut -c1-16
LEFT=$(( ${BUDGET_S:-585} - ($(date +%s) - T0) ))  # BUDGET_S: the seconds this script may take (one call's 10 minutes by default)
timeout $LEFT python3 -m pgolf train --recipe frontier --proxy 300 --data $D --tokenizer $TOK --no-eval \
  --name fr --out /tmp/runs "$@" 2>&1 | grep --line-buffered -v "it/s\]" | tee $OUT/train.log | tail -40
echo "train done at $(( $(date +%s) - T0 )) s"
R=/tmp/runs/fr; cp $R/record.json $R/metrics.jsonl $R/config.json $OUT/ 2>/dev/null
cp $R/model.pgq $D/fineweb_val_000000.bin $D/fineweb_val_bytes_000000.bin $D/manifest.json $OUT/ 2>/dev/null; ls -la $OUT
