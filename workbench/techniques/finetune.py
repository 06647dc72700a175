"""FineTune: train the model on the data's train split to recover what a lossy step cost (best epoch kept)."""
from __future__ import annotations

from ..backends.ort import OrtModel
from ..errors import RecipeError
from ..recipe import FineTune
from ..registry import technique


@technique(FineTune)
def finetune(model, step: FineTune, ctx):
    if isinstance(model, OrtModel):
        raise RecipeError("FineTune: the model is already an ONNX Runtime graph; put FineTune before Quantize")
    from ..train import fit

    model, history = fit(model, ctx.data, epochs=step.epochs, lr=step.lr, progress=ctx.progress,
                         reference=ctx.original, label="fine-tuning")
    best = max(history, key=lambda row: row["metric"])
    ctx.note(f"fine-tuned {step.epochs} epoch(s): {ctx.data.metric_name} {history[0]['metric']:.4f} -> "
             f"{best['metric']:.4f} (best epoch {best['epoch']} kept)")
    return model
