"""Notebook magics: %optimize, %%recipe, %compare, %profile. Thin: parse, resolve names, call the engine.

    %load_ext workbench
    %optimize digits-cnn --quant int8
"""
from __future__ import annotations

import difflib
import re
import shlex

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

TECHNIQUE_FLAGS = {"--quant": "quant", "--prune": "prune", "--distill": "distill", "--factorize": "factorize",
                   "--finetune": "finetune", "--unpad": "unpad"}


def _parse(magic, line: str):
    try:
        return parse_argstring(magic, line)
    except UsageError:
        raise
    except SystemExit:  # argparse's exit on a bad flag, turned into one line
        raise UsageError(f"could not parse {line!r}; see %{magic.__name__}? for the flags") from None


def _flag_order(line: str) -> list[str]:
    """Technique flags in the order they appear on the line (that order becomes the recipe's)."""
    try:
        tokens = shlex.split(line)
    except ValueError:
        tokens = line.split()
    return [TECHNIQUE_FLAGS[t.split("=")[0]] for t in tokens if t.split("=")[0] in TECHNIQUE_FLAGS]


def _identifier(name: str) -> str:
    return re.sub(r"\W", "_", name)


class _Progress:
    """A tqdm.auto bar (a widget in notebooks, text in terminals) fed by the engine's progress callback."""

    def __init__(self, title: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=100, desc=title, bar_format="{desc} {bar} {percentage:3.0f}% [{elapsed}]", leave=False)

    def __call__(self, message: str, fraction: float | None = None) -> None:
        self.bar.set_description_str(message[:60])
        if fraction is not None:
            self.bar.n = int(fraction * 100)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


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
        from . import zoo

        builtin_data = None
        if model_name not in self.shell.user_ns and model_name in zoo.list():
            model, builtin_data = self._load_builtin(model_name)
        else:
            model = self._lookup(model_name, "model")
        if data_name is None:
            if builtin_data is None:
                found = [k for k, v in self.shell.user_ns.items() if _is_data(v) and not k.startswith("_")]
                hint = f" (the notebook has: {', '.join(found)})" if found else \
                    " (build one with wb.Data(val=..., metric=...) or name a built-in: --data digits-cnn)"
                raise UsageError(f"%{model_name}: missing data to measure it on; pass --data NAME{hint}")
            return model, builtin_data, model_name
        if data_name not in self.shell.user_ns and data_name in zoo.list():
            return model, self._load_builtin(data_name)[1], model_name
        return model, self._lookup(data_name, "data"), model_name

    def _load_builtin(self, name: str):
        from . import zoo

        cache = self.shell.user_ns.setdefault("_workbench_builtins", {})
        if name not in cache:
            cache[name] = zoo.load(name)
        return cache[name]

    def _run(self, title: str, fn):
        """Run engine work with a progress bar; engine errors become one-line UsageErrors."""
        from .errors import WorkbenchError

        bar = _Progress(title)
        try:
            return fn(bar)
        except WorkbenchError as e:
            raise UsageError(str(e)) from None
        except KeyboardInterrupt:
            print("interrupted: nothing was changed (your model and the study are as they were)")
            return None
        finally:
            bar.close()

    # -- %optimize ---------------------------------------------------------------------------------------------
    @magic_arguments()
    @argument("model", help="a model in the notebook, or a built-in name (digits-mlp, digits-cnn, minilm)")
    @argument("--quant", choices=["int8", "int8-dynamic", "int8-static", "fp16", "bf16", "auto"],
              help="quantize (int8 picks static for conv nets, dynamic otherwise)")
    @argument("--prune", type=float, metavar="S", help="prune a share S of weights (or channels with --structured)")
    @argument("--structured", action="store_true", help="remove whole channels/neurons/heads")
    @argument("--distill", action="store_true", help="distill from the original (or --teacher)")
    @argument("--teacher", metavar="NAME", help="teacher model in the notebook for --distill")
    @argument("--epochs", type=int, metavar="N", help="distillation epochs")
    @argument("--factorize", type=float, metavar="R", help="low-rank factorization, rank ratio R in (0, 1]")
    @argument("--finetune", type=int, metavar="N", help="fine-tune N epochs on the train split")
    @argument("--unpad", action="store_true", help="BERT encoders: skip padding tokens in the dense layers")
    @argument("--recipe", metavar="NAME_OR_PATH", help="a Recipe in the notebook, a YAML file or 'prune=0.5,quant=int8'")
    @argument("--data", metavar="NAME", help="a wb.Data (or eval function) in the notebook, or a built-in name")
    @argument("--backend", choices=["auto", "torch", "onnxruntime"], default="auto")
    @argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    @argument("--as", dest="as_name", metavar="NAME", help="namespace name for the result (default MODEL_opt)")
    @argument("--no-card", action="store_true", help="do not display the result card")
    @argument("--report", metavar="OUT.html", help="also write the pipeline report for this run (re-runnable)")
    @argument("--auto", action="store_true", help="search recipes across techniques (optuna) within a metric budget")
    @argument("--max-drop", type=float, default=0.01, metavar="D", help="--auto: metric budget (default 0.01)")
    @argument("--budget", default="5min", metavar="TIME", help="--auto: wall time, e.g. 90s, 5min (default 5min)")
    @line_magic
    def optimize(self, line):
        """Optimize a copy of MODEL and show a result card; the Result goes into the namespace.

        Examples::

            %optimize digits-cnn --quant int8
            %optimize model --quant int8 --data val_data --as model_int8
            %optimize model --prune 0.5 --structured --finetune 1 --quant int8 --as small
            %optimize model --recipe my_recipe --data data

        Technique flags compose in the order given, quantization last. The Result (with .model, .table(),
        .save(path)) is stored as MODEL_opt unless --as says otherwise, and recorded in the notebook's Study.
        """
        from . import engine
        from .recipe import Recipe, from_flags
        from .errors import RecipeError

        args = _parse(self.optimize, line)
        flags = _flag_order(line)
        if args.recipe and flags:
            raise UsageError("use either --recipe or technique flags (--quant, --prune, ...), not both")
        if args.auto:
            if args.recipe or flags:
                raise UsageError("--auto searches the recipes itself; drop --recipe and technique flags")
            return self._autotune(args)
        try:
            if args.recipe:
                spec = self.shell.user_ns.get(args.recipe, args.recipe)
                recipe = Recipe.parse(spec)
            else:
                recipe = Recipe.from_dict(from_flags(
                    quant=args.quant, prune=args.prune, structured=args.structured, distill=args.distill,
                    teacher=args.teacher, epochs=args.epochs, factorize=args.factorize, finetune=args.finetune,
                    unpad=args.unpad, order=flags))
        except RecipeError as e:
            raise UsageError(str(e)) from None
        if args.teacher and args.teacher not in _builtin_names():
            teacher = self._lookup(args.teacher, "teacher model")
            for step in recipe.steps:  # a notebook variable: hand the module itself to Distill
                if step.kind == "distill" and step.teacher == args.teacher:
                    step.teacher = getattr(teacher, "model", teacher)
        model, data, label = self._model_and_data(args.model, args.data)
        result = self._run(f"%optimize {label}", lambda bar: engine.optimize(
            model, recipe, data=data, backend=args.backend, device=args.device, progress=bar, name=label))
        if result is None:
            return None
        target = args.as_name or f"{_identifier(args.model)}_opt"
        if not target.isidentifier():
            raise UsageError(f"--as {target!r} is not a valid Python name")
        self.shell.user_ns[target] = result
        if not args.no_card:
            from IPython.display import display

            from .result import Card

            display(Card(result, name=target))
        if args.report:
            self._write_report(label, result, args.report)
        return None

    def _autotune(self, args) -> None:
        """%optimize MODEL --auto: the best candidate within the metric budget, a live chart of the search."""
        from IPython.display import display

        from . import dashboards
        from .tuning import autotune
        from .result import Card

        model, data, label = self._model_and_data(args.model, args.data)
        chart = dashboards.as_widget(dashboards.pareto_placeholder()) if _widgets_available() else None
        results = []

        def on_result(result):
            results.append(result)
            if chart is not None:
                fig = dashboards.pareto(results)
                with chart.batch_update():
                    chart.data = []
                    chart.add_traces(list(fig.data))

        if chart is not None:
            display(chart)
        tuned = self._run(f"%optimize {label} --auto", lambda bar: autotune(
            model, data, max_drop=args.max_drop, budget=args.budget, backend=args.backend, device=args.device,
            progress=bar, on_result=on_result))
        if tuned is None:
            return None
        target = args.as_name or f"{_identifier(args.model)}_opt"
        self.shell.user_ns[target] = tuned.best
        self.shell.user_ns[f"{target}_search"] = tuned
        print(f"searched {len(tuned.results)} candidates in {tuned.seconds:.0f} s; "
              + ("best within the budget:" if tuned.within_budget else
                 f"none stayed within a {args.max_drop:g} drop; the most accurate:") + f" {tuned.best.recipe}")
        if not args.no_card:
            display(Card(tuned.best, name=target))
        return None

    def _write_report(self, label: str, result, path: str) -> None:
        """The pipeline report for this run: the model must be one a fresh kernel can build (a built-in)."""
        from .reports import report

        if label not in _builtin_names():
            raise UsageError(f"--report re-runs the recipe in a fresh kernel, which cannot see the notebook's "
                             f"{label!r}; use a built-in, or wb.report('pipeline', {{'model': "
                             "'package.module:factory', ...}})")
        params = {"model": label, "recipes": [str(result.recipe)], "device": result.device,
                  "batch_sizes": [int(b) for b in result.baseline["batch_sizes"].split(",")]}
        from pathlib import Path

        self._run("writing the report", lambda bar: report("pipeline", params, output=Path(path).with_suffix(".ipynb"),
                                                             html=path))
        print(f"report: {path}")

    # -- %%recipe ----------------------------------------------------------------------------------------------
    @magic_arguments()
    @argument("name", help="namespace name for the Recipe")
    @cell_magic
    def recipe(self, line, cell):
        """A YAML cell becomes a validated Recipe named NAME in the namespace.

        Example::

            %%recipe small
            steps:
              - type: prune
                sparsity: 0.5
                structured: true
              - type: quantize
                dtype: int8
        """
        from .errors import RecipeError
        from .recipe import Recipe

        args = _parse(self.recipe, line)
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
    @magic_arguments()
    @argument("models", nargs="+", help="models or results in the notebook (the first is the baseline)")
    @argument("--data", metavar="NAME", help="a wb.Data in the notebook, or a built-in name")
    @argument("--batch", type=int, action="append", metavar="N", help="batch size to time (repeatable)")
    @line_magic
    def compare(self, line):
        """Measure models side by side in one run and show the table (ratios against the first).

        Example::

            %compare model model_opt small --data data --batch 1 --batch 64
        """
        from . import engine

        args = _parse(self.compare, line)
        models = {}
        data = None
        for name in args.models:
            if name not in self.shell.user_ns and name in _builtin_names():
                models[name], data_here = self._load_builtin(name)
                data = data or data_here
            else:
                models[name] = self._lookup(name, "model")
        if args.data:
            data = self._model_and_data(args.models[0], args.data)[1]
        if data is None:
            raise UsageError("%compare: missing data to measure on; pass --data NAME")
        table = self._run("%compare", lambda bar: engine.compare(models, data=data, batch_sizes=args.batch,
                                                                  progress=bar))
        return table

    # -- %profile ----------------------------------------------------------------------------------------------
    @magic_arguments()
    @argument("model", help="a torch model in the notebook, or a built-in name")
    @argument("--data", metavar="NAME", help="a wb.Data in the notebook, or a built-in name")
    @argument("--batch", type=int, default=1, metavar="N", help="batch size (default 1)")
    @line_magic
    def profile(self, line):
        """Per-layer breakdown: params, MACs and measured time with their shares, to see where the cost is.

        Example::

            %profile digits-cnn --batch 64
        """
        from .measure import is_torch_module, profile_layers

        args = _parse(self.profile, line)
        model, data, _ = self._model_and_data(args.model, args.data)
        if hasattr(model, "model") and not is_torch_module(model):
            model = model.model  # a Result
        if not is_torch_module(model):
            raise UsageError(f"%profile needs a torch module; {args.model!r} is a {type(model).__name__}")
        import copy

        return self._run("%profile", lambda bar: profile_layers(copy.deepcopy(model).eval(), data.inputs(args.batch)))


def _widgets_available() -> bool:
    try:
        import anywidget  # noqa: F401  (plotly's FigureWidget needs it)
    except ImportError:
        return False
    return True


def _is_data(value) -> bool:
    from .data import Data

    return isinstance(value, Data)


def _builtin_names() -> list[str]:
    from . import zoo

    return zoo.list()
