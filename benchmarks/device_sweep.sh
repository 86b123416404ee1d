#!/usr/bin/env bash
# Run a long `pgolf sweep` across several lent-machine calls of at most 10 minutes each.
#
#   bash benchmarks/device_sweep.sh SPEC OUT_DIR SECONDS
#
# The sweep runs detached (setsid), so it keeps running between calls while the machine stays warm. Each call
# (re)starts it if it is not running, waits until SECONDS have passed since this script began or the sweep has
# ended, then packs OUT_DIR's small files (records, metrics, configs, logs, the results database; no weights)
# into $OUT/sweep.tar. Carry that tar back as .runs/sweep.tar: on a fresh machine it is unpacked first, and the
# sweep skips every finished run. Expects .whl/ and .carry/ as benchmarks/device_setup.sh does.
set -u
SPEC=$1; RUNS=$2; SECONDS_MAX=$3
T0=$(date +%s)
. benchmarks/device_setup.sh
if [ ! -d "$RUNS" ] && [ -f .runs/sweep.tar ]; then
  tar -xf .runs/sweep.tar
  echo "[device_sweep] unpacked $(ls "$RUNS" | wc -l) entries of $RUNS from the carried tar"
fi
mkdir -p "$RUNS"
if ! pgrep -f "pgolf sweep $SPEC" >/dev/null; then
  setsid nohup python3 -m pgolf sweep "$SPEC" >>"$RUNS/sweep.log" 2>&1 </dev/null &
  echo "[device_sweep] sweep started (a finished sweep only re-ingests its runs and ends)"
fi
sleep 2
while pgrep -f "pgolf sweep $SPEC" >/dev/null && [ $(( $(date +%s) - T0 )) -lt "$SECONDS_MAX" ]; do
  sleep 5
done
tar -cf "$OUT/sweep.tar" --exclude='*.pgw' --exclude='*.pgq' --exclude='.sweep.lock' "$RUNS"
echo "[device_sweep] $(( $(date +%s) - T0 )) s; running: $(pgrep -fc "pgolf sweep $SPEC")"
tail -n 12 "$RUNS/sweep.log"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
