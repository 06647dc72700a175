"""What several test modules share: fast measurement options, a tiny model and task, a byte-exact model check."""
import io

FAST = dict(batch_sizes=(1,), study=False)  # one batch size timed, nothing recorded


def state_bytes(model) -> bytes:
    """The model's full state as bytes, plus its mode flags: equal bytes mean an untouched model."""
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    flags = repr([(n, m.training) for n, m in model.named_modules()] +
                 [(n, p.requires_grad) for n, p in model.named_parameters()])
    return buf.getvalue() + flags.encode()


def tiny_task(n=96, seed=0):
    """A linearly separable 16-feature task (train = val), for models that train in milliseconds."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import workbench as wb

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, 0] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    return wb.Data(train=loader, val=loader, metric="accuracy")


def tiny_model():
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1))
            self.head = nn.Linear(32, 2)

        def forward(self, x):
            return self.head(self.body(x))

    return Tiny()


def int8_weight_bits() -> tuple[int, bool]:
    """(the bits int8 weights get here, 8 with VNNI and 7 without, forced or not; whether the hardware runs them
    without saturating: 8-bit weights forced (WORKBENCH_CPU=vnni) on a CPU without VNNI overflow its AVX2
    multiply-adds (digits-cnn's static int8 loses 2 points there), so no fidelity figure holds: tests check the
    forced path's choices, not its accuracy)."""
    from workbench.target import _probe, cpu_info

    bits = 8 if cpu_info().vnni else 7
    return bits, bits == 7 or _probe(None).vnni
