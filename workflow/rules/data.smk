# Stage 1: the data pack every run reads, and the pretrained tiny base every run starts from.
# Both are optional (config `pack`, `pretrain`): the toy benchmark needs neither, a Hugging Face base
# needs no pretraining.

if config["pack"]:

    # On a cluster it runs on the submitting host: the hf source downloads, and compute nodes often
    # have no internet (the synthetic pack takes seconds anyway).
    localrules:
        build_pack,

    rule build_pack:
        output:
            **pack_files(),
        params:
            args=build_pack_args(),
            out_dir=lambda wildcards, output: os.path.dirname(output.metadata),
        log:
            f"{LOGS}/build_pack.log",
        conda:
            "../../envs/biollm-cls.yaml"
        shell:
            "python -m biollm_cls.cli build-pack {params.args:q} --output-dir {params.out_dir:q} > {log:q} 2>&1"


if config["pretrain"]:

    rule pretrain_base:
        input:
            **pack_files(),
        output:
            checkpoint=BASE_CHECKPOINT,
            stats=f"{RESULTS}/data/base.stats.json",
        params:
            pack_dir=lambda wildcards, input: os.path.dirname(input.metadata),
            args=pretrain_args(),
            # the suite's model.* (and prompt-encoding) overrides: the checkpoint must fit every run
            overrides=pretrain_overrides(),
        log:
            f"{LOGS}/pretrain_base.log",
        benchmark:
            f"{BENCHMARKS}/pretrain_base.tsv"
        threads: config["threads_per_run"]
        resources:
            gpu=1,
        conda:
            "../../envs/biollm-cls.yaml"
        shell:
            "python -m biollm_cls.cli pretrain --pack-dir {params.pack_dir:q} --output {output.checkpoint:q}"
            " {params.args:q} {params.overrides:q} > {log:q} 2>&1"
