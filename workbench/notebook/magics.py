"""Notebook magics: %optimize, %%recipe, %compare, %profile. Thin: parse, resolve names, call the engine.

    %load_ext workbench
    %optimize digits-cnn --quant int8

`%optimize`'s technique flags come from the registered techniques (`workbench.recipe.add_flags`), so a technique
registered later gets its flag too; `%optimize?` lists them all.
"""
from __future__ import annotations

import difflib
import re
import shlex

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser

from ..errors import first_line

OPTIMIZE_DOC = """Optimize a copy of MODEL and show a result card; the Result goes into the namespace.

Examples:

    %optimize digits-cnn --quant int8
    %optimize model --quant int8 --data val_data --as model_int8
    %optimize model --prune 0.5 --structured --finetune 1 --quant int8 --as small
    %optimize model --quant int8-static:calibration=entropy --data data
    %optimize model --recipe my_recipe --data data
    %optimize digits-cnn --auto --max-drop 0.01 --budget 2min

Technique flags compose in the order given; inference rewrites (unpad) and quantization come last. A flag's value
may carry options as in the short form (`--quant int8-static:calibration=entropy`). The Result (with .model,
.table(), .speedups, .verdict, .save(path)) is stored as MODEL_opt unless --as says otherwise, and recorded in the
Study.
"""


def _parser(prog: str, description: str) -> MagicArgumentParser:
    return MagicArgumentParser(prog=prog, description=description, add_help=False)


def optimize_parser() -> MagicArgumentParser:
    """%optimize's parser: the face's own options plus every registered technique's flags."""
    from ..recipe import add_flags
    from ..registry import backend_names

    p = _parser("%optimize", OPTIMIZE_DOC.splitlines()[0])
    p.add_argument("model", help="a model in the notebook, or a built-in name (digits-mlp, digits-cnn, minilm, "
                   "docs-lm)")
    add_flags(p)
    p.add_argument("--recipe", metavar="NAME_OR_PATH",
                   help="a Recipe in the notebook, a YAML file or 'prune=0.5,quant=int8'")
    p.add_argument("--data", metavar="NAME", help="a wb.Data (or eval function) in the notebook, or a built-in name")
    p.add_argument("--backend", choices=["auto", *backend_names()], default="auto")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, metavar="N", help="intra-op threads while measuring")
    p.add_argument("--as", dest="as_name", metavar="NAME", help="namespace name for the result (default MODEL_opt)")
    p.add_argument("--no-card", action="store_true", help="do not display the result card")
    p.add_argument("--report", metavar="OUT.html", help="also write the pipeline report for this run (re-runnable)")
    p.add_argument("--auto", action="store_true", help="search recipes across techniques (optuna) within a "
                   "metric budget")
    p.add_argument("--max-drop", type=float, default=0.01, metavar="D", help="--auto: metric budget (default 0.01)")
    p.add_argument("--budget", default="5min", metavar="TIME", help="--auto: wall time, e.g. 90s, 5min (default 5min)")
    return p


def _parse(parser: MagicArgumentParser, line: str):
    try:
        return parser.parse_argstring(line)
    except UsageError:
        raise
    except SystemExit:  # argparse's exit on a bad flag, turned into one line
        raise UsageError(f"could not parse {line!r}; see {parser.prog}? for the flags") from None


