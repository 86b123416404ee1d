#!/usr/bin/env bash
# The frontier recipe's compiled step-3 NaN, located: benchmarks/nan_probe.py (grads and weights of every
# parameter each step) under Inductor, under aot_eager (the same graphs, no Inductor code), and under Inductor
# with one piece off at a time. usage (device, .whl carried, shared/ copied in): bash benchmarks/frontier_nan_probe.sh [VARIANT...]
# A VARIANT is BACKEND[:SECTION.FIELD=VALUE[,...]] (BACKEND inductor-mask-eager: inductor, the BlockMask built
# outside the graph); default: the list below.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
D=/tmp/caseops; TOK=shared/data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model
[ -f $D/fineweb_val_000000.bin ] || timeout 150 python3 -m pgolf data build --caseops --docs shared/data/wiki/docs_000.jsonl.xz \
  shared/data/wiki/docs_001.jsonl.xz --tokenizer $TOK --val-docs 500 --out $D 2>&1 | tail -1
VARIANTS=("$@")
[ ${#VARIANTS[@]} -eq 0 ] && VARIANTS=(inductor aot_eager "inductor:train.doc_mask=false" "inductor:model.fused_ce=false" "inductor:model.fused_qk=false")
for v in "${VARIANTS[@]}"; do
  backend=${v%%:*}; sets=(); [ "$v" != "$backend" ] && IFS=, read -ra kv <<< "${v#*:}" && for s in "${kv[@]}"; do sets+=(--set "$s"); done
  extra=(); [ "$backend" = inductor-mask-eager ] && backend=inductor && extra=(--mask-eager)
  echo "== $v"
  start=$(date +%s)
  timeout 200 python3 benchmarks/nan_probe.py --recipe frontier --proxy 300 --data $D --steps 4 --backend $backend "${extra[@]}" "${sets[@]}" 2>&1 \
    | python3 -c "
import json, sys
for line in sys.stdin:
    if not line.startswith('{'):
        if 'Error' in line or 'error' in line: print('   ', line.rstrip()[:300])
        continue
    r = json.loads(line)
    print(f\"  step {r['step']}: loss {r['loss']:.4f} clip_norm {r['clip_norm']} max_w {r['max_weight']} bad_grads {r['nonfinite_grads'][:6]}({len(r['nonfinite_grads'])}) bad_w {r['nonfinite_weights'][:4]} top {[(k, round(n, 3)) for k, n in r['top_grads'][:3]]}\" + (f\" eager_same_w {r['eager_loss_same_weights']}\" if 'eager_loss_same_weights' in r else ''))
"
  echo "   ($(( $(date +%s) - start )) s)"
done
