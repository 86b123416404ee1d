#!/usr/bin/env bash
# `pgolf eval` of the frontier run that benchmarks/frontier_train_device.sh left in /tmp/runs/fr (issue 25: the
# recipe's own evaluation, document-isolated plain pass + per-document LoRA TTT with phased global SGD, its
# receipt counting decompression and compile), on the same machine and CaseOps split. Brings back eval.json.
# usage (repo root on the device, after frontier_train_device.sh): bash benchmarks/frontier_eval_device.sh [--set k=v ...]
set -o pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; R=${RUN:-/tmp/runs/fr}; T0=$(date +%s)
[ -f $R/model.pgq ] || { echo "frontier_eval_device: no $R/model.pgq (run frontier_train_device.sh first)"; exit 1; }
timeout ${BUDGET_S:-590} python3 -m pgolf eval $R --data /tmp/caseops --out $OUT/eval.json "$@" 2>&1 \
  | grep --line-buffered -v "it/s\]" | tee $OUT/eval.log | tail -30
echo "eval done at $(( $(date +%s) - T0 )) s"; ls -la $OUT
