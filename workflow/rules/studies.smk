# Follow-up studies (config key `studies`), each defined only when its switch is on.
if STUDIES["transfer"]["enabled"]:
    TRANSFER_SET = STUDIES["transfer"]["construction"]
    TRANSFER_ARCHS = STUDIES["transfer"]["archs"]

    rule study_transfer:
        input:
            source=f"{RESULTS}/sources/{config['constructions'][TRANSFER_SET]['source']}/model.pt",
            ensemble=[f"{RESULTS}/sources/{s}/model.pt" for s in config["constructions"][TRANSFER_SET].get("ensemble", [])],
            data=f"{RESULTS}/data.h5",
            standard=[f"{RESULTS}/{target_dir(ORIGINAL_SET, a)}/model.pt" for a in TRANSFER_ARCHS],
            standard_metrics=[f"{RESULTS}/{target_dir(ORIGINAL_SET, a)}/metrics.json" for a in TRANSFER_ARCHS],
            learned_metrics=[f"{RESULTS}/{target_dir(TRANSFER_SET, a)}/metrics.json" for a in TRANSFER_ARCHS],
        output:
            study_table("transfer"),
        params:
            study_name="transfer",
            batch_size=config["evaluation"]["batch_size"],
            archs=TRANSFER_ARCHS,
            construction=config["constructions"][TRANSFER_SET],
            fast=config["fast_paths"],
            seed=config["seed"],
            device=config["device"],
        log:
            f"{LOGS}/studies/transfer.log",
        benchmark:
            f"{BENCHMARKS}/studies/transfer.tsv",
        conda:
            "../../envs/notbugs.yaml"
        threads: rule_threads("studies")
        resources:
            gpu=GPU,
            mem_mb=8000,
            runtime=6 * 60,
        script:
            "../scripts/studies.py"


if STUDIES["robust_leakage"]["enabled"]:
    LEAKAGE_SETS = STUDIES["robust_leakage"]["constructions"]

    rule study_robust_leakage:
        input:
            linear=f"{RESULTS}/sources/{LINEAR_SOURCE}/model.pt",
            data=f"{RESULTS}/data.h5",
            constructed=expand(f"{RESULTS}/constructed/{{name}}.h5", name=LEAKAGE_SETS),
            deep_metrics=[f"{RESULTS}/{target_dir(s, TARGET_ARCHS[0])}/metrics.json"
                          for s in LEAKAGE_SETS if s in TRAIN_SETS],
        output:
            accuracy=study_table("robust_leakage"),
            features=study_table("robust_leakage_features"),
        params:
            study_name="robust_leakage",
            device="cpu",
            constructions=LEAKAGE_SETS,
            deep_sets=[s for s in LEAKAGE_SETS if s in TRAIN_SETS],
            study=STUDIES["robust_leakage"],
        log:
            f"{LOGS}/studies/robust_leakage.log",
        benchmark:
            f"{BENCHMARKS}/studies/robust_leakage.tsv",
        conda:
            "../../envs/notbugs.yaml"
        threads: rule_threads("studies")
        script:
            "../scripts/studies.py"


if STUDIES["gaussian"]["enabled"]:

    rule study_gaussian:
        output:
            fits=study_table("gaussian_fits"),
            misalignment=study_table("gaussian_misalignment"),
            eigen=study_table("gaussian_eigen"),
        params:
            study_name="gaussian",
            device="cpu",
            study=STUDIES["gaussian"],
            seed=config["seed"],
        log:
            f"{LOGS}/studies/gaussian.log",
        benchmark:
            f"{BENCHMARKS}/studies/gaussian.tsv",
        conda:
            "../../envs/notbugs.yaml"
        threads: rule_threads("studies")
        script:
            "../scripts/studies.py"


if STUDIES["rebuttals"]["enabled"]:
    REBUTTAL_SET = STUDIES["rebuttals"]["construction"]
    REBUTTAL_SETS = rebuttal_sets(config)

    rule study_rebuttals:
        input:
            constructed=expand(f"{RESULTS}/constructed/{{name}}.h5", name=REBUTTAL_SETS),
            learned_metrics=[f"{RESULTS}/{target_dir(s, TARGET_ARCHS[0])}/metrics.json" for s in REBUTTAL_SETS],
            judge=f"{RESULTS}/sources/{fresh_sources(STUDIES['rebuttals']['fresh_models'] + 1)[-1]}/model.pt",
            source=f"{RESULTS}/sources/{config['constructions'][REBUTTAL_SET]['source']}/model.pt",
            ensemble=[f"{RESULTS}/sources/{s}/model.pt"
                      for s in config["constructions"][nontransferable_set(REBUTTAL_SET)]["ensemble"]],
            relabelled=f"{RESULTS}/constructed/{RELABEL_SET}.h5",
            relabel_metrics=f"{RESULTS}/{target_dir(RELABEL_SET, TARGET_ARCHS[0])}/metrics.json",
            relabeller_metrics=f"{RESULTS}/sources/{RELABEL_SOURCE}/metrics.json",
            data=f"{RESULTS}/data.h5",
        output:
            study_table("rebuttals"),
        params:
            study_name="rebuttals",
            batch_size=config["evaluation"]["batch_size"],
            names=REBUTTAL_SETS,
            constructions=[config["constructions"][s] for s in REBUTTAL_SETS],
            fast=config["fast_paths"],
            seed=config["seed"],
            device=config["device"],
        log:
            f"{LOGS}/studies/rebuttals.log",
        benchmark:
            f"{BENCHMARKS}/studies/rebuttals.tsv",
        conda:
            "../../envs/notbugs.yaml"
        threads: rule_threads("studies")
        resources:
            gpu=GPU,
        script:
            "../scripts/studies.py"


for _study in ENABLED_STUDIES:

    rule:
        name:
            f"plot_{_study}"
        input:
            [f"{RESULTS}/tables/{t}.csv" for t in STUDY_TABLES[_study]],
        output:
            report(f"{RESULTS}/figures/{_study}.png", caption=f"../report/{_study}.rst", category="Studies"),
            f"{RESULTS}/figures/{_study}.pdf",
        params:
            plot=_study,
        log:
            f"{LOGS}/plot/{_study}.log",
        benchmark:
            f"{BENCHMARKS}/plot/{_study}.tsv",
        conda:
            "../../envs/notbugs.yaml"
        script:
            "../scripts/plot.py"
