#!/usr/bin/env bash
# Prepare a bare lent GPU machine: carried wheels (zstandard, brotli), the package on PYTHONPATH, and the
# wiki-sp1024 shards built from the carried corpus (BENCHMARKS.md). Source it: `. benchmarks/device_setup.sh`.
# Expects the carry folders .whl/ (wheels) and .carry/ (docs_000/001.jsonl.xz, fineweb_1024_bpe.model).
set -e
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
DATA=${DATA:-/tmp/wiki-sp1024}
if [ ! -f "$DATA/manifest.json" ]; then
  python3 -m pgolf data build --docs .carry/docs_000.jsonl.xz .carry/docs_001.jsonl.xz \
    --tokenizer .carry/fineweb_1024_bpe.model --val-docs 500 --out "$DATA"
fi
set +e
