# The biollm-cls evaluation suite: build a data pack, pretrain the tiny base, train every
# (ablation, seed), then per-run tables, the merged suite tables, figures and an HTML report.
#
#   uv run snakemake all --cores 1 --resources gpu=1    # targets BEFORE --resources (it takes a list)
#   uv run snakemake --profile profiles/default          # the same, with the defaults in the profile
#   uv run snakemake --configfile config/toy.yaml -n     # another suite config (replaces the default)
#   uv run snakemake --report results/default/report.html   # after a run: figures + tables in one HTML
#
# Reruns. A run reruns when its inputs are newer (pack, base checkpoint) or its parameters change
# (the resolved override list is the train rule's `params`), so editing one ablation's overrides reruns
# only that ablation's runs and what depends on them. Library code is deliberately NOT an input:
# editing src/ does not rerun finished runs (each run records its library version and git commit in
# run_metadata.json). After a library change that should invalidate results, force it:
#   uv run snakemake --forcerun train --profile profiles/default     # every run, then tables and plots
#   uv run snakemake -R pretrain_base --profile profiles/default     # a new base, hence every run
#   uv run snakemake results/<suite>/runs/<ablation>/seed<seed>/summary.json --force --cores 1   # one run
# See docs/pipeline.md.

from snakemake.utils import min_version

min_version("9.0")


# A --configfile given on the command line replaces this default instead of being merged into it
# (Snakemake would otherwise merge the `ablations` maps of both files); --config key=value still
# updates whichever config is in use.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# The suite config is checked against workflow/schemas/config.schema.yaml first thing in rules/common.smk
# (one error line, exit code 2).


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/metrics.smk"
include: "workflow/rules/plots.smk"
include: "workflow/rules/publish.smk"


rule all:
    input:
        suite_tables(),
        suite_plots(),
        publish_targets(),  # the W&B dashboard, only when the config says wandb: {publish: true}
    default_target: True
