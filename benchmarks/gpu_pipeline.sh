#!/usr/bin/env bash
# Device runs longer than one call's 10 minutes, in one lease: `start` runs the stages one after another in a
# process of its own (setsid: it outlives the call, as long as the machine is held), `poll SECONDS` waits up to
# SECONDS for them and brings back under $OUT each stage's small files (< 2 MB) as N.tgz, its progress and a
# monitor of the GPU's memory and utilisation every 20 s.
# A stage is a command line run in the repo root with OUT=/tmp/pipeline/N; a failed stage does not stop the
# next. Call `poll` again at once after each reply: a machine left idle 30 s goes back, with the stages.
# usage: bash benchmarks/gpu_pipeline.sh start "BUDGET_S=700 bash benchmarks/frontier_train_device.sh" ...
#        bash benchmarks/gpu_pipeline.sh poll 570 [STAGE]   (STAGE: return as soon as that stage has ended)
P=/tmp/pipeline
case "$1" in
  start)
    shift; mkdir -p $P; rm -f $P/done
    printf '%s\n' "$@" > $P/stages
    setsid bash -c '
      n=0; T0=$(date +%s)
      while read -r stage; do
        n=$((n+1)); mkdir -p '$P'/$n
        echo "[$(( $(date +%s) - T0 )) s] stage $n: $stage" >> '$P'/progress
        OUT='$P'/$n bash -c "$stage" > '$P'/$n/stage.log 2>&1 < /dev/null; rc=$?
        echo "[$(( $(date +%s) - T0 )) s] stage $n exit $rc" >> '$P'/progress
      done < '$P'/stages
      touch '$P'/done' > /dev/null 2>&1 < /dev/null &
    setsid bash -c 'T0=$(date +%s); while [ ! -f '$P'/done ]; do
      echo "[$(( $(date +%s) - T0 )) s] $(nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader)" >> '$P'/monitor
      sleep 20; done' > /dev/null 2>&1 < /dev/null &
    sleep 2; cat $P/progress ;;
  poll)
    END=$(( $(date +%s) + ${2:-570} )); UNTIL=${3:-}  # optional: return once stage UNTIL has ended
    while [ ! -f $P/done ] && [ $(date +%s) -lt $END ]; do
      [ -n "$UNTIL" ] && grep -q "stage $UNTIL exit" $P/progress && break; sleep 5; done
    cat $P/progress; nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
    for d in $P/[0-9]*/; do n=$(basename $d)
      (cd $d && find . -maxdepth 1 -type f -size -2M -printf '%f\n' | tar czf $OUT/$n.tgz -T -); done
    cp $P/progress $OUT/progress.txt; cp $P/monitor $OUT/monitor.txt 2>/dev/null; tail -n 4 $P/monitor 2>/dev/null; ls -la $OUT; [ -f $P/done ] && echo "ALL STAGES DONE"
    for f in $P/[0-9]*/*.log; do echo "== $f"; tail -n 25 $f; done ;;
  *) echo "usage: gpu_pipeline.sh start STAGE... | poll SECONDS [STAGE]"; exit 2 ;;
esac
