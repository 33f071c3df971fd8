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


rule tables:
    input:
        metrics=expand(f"{RESULTS}/{{model_dir}}/metrics.json", model_dir=model_dirs()),
        constructed=expand(f"{RESULTS}/constructed/{{name}}.h5", name=CONSTRUCTIONS),
        data=f"{RESULTS}/data.h5",
    output:
        models=report(f"{RESULTS}/tables/models.csv", caption="../report/models_table.rst", category="Tables"),
        table1=report(f"{RESULTS}/tables/table1.csv", caption="../report/table1_csv.rst", category="Tables"),
        figure2=report(f"{RESULTS}/tables/figure2.csv", caption="../report/figure2_csv.rst", category="Tables"),
    params:
        figure2_rows=config["figures"]["figure2"],
        model_dirs=model_dirs(),
        constructions=CONSTRUCTIONS,
    log:
        f"{LOGS}/tables.log",
    conda:
        "../../envs/notbugs.yaml"
    script:
        "../scripts/tables.py"
