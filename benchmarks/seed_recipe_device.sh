#!/usr/bin/env bash
# One seed recipe's h100-300s proxy run (issue 26's table: pre-quant, round trip, final bpb, bytes, tok/s), seed
# 1337, in one call of a lent GPU: builds the recipe's split from the corpus in shared/ (wiki-sp1024, or the
# CaseOps split for the 8192-token recipes; sha256 printed to compare with docs/benchmarks.md), then runs
# benchmarks/h100_300s.py, whose row (final_bpb = the last scored pass) comes back with the run's record.
# usage (repo root on the device, .whl carried, shared/ in the checkout): bash benchmarks/seed_recipe_device.sh RECIPE [--set k=v ...]
set -o pipefail
RECIPE=${1:?usage: seed_recipe_device.sh RECIPE [--set k=v ...]}; shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; T0=$(date +%s); W=shared/data/wiki
VOCAB=$(python3 -c "from pgolf.recipes import get_recipe; print(get_recipe('$RECIPE').model.vocab_size)") || exit 1
if [ "$VOCAB" = 8192 ]; then
  D=/tmp/caseops; TOK=shared/data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model; FLAG=--caseops
else
  D=/tmp/wiki-sp1024; TOK=shared/data/tokenizers/fineweb_1024_bpe.model; FLAG=
fi
[ -f $D/manifest.json ] || timeout 200 python3 -m pgolf data build $FLAG --docs $W/docs_000.jsonl.xz $W/docs_001.jsonl.xz \
  --tokenizer $TOK --val-docs 500 --out $D 2>&1 | grep --line-buffered -v "doc/s" | tail -2
echo "build done at $(( $(date +%s) - T0 )) s"; sha256sum $D/fineweb_val_000000.bin | cut -c1-16
LEFT=$(( ${BUDGET_S:-590} - ($(date +%s) - T0) ))  # BUDGET_S: the seconds this script may take
timeout $LEFT python3 benchmarks/h100_300s.py --data $D --recipe "$RECIPE" --name seed-$RECIPE --out /tmp/runs \
  --set train.seed=1337 "$@" 2>&1 | grep --line-buffered -v "it/s\]" | tee $OUT/run.log | tail -30
echo "run done at $(( $(date +%s) - T0 )) s"
R=/tmp/runs/seed-$RECIPE; cp $R/record.json $R/metrics.jsonl $R/config.json $R/benchmark.jsonl $OUT/ 2>/dev/null; ls -la $OUT
