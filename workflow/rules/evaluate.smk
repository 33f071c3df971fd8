rule evaluate_source:
    input:
        models=[f"{RESULTS}/sources/{{source}}/model.pt"],
        data=f"{RESULTS}/data.h5",
    output:
        metrics=[f"{RESULTS}/sources/{{source}}/metrics.json"],
        predictions=[f"{RESULTS}/sources/{{source}}/predictions.h5"],
    params:
        evaluation=pgd_config(config["evaluation"]),
        fast=config["fast_paths"],
        seed=config["seed"],
        device=config["device"],
    log:
        f"{LOGS}/evaluate_source/{{source}}.log",
    benchmark:
        f"{BENCHMARKS}/evaluate_source/{{source}}.tsv",
    conda:
        "../../envs/notbugs.yaml"
    threads: rule_threads("evaluate_source")
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
        evaluation=pgd_config(config["evaluation"]),
        fast=config["fast_paths"],
        seed=config["seed"],
        device=config["device"],
    log:
        target_job_log("evaluate_target"),
    benchmark:
        target_job_benchmark("evaluate_target"),
    conda:
        "../../envs/notbugs.yaml"
    threads: rule_threads("evaluate_target")
    resources:
        gpu=GPU,
        mem_mb=8000,
        runtime=6 * 60,
    script:
        "../scripts/evaluate.py"


if AUTOATTACK:

    rule evaluate_autoattack:
        input:
            models=[f"{RESULTS}/{{model_dir}}/model.pt"],
            data=f"{RESULTS}/data.h5",
        output:
            metrics=[f"{RESULTS}/{{model_dir}}/autoattack.json"],
            predictions=[f"{RESULTS}/{{model_dir}}/autoattack_predictions.h5"],
        wildcard_constraints:
            model_dir="|".join(re.escape(d) for d in AUTOATTACK_DIRS),
        params:
            evaluation=autoattack_config(config["evaluation"], config["figures"]["figure2_eps"]),
            fast=config["fast_paths"],
            seed=config["seed"],
            device=config["device"],
        log:
            f"{LOGS}/evaluate_autoattack/{{model_dir}}.log",
        benchmark:
            f"{BENCHMARKS}/evaluate_autoattack/{{model_dir}}.tsv",
        conda:
            "../../envs/notbugs.yaml"
        threads: rule_threads("evaluate_autoattack")
        resources:
            gpu=GPU,
            mem_mb=8000,
            runtime=12 * 60,
        script:
            "../scripts/evaluate.py"
