# Stage 4: the suite figures of one view (system = base + hippocampus, base = consolidated neocortex).


localrules:
    plots,


rule plots:
    input:
        suite_tables(),
    output:
        **{
            name: report(
                f"{PLOTS_DIR}/{name}_{{view}}.png",
                caption=f"../report/figure_{name}.rst",
                category="Figures",
                subcategory="{view} view",
                labels={"figure": name.replace("_", " "), "view": "{view}"},
            )
            for name in PLOT_NAMES
        },
    params:
        tables_dir=lambda wildcards, input: os.path.dirname(input[0]),
        out_dir=lambda wildcards, output: os.path.dirname(output.task_matrix),
        reference=config["plots"]["reference"],
    log:
        f"{LOGS}/plots/{{view}}.log",
    conda:
        "../../envs/biollm-cls.yaml"
    shell:
        "python -m biollm_cls.cli plots --tables-dir {params.tables_dir:q} --output-dir {params.out_dir:q}"
        " --views {wildcards.view} --reference {params.reference:q} > {log:q} 2>&1"
