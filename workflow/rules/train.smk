rule train_source:
    input:
        data=f"{RESULTS}/data.h5",
    output:
        models=[f"{RESULTS}/sources/{{source}}/model.pt"],
        logs=[f"{RESULTS}/sources/{{source}}/train_log.csv"],
    params:
        arch=lambda wc: config["sources"][wc.source]["arch"],
        train=lambda wc: source_train_params(config, wc.source),
        seeds=lambda wc: [source_seed(config, wc.source)],
        validation=config["validation"],
        device=config["device"],
    log:
        f"{LOGS}/train_source/{{source}}.log",
    benchmark:
        f"{BENCHMARKS}/train_source/{{source}}.tsv",
    # Sources, then constructions, head the longest chains: start them before quick jobs.
    priority: 2
    conda:
        "../../envs/notbugs.yaml"
    threads: rule_threads("train_source")
    resources:
        # one GPU per training process (train.processes > 1: DistributedDataParallel)
        gpu=lambda wc: GPU * config["sources"][wc.source]["train"]["processes"],
        mem_mb=16000,
        runtime=24 * 60,
    script:
        "../scripts/train.py"


rule train_target:
    input:
        data=f"{RESULTS}/data.h5",
        train_set=training_set_file,
    output:
        models=target_files("model.pt"),
        logs=target_files("train_log.csv"),
    params:
        arch=lambda wc: wc.arch,
        train=lambda wc: target_train_config(config, wc.train_set),
        # Fresh targets: a seed of their own, never the sources' (docs/paper-notes.md §3).
        seeds=lambda wc: [target_seed(config["seed"], wc.train_set, wc.arch, k) for k in job_replicates(wc)],
        validation=config["validation"],
        device=config["device"],
    log:
        target_job_log("train_target"),
    benchmark:
        target_job_benchmark("train_target"),
    conda:
        "../../envs/notbugs.yaml"
    threads: rule_threads("train_target")
    resources:
        gpu=GPU * config["targets"]["train"]["processes"],
        mem_mb=16000,
        runtime=24 * 60,
    script:
        "../scripts/train.py"
