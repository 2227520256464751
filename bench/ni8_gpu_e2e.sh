#!/usr/bin/env bash
# The NI8 pipeline end to end on one GPU, in one command (issue 12 item 4; bench/README.md):
#   1. deps: installs the carried py3.12 wheels (.device/e2e/whl: Snakemake, Hydra, OmegaConf, jsonschema
#      and what they need that the device image lacks) into /tmp/site, unless snakemake and hydra already
#      import (the project's .venv here);
#   2. model: a random-init Qwen2.5-0.5B-shaped model directory with a byte-level BPE tokenizer trained on
#      the carried Natural-Instructions sample tasks (.device/e2e/ni-sample), at the path the config names;
#   3. suite: `snakemake all` with config/ni8_gpu_e2e.yaml (build_pack from the carried tasks, full_cls and
#      er_matched x seed 7 with device=auto, run tables, merge, plots), W&B off;
#   4. report: per run the wall time, its split by phase (wake, sleep, fisher, refresh, evaluation,
#      checkpoint) and the device from run_metadata.json, the script's stages and the merged metrics, to
#      $OUT (report.md, report.json, log.txt, results.tar.gz, each run's summary.json and run_metadata.json:
#      8 files) and stdout.
# On the GPU machine (carry [".device/e2e"]):   bash bench/ni8_gpu_e2e.sh
# Here, a CPU check of the whole flow with a tiny model:   E2E_TINY=1 OUT=/tmp/e2e_out uv run bash bench/ni8_gpu_e2e.sh
# Environment: OUT (default /tmp/ni8_gpu_e2e_out), E2E_TINY=1 (2 layers, hidden 64), E2E_COMPILE=1
# (train.compile_model=true), E2E_GRAPHS=1 (train.cuda_graphs=true), E2E_FAST=1 (train=qwen_0_5b_fast, compiled), E2E_RESULTS=disk (run directories on the disk, not on /dev/shm; see step 3),
# E2E_DEADLINE_S (seconds from the start after which the suite is stopped so that the report still comes
# back; default 510 on a GPU, none otherwise), E2E_CORES (default: nproc).
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }
T0=$(date +%s%N)
E2E=.device/e2e
CONFIG=config/ni8_gpu_e2e.yaml
OUT=${OUT:-/tmp/ni8_gpu_e2e_out}
WORK=/tmp/biollm_e2e
mkdir -p "$OUT" "$WORK"
LOG=$OUT/log.txt
STAGES=$WORK/stages.tsv
: > "$LOG"
: > "$STAGES"
[ -f "$CONFIG" ] && [ -f Snakefile ] || die "run from the project root (no $CONFIG or Snakefile in $PWD)"
[ -d "$E2E/ni-sample" ] || die "$E2E/ni-sample is missing: copy ../shared/ni-sample/tasks there and carry $E2E (bench/README.md)"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled WANDB_SILENT=true \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
log() { echo "$*" | tee -a "$LOG"; }
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
secs() { printf '%d.%d' $(( $1 / 1000 )) $(( $1 % 1000 / 100 )); }
stage_start() { S0=$(date +%s%N); log "=== $1"; }
stage_end() { printf '%s\t%s\n' "$1" "$(secs "$(ms_since "$S0")")" >> "$STAGES"; }

# ---- 1. deps --------------------------------------------------------------------------------------------
stage_start deps
if python3 -c "import snakemake, hydra" 2>/dev/null; then
    log "snakemake and hydra import already ($(command -v python3)): no wheels installed"
