#!/bin/bash
# Runs the study's (ablation, seed) train jobs on the device machine's CPUs, 14 at a time, in dependency order
# (full_cls before the er_matched baselines that read its summary). Usage: device_study.sh SUITE CONFIG [DATA_SUITE]
# DATA_SUITE: the suite whose data/ (pack, pretrained base) the runs read (default: SUITE).
set -u
python3 -m pip install -q --no-deps --root-user-action=ignore .whl/* 2>&1 | tail -1
export PYTHONPATH=$PWD/src OMP_NUM_THREADS=1
export DEVICE_OVERRIDE=${DEVICE_OVERRIDE:-}  # e.g. device=cpu (default: device=auto, the GPU where there is one)
nproc
python3 - "$@" > /tmp/jobs.txt <<'PY'
import sys, yaml, shlex
suite, cfgfile = sys.argv[1], sys.argv[2]
c = yaml.safe_load(open(cfgfile))
R = f"results/{suite}"
D = f"results/{sys.argv[3] if len(sys.argv) > 3 else suite}"
matched = {"er_matched": "full_cls", "er_matched_total": "full_cls"}
for phase in (0, 1):
    for a, extra in c["ablations"].items():
        preset = a.split("__")[0]
        if (preset in matched) != (phase == 1):
            continue
        for s in c["seeds"]:
            o = [f"ablation={preset}", f"seed={s}"] + ([f"ablation_name={a}"] if preset != a else [])
            o += [f"benchmark={c['benchmark']}"]
            if c.get("pack"):
                o += [f"benchmark.local_path={D}/data/pack/train.jsonl", f"benchmark.eval_local_path={D}/data/pack/eval.jsonl"]
            if c.get("pretrain"):
                o += [f"model.init_checkpoint={D}/data/base.pt"]
            o += [f"logging.output_dir={R}/runs/{a}/seed{s}", f"suite_name={suite}"]
            if preset in matched:
                learner = matched[preset] + (f"__{a.split('__', 1)[1]}" if "__" in a else "")
                o.append(f"consolidation.sleep_plan={R}/runs/{learner}/seed{s}/summary.json")
            o += list(c["overrides"]) + list(extra or [])
            print(phase, " ".join(shlex.quote(x) for x in o))
PY
for phase in 0 1; do
  grep "^$phase " /tmp/jobs.txt | cut -d' ' -f2- | xargs -P ${JOBS:-14} -I{} sh -c 'python3 -m biollm_cls.cli train {} train.num_threads=1 $DEVICE_OVERRIDE > /dev/null 2>>/tmp/errors.log || echo "FAILED: {}" >> /tmp/errors.log'
done
cat /tmp/errors.log 2>/dev/null | tail -5
find results/$1/runs -name summary.json | wc -l
