rule tables:
    input:
        metrics=expand(f"{RESULTS}/{{model_dir}}/metrics.json", model_dir=model_dirs()),
        predictions=expand(f"{RESULTS}/{{model_dir}}/predictions.h5", model_dir=model_dirs()),
        constructed=expand(f"{RESULTS}/constructed/{{name}}.h5", name=CONSTRUCTIONS),
        autoattack=expand(f"{RESULTS}/{{model_dir}}/autoattack_predictions.h5", model_dir=AUTOATTACK_DIRS),
        data=f"{RESULTS}/data.h5",
    output:
        models=report(f"{RESULTS}/tables/models.csv", caption="../report/models_table.rst", category="Tables"),
        table1=report(f"{RESULTS}/tables/table1.csv", caption="../report/table1_csv.rst", category="Tables"),
        figure2=report(f"{RESULTS}/tables/figure2.csv", caption="../report/figure2_csv.rst", category="Tables"),
        claims=report(f"{RESULTS}/tables/claims.csv", caption="../report/claims_csv.rst", category="Tables"),
        summary=f"{RESULTS}/summary.md",
    params:
        figure2_rows=config["figures"]["figure2"],
        figure2_eps=config["figures"]["figure2_eps"],
        comparisons=config["comparisons"],
        model_dirs=model_dirs(),
        autoattack_dirs=AUTOATTACK_DIRS,
        constructions=CONSTRUCTIONS,
    log:
        f"{LOGS}/tables.log",
    benchmark:
        f"{BENCHMARKS}/tables.tsv",
    conda:
        "../../envs/notbugs.yaml"
    script:
        "../scripts/tables.py"
