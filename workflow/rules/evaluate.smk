rule evaluate:
    input:
        model=f"{RESULTS}/{{model_dir}}/model.pt",
        data=f"{RESULTS}/data.h5",
    output:
        metrics=f"{RESULTS}/{{model_dir}}/metrics.json",
        predictions=f"{RESULTS}/{{model_dir}}/predictions.h5",
    wildcard_constraints:
        model_dir="sources/[^/]+|targets/[^/]+/[^/]+",
    params:
        evaluation=config["evaluation"],
        fast=config["fast_paths"],
        seed=config["seed"],
        device=config["device"],
    log:
        f"{LOGS}/evaluate/{{model_dir}}.log",
    conda:
        "../../envs/notbugs.yaml"
    threads: config["threads"]
    resources:
        gpu=GPU,
        mem_mb=8000,
        runtime=6 * 60,
    script:
        "../scripts/evaluate.py"
