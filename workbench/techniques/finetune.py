"""FineTune: train the model on the data's train split to recover what a lossy step cost (best epoch kept)."""
from __future__ import annotations

from dataclasses import dataclass

from ..recipe import Step, option
from ..registry import technique


@dataclass
class FineTune(Step):
    """Train the model on the data's train split to recover accuracy after a lossy step."""

    kind = "finetune"
    short = "finetune"
    main_field = "epochs"
    aliases = ("fine-tune",)
    colour = "#8c564b"

    epochs: int = option(1, low=1, high=10_000, integer=True, ui=(1, 10, 1), help="epochs on the train split")
    lr: float = option(1e-3, low=0, high=10, low_open=True)

    @property
    def needs_train(self) -> bool:
        return True


@technique(FineTune)
def finetune(model, step: FineTune, ctx):
    from ..train import fit

    model, history = fit(model, ctx.data, epochs=step.epochs, lr=step.lr, progress=ctx.progress,
                         reference=ctx.original, target=ctx.target, label="fine-tuning")
    best = max(history, key=lambda row: row["metric"])
    ctx.note(f"fine-tuned {step.epochs} epoch(s): {ctx.data.metric_name} {history[0]['metric']:.4f} -> "
             f"{best['metric']:.4f} (best epoch {best['epoch']} kept)")
    return model
