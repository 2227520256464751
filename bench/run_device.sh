#!/usr/bin/env bash
# One device call: several stages of the library (snapshots under .benchsite/snaps, or src) timed in turn
# on the same machine. Usage: bash bench/run_device.sh "label:path[:flags...]" ...   (writes $OUT/<label>.json)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
D=.benchsite
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,temperature.gpu --format=csv 2>&1 | tee -a "$OUT/log.txt"
for spec in "$@"; do
  IFS=: read -r label path flags <<<"$spec"
  echo "=== $label ($path) $flags" | tee -a "$OUT/log.txt"
  # shellcheck disable=SC2086
  PYTHONPATH="$path:$D/deps" python3 bench/bench_cls.py --label "$label" --model-dir /tmp/qwen_shape \
      --json-out "$OUT/$label.json" $flags 2>&1 | grep -v "Loading weights\|Writing model" | tee -a "$OUT/log.txt"
done
