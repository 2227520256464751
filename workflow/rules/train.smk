# Stage 2: one training run per (ablation, seed). The run writes its whole directory; summary.json is
# written last, so its presence marks a completed run (docs/run_outputs.md).
#
# A rerun after a failure (or a kill) resumes from the run's newest intact checkpoint: `train
# --restart-stale` resumes a run directory only when the same config, library commit and inputs started
# it, and otherwise (a changed override list, a forced rerun of a completed run, a rebuilt pack or base, a
# library change) deletes it and starts over, with one `note:` line in the log either way. Only
# summary.json and task_matrix.csv (written at the end) are declared outputs: Snakemake deletes the
# outputs of a failed job, and the checkpoints and metrics.jsonl must survive for the resume.


rule train:
    input:
        unpack(train_inputs),
    output:
        summary=f"{RUN_DIR}/summary.json",
        task_matrix=f"{RUN_DIR}/task_matrix.csv",
    params:
        # The resolved override list: a change here (suite-level or this ablation's overrides) reruns
        # this run; library code is not an input (see the Snakefile on forcing reruns).
        overrides=train_overrides,
        # not in the command (the overrides name it); kept so that the params of runs made before the
        # resume (when the command deleted it) are unchanged (docs/pipeline.md, updating)
        run_dir=run_dir,
    log:
        f"{LOGS}/train/{{ablation}}/seed{{seed}}.log",
    benchmark:
        f"{BENCHMARKS}/train/{{ablation}}/seed{{seed}}.tsv"
    threads: config["threads_per_run"]
    resources:
        gpu=1,
    conda:
        "../../envs/biollm-cls.yaml"
    shell:
        "python -m biollm_cls.cli train --restart-stale {params.overrides:q} > {log:q} 2>&1"
