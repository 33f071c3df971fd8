rule plot_figure2:
    input:
        f"{RESULTS}/tables/figure2.csv",
    output:
        report(f"{RESULTS}/figures/figure2.png", caption="../report/figure2.rst", category="Figures"),
        f"{RESULTS}/figures/figure2.pdf",
    params:
        plot="figure2",
    log:
        f"{LOGS}/plot/figure2.log",
    benchmark:
        f"{BENCHMARKS}/plot/figure2.tsv",
    conda:
        "../../envs/notbugs.yaml"
    script:
        "../scripts/plot.py"


rule plot_summary_page:
    input:
        summary=f"{RESULTS}/summary.md",
        figure2=f"{RESULTS}/figures/figure2.png",
    output:
        report(f"{RESULTS}/summary.html", caption="../report/summary.rst", category="Summary"),
    params:
        plot="summary_page",
    log:
        f"{LOGS}/plot/summary_page.log",
    benchmark:
        f"{BENCHMARKS}/plot/summary_page.tsv",
    conda:
        "../../envs/notbugs.yaml"
    script:
        "../scripts/plot.py"


rule plot_table1:
    input:
        f"{RESULTS}/tables/table1.csv",
    output:
        report(f"{RESULTS}/figures/table1.png", caption="../report/table1.rst", category="Figures"),
        f"{RESULTS}/figures/table1.pdf",
    params:
        plot="table1",
    log:
        f"{LOGS}/plot/table1.log",
    benchmark:
        f"{BENCHMARKS}/plot/table1.tsv",
    conda:
        "../../envs/notbugs.yaml"
    script:
        "../scripts/plot.py"


rule plot_training_curves:
    input:
        expand(f"{RESULTS}/{{model_dir}}/train_log.csv", model_dir=model_dirs()),
    output:
        report(f"{RESULTS}/figures/training_curves.png", caption="../report/training_curves.rst", category="Figures"),
        f"{RESULTS}/figures/training_curves.pdf",
    params:
        plot="training_curves",
        names=model_dirs(),
    log:
        f"{LOGS}/plot/training_curves.log",
    benchmark:
        f"{BENCHMARKS}/plot/training_curves.tsv",
    conda:
        "../../envs/notbugs.yaml"
    script:
        "../scripts/plot.py"


rule plot_grid:
    input:
        constructed=f"{RESULTS}/constructed/{{name}}.h5",
        data=f"{RESULTS}/data.h5",
    output:
        report(f"{RESULTS}/figures/grids/{{name}}.png", caption="../report/grid.rst", category="Constructed images", subcategory="{name}"),
        f"{RESULTS}/figures/grids/{{name}}.pdf",
    params:
        plot="grid",
        examples=config["figures"]["grid_examples"],
        amplify=config["figures"]["amplify"],
    log:
        f"{LOGS}/plot/grid_{{name}}.log",
    benchmark:
        f"{BENCHMARKS}/plot/grid_{{name}}.tsv",
    conda:
        "../../envs/notbugs.yaml"
    script:
        "../scripts/plot.py"
