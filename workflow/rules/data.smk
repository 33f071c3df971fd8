rule prepare_data:
    output:
        f"{RESULTS}/data.h5",
    params:
        # the extra_train default left out, so runs made before it existed are not invalidated
        dataset={k: v for k, v in config["dataset"].items() if k != "n_extra_train" or v},
        seed=config["seed"],
    log:
        f"{LOGS}/prepare_data.log",
    benchmark:
        f"{BENCHMARKS}/prepare_data.tsv",
    conda:
        "../../envs/notbugs.yaml"
    # processes that decode images (restricted_imagenet); the other sources use one
    threads: rule_threads("prepare_data")
    resources:
        mem_mb=8000,
        runtime=240,  # minutes; Restricted ImageNet decodes ~267,000 JPEGs
    script:
        "../scripts/prepare_data.py"
