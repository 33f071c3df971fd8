rule evaluate_source:
    input:
        models=[f"{RESULTS}/sources/{{source}}/model.pt"],
        data=f"{RESULTS}/data.h5",
    output:
        metrics=[f"{RESULTS}/sources/{{source}}/metrics.json"],
        predictions=[f"{RESULTS}/sources/{{source}}/predictions.h5"],
    params:
        evaluation=config["evaluation"],
        fast=config["fast_paths"],
        seed=config["seed"],
        device=config["device"],
    log:
        f"{LOGS}/evaluate_source/{{source}}.log",
    conda:
        "../../envs/notbugs.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=8000,
        runtime=6 * 60,
    script:
        "../scripts/evaluate.py"


rule evaluate_target:
    input:
        models=target_files("model.pt"),
        data=f"{RESULTS}/data.h5",
    output:
        metrics=target_files("metrics.json"),
        predictions=target_files("predictions.h5"),
    params:
        evaluation=config["evaluation"],
        fast=config["fast_paths"],
        seed=config["seed"],
        device=config["device"],
    log:
        target_job_log("evaluate_target"),
    conda:
        "../../envs/notbugs.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=8000,
        runtime=6 * 60,
    script:
        "../scripts/evaluate.py"
