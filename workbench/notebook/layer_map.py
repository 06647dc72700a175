"""LayerMap: a custom widget (anywidget) showing a model's layers as a grid coloured by sensitivity or sparsity;
clicking a layer excludes it from pruning/quantization, and `ignored` gives the recipe's list.

    >>> m = wb.LayerMap.from_sensitivity(wb.sensitivity(model, data))
    >>> m                                   # click layers in the notebook
    >>> wb.Prune(0.5, ignore=m.ignored)
"""
from __future__ import annotations

from pathlib import Path

import anywidget
import traitlets

HERE = Path(__file__).parent / "widgets"


class LayerMap(anywidget.AnyWidget):
    _esm = HERE / "layer_map.js"
    _css = HERE / "layer_map.css"

    layers = traitlets.List([]).tag(sync=True)  # [{"name", "type", "params", "value"}]
    excluded = traitlets.List([]).tag(sync=True)
    colour_by = traitlets.Unicode("share of weights").tag(sync=True)
    title = traitlets.Unicode("layers").tag(sync=True)

    @classmethod
    def from_model(cls, model, title: str = "layers", **kwargs) -> "LayerMap":
        """Layers with weights, coloured by their share of the model's weights."""
        from ..measure import layer_table

        table = layer_table(model)
        total = max(int(table["params"].sum()), 1)
        layers = [{"name": n, "type": row["type"], "params": int(row["params"]), "value": row["params"] / total}
                  for n, row in table.iterrows()]
        return cls(layers=layers, title=title, colour_by="share of weights", **kwargs)

    @classmethod
    def from_sensitivity(cls, df, level=None, title: str = "sensitivity", **kwargs) -> "LayerMap":
        """Coloured by the metric change at one level (default: the highest) of `wb.sensitivity`'s table."""
        level = df["level"].iloc[-1] if level is None else level
        rows = df[df["level"] == level]
        layers = [{"name": r["layer"], "type": r["type"], "params": int(r["params"]), "value": float(r["delta"])}
                  for _, r in rows.iterrows()]
        return cls(layers=layers, title=f"{title} at {level}", colour_by="sensitivity", **kwargs)

    def show_sparsity(self, model) -> None:
        """Re-colour by the real sparsity of a model or a Result (its float graph), keeping the exclusions."""
        from ..measure import layer_table

        table = getattr(model, "layers", None)
        if table is None or callable(table):
            table = layer_table(model)
        values = {n: float(s) for n, s in table["sparsity"].items()}
        self.layers = [{**layer, "value": values.get(layer["name"])} for layer in self.layers]
        self.colour_by = "sparsity"

    def toggle(self, name: str) -> None:
        """What a click does: exclude `name`, or include it again."""
        if name not in {layer["name"] for layer in self.layers}:
            raise KeyError(f"no layer {name!r} in this map")
        self.excluded = [n for n in self.excluded if n != name] if name in self.excluded else [*self.excluded, name]

    @property
    def ignored(self) -> tuple:
        """The excluded layers, for Prune(ignore=...) and Quantize(exclude=...)."""
        return tuple(self.excluded)
