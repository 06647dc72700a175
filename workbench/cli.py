"""The `workbench` command: optimize a model, reports from templates (one at a time or in batches), autotune.

    workbench optimize digits-cnn --quant int8 --save cnn-int8
    workbench templates
    workbench report quickstart -p model digits-mlp --html out.html
    workbench batch grid.yaml --workers 2 --out batch-reports
    workbench autotune digits-cnn --budget 10min

The CLI and the Python API (`wb.optimize`, `wb.report`, `wb.reports.batch`, `wb.autotune`) call the same functions;
`workbench optimize` takes the same technique flags as `%optimize`, derived from the registered techniques.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _value(text: str):
    """-p values are YAML: 0.5 is a number, [1, 64] a list, true a bool, anything else a string."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _parameters(args) -> dict:
    import yaml

    params = {}
    for path in args.parameters_file or []:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise SystemExit(f"error: {path} must hold a mapping of parameter names to values")
        params.update(loaded)
    for name, value in args.parameter or []:
        params[name] = _value(value)
    return params


def _without_iri_grammar() -> None:
    """jsonschema (nbformat's validator, so papermill's) imports `rfc3987_syntax` where it is installed, which builds
    a Lark grammar for its 'iri' format at import: about 3 s of every `workbench report`'s start. No command checks
    IRIs, so this process does without it, as jsonschema does where that package is not installed."""
    if "jsonschema" not in sys.modules:
        sys.modules.setdefault("rfc3987_syntax", None)  # None: `import rfc3987_syntax` raises ImportError


def main(argv=None) -> int:
    from .errors import WorkbenchError

    _without_iri_grammar()

    from .recipe import add_flags
    from .registry import backend_names

    parser = argparse.ArgumentParser(prog="workbench", description="Make PyTorch models smaller and faster, "
                                     "measured honestly; reproducible reports.")
    sub = parser.add_subparsers(dest="command", required=True)

    p_opt = sub.add_parser("optimize", help="optimize a model with technique flags, print the table and verdict")
    p_opt.add_argument("model", help="a built-in name or an import path package.module:factory -> (model, data)")
    add_flags(p_opt)
    p_opt.add_argument("--recipe", help="a recipe instead of flags: 'prune=0.5,quant=int8' or a YAML file")
    p_opt.add_argument("--backend", choices=["auto", *backend_names()], default="auto")
    p_opt.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p_opt.add_argument("--batch", type=int, action="append", help="batch size to time (repeatable)")
    p_opt.add_argument("--threads", type=int, help="intra-op threads while measuring")
    p_opt.add_argument("--save", help="directory to save the optimized model into")
    p_opt.set_defaults(run=_optimize)

    p_list = sub.add_parser("templates", help="list the templates and their parameters")
    p_list.set_defaults(run=_templates)

    p_report = sub.add_parser("report", help="run one template with parameters, write notebook and HTML")
    p_report.add_argument("template", help="a template path or name (quickstart, quantization, pruning, ...)")
    p_report.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"))
    p_report.add_argument("-f", "--parameters-file", action="append", metavar="PARAMS.yaml")
    p_report.add_argument("-o", "--output", help="executed notebook (default TEMPLATE-report.ipynb)")
    p_report.add_argument("--html", help="HTML report with the code hidden")
    p_report.add_argument("--timeout", type=int, default=1800, help="seconds per cell (default 1800)")
    p_report.add_argument("--kernel", help="Jupyter kernel name (default: the template's, python3)")
    p_report.set_defaults(run=_report)

    p_batch = sub.add_parser("batch", help="run many parameter sets in parallel on dask.distributed")
    p_batch.add_argument("spec", help="GRID.yaml: template, parameters, and a grid or a list of runs")
    p_batch.add_argument("--workers", type=int, default=2, help="local worker processes (default 2)")
    p_batch.add_argument("--scheduler", help="address of an existing dask scheduler, e.g. tcp://host:8786")
    p_batch.add_argument("--out", help="output directory (default: the spec's 'out', or batch-reports)")
    p_batch.add_argument("--timeout", type=int, default=1800, help="seconds per cell (default 1800)")
    p_batch.set_defaults(run=_batch)

    p_auto = sub.add_parser("autotune", help="search recipes for the fastest/smallest model within a metric budget")
    p_auto.add_argument("model", help="a built-in name or an import path package.module:factory -> (model, data)")
    p_auto.add_argument("--max-drop", type=float, default=0.01, help="metric budget against the baseline")
    p_auto.add_argument("--objective", choices=["latency", "size"], default="latency")
    p_auto.add_argument("--budget", default="10min", help="wall time, e.g. 90s, 10min")
    p_auto.add_argument("--batch", type=int, help="batch size to optimize latency for")
    p_auto.add_argument("--storage", help="optuna storage URL shared by several machines (default: local SQLite)")
    p_auto.add_argument("--study", help="optuna study name (the same on every machine of one search)")
    p_auto.add_argument("--save", help="directory to save the best model into")
    p_auto.set_defaults(run=_autotune)

    args = parser.parse_args(argv)
    try:
        return args.run(args, argv if argv is not None else sys.argv[1:])
    except WorkbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _optimize(args, argv) -> int:
    from .engine import optimize
    from .errors import RecipeError
    from .progress import Lines
    from .recipe import Recipe, flag_order, flags_from_args, from_flags
    from .tables import display_table
    from .zoo import resolve

    flags = flags_from_args(args)
    if args.recipe and flags:
        raise RecipeError("use either --recipe or technique flags (--quant, --prune, ...), not both")
    recipe = Recipe.parse(args.recipe) if args.recipe else Recipe.from_dict(from_flags(order=flag_order(argv),
                                                                                      **flags))
    model, data = resolve(args.model)
    result = optimize(model, recipe, data=data, backend=args.backend, device=args.device, batch_sizes=args.batch,
                      threads=args.threads, progress=Lines(), name=args.model)
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(f"{result.recipe} on {result.device} ({result.backend})\n{result.verdict}")
        print(display_table(result.table()).to_string())
    for line in result.preflight:
        print(f"! pre-flight: {line}")
    for note in result.notes:
        print(f"- {note}")
    if args.save:
        print(f"saved to {result.save(args.save)}")
    return 0


