#!/usr/bin/env bash
# Eight-step frontier runs (proxy 300, CaseOps) with one setting changed each, eager unless said: which setting
# the step-3 NaN of the compiled run depends on. usage (device, .whl carried, shared/ copied in): bash benchmarks/frontier_nan_diag.sh
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
D=/tmp/caseops; TOK=shared/data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model
timeout 150 python3 -m pgolf data build --caseops --docs shared/data/wiki/docs_000.jsonl.xz \
  shared/data/wiki/docs_001.jsonl.xz --tokenizer $TOK --val-docs 500 --out $D 2>&1 | tail -1
i=0
for v in "" "optim.tied_embed_lr=0.003" "model.fused_ce=false" "model.residual_dtype=float32" "model.fused_qk=false" "train.doc_mask=false" "optim.muon_polar_express=false" "train.compile=true"; do
  i=$((i+1)); S=(--set train.compile=false --set train.compile_warmup_steps=0 --set train.max_steps=8 --set train.log_every=1 --set eval.precompile=false)
  [ -n "$v" ] && S+=(--set "$v")
  echo "== variant: ${v:-eager}"
  timeout 100 python3 -m pgolf train --recipe frontier --proxy 300 --data $D --tokenizer $TOK --no-quant --no-eval \
    --name d$i --out /tmp/runs "${S[@]}" > /tmp/d$i.log 2>&1
  python3 -c "
import json,sys
rows=[json.loads(l) for l in open('/tmp/runs/d$i/metrics.jsonl')]
print(' '.join(f\"{r['step']}:{r['loss']:.3f}\" for r in rows if r['kind']=='train'), [r.get('what') for r in rows if r['kind']=='event'])
" 2>&1 | tail -1
done