else
    ls "$E2E"/whl/*.whl > /dev/null 2>&1 || die "no wheels in $E2E/whl: carry $E2E (bench/README.md)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$E2E"/whl/*.whl \
        2>&1 | tee -a "$LOG"
    # Two image packages must be new enough / old enough for pydantic and snakemake: shadow them only when not.
    compat=$(python3 - <<'PY'
from importlib.metadata import version
def v(name):
    try:
        return tuple(int(x) for x in version(name).split(".")[:2])
    except Exception:
        return (0, 0)
print(" ".join(n for n, bad in (("typing_extensions", v("typing_extensions") < (4, 16)),
                                ("packaging", not (24, 0) <= v("packaging") < (26, 0))) if bad))
PY
)
    for name in $compat; do
        log "the image's $name does not fit: installing the carried one"
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$E2E"/compat/"$name"-*.whl 2>&1 | tee -a "$LOG"
    done
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
# The rules call `python`: make it the interpreter that holds torch and the wheels.
PREFIX='import sys; print(sys.prefix)'
if [ "$(python -c "$PREFIX" 2>/dev/null)" != "$(python3 -c "$PREFIX")" ]; then
    mkdir -p "$WORK/bin" && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > "$WORK/bin/python"
    chmod +x "$WORK/bin/python" && export PATH=$WORK/bin:$PATH
fi
python3 -c "import snakemake, hydra, omegaconf, jsonschema, yaml, pandas, matplotlib, torch, transformers, tokenizers, biollm_cls" \
    2>&1 | tee -a "$LOG" || die "a package the pipeline needs does not import (above)"
stage_end deps

# ---- 2. facts and the model directory ------------------------------------------------------------------
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm \
    --format=csv 2>&1 | tee -a "$LOG" || log "no nvidia-smi"
python3 -m biollm_cls.cli check-device 2>&1 | tee -a "$LOG"
df -h . /tmp 2>&1 | tee -a "$LOG"
MODEL_DIR=$(python3 -c "import yaml; o = yaml.safe_load(open('$CONFIG'))['overrides']; print(next(x.split('=', 1)[1] for x in o if x.startswith('model.hf_model_name=')))")
VOCAB=$(python3 -c "import yaml; o = yaml.safe_load(open('$CONFIG'))['overrides']; print(next(x.split('=', 1)[1] for x in o if x.startswith('model.vocab_size=')))")
stage_start model
python3 bench/ni8_gpu_e2e.py model --tasks "$E2E/ni-sample" --out "$MODEL_DIR" --vocab "$VOCAB" \
    ${E2E_TINY:+--tiny} 2>&1 | { grep -v "Writing model\|Loading weights" || true; } | tee -a "$LOG"
stage_end model

# ---- 3. the suite --------------------------------------------------------------------------------------
SUITE=$(python3 -c "import yaml; print(yaml.safe_load(open('$CONFIG'))['suite_name'])")
RUN_CONFIG=$CONFIG
if [ -n "${E2E_COMPILE:-}${E2E_GRAPHS:-}${E2E_FAST:-}" ]; then
    RUN_CONFIG=$WORK/ni8_gpu_e2e_variant.yaml
    cp "$CONFIG" "$RUN_CONFIG"
    [ -n "${E2E_COMPILE:-}${E2E_FAST:-}" ] && sed -i 's/train.compile_model=false/train.compile_model=true/' "$RUN_CONFIG"
    [ -n "${E2E_GRAPHS:-}" ] && sed -i 's/  - train.deterministic=false/&\n  - train.cuda_graphs=true/' "$RUN_CONFIG"
    # the large-GPU preset (cuda_graphs, fp8 Fisher, no gradient checkpointing) in place of the 12 GB one
    [ -n "${E2E_FAST:-}" ] && sed -i 's/  - train=continual_pilot_4070/  - train=qwen_0_5b_fast/' "$RUN_CONFIG"
fi
# A fresh suite every time (only this suite's folder). Its run directories go to tmpfs (/dev/shm) when it has
# room: each run writes 9 checkpoints (8 boundaries + the end) of up to ~8 GB (fp32 base, AdamW moments, EWC
# Fisher and anchor), each fsync-ed and hashed, which on a slow disk would not fit the time limit.
# E2E_RESULTS=disk keeps them on the disk; the report says where they were.
rm -rf "results/$SUITE"
mkdir -p results
NEED_GB=$([ -n "${E2E_TINY:-}" ] && echo 1 || echo 24)  # peak ~20 GB: full_cls 8 + er_matched 2 x 6
SHM_GB=$(df -P -k /dev/shm 2>/dev/null | awk 'NR == 2 {print int($4 / 1048576)}')
if [ "${E2E_RESULTS:-shm}" = shm ] && [ "${SHM_GB:-0}" -ge "$NEED_GB" ]; then
    rm -rf "/dev/shm/biollm_e2e/$SUITE" && mkdir -p "/dev/shm/biollm_e2e/$SUITE"
    ln -s "/dev/shm/biollm_e2e/$SUITE" "results/$SUITE"
    RESULTS_ON="tmpfs (/dev/shm, ${SHM_GB} GB free)"
else
    RESULTS_ON="disk ($(df -P -k . | awk 'NR == 2 {print int($4 / 1048576)}') GB free; /dev/shm: ${SHM_GB:-none} GB free)"
fi
log "results/$SUITE on $RESULTS_ON"
if [ -z "${E2E_DEADLINE_S+x}" ]; then
    E2E_DEADLINE_S=$(python3 -c "import torch; print(510 if torch.cuda.is_available() else 0)")
fi
LIMIT=()
if [ "$E2E_DEADLINE_S" -gt 0 ]; then
    left=$(( E2E_DEADLINE_S - $(ms_since "$T0") / 1000 - 20 ))
    [ "$left" -gt 30 ] || die "only ${left}s of E2E_DEADLINE_S=$E2E_DEADLINE_S left for the suite"
    LIMIT=(timeout --signal=INT --kill-after=15 "$left")
    log "the suite is stopped after ${left}s (E2E_DEADLINE_S=$E2E_DEADLINE_S)"
fi
stage_start snakemake
set +e
"${LIMIT[@]}" python3 -m snakemake all --cores "${E2E_CORES:-$(nproc)}" --resources gpu=1 \
    --configfile "$RUN_CONFIG" --scheduler greedy --keep-going --printshellcmds --show-failed-logs 2>&1 | tee -a "$LOG"
RC=${PIPESTATUS[0]}
set -e
stage_end snakemake
for f in "results/$SUITE"/logs/train/*/*.log; do
    if [ -f "$f" ]; then log "=== $f"; cat "$f" >> "$LOG"; fi
done

# ---- 4. the report -------------------------------------------------------------------------------------
printf 'total before the report\t%s\n' "$(secs "$(ms_since "$T0")")" >> "$STAGES"
python3 bench/ni8_gpu_e2e.py report --config "$RUN_CONFIG" --out "$OUT" --stages "$STAGES" \
    --model-dir "$MODEL_DIR" --snakemake-rc "$RC" --results-on "$RESULTS_ON"
ls -l "$OUT"
[ "$RC" -eq 0 ] || die "snakemake exited with $RC (its log: $LOG)"
