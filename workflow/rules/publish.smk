# Optional stage 5: publish the suite tables and figures as ONE W&B analysis run (job type `analysis`,
# group `analysis-<suite_name>`), built from the local CSVs and PNGs, never from the W&B API.
#   uv run snakemake publish_dashboard --cores 1                      # its own target, any config
#   wandb: {publish: true}  in the suite config                        # also part of `all`
# Offline by default: the run lands in results/<suite>/wandb/offline-run-*; upload it later with
# `wandb sync results/<suite>/wandb/offline-run-*`. WANDB_MODE overrides wandb.mode; online without
# an API key falls back to offline. See docs/wandb.md.

DASHBOARD = f"{RESULTS}/dashboard.json"


def wandb_setting(key, default=None):
    """A key of the config's optional `wandb` section (absent section or key -> default)."""
    value = (config.get("wandb") or {}).get(key)
    return default if value is None else value


def publish_targets():
    """What `rule all` adds: the dashboard marker when `wandb.publish` is true, else nothing."""
    return [DASHBOARD] if wandb_setting("publish", False) else []


def publish_args():
    """Arguments of publish-dashboard from the `wandb` section (they are the rule's params: a change reruns it)."""
    args = [
        "--suite", config["suite_name"],
        "--project", wandb_setting("project", "biollm-cls"),
        "--mode", wandb_setting("mode", "offline"),
        "--baseline-a", wandb_setting("baseline_a", "full_cls"),
        "--baseline-b", wandb_setting("baseline_b", "no_sleep"),
    ]
    if wandb_setting("entity"):
        args += ["--entity", wandb_setting("entity")]
    return args


localrules:
    publish_dashboard,


rule publish_dashboard:
    input:
        tables=suite_tables(),
        plots=suite_plots(),
    output:
        DASHBOARD,
    params:
        tables_dir=TABLES_DIR,
        plots_dir=PLOTS_DIR,
        args=publish_args(),
    log:
        f"{LOGS}/publish_dashboard.log",
    conda:
        "../../envs/biollm-cls.yaml"
    shell:
        "python -m biollm_cls.cli publish-dashboard --tables-dir {params.tables_dir:q} --plots-dir {params.plots_dir:q}"
        " --output {output:q} {params.args:q} > {log:q} 2>&1"
