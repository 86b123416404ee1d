#!/usr/bin/env bash
# Issue 24's quant_delta, several quantizations of ONE trained model in one call: for each variant (a list of
# quant.* overrides, "-" for none), `pgolf quant RUN_DIR --out` re-quantizes the run's float weights with its
# Hessians (the run's own model.pgq is left alone), then `pgolf eval` scores that artifact with the plain pass
# alone (the recipe's document-isolated pass, eager); one JSON line per variant goes to $OUT/variants.jsonl:
# the overrides, bytes, fit k, quantize/serialize seconds and the round-trip bpb (its quant_delta against the
# run's pre-quant bpb). The first variant explains every tensor (rule, bytes, error) into $OUT/explain.txt.
# usage (repo root on the device, after frontier_train_device.sh): bash benchmarks/quant_variants_device.sh
#        "-" "quant.lqer_top_k=8" "quant.embed_bits=8 quant.lqer_top_k=1" ...
# env: RUN (default /tmp/runs/fr), DATA (default /tmp/caseops), BUDGET_S (default 590).
set -o pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; R=${RUN:-/tmp/runs/fr}; DATA=${DATA:-/tmp/caseops}; T0=$(date +%s); Q=$(mktemp -d)
[ -f $R/model.pgw ] || { echo "quant_variants_device: no $R/model.pgw (run frontier_train_device.sh first)"; exit 1; }
n=0
for variant in "$@"; do
  n=$((n+1)); LEFT=$(( ${BUDGET_S:-590} - ($(date +%s) - T0) ))
  [ $LEFT -gt 30 ] || { echo "variant $n ($variant): no time left"; break; }
  SETS=(); [ "$variant" = "-" ] || for kv in $variant; do SETS+=(--set "$kv"); done
  EXPLAIN=(); [ $n = 1 ] && EXPLAIN=(--explain)
  echo "[$(( $(date +%s) - T0 )) s] variant $n: $variant"
  timeout $LEFT python3 -m pgolf quant $R "${SETS[@]}" "${EXPLAIN[@]}" --out $Q/$n.pgq --json $Q/$n.quant.json \
    > $Q/$n.quant.log 2>&1; rc=$?
  [ $n = 1 ] && cp $Q/$n.quant.log $OUT/explain.txt
  tail -n 4 $Q/$n.quant.log
  if [ $rc -le 1 ] && [ -f $Q/$n.pgq ]; then  # rc 1: written, but over the cap (still scored, marked)
    LEFT=$(( ${BUDGET_S:-590} - ($(date +%s) - T0) ))
    timeout $LEFT python3 -m pgolf eval $Q/$n.pgq --config $R/config.json --data $DATA --set eval.ttt=false \
      --set eval.precompile=false --set eval.compile=false --out $Q/$n.eval.json 2>&1 | grep -v "it/s\]" | tail -n 3
  fi
  python3 benchmarks/quant_variant_row.py "$variant" $R/record.json $Q/$n.quant.json $Q/$n.eval.json \
    | tee -a $OUT/variants.jsonl
done
echo "variants done at $(( $(date +%s) - T0 )) s"; ls -la $OUT
