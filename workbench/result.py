"""Result of `optimize`: the optimized model, its measurements beside the baseline's, and how it was made."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .recipe import Recipe
from .verdict import DEFAULT_MAX_DROP


@dataclass
class Result:
    """What `wb.optimize` returns.

    model: the optimized model (a torch module, or a backend's model callable like one).
    measurement / baseline: `Measurement`s of the optimized model and of the original, timed side by side.
    notes: what the engine decided and why, and honest warnings (e.g. "no speedup expected here").
    preflight: "will this be faster here?", checked before any work.
    """

    model: Any
    recipe: Recipe
    measurement: Any
    baseline: Any
    notes: list = field(default_factory=list)
    backend: str = "torch"
    target: Any = None
    run_id: int | None = None
    baseline_id: int | None = None
    env: dict = field(default_factory=dict)
    example_inputs: Any = field(default=None, repr=False)
    layers: Any = field(default=None, repr=False)  # per-layer shapes and sparsity of the (last float) torch model
    details: dict = field(default_factory=dict, repr=False)  # per-technique tables, e.g. details["factorize"]
    preflight: list = field(default_factory=list)
    exported: Path | None = None  # where `export` wrote the deployable file

    @property
    def name(self) -> str:
        return str(self.recipe)

    @property
    def device(self) -> str:
        return self.measurement.device

    def table(self):
        """Baseline and optimized model side by side, as a numeric pandas DataFrame."""
        from .tables import results_table

        return results_table({"baseline": self.baseline, self.name: self.measurement}, "baseline")

    @property
    def speedups(self):
        """One row per timed batch size: batch, ratio, low, high (the 95% interval), stable."""
        import pandas as pd

        rows = [{"batch": s.batch, "ratio": s.ratio, "low": s.low, "high": s.high, "stable": s.stable}
                for _, s in sorted(self.measurement.speedups.items())]
        return pd.DataFrame(rows, columns=["batch", "ratio", "low", "high", "stable"])

    def judge(self, max_drop: float = DEFAULT_MAX_DROP):
        """The `workbench.verdict.Verdict` on this candidate for a metric budget."""
        from .verdict import judge

        return judge(self.baseline, self.measurement, max_drop)

    @property
    def verdict(self) -> str:
        """The one-line verdict (metric budget 0.01): faster only when the interval's lower bound is above 1."""
        return self.judge().text

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __repr__(self) -> str:
        m, b = self.measurement, self.baseline
        head = (f"Result({self.name!r}: {m.metric_name} {b.metric:.4g} -> {m.metric:.4g}, "
                f"size {b.size_bytes / 1e6:.3g} -> {m.size_bytes / 1e6:.3g} MB, backend={self.backend!r})")
        return "\n".join([head, *self.language_model_lines()])

    def language_model_lines(self) -> list[str]:
        """A causal language model's perplexity and generation speed, original then optimized (none otherwise)."""
        m, b = self.measurement, self.baseline
        out = []
        if b.perplexity is not None and m.perplexity is not None:
            out.append(f"  perplexity {b.perplexity:.4g} -> {m.perplexity:.4g} "
                       f"({m.perplexity / b.perplexity - 1:+.1%}) on the validation text")
        for who, measured in (("original", b), ("optimized", m)):
            if measured.generation is not None:
                out += [f"  {who}: {line}" for line in measured.generation.lines()]
        return out

    def _repr_html_(self) -> str:
        from .notebook.card import Card  # rendering is the notebook layer's; imported only when a notebook asks

        return Card(self)._repr_html_()

    # -- persistence -----------------------------------------------------------------------------------------
    def export(self, path=None) -> Path:
        """Write the deployable file for this result's backend (an `.onnx` graph for ONNX Runtime, a
        `torch.export` program `.pt2` for torch) at `path` (default: `model<suffix>` in the current directory,
        which you asked for by calling this); `result.deploy` then gives the lines that load and run it without
        the workbench. The file is checked to load and to match this model before it is kept."""
        from .registry import backend_of
        from .storage import export_deployable

        backend = backend_of(self.model)
        self.exported = export_deployable(backend, self.model, self.example_inputs, path)
        return self.exported

    @property
    def deploy(self) -> list[str]:
        """Lines of Python that load the exported file and run it without the workbench (export first)."""
        from .contract import input_layout
        from .registry import backend_of

        backend = backend_of(self.model)
        path = self.exported or Path(f"model{backend.deploy_suffix}")
        names = input_layout(self.example_inputs)[1] if self.example_inputs is not None else ["inputs"]
        return backend.usage(self.model, path, names)

    def save(self, path) -> Path:
        """Write the model, recipe.yaml, result.json and a manifest (SHA-256 of every file) into directory `path`,
        atomically; `wb.load(path)` checks the manifest. See `workbench.storage` for the formats and what is safe
        to load."""
        from .storage import save_result

        return save_result(self, path)
