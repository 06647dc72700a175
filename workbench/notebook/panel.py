"""The control panel: `wb.panel(model, data)` gives toggles, sliders and dropdowns instead of code.

Its controls are derived from the registered techniques' fields (a tick box per technique, a control for its main
field and for each field that has a flag), so a new technique appears here without a change to this file. Work runs
in a background thread so the notebook stays responsive; every run lands in the Study and adds a point to the live
Pareto chart; errors show in the panel's output area instead of being lost; the equivalent `%optimize` line and
Recipe YAML are shown so an exploration can be reproduced.
"""
from __future__ import annotations

import threading
import traceback
from dataclasses import fields

import ipywidgets as W

from ..recipe import Recipe, from_flags


def control_for(f, description: str):
    """The widget for a step field, from its rules (choices, range and `ui`), or None where none fits."""
    meta = f.metadata or {}
    default = f.default
    if meta.get("names") or meta.get("module") is not None:
        return None
    choices = meta.get("choices")
    if choices == (True, False):
        return W.Checkbox(value=bool(default), description=description, indent=False)
    if choices:
        options = [c for c in choices if c is not None]
        return W.Dropdown(options=options, value=default if default in options else options[0],
                          description=description)
    ui = meta.get("ui")
    if ui is None and (meta.get("low") is None or meta.get("high") is None):
        return None
    lo, hi, step = ui or (meta["low"], meta["high"], None)
    value = default if default is not None else lo
    if meta.get("integer"):
        return W.IntSlider(value=max(int(value), int(lo)), min=int(lo), max=int(hi), step=int(step or 1),
                           description=description, continuous_update=False)
    return W.FloatSlider(value=value, min=lo, max=hi, step=step or (hi - lo) / 20, description=description,
                         continuous_update=False, readout_format=".2f")


