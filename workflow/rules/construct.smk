rule construct:
    input:
        unpack(construction_inputs),
    output:
        f"{RESULTS}/constructed/{{name}}.h5",
    params:
        construction=lambda wc: config["constructions"][wc.name],
        fast=config["fast_paths"],
        seed=config["seed"],
        device=config["device"],
        chunk_size=config["chunk_size"],
    log:
        f"{LOGS}/construct/{{name}}.log",
    benchmark:
        f"{BENCHMARKS}/construct/{{name}}.tsv",
    priority: 1
    conda:
        "../../envs/notbugs.yaml"
    threads: rule_threads("construct")
    resources:
        gpu=lambda wc: GPU if "source" in config["constructions"][wc.name] else 0,
        mem_mb=8000,
        runtime=24 * 60,
    script:
        "../scripts/construct.py"
