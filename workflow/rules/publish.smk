# Optional stage 5: publish the suite tables and figures as ONE W&B analysis run (job type `analysis`,
# group `analysis-<suite_name>`), built from the local CSVs and PNGs, never from the W&B API.
#   uv run snakemake publish_dashboard --cores 1                      # its own target, any config
#   wandb: {publish: true}  in the suite config                        # also part of `all`
# Offline by default: the run lands in results/<suite>/wandb/offline-run-*; upload it later with
# `wandb sync results/<suite>/wandb/offline-run-*`. WANDB_MODE overrides wandb.mode; online without
# an API key falls back to offline. See docs/wandb.md.

# DASHBOARD, wandb_setting(), publish_targets() and publish_args() live in common.smk (`snakemake --lint`:
# no functions next to rules).


localrules:
    publish_dashboard,


rule publish_dashboard:
    input:
        tables=suite_tables(),
        plots=suite_plots(),
    output:
        DASHBOARD,
    params:
        tables_dir=lambda wildcards, input: os.path.dirname(input.tables[0]),
        plots_dir=lambda wildcards, input: os.path.dirname(input.plots[0]),
        args=publish_args(),
    log:
        f"{LOGS}/publish_dashboard.log",
    conda:
        "../../envs/biollm-cls.yaml"
    shell:
        "python -m biollm_cls.cli publish-dashboard --tables-dir {params.tables_dir:q} --plots-dir {params.plots_dir:q}"
        " --output {output:q} {params.args:q} > {log:q} 2>&1"
