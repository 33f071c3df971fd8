rule train_source:
    input:
        data=f"{RESULTS}/data.h5",
    output:
        model=f"{RESULTS}/sources/{{source}}/model.pt",
        log_csv=f"{RESULTS}/sources/{{source}}/train_log.csv",
    params:
        arch=lambda wc: config["sources"][wc.source]["arch"],
        train=lambda wc: config["sources"][wc.source]["train"],
        seed=lambda wc: config["sources"][wc.source].get("seed", config["seed"]),
        device=config["device"],
    log:
        f"{LOGS}/train_source/{{source}}.log",
    # Sources, then constructions, head the longest chains: start them before quick jobs.
    priority: 2
    conda:
        "../../envs/notbugs.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=16000,
        runtime=24 * 60,
    script:
        "../scripts/train.py"


rule train_target:
    input:
        data=f"{RESULTS}/data.h5",
        train_set=training_set_file,
    output:
        model=f"{RESULTS}/targets/{{train_set}}/{{arch}}/model.pt",
        log_csv=f"{RESULTS}/targets/{{train_set}}/{{arch}}/train_log.csv",
    params:
        arch=lambda wc: wc.arch,
        train=config["targets"]["train"],
        seed=config["seed"],
        device=config["device"],
    log:
        f"{LOGS}/train_target/{{train_set}}/{{arch}}.log",
    conda:
        "../../envs/notbugs.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=16000,
        runtime=24 * 60,
    script:
        "../scripts/train.py"