class Panel:
    """Widgets around one model and its data. `panel.widget` is the ipywidgets box; the panel displays itself.

    enabled[short]: the tick box of each technique; main[short]: the control of its main field (None for on/off
    techniques); options[flag]: the control of each field with a flag (e.g. options["structured"]); rows[short]:
    the technique's row (hidden where the technique does not apply to the model).
    """

    def __init__(self, model, data=None, study=None, name: str = "model"):
        from .. import zoo
        from ..facts import ModelFacts
        from ..registry import backend_names, techniques
        from ..study import Study
        from ..target import cuda_available, of_model
        from . import layer_map

        if isinstance(model, str):
            name, (model, data) = model, zoo.load(model)
        self.model, self.data, self.name = model, data, name
        self.study = study if study is not None else Study.default()
        self.results: list = []
        self._thread: threading.Thread | None = None
        self._baseline = None
        facts = ModelFacts(model, data, of_model(model))

        self.enabled, self.main, self.options, self.rows = {}, {}, {}, {}
        for tech in techniques():
            cls = tech.config
            applies = tech.applies(facts) if tech.applies else True
            on = W.Checkbox(value=bool(applies and tech.suggested and tech.suggested(facts)), description=cls.short,
                            indent=False, layout=W.Layout(width="110px"))
            main_field = next((f for f in fields(cls) if f.name == cls.main_field), None)
            main = control_for(main_field, main_field.name) if main_field is not None else None
            extras = []
            for f in fields(cls):
                flag = (f.metadata or {}).get("flag")
                widget = control_for(f, f.name) if flag else None
                if widget is not None:
                    self.options[flag.lstrip("-").replace("-", "_")] = widget
                    extras.append(widget)
            self.enabled[cls.short], self.main[cls.short] = on, main
            self.rows[cls.short] = W.HBox([on] + ([main] if main is not None else []) + extras,
                                          layout=W.Layout(display=None if applies else "none"))
        self.backend = W.Dropdown(options=["auto", *backend_names()], value="auto", description="backend")
        self.device = W.Dropdown(options=["auto", "cpu", *(["cuda"] if cuda_available() else [])], value="auto",
                                 description="device")
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.progress = W.FloatProgress(value=0, min=0, max=1, description="idle")
        self.table = W.HTML()
        self.code = W.HTML()
        self.errors = W.Output(layout=W.Layout(border="1px solid #e0b4b4", min_height="0px"))
        self.layer_map = layer_map.LayerMap.from_model(model, title=f"{name}: layers")
        self.chart = self._empty_chart()

        for control in self._controls():
            control.observe(lambda change: self._show_code(), names="value")
        self.layer_map.observe(lambda change: self._show_code(), names="excluded")
        self.run_button.on_click(lambda button: self.run())
        self._show_code()
        self.restored = self._restore(model)
        self.widget = W.VBox([
            W.HBox([W.VBox(list(self.rows.values())),
                    W.VBox([self.backend, self.device, W.HBox([self.run_button, self.progress])])]),
            self.layer_map, self.chart, self.table, self.code, self.errors])

    def _controls(self) -> list:
        return [*self.enabled.values(), *(m for m in self.main.values() if m is not None), *self.options.values(),
                self.backend, self.device]

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # -- recipe from the controls --------------------------------------------------------------------------------
    def flags(self) -> dict:
        """The flags the controls describe, as `from_flags` and `%optimize` take them."""
        from ..recipe import flag_fields

        flags = {}
        for short, on in self.enabled.items():
            if on.value:
                main = self.main[short]
                flags[short] = True if main is None else main.value
        for key, widget in self.options.items():
            owner = flag_fields()[key][0].short
            if flags.get(owner) is not None and widget.value not in (None, False):
                flags[key] = widget.value
        return flags

    def recipe(self) -> Recipe:
        """The Recipe the controls describe (layers excluded in the map are left out where a step excludes)."""
        from ..registry import step_class

        d = from_flags(order=list(self.enabled), **self.flags())
        ignored = list(self.layer_map.ignored)
        for step in d["steps"]:
            for f in fields(step_class(step["type"])):
                if (f.metadata or {}).get("excludes"):
                    step[f.name] = ignored
        return Recipe.from_dict(d)

    def magic_line(self) -> str:
        """The `%optimize` line for the same run (layer exclusions need the YAML recipe)."""
        parts = [f"%optimize {self.name}"]
        for key, value in self.flags().items():
            parts.append(f"--{key.replace('_', '-')}" + ("" if value is True else f" {value:g}"
                                                          if isinstance(value, float) else f" {value}"))
        parts += [f"--backend {self.backend.value}", f"--device {self.device.value}"]
        return " ".join(parts)

    def _show_code(self) -> None:
        import html

        try:
            yaml_text = self.recipe().to_yaml()
        except Exception as e:  # e.g. nothing selected
            self.code.value = f"<i>{html.escape(str(e))}</i>"
            return
        note = "<br><i>layer exclusions are in the YAML only</i>" if self.layer_map.ignored else ""
        self.code.value = (f"<details><summary>reproduce this run</summary><pre>{html.escape(self.magic_line())}</pre>"
                           f"{note}<pre>{html.escape(yaml_text)}</pre></details>")

    # -- running ------------------------------------------------------------------------------------------------
    def _start(self, work, wait: bool) -> None:
        """Run `work` in a background thread, one at a time, with the Run button disabled meanwhile."""
        if self._thread is not None and self._thread.is_alive():
            self.errors.append_stdout("a run is already going; wait for it to finish\n")
            return
        self.run_button.disabled = True
        self._thread = threading.Thread(target=self._guarded(work), daemon=True)
        self._thread.start()
        if wait:
            self.wait()

    def _guarded(self, work):
        """Errors in a widget's thread are otherwise lost in JupyterLab: show them in the panel."""

        def run():
            try:
                work()
                self.progress.value, self.progress.description = 1.0, "done"
            except Exception as e:
                self.progress.description = "failed"
                self.errors.append_stderr(f"{type(e).__name__}: {e}\n")
                if not type(e).__module__.startswith("workbench"):
                    self.errors.append_stderr(traceback.format_exc())
            finally:
                self.run_button.disabled = False

        return run

    def run(self, wait: bool = False) -> None:
        """Run the current recipe in a background thread (what the Run button does)."""
        self._start(self._work, wait)

    def sweep(self, grid: dict, wait: bool = False) -> None:
        """Run a grid of recipes in the background (see `wb.sweep`); the chart gains a point as each finishes."""

        def work():
            from ..search.sweep import sweep

            def on_result(result):
                self.results.append(result)
                self._update(result)

            sweep(self.model, self.data, grid, on_result=on_result, progress=self._progress, study=self.study,
                  backend=self.backend.value, device=self.device.value, name=self.name)

        self._start(work, wait)

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _progress(self, message: str, fraction: float | None = None) -> None:
        self.progress.description = message[:40]
        if fraction is not None:
            self.progress.value = fraction

    def _work(self) -> None:
        from ..engine import Baseline

        from ..target import resolve

        recipe = self.recipe()
        target = resolve(self.backend.value, self.device.value, precisions=recipe.precisions)
        if self._baseline is None or self._baseline[0] != target:  # the baseline is measured once per target
            self._baseline = (target, Baseline(self.model, self.data, backend=target.backend, device=target.device,
                                               study=self.study, name=self.name, progress=self._progress))
        result = self._baseline[1].run(recipe, progress=self._progress)
        self.results.append(result)
        self._update(result)

    def _empty_chart(self):
        from .. import charts

        return charts.as_widget(charts.pareto_placeholder("runs will appear here"))

    def _runs(self, model=None):
        """This model's runs in the Study (its name, and the baseline's parameter count, must match), with their
        baselines; None when there are none."""
        if self.study is None:
            return None
        df = self.study.df
        if df.empty or "model" not in df:
            return None
        mine = df[df["model"] == self.name]
        if model is not None and hasattr(model, "parameters"):
            from ..measure.counts import count_params

            params = count_params(model)[0]  # as the Study's baseline row counted them
            bases = mine[(mine["kind"] == "baseline") & (mine["params"] == params)].index
            mine = mine[mine.index.isin(bases) | mine["parent"].isin(bases)]
        return mine if (mine["kind"] == "optimize").any() else None

    def _restore(self, model) -> int:
        """After a reload (the same panel built again), the runs the Study holds for this model: chart, table and
        the last run's choices. Returns how many runs came back."""
        runs = self._runs(model)
        if runs is None:
            return 0
        self._draw(runs)
        last = runs[runs["kind"] == "optimize"].iloc[-1]
        self._choose(str(last["recipe"]), str(last["device"]))
        count = int((runs["kind"] == "optimize").sum())
        self.progress.description = f"restored {count} run{'s' * (count != 1)}"
        return count

    def _choose(self, recipe: str, device: str) -> None:
        """Set the controls to a recipe's steps (what the last run used)."""
        from dataclasses import fields as step_fields

        from ..errors import RecipeError

        try:
            steps = Recipe.parse(recipe).steps
        except RecipeError:
            return
        for on in self.enabled.values():
            on.value = False
        for step in steps:
            if step.short not in self.enabled:
                continue
            self.enabled[step.short].value = True
            main = self.main.get(step.short)
            value = getattr(step, step.main_field, None) if step.main_field else None
            if main is not None and value is not None and _fits(main, value):
                main.value = value
            for f in step_fields(step):
                flag = (f.metadata or {}).get("flag")
                widget = self.options.get(flag.lstrip("-").replace("-", "_")) if flag else None
                if widget is not None and _fits(widget, getattr(step, f.name)):
                    widget.value = getattr(step, f.name)
        if device in self.device.options:
            self.device.value = device

    def _draw(self, runs) -> None:
        """Chart and table from the Study's rows of this model (what every run adds to)."""
        import html

        from .. import charts
        from ..measure.measurement import batches_in, column, significant

        self._show(charts.pareto(runs))
        batches = batches_in(runs.columns)
        head = ["run", str(runs["metric_name"].dropna().iloc[0]) if runs["metric_name"].notna().any() else "metric",
                "size MB"] + [f"p50 ms (b={b})" for b in batches] + [f"speedup (b={b})" for b in batches]
        rows = []
        for _, r in runs.iterrows():
            cells = [r["recipe"] if r["kind"] == "optimize" else "baseline", significant(r["metric"]),
                     significant(r["size_bytes"] / 1e6)]
            cells += [significant(r.get(column("p50", b))) for b in batches]
            cells += [_speedup(r, b) for b in batches]
            rows.append(cells)
        self.table.value = ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
                            + "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                                      for row in rows) + "</table>")

    def _update(self, result) -> None:
        from ..tables import table

        runs = self._runs(self.model)
        if runs is not None:
            self._draw(runs)
        else:  # no Study to draw from: this panel's own results
            from .. import charts

            self._show(charts.pareto(self.results))
            shown = table(self.results)
            shown["verdict"] = [""] + [r.verdict for r in self.results]
            self.table.value = shown.to_html(border=0)
        self.layer_map.show_result(result)

    def _show(self, fig) -> None:
        """The live chart shows `fig`'s traces, title and axis titles."""
        with self.chart.batch_update():
            self.chart.data = []
            self.chart.add_traces(list(fig.data))
            for key in ("title", "xaxis.title", "yaxis.title", "legend.title"):
                self.chart.layout[key] = fig.layout[key]

    @property
    def points(self) -> int:
        """Runs shown on the chart (baseline excluded)."""
        return sum(len(t.x) for t in self.chart.data if t.name not in ("baseline", "Pareto front"))


def _fits(widget, value) -> bool:
    """Whether a control can show `value` (a dropdown's options, a slider's range, a tick box's bool)."""
    options = getattr(widget, "options", None)
    if options is not None:
        return value in options
    if isinstance(widget, W.Checkbox):
        return isinstance(value, bool)
    low, high = getattr(widget, "min", None), getattr(widget, "max", None)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def _speedup(row, batch: int) -> str:
    from ..measure.measurement import column, significant

    ratio = row.get(column("speedup", batch))
    if ratio is None or ratio != ratio:
        return "1x" if row["kind"] == "baseline" else ""
    low, high = row.get(column("low", batch)), row.get(column("high", batch))
    return f"{significant(ratio)}x ({significant(low)}-{significant(high)})"


def panel(model, data=None, study=None, name: str | None = None) -> Panel:
    """A control panel for `model` (a module or a built-in name) on `data`."""
    return Panel(model, data, study=study, name=name or (model if isinstance(model, str) else "model"))
