# Stage 3: continual-metrics tables of each run, then the suite tables merged over all runs.
# Both are light (pandas on small files), so on a cluster they run on the submitting host.


localrules:
    run_metrics,
    merge,


rule run_metrics:
    input:
        summary=f"{RUN_DIR}/summary.json",  # written last: metrics.jsonl (read from run_dir) is complete
        task_matrix=f"{RUN_DIR}/task_matrix.csv",
    output:
        **{table: f"{RUN_DIR}/tables/{table}.csv" for table in RUN_TABLES},
    params:
        run_dir=run_dir,
        out_dir=lambda wildcards, output: os.path.dirname(output.summary),
    log:
        f"{LOGS}/run_metrics/{{ablation}}/seed{{seed}}.log",
    conda:
        "../../envs/biollm-cls.yaml"
    shell:
        "python -m biollm_cls.cli run-metrics {params.run_dir:q} --output-dir {params.out_dir:q} > {log:q} 2>&1"


rule merge:
    input:
        run_table_files(),
    output:
        **{
            table: report(
                f"{TABLES_DIR}/{name}",
                caption=f"../report/table_{table}.rst",
                category="Tables",
            )
            for table, name in SUITE_TABLES.items()
        },
    params:
        run_dirs=all_runs(),
        out_dir=lambda wildcards, output: os.path.dirname(output.summary),
    log:
        f"{LOGS}/merge.log",
    conda:
        "../../envs/biollm-cls.yaml"
    shell:
        "python -m biollm_cls.cli merge {params.run_dirs:q} --output-dir {params.out_dir:q} > {log:q} 2>&1"
