# Stage 2: one training run per (ablation, seed). The run writes its whole directory; summary.json is
# written last, so its presence marks a completed run (docs/run_outputs.md).


rule train:
    input:
        unpack(train_inputs),
    output:
        summary=f"{RUN_DIR}/summary.json",
        task_matrix=f"{RUN_DIR}/task_matrix.csv",
        metrics=f"{RUN_DIR}/metrics.jsonl",
    params:
        # The resolved override list: a change here (suite-level or this ablation's overrides) reruns
        # this run; library code is not an input (see the Snakefile on forcing reruns).
        overrides=train_overrides,
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
        # A rerun starts from an empty run directory: a run directory is never appended to.
        "rm -rf {params.run_dir:q} && python -m biollm_cls.cli train {params.overrides:q} > {log:q} 2>&1"
