"""The control panel: `wb.panel(model, data)` gives sliders and dropdowns instead of code.

Work runs in a background thread so the notebook stays responsive; every run lands in the Study and adds a point
to the live Pareto chart; errors show in the panel's output area instead of being lost; the equivalent
`%optimize` line and Recipe YAML are shown so an exploration can be reproduced.
"""
from __future__ import annotations

import threading
import traceback

import ipywidgets as W

from ..recipe import Recipe, from_flags


class Panel:
    """Widgets around one model and its data. `panel.widget` is the ipywidgets box; the panel displays itself."""

    def __init__(self, model, data=None, study=None, name: str = "model"):
        from .. import zoo
        from ..study import Study

        if isinstance(model, str):
            name, (model, data) = model, zoo.load(model)
        self.model, self.data, self.name = model, data, name
        self.study = study if study is not None else Study.default()
        self.results: list = []
        self._thread: threading.Thread | None = None

        self.quant_on = W.Checkbox(value=True, description="quantize", indent=False)
        self.quant = W.Dropdown(options=["int8", "int8-dynamic", "int8-static", "fp16", "bf16", "auto"], value="int8",
                                description="dtype")
        self.prune_on = W.Checkbox(value=False, description="prune", indent=False)
        self.sparsity = W.FloatSlider(value=0.5, min=0.05, max=0.95, step=0.05, description="sparsity",
                                      readout_format=".0%", continuous_update=False)
        self.structured = W.Checkbox(value=True, description="structured", indent=False)
        self.finetune = W.IntSlider(value=1, min=0, max=10, description="fine-tune", continuous_update=False)
        self.distill_on = W.Checkbox(value=False, description="distill", indent=False)
        self.epochs = W.IntSlider(value=2, min=1, max=20, description="epochs", continuous_update=False)
        from ..techniques.unpad import padding_share, supported

        # BERT encoders only: run the dense layers on real tokens; on by default when the data carries padding
        bert = bool(supported(model))
        padded = bert and data is not None and (padding_share(data) or 0) > 0.05
        self.unpad_on = W.Checkbox(value=padded, description="skip padding (unpad)", indent=False,
                                   layout=W.Layout(display=None if bert else "none"))
        self.backend = W.Dropdown(options=["auto", "torch", "onnxruntime"], value="auto", description="backend")
        self.device = W.Dropdown(options=["auto", "cpu", "cuda"], value="auto", description="device")
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.progress = W.FloatProgress(value=0, min=0, max=1, description="idle")
        self.table = W.HTML()
        self.code = W.HTML()
        self.errors = W.Output(layout=W.Layout(border="1px solid #e0b4b4", min_height="0px"))
        from . import layer_map

        self.layer_map = layer_map.LayerMap.from_model(model, title=f"{name}: layers")
        self.chart = self._empty_chart()

        for control in (self.quant_on, self.quant, self.prune_on, self.sparsity, self.structured, self.finetune,
                        self.distill_on, self.epochs, self.unpad_on, self.backend, self.device):
            control.observe(lambda change: self._show_code(), names="value")
        self.layer_map.observe(lambda change: self._show_code(), names="excluded")
        self.run_button.on_click(lambda button: self.run())
        self._show_code()
        self.widget = W.VBox([
            W.HBox([W.VBox([W.HBox([self.quant_on, self.quant]),
                            W.HBox([self.prune_on, self.sparsity, self.structured]),
                            W.HBox([self.distill_on, self.epochs]), self.finetune, self.unpad_on]),
                    W.VBox([self.backend, self.device, W.HBox([self.run_button, self.progress])])]),
            self.layer_map, self.chart, self.table, self.code, self.errors])

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # -- recipe from the controls --------------------------------------------------------------------------------
    def recipe(self) -> Recipe:
        """The Recipe the controls describe (layers excluded in the map are left out of pruning/quantization)."""
        flags = dict(quant=self.quant.value if self.quant_on.value else None,
                     prune=self.sparsity.value if self.prune_on.value else None,
                     structured=self.structured.value and self.prune_on.value,
                     distill=self.distill_on.value, epochs=self.epochs.value if self.distill_on.value else None,
                     finetune=self.finetune.value or None if (self.prune_on.value or self.distill_on.value) else None,
                     unpad=self.unpad_on.value)
        d = from_flags(**flags, order=["prune", "distill", "finetune", "unpad", "quant"])
        for step in d["steps"]:
            if step["type"] == "prune":
                step["ignore"] = list(self.layer_map.ignored)
            if step["type"] == "quantize":
                step["exclude"] = list(self.layer_map.ignored)
        return Recipe.from_dict(d)

    def magic_line(self) -> str:
        """The `%optimize` line for the same run (layer exclusions need the YAML recipe)."""
        parts = [f"%optimize {self.name}"]
        if self.prune_on.value:
            parts.append(f"--prune {self.sparsity.value:g}" + (" --structured" if self.structured.value else ""))
        if self.distill_on.value:
            parts.append(f"--distill --epochs {self.epochs.value}")
        if (self.prune_on.value or self.distill_on.value) and self.finetune.value:
            parts.append(f"--finetune {self.finetune.value}")
        if self.unpad_on.value:
            parts.append("--unpad")
        if self.quant_on.value:
            parts.append(f"--quant {self.quant.value}")
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
        self._thread = threading.Thread(target=work, daemon=True)
        self._thread.start()
        if wait:
            self.wait()

    def run(self, wait: bool = False) -> None:
        """Run the current recipe in a background thread (what the Run button does)."""
        self._start(self._work, wait)

    def sweep(self, grid: dict, wait: bool = False) -> None:
        """Run a grid of recipes in the background (see `wb.sweep`); the chart gains a point as each finishes."""

        def work():
            from ..grid import sweep

            def on_result(result):
                self.results.append(result)
                self._update(result)

            try:
                sweep(self.model, self.data, grid, on_result=on_result, progress=self._progress, study=self.study,
                      backend=self.backend.value, device=self.device.value, name=self.name)
                self.progress.description = "done"
            except Exception as e:
                self.progress.description = "failed"
                self.errors.append_stderr(f"{type(e).__name__}: {e}\n")
            finally:
                self.run_button.disabled = False

        self._start(work, wait)

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _progress(self, message: str, fraction: float | None = None) -> None:
        self.progress.description = message[:40]
        if fraction is not None:
            self.progress.value = fraction

    def _work(self) -> None:
        from ..engine import optimize

        try:
            recipe = self.recipe()
            result = optimize(self.model, recipe, data=self.data, backend=self.backend.value,
                              device=self.device.value, study=self.study, progress=self._progress, name=self.name,
                              baseline=self.results[0] if self.results else None)
            self.results.append(result)
            self._update(result)
            self.progress.description = "done"
        except Exception as e:  # shown in the panel: errors in widget callbacks are otherwise lost
            self.progress.description = "failed"
            self.errors.append_stderr(f"{type(e).__name__}: {e}\n")
            if not hasattr(e, "__module__") or not type(e).__module__.startswith("workbench"):
                self.errors.append_stderr(traceback.format_exc())
        finally:
            self.run_button.disabled = False

    def _empty_chart(self):
        from .. import dashboards

        return dashboards.as_widget(dashboards.pareto_placeholder("runs will appear here"))

    def _update(self, result) -> None:
        import pandas as pd

        from .. import dashboards

        fig = dashboards.pareto(self.results)
        with self.chart.batch_update():
            self.chart.data = []
            self.chart.add_traces(list(fig.data))
            self.chart.layout.title = fig.layout.title
            self.chart.layout.xaxis.title = fig.layout.xaxis.title
            self.chart.layout.yaxis.title = fig.layout.yaxis.title
        rows = pd.concat([self.results[0].table().iloc[[0]]] + [r.table().iloc[[1]] for r in self.results])
        self.table.value = rows.to_html(float_format=lambda v: f"{v:.4g}")
        self.layer_map.show_sparsity(result)

    @property
    def points(self) -> int:
        """Runs shown on the chart (baseline excluded)."""
        return sum(len(t.x) for t in self.chart.data if t.name not in ("baseline", "Pareto front"))


def panel(model, data=None, study=None, name: str | None = None) -> Panel:
    """A control panel for `model` (a module or a built-in name) on `data`."""
    return Panel(model, data, study=study, name=name or (model if isinstance(model, str) else "model"))
