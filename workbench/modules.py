"""The built-in architectures (the zoo's models and the students distillation builds from them).

They live at module level (not inside functions) so that saved models pickle and reload.
"""
from __future__ import annotations

from torch import nn



def digits_mlp(width: float = 1.0) -> nn.Module:
    """64 -> 256 -> 128 -> 10 on 8x8 digits."""
    h1, h2 = int(256 * width), int(128 * width)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 10))


def digits_cnn(width: float = 1.0) -> nn.Module:
    """Three conv blocks on 32x32 digits; convolutions carry ~98% of the MACs."""
    c1, c2, c3 = int(32 * width), int(64 * width), int(64 * width)

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(1, c1), *block(c1, c2), *block(c2, c3), nn.Flatten(),
                         nn.Linear(c3 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder + mean pooling + L2 normalisation: what sentence-transformers computes."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1)