def _templates(args, argv) -> int:
    from .reports import templates
    for name, params in templates().items():
        print(name)
        for p, info in params.items():
            help_text = f"  # {info['help']}" if info["help"] else ""
            print(f"    {p}: {info['type']} = {info['default']}{help_text}")
    return 0


def _report(args, argv) -> int:
    from .progress import Lines
    from .reports import report

    html = args.html
    out = report(args.template, _parameters(args), output=args.output, html=html, timeout=args.timeout,
                 kernel=args.kernel, progress=Lines())
    print(f"wrote {out}" + (f" and {html}" if html else ""))
    return 0


def _autotune(args, argv) -> int:
    from .progress import Lines
    from .search.autotune import autotune
    from .tables import display_table
    from .zoo import resolve

    model, data = resolve(args.model)
    tuned = autotune(model, data, max_drop=args.max_drop, objective=args.objective, budget=args.budget,
                     batch=args.batch, storage=args.storage, study_name=args.study, progress=Lines())
    print(tuned.headline)
    print(display_table(tuned.best.table()).to_string())
    print(f"\nPareto front of {len(tuned.results)} candidates:")
    print(tuned.front.to_string(index=False))
    if args.save:
        print(f"saved to {tuned.best.save(args.save)}")
    return 0 if tuned.within_budget and tuned.reliable else 1


def _batch(args, argv) -> int:
    import json

    from .reports import batch
    index = batch(args.spec, workers=args.workers, scheduler=args.scheduler, out=args.out, timeout=args.timeout)
    records = json.loads((index.parent / "index.json").read_text())
    failed = [r for r in records if r["status"] != "ok"]
    print(f"wrote {index}: {len(records) - len(failed)} of {len(records)} reports")
    for r in failed:
        print(f"  {r['dir']} failed: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
