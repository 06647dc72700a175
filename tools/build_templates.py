"""Build the papermill templates in workbench/reports/templates/ (package data) from shared cells (the source of
truth for them).

    python tools/build_templates.py          # rewrite templates/*.ipynb
    python tools/build_templates.py --check  # exit 1 if a committed template differs from what this builds

Every template records the same things (parameters, recipe, environment, study table, charts, verdicts, headline)
through `workbench.reports`, so the notebooks stay short and cannot drift apart.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbtools
from nbformat.v4 import new_code_cell, new_markdown_cell

OUT = Path(__file__).resolve().parent.parent / "workbench" / "reports" / "templates"  # package data

COMMON_PARAMETERS = '''device: str = "auto"  # auto, cpu or cuda
batch_sizes: list = [1, 64]  # batch sizes to time
threads: int = None  # intra-op threads, None for the default; recorded in the report
max_drop: float = 0.01  # metric budget against the baseline, for the verdicts
seed: int = 0'''


def cells(title: str, intro: str, parameters: str, derive: str = "", extra: list | None = None,
          batch_sizes: str = "[1, 64]"):
    common = COMMON_PARAMETERS.replace("batch_sizes: list = [1, 64]", f"batch_sizes: list = {batch_sizes}")
    out = [new_markdown_cell(f"# {title}\n\n{intro}"),
           new_code_cell(parameters + "\n" + common, metadata={"tags": ["parameters"]})]
    if derive:
        out.append(new_code_cell(derive))
    out += [
        new_code_cell("import workbench as wb\nfrom workbench import reports\n\n"
                      "reports.show_parameters(model=model, recipes=recipes, device=device, "
                      "batch_sizes=batch_sizes, threads=threads, max_drop=max_drop, seed=seed)"),
        new_markdown_cell("## Environment"),
        new_code_cell("reports.environment_table(device, threads, seed)"),
        new_markdown_cell("## Results\n\nEvery candidate is measured against one baseline, in this process, with the "
                          "same threads and inputs, timed in interleaved rounds beside it; each speedup comes with "
                          "its 95% interval."),
        new_code_cell("model_obj, data = reports.load_model(model)\n"
                      "results = reports.run_recipes(model_obj, data, recipes, device=device, seed=seed, "
                      "batch_sizes=batch_sizes or None, threads=threads, name=model)\n"
                      "reports.comparison(results)"),
        new_code_cell("reports.show(wb.charts.pareto(results))"),
    ]
    out += extra or []
    out += [
        new_markdown_cell("## Verdicts\n\nWithin the metric budget? Reliably faster at every timed batch (the lower "
                          "end of the speedup's 95% interval above 1, on a quiet machine)? Smaller?"),
        new_code_cell("reports.verdicts(results, max_drop)"),
        new_code_cell("for r in results:\n    for note in r.notes:\n        print(f'- {r.recipe}: {note}')"),
        new_code_cell("reports.headline(results, max_drop)", metadata={"tags": ["headline"]}),
    ]
    return out


MODEL = 'model: str = "digits-cnn"  # a built-in name, or an import path package.module:factory giving (model, data)'

TEMPLATES = {
    "quickstart": cells(
        "Quickstart: a built-in model, each technique against the baseline",
        "Quantization, structured pruning, low-rank factorization and distillation on one model, measured side by "
        "side, with the Pareto chart and a verdict per candidate.",
        MODEL + '\nrecipes: list = ["quant=int8", "quant=int8-dynamic", "prune=0.5:structured=true:scope=layer,'
        'finetune=2", "factorize:energy=0.9,finetune=1", "distill=5:student=width=0.5"]'),
    "quantization": cells(
        "Quantization report",
        "Every quantization mode on one model: int8 dynamic and static (ONNX Runtime), fp16 and bf16 (torch).",
        MODEL + '\nmodes: list = ["int8", "int8-dynamic", "int8-static", "fp16", "bf16"]\n'
        'calibration: str = "minmax"  # minmax, entropy or percentile, for static int8',
        'recipes = [f"quant={m}" + (f":calibration={calibration}" if m == "int8-static" else "") for m in modes]'),
    "pruning": cells(
        "Pruning report",
        "A sparsity sweep with fine-tuning, and the per-layer sensitivity that shows where the model is fragile.",
        MODEL + '\nsparsities: list = [0.25, 0.4, 0.5]\nstructured: bool = True  # structured pruning is the '
        'kind that runs faster\nfinetune: int = 3  # recovery epochs after pruning (3 keep digits-cnn within 0.01 '
        'at 50% of its channels)',
        'recipes = [f"prune={s}:structured={str(structured).lower()}:scope=layer" + (f",finetune={finetune}" '
        'if finetune else "") for s in sparsities]',
        [new_markdown_cell("## Sensitivity\n\nThe metric change when only one layer is pruned to each level."),
         new_code_cell("sens = wb.sensitivity(model_obj, data, levels=sparsities, structured=structured)\n"
                       "reports.show(wb.charts.sensitivity_heatmap(sens))")]),
    "distillation": cells(
        "Distillation report",
        "A smaller student distilled from the model, against the same student trained on the labels alone.",
        MODEL + '\nstudent: str = "width=0.5"  # width=W for built-in families, depth=D for transformers\n'
        'epochs: int = 5\ntemperature: float = 4.0\nalpha: float = 0.9',
        'recipes = [f"distill={epochs}:student={student}:temperature={temperature}:alpha={alpha}:patience=None"]',
        [new_markdown_cell("## Without the teacher\n\nThe same student, same epochs and seed, trained on the "
                           "labels only."),
         new_code_cell("reports.labels_only(model_obj, data, student, epochs, results[0])")]),
    "language-model": cells(
        "Language-model report",
        "A causal language model made smaller and faster: perplexity on held-out text, size, and greedy generation "
        "timed (time to first token, tokens per second at batch 1 and 8, prompts of 32 and 256 tokens, 64 new "
        "tokens, cache on), each candidate beside the original.",
        'model: str = "docs-lm"  # a built-in causal LM (docs-lm, docs-lm-tiny) or an import path '
        'package.module:factory giving (model, data)\n'
        'recipes: list = ["quant=int8", "quant=int8-weight", "quant=int4"]',
        extra=[new_markdown_cell("## Generation\n\nGreedy decoding with the key/value cache, the candidate and the "
                                 "original taking turns on the same prompts; tokens per second against the "
                                 "original's from paired runs, with the 95% interval, and the share of prompts "
                                 "whose greedy tokens stay the same."),
               new_code_cell("reports.generation(results)")],
        batch_sizes="[1, 8]"),
    "pipeline": cells(
        "Pipeline report",
        "Any recipes on any model: the report an exploration turns into (`Study.to_report`, `%optimize --report`).",
        MODEL + '\nrecipes: list = ["prune=0.4:structured=true:scope=layer,distill=2,factorize:energy=0.9,'
        'quant=int8"]  # short forms, YAML text or dicts'),
}


def main(argv) -> int:
    return nbtools.main(argv, TEMPLATES, OUT, "tools/build_templates.py")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
