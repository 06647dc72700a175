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

    layers = traitlets.List([]).tag(sync=True)  # [{"name", "type", "params", "value", "shape", "label", "detail"}]
    excluded = traitlets.List([]).tag(sync=True)
    colour_by = traitlets.Unicode("share of weights").tag(sync=True)
    title = traitlets.Unicode("layers").tag(sync=True)

    @classmethod
    def from_model(cls, model, title: str = "layers", **kwargs) -> "LayerMap":
        """Layers with weights, coloured by their share of the model's weights."""
        from ..measure import layer_table

        table = layer_table(model)
        total = max(int(table["params"].sum()), 1)
        layers = [{"name": n, "type": row["type"], "params": int(row["params"]), "value": row["params"] / total,
                   "shape": list(row["shape"])} for n, row in table.iterrows()]
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

        table = _table(model)
        values = {n: float(s) for n, s in table["sparsity"].items()}
        self.layers = [{**layer, "value": values.get(layer["name"])} for layer in self.layers]
        self.colour_by = "sparsity"

    def show_structure(self, model) -> None:
        """Re-colour by the share of each layer a structured pruning kept (a model or a Result, against the shapes
        this map was built with): tiles read "32/64 out" for the output channels, neurons or head dimensions kept;
        a layer the pruning removed whole reads "removed"."""
        table = _table(model)
        layers = []
        for layer in self.layers:
            before = layer.get("shape") or []
            if layer["name"] not in table.index:
                layers.append({**layer, "value": 0.0, "label": "removed", "detail": "removed"})
                continue
            now = list(table.loc[layer["name"], "shape"])
            kept = table.loc[layer["name"], "params"] / max(layer["params"], 1)
            text = f"{now[0]}/{before[0]} out" if before and now and now[0] != before[0] else \
                f"{100 * kept:.0f}% kept"
            detail = f"shape {tuple(before)} -> {tuple(now)}" if before else ""
            layers.append({**layer, "value": float(kept), "label": text, "detail": detail})
        self.layers = layers
        self.colour_by = "share kept"

    def show_result(self, result) -> None:
        """What a run changed: the channels kept where a structured pruning changed shapes, else the sparsity."""
        table = _table(result)
        shapes = {layer["name"]: list(layer.get("shape") or []) for layer in self.layers}
        changed = any(name not in table.index or list(table.loc[name, "shape"]) != shape
                      for name, shape in shapes.items() if shape)
        if changed:
            self.show_structure(result)
        else:
            self.layers = [{k: v for k, v in layer.items() if k not in ("label", "detail")} for layer in self.layers]
            self.show_sparsity(result)

    def toggle(self, name: str) -> None:
        """What a click does: exclude `name`, or include it again."""
        if name not in {layer["name"] for layer in self.layers}:
            raise KeyError(f"no layer {name!r} in this map")
        self.excluded = [n for n in self.excluded if n != name] if name in self.excluded else [*self.excluded, name]

    @property
    def ignored(self) -> tuple:
        """The excluded layers, for Prune(ignore=...) and Quantize(exclude=...)."""
        return tuple(self.excluded)


def _table(model):
    """The per-layer table of a model, or of a Result (its float graph's, recorded when it ran)."""
    from ..measure import layer_table

    table = getattr(model, "layers", None)
    return layer_table(model) if table is None or callable(table) else table