def _tokens(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError:
        return line.split()


def _identifier(name: str) -> str:
    return re.sub(r"\W", "_", name)


def _builtin_names() -> list[str]:
    from .. import zoo

    return zoo.list()


def _builtin(name: str) -> str | None:
    """The built-in a name means: 'digits-cnn', or its Python-name spelling 'digits_cnn'."""
    names = _builtin_names()
    return name if name in names else next((n for n in names if _identifier(n) == name), None)


def _is_data(value) -> bool:
    from ..data import Data

    return isinstance(value, Data)


def _widgets_available() -> bool:
    try:
        import anywidget  # noqa: F401  (plotly's FigureWidget needs it)
    except ImportError:
        return False
    return True


@magics_class
class WorkbenchMagics(Magics):
    """The workbench's magics. Results go back into the notebook's namespace and its Study."""

    # -- name resolution -------------------------------------------------------------------------------------
    def _lookup(self, name: str, what: str):
        ns = self.shell.user_ns
        if name in ns:
            return ns[name]
        candidates = [k for k in ns if not k.startswith("_")]
        builtin = what in ("model", "data")
        if builtin:
            candidates += _builtin_names()
        close = difflib.get_close_matches(name, candidates, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        builtins = f" (or a built-in: {', '.join(_builtin_names())})" if builtin else ""
        raise UsageError(f"no {what} {name!r} in the notebook{hint}{builtins}")

    def _model_and_data(self, model_name: str, data_name: str | None):
        """(model, data, label): a namespace model or a built-in; data from --data, or the built-in's own."""
        builtin_data = None
        builtin = _builtin(model_name) if model_name not in self.shell.user_ns else None
        if builtin:
            model, builtin_data = self._load_builtin(builtin)
            model_name = builtin
        elif model_name.startswith(("hf:", "onnx:")) or model_name.endswith(".onnx"):
            from pathlib import Path

            from ..errors import WorkbenchError
            from ..zoo import load_model  # a model on disk: hf:path/to/dir, onnx:model.onnx or model.onnx

            try:
                model = load_model(model_name.partition(":")[2] if model_name.startswith(("hf:", "onnx:"))
                                   else model_name)
            except WorkbenchError as e:
                raise UsageError(str(e)) from None
            model_name = Path(model_name.partition(":")[2] or model_name).stem or "model"
        else:
            model = self._lookup(model_name, "model")
        if data_name is None:
            if builtin_data is None:
                found = [k for k, v in self.shell.user_ns.items() if _is_data(v) and not k.startswith("_")]
                hint = f" (the notebook has: {', '.join(found)})" if found else \
                    " (build one with wb.Data(val=..., metric=...) or name a built-in: --data digits-cnn)"
                raise UsageError(f"missing data to measure {model_name!r} on; pass --data NAME{hint}")
            return model, builtin_data, model_name
        data_builtin = _builtin(data_name) if data_name not in self.shell.user_ns else None
        if data_builtin:
            return model, self._load_builtin(data_builtin)[1], model_name
        return model, self._lookup(data_name, "data"), model_name

    def _load_builtin(self, name: str):
        from .. import zoo

        cache = self.shell.user_ns.setdefault("_workbench_builtins", {})
        if name not in cache:
            cache[name] = zoo.load(name)
        return cache[name]

    def _run(self, title: str, fn):
        """Run engine work with a progress bar; the workbench's errors become one-line UsageErrors."""
        from ..errors import WorkbenchError
        from ..progress import Bar

        bar = Bar(title)
        try:
            result = fn(bar)
        except WorkbenchError as e:
            bar.finish(first_line(e, 100))
            raise UsageError(str(e)) from None
        except UsageError as e:
            bar.finish(first_line(e, 100))
            raise
        except KeyboardInterrupt:
            bar.finish("interrupted")
            print("interrupted: nothing was changed (your model and the study are as they were)")
            return None
        except BaseException as e:
            bar.finish(type(e).__name__)
            raise
        bar.finish()
        return result

    # -- %optimize ---------------------------------------------------------------------------------------------
    @line_magic
    def optimize(self, line):
        from .. import engine
        from ..errors import RecipeError
        from ..recipe import Recipe, flag_order, flags_from_args, from_flags

        refresh_help()  # a technique registered since %load_ext gets its flag in %optimize? too
        args = _parse(optimize_parser(), line)
        flags = flags_from_args(args)
        if args.recipe and flags:
            raise UsageError("use either --recipe or technique flags (--quant, --prune, ...), not both")
        if args.auto:
            if args.recipe or flags:
                raise UsageError("--auto searches the recipes itself; drop --recipe and technique flags")
            return self._autotune(args)
        try:
            if args.recipe:
                recipe = Recipe.parse(self.shell.user_ns.get(args.recipe, args.recipe))
            else:
                recipe = Recipe.from_dict(from_flags(order=flag_order(_tokens(line)), **flags))
        except RecipeError as e:
            raise UsageError(str(e)) from None
        teacher = getattr(args, "teacher", None)
        if teacher and not _builtin(teacher):
            module = self._lookup(teacher, "teacher model")
            for step in recipe.steps:  # a notebook variable: hand the module itself to the step
                if getattr(step, "teacher", None) == teacher:
                    step.teacher = getattr(module, "model", module)
        if args.as_name and not args.as_name.isidentifier():
            raise UsageError(f"--as {args.as_name!r} is not a valid Python name")
        loaded = {}

        def work(bar):  # the bar shows at once, also while a built-in loads (trained on first use)
            bar(f"loading {args.model}", None)
            model, data, label = loaded["model"] = self._model_and_data(args.model, args.data)
            return engine.optimize(model, recipe, data=data, backend=args.backend, device=args.device,
                                   threads=args.threads, progress=bar, name=label)

        result = self._run(f"%optimize {args.model}", work)
        if result is None:
            return None
        label = loaded["model"][2]
        target = args.as_name or f"{_identifier(label)}_opt"
        target = self._store(target, result, chosen=bool(args.as_name))
        if not args.no_card:
            from IPython.display import display

            from .card import Card

            display(Card(result, name=target))
        if args.report:
            self._write_report(label, result, args.report)
        return None

    def _autotune(self, args) -> None:
        """%optimize MODEL --auto: the best candidate within the metric budget, a live chart of the search."""
        from IPython.display import display

        from .. import charts
        from ..search.autotune import autotune
        from .card import Card

        model, data, label = self._model_and_data(args.model, args.data)
        chart = charts.as_widget(charts.pareto_placeholder()) if _widgets_available() else None
        results = []

        def on_result(result):
            results.append(result)
            if chart is not None:
                fig = charts.pareto(results)
                with chart.batch_update():
                    chart.data = []
                    chart.add_traces(list(fig.data))
                    chart.layout.title = fig.layout.title

        if chart is not None:
            display(chart)
        tuned = self._run(f"%optimize {label} --auto", lambda bar: autotune(
            model, data, max_drop=args.max_drop, budget=args.budget, backend=args.backend, device=args.device,
            progress=bar, on_result=on_result))
        if tuned is None:
            return None
        target = self._store(args.as_name or f"{_identifier(label)}_opt", tuned.best, chosen=bool(args.as_name))
        self.shell.user_ns[f"{target}_search"] = tuned
        print(f"searched {len(tuned.results)} candidates in {tuned.seconds:.0f} s; {tuned.headline}")
        if not args.no_card:
            display(Card(tuned.best, name=target))
        return None

    def _store(self, name: str, result, chosen: bool) -> str:
        """Put `result` in the namespace as `name`. A default name that holds another recipe's result (or anything
        else) is not overwritten: the result goes to `name_2` (then _3, ...), and a line says so. Re-running the
        same recipe replaces its earlier result; a name given with --as is used as it is."""
        from ..result import Result

        ns, base = self.shell.user_ns, name
        n = 1
        while not chosen and name in ns and not (isinstance(ns[name], Result)
                                                 and str(ns[name].recipe) == str(result.recipe)):
            n += 1
            name = f"{base}_{n}"
        if name != base:
            print(f"stored as {name}: {base} holds an earlier result ({_describe(ns[base])}); --as NAME picks the name")
        ns[name] = result
        return name

    def _write_report(self, label: str, result, path: str) -> None:
        """The pipeline report for this run: the model must be one a fresh kernel can build (a built-in)."""
        from ..reports import report

        if not _builtin(label):
            raise UsageError(f"--report re-runs the recipe in a fresh kernel, which cannot see the notebook's "
                             f"{label!r}; use a built-in, or wb.report('pipeline', {{'model': "
                             "'package.module:factory', ...}})")
        params = {"model": label, "recipes": [str(result.recipe)], "device": result.device,
                  "batch_sizes": list(result.baseline.batch_sizes)}
        from pathlib import Path

        self._run("writing the report", lambda bar: report("pipeline", params,
                                                           output=Path(path).with_suffix(".ipynb"), html=path))
        print(f"report: {path}")

    # -- %%recipe ----------------------------------------------------------------------------------------------
    @cell_magic
    def recipe(self, line, cell):
        """A YAML cell becomes a validated Recipe named NAME in the namespace.

        Example:

            %%recipe small
            steps:
              - type: prune
                sparsity: 0.5
                structured: true
              - type: quantize
                dtype: int8
        """
        from ..errors import RecipeError
        from ..recipe import Recipe

        p = _parser("%%recipe", "a YAML cell becomes a Recipe")
        p.add_argument("name", help="namespace name for the Recipe")
        args = _parse(p, line)
        if not args.name.isidentifier():
            raise UsageError(f"%%recipe {args.name!r}: the name must be a valid Python name")
        try:
            recipe = Recipe.from_yaml(cell)
        except RecipeError as e:
            raise UsageError(str(e)) from None
        recipe.name = recipe.name or args.name
        self.shell.user_ns[args.name] = recipe
        print(f"{args.name} = {recipe}")

    # -- %compare ----------------------------------------------------------------------------------------------
    @line_magic
    def compare(self, line):
        """Measure models side by side in one run (timed interleaved) and show the table, speedups with their
        95% interval against the first; `--as NAME` keeps the numeric table in the namespace.

        Example:

            %compare model model_opt small --data data --batch 1 --batch 64 --as table
        """
        from .. import engine
        from ..tables import display_table

        p = _parser("%compare", "models side by side")
        p.add_argument("models", nargs="+", help="models or results in the notebook (the first is the baseline)")
        p.add_argument("--data", metavar="NAME", help="a wb.Data in the notebook, or a built-in name")
        p.add_argument("--batch", type=int, action="append", metavar="N", help="batch size to time (repeatable)")
        p.add_argument("--as", dest="as_name", metavar="NAME", help="namespace name for the numeric table")
        args = _parse(p, line)
        if args.as_name and not args.as_name.isidentifier():
            raise UsageError(f"--as {args.as_name!r} is not a valid Python name")
        models, data = {}, None
        for name in args.models:
            builtin = _builtin(name) if name not in self.shell.user_ns else None
            if builtin:
                models[name], data_here = self._load_builtin(builtin)
                data = data or data_here
            else:
                models[name] = self._lookup(name, "model")
        if args.data:
            data = self._model_and_data(args.models[0], args.data)[1]
        if data is None:
            raise UsageError("%compare: missing data to measure on; pass --data NAME")
        table = self._run("%compare", lambda bar: engine.compare(models, data=data, batch_sizes=args.batch,
                                                                  progress=bar))
        if table is None:
            return None
        if args.as_name:
            self.shell.user_ns[args.as_name] = table
        from IPython.display import display

        display(display_table(table))
        return None

    # -- %profile ----------------------------------------------------------------------------------------------
    @line_magic
    def profile(self, line):
        """Per-layer breakdown: params, MACs and measured time with their shares, to see where the cost is.

        Example:

            %profile digits-cnn --batch 64
        """
        from ..engine import check_model
        from ..errors import WorkbenchError
        from ..measure import profile_layers
        from ..target import of_model
        from ..tensors import copy_model

        p = _parser("%profile", "where the time goes, per layer")
        p.add_argument("model", help="a torch model in the notebook, or a built-in name")
        p.add_argument("--data", metavar="NAME", help="a wb.Data in the notebook, or a built-in name")
        p.add_argument("--batch", type=int, default=1, metavar="N", help="batch size (default 1)")
        args = _parse(p, line)
        model, data, _ = self._model_and_data(args.model, args.data)
        try:
            model = check_model(model)
        except WorkbenchError:
            raise UsageError(f"%profile needs a torch module; {args.model!r} is a {type(model).__name__}") from None
        return self._run("%profile", lambda bar: profile_layers(copy_model(model).eval(), data.inputs(args.batch),
                                                                of_model(model)))


def refresh_help() -> None:
    """`%optimize?` shows the docstring: the examples plus every registered technique's flag."""
    WorkbenchMagics.optimize.__doc__ = OPTIMIZE_DOC + "\n" + optimize_parser().format_help()


def _describe(value) -> str:
    from ..result import Result

    return str(value.recipe) if isinstance(value, Result) else type(value).__name__
