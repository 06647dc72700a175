"""The support matrix: the architectures users bring, built offline from tiny configs (random weights), against every
technique. `tools/support_matrix.py` writes the README's table from it and the test suite runs it, so the table
cannot go stale.

    >>> from workbench import support
    >>> cell = support.run_cell("bert", "int8")      # Cell(status='works', fidelity=0.998, ...)

A cell works when the technique runs, the optimized model takes the original's call (keyword and positional) and
returns the same structure, its fidelity is reported, and it saves, reloads and runs at a batch size and sequence
length not seen before; or it is refused before any work in one line that says why and what works instead.
"""
from __future__ import annotations

import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import first_line

SEED = 0
VOCAB = 96

# technique column -> the recipe it runs
TECHNIQUES = {
    "int8": "quant=int8",
    "int8-dynamic": "quant=int8-dynamic",
    "int8-static": "quant=int8-static",
    "int4": "quant=int4",
    "fp16": "quant=fp16",
    "bf16": "quant=bf16",
    "prune (structured)": "prune=0.25:structured=true",
    "prune": "prune=0.5",
    "factorize": "factorize:rank_ratio=0.5",
    "distill": "distill:epochs=1:student=depth=0.5",  # models without a block list: a pruned student (below)
    "unpad": "unpad",
    "export": "quant=int8",  # then result.export(): the deployable file, run by its runtime alone
}


@dataclass
class Arch:
    name: str
    family: str  # 'text', 'causal', 'vision', 'audio', 'sequence', 'tabular'
    build: Callable[[], Any]
    source: str  # 'transformers' or 'torch'
    blocks: bool = False  # a list of repeated blocks, which Distill(student='depth=...') halves


def recipe_for(arch: "Arch", technique: str) -> str:
    """The recipe a technique's column runs on an architecture: distillation needs a smaller student, half the
    blocks where the model has a block list, else the model with a quarter of its channels pruned."""
    if technique == "distill" and not arch.blocks:
        return "prune=0.25:structured=true,distill:epochs=1"
    return TECHNIQUES[technique]


def _hf(cls_name: str, config_name: str, **config):
    def build():
        import transformers

        cfg = getattr(transformers, config_name)(**config)
        return getattr(transformers, cls_name)(cfg)
    return build


_TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64)
_IMAGE = dict(image_size=32, num_channels=3, num_labels=5)


def _plain(kind: str):
    def build():
        from torch import nn

        if kind == "mlp":
            return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
        if kind == "cnn":
            return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))
        if kind in ("lstm", "gru"):
            return __getattr__("Recurrent")(kind)
        return __getattr__("Encoder")()
    return build


def _module_classes():
    """Plain torch models defined at module level, as a user's own package defines them (a pickle finds them)."""
    from torch import nn

    class Recurrent(nn.Module):
        """A 2-layer LSTM or GRU over a sequence of vectors, classifying from the last step."""

        def __init__(self, cell: str = "lstm"):
            super().__init__()
            self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(16, 32, batch_first=True, num_layers=2)
            self.head = nn.Linear(32, 5)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.head(out[:, -1])

    class Encoder(nn.Module):
        """torch's own nn.TransformerEncoder over a sequence of vectors, mean-pooled into a classifier."""

        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 32)
            layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(32, 5)

        def forward(self, x):
            return self.head(self.encoder(self.proj(x)).mean(1))

    for cls in (Recurrent, Encoder):
        cls.__qualname__ = cls.__name__
    return Recurrent, Encoder


def __getattr__(name: str):  # the classes above, built when first asked for (torch imports lazily)
    if name in ("Recurrent", "Encoder"):
        classes = dict(zip(("Recurrent", "Encoder"), _module_classes()))
        globals().update(classes)
        return classes[name]
    raise AttributeError(name)


ARCHITECTURES = {a.name: a for a in [
    Arch("bert", "text", _hf("BertModel", "BertConfig", **_TEXT), "transformers", True),
    Arch("roberta", "text", _hf("RobertaForSequenceClassification", "RobertaConfig", **_TEXT, pad_token_id=1),
         "transformers", True),
    Arch("distilbert", "text", _hf("DistilBertModel", "DistilBertConfig", vocab_size=VOCAB, dim=32, n_layers=2,
                                   n_heads=4, hidden_dim=64, max_position_embeddings=64), "transformers", True),
    Arch("albert", "text", _hf("AlbertModel", "AlbertConfig", **_TEXT, embedding_size=16), "transformers"),
    Arch("deberta-v2", "text", _hf("DebertaV2ForSequenceClassification", "DebertaV2Config", **_TEXT, num_labels=3,
                                   relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"]),
         "transformers", True),
    Arch("mpnet", "text", _hf("MPNetModel", "MPNetConfig", **_TEXT), "transformers", True),
    Arch("gpt2", "causal", _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                               n_positions=64, bos_token_id=1, eos_token_id=2), "transformers", True),
    Arch("llama", "causal", _hf("LlamaForCausalLM", "LlamaConfig", vocab_size=VOCAB, hidden_size=32,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=64, max_position_embeddings=64), "transformers", True),
    Arch("vit", "vision", _hf("ViTForImageClassification", "ViTConfig", **_IMAGE, patch_size=8, hidden_size=32,
                              num_hidden_layers=2, num_attention_heads=4, intermediate_size=64), "transformers", True),
    Arch("clip-vision", "vision", _hf("CLIPVisionModel", "CLIPVisionConfig", image_size=32, num_channels=3,
                                      patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64), "transformers", True),
    Arch("swin", "vision", _hf("SwinForImageClassification", "SwinConfig", **_IMAGE, patch_size=4, embed_dim=16,
                               depths=[1, 1], num_heads=[2, 4], window_size=4), "transformers", True),
    Arch("resnet", "vision", _hf("ResNetForImageClassification", "ResNetConfig", num_channels=3, num_labels=5,
                                 embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1]), "transformers"),
    Arch("convnext", "vision", _hf("ConvNextForImageClassification", "ConvNextConfig", **_IMAGE,
                                   num_stages=2, hidden_sizes=[16, 32], depths=[1, 1]), "transformers"),
    Arch("mobilenetv2", "vision", _hf("MobileNetV2ForImageClassification", "MobileNetV2Config", **_IMAGE,
                                      depth_multiplier=0.35), "transformers"),
    Arch("efficientnet", "vision", _hf("EfficientNetForImageClassification", "EfficientNetConfig", **_IMAGE,
                                       width_coefficient=0.25, depth_coefficient=1.0, hidden_dim=320,
                                       # three stages with B0's first channels and strides; the second repeats,
                                       # so a block adds its input
                                       kernel_sizes=[3, 5, 3], in_channels=[32, 16, 24], out_channels=[16, 24, 40],
                                       strides=[1, 2, 2], num_block_repeats=[1, 2, 1], expand_ratios=[1, 6, 6]),
         "transformers"),
    Arch("wav2vec2", "audio", _hf("Wav2Vec2Model", "Wav2Vec2Config", hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, conv_dim=[16, 16, 16],
                                  conv_stride=[5, 2, 2], conv_kernel=[10, 3, 3], num_conv_pos_embeddings=16,
                                  num_conv_pos_embedding_groups=4, mask_time_prob=0.0),  # (numpy's random
         "transformers", True),  # time masks in training are not seeded)
    Arch("mlp", "tabular", _plain("mlp"), "torch"),
    Arch("cnn", "vision", _plain("cnn"), "torch"),
    Arch("lstm", "sequence", _plain("lstm"), "torch"),
    Arch("gru", "sequence", _plain("gru"), "torch"),
    Arch("transformer-encoder", "sequence", _plain("transformer"), "torch"),
]}


def _batches(family: str, sizes, lengths, generator):
    import torch

    out = []
    for rows, length in zip(sizes, lengths):
        if family in ("text", "causal"):
            ids = torch.randint(3, VOCAB, (rows, length), generator=generator)
            mask = torch.ones(rows, length, dtype=torch.long)
            for r in range(1, rows):  # every row but the first padded at the end, by a different amount
                real = max(2, length - (r * 3) % length)
                mask[r, real:] = 0
                ids[r, real:] = 0
            out.append(({"input_ids": ids, "attention_mask": mask}, None))
        elif family == "vision":
            out.append((torch.randn(rows, 3, 32, 32, generator=generator), None))
        elif family == "sequence":
            out.append((torch.randn(rows, length, 16, generator=generator), None))
        elif family == "audio":  # a waveform: 64 samples a step
            out.append((torch.randn(rows, length * 64, generator=generator), None))
        else:
            out.append((torch.randn(rows, 20, generator=generator), None))
    return out


def load(name: str):
    """(model, data) for a matrix architecture: a tiny seeded model in eval mode and a fidelity data bundle whose
    batches vary in sequence length (text: padded at the end, as a tokenizer pads to the longest)."""
    import torch

    from .data import Data
    from .tensors import seeded

    arch = ARCHITECTURES[name]
    with seeded(SEED):
        model = arch.build().eval()
    g = torch.Generator().manual_seed(SEED)
    train = _batches(arch.family, [8, 8, 8, 8], [12, 16, 12, 16], g)
    val = _batches(arch.family, [8, 8], [12, 16], g)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if norms:  # batch-norm statistics from the data, as training leaves them: an untrained deep conv net's
        for m in norms:  # activations otherwise shrink to ~1e-25 and every input looks alike
            m.reset_parameters()
            m.momentum = None  # a cumulative average over the batches
        with torch.no_grad():
            for m in norms:  # the norms alone in training mode: dropout and stochastic depth (EfficientNet's) would
                m.train()  # make the statistics depend on the random state the process is in
            for inputs, _ in train:
                model(inputs)
            model.eval()
    return model, Data(train=train, val=val, metric="fidelity", name=name)


@dataclass
class Cell:
    architecture: str
    technique: str
    status: str  # 'works', 'refused', 'fails', 'n/a'
    fidelity: float | None = None
    reason: str = ""
    pickle: bool = False  # saved as a pickle (data-dependent shapes): reloads with trust_pickle=True
    floor: float | None = None  # the row's: the fidelity a model returning the same output for every input gets

    def text(self) -> str:
        if self.status == "works":
            return f"{self.fidelity:.3f}" if self.fidelity is not None else "works"
        if self.status == "n/a":
            return "n/a"
        return f"{'refused' if self.status == 'refused' else 'FAILS'}: {self.reason}"


def applies(arch: Arch, technique: str) -> bool:
    """Whether a technique is meant for this architecture at all (unpad is for BERT-style encoders)."""
    if technique == "unpad":
        from .architectures import bert_encoders

        return arch.family == "text" and bool(bert_encoders(arch.build()))
    return True


def _same_structure(a, b) -> str | None:
    """Why output `b` is not built like output `a` (None when it is)."""
    import torch

    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor):
            return f"returns {type(b).__name__} where the original returns a tensor"
        if a.shape != b.shape:
            return f"returns shape {tuple(b.shape)} where the original returns {tuple(a.shape)}"
        return None
    if hasattr(a, "keys"):
        if type(a) is not type(b) and not (isinstance(b, dict) and isinstance(a, dict)):
            return f"returns {type(b).__name__} where the original returns {type(a).__name__}"
        for k in a.keys():
            if not _holds_tensors(a[k]):  # a language model's key/value cache object is not kept (README)
                continue
            if k not in b.keys():
                return f"has no {k!r} in its output"
            why = _same_structure(a[k], b[k])
            if why:
                return why
        return None
    if isinstance(a, (tuple, list)):
        if not isinstance(b, (tuple, list)) or len(a) != len(b):
            return f"returns {type(b).__name__} where the original returns a {type(a).__name__} of {len(a)}"
        for x, y in zip(a, b):
            why = _same_structure(x, y)
            if why:
                return why
        return None
    return None


def _holds_tensors(value) -> bool:
    import torch

    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_tensors(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensors(v) for v in value.values())
    return False


def _calls(model, inputs):
    """The ways a user calls the model on a batch: as the data holds it, and for a dict, its leading inputs
    positionally in the forward's order (`m(ids, mask)`) and the rest by keyword."""
    import inspect

    if isinstance(inputs, dict):
        params = [p.name for p in inspect.signature(model.forward).parameters.values()]
        lead = []
        for name in params:
            if name not in inputs:
                break
            lead.append(name)
        rest = {k: v for k, v in inputs.items() if k not in lead}
        return [("keyword", lambda m: m(**inputs)),
                ("positional", lambda m: m(*[inputs[k] for k in lead], **rest))]
    if isinstance(inputs, (tuple, list)):
        return [("positional", lambda m: m(*inputs))]
    return [("positional", lambda m: m(inputs))]


NEW_SHAPES = ((3, 20), (5, 9), (1, 11))  # (rows, sequence length) no batch has: saves and exports must run at each


def _new_shape(family: str, shape: tuple = NEW_SHAPES[0]):
    """Inputs at a batch size and sequence length no batch had."""
    import torch

    return _batches(family, [shape[0]], [shape[1]], torch.Generator().manual_seed(SEED + 1))[0][0]


def check_contract(original, result, family: str, data) -> str | None:
    """Why the optimized model breaks the original's call or output contract (None when it keeps it)."""

    inputs = next(iter(data.val_batches()))[0]
    for how, call in _calls(original, inputs):
        why = _differs(f"{how} call", lambda: call(original), lambda: call(result.model))
        if why:
            return why
    return None


def _differs(what: str, reference: Callable, candidate: Callable) -> str | None:
    """Why `candidate()` fails or returns another structure than `reference()` (None when it does not)."""
    import torch

    with torch.inference_mode():
        expected = reference()
        try:
            got = candidate()
        except Exception as e:
            return f"{what} fails: {first_line(e, named=True)}"[:200]
    why = _same_structure(expected, got)
    return f"{what} {why}" if why else None


def check_saved(result, family: str) -> str | None:
    """Why the saved result does not reload and run at new batch sizes and sequence lengths (None when it does)."""
    import warnings

    from .errors import PickleFallback
    from .storage import load as load_saved
    from .tensors import call_model

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PickleFallback)
        path = result.save(Path(tmp) / "saved")
        pickled = any(issubclass(w.category, PickleFallback) for w in caught)
        result.details["saved_as_pickle"] = pickled
        model = load_saved(path, trust_pickle=pickled)  # a pickle is never loaded unless the save said so
        for shape in NEW_SHAPES:
            inputs = _new_shape(family, shape)
            why = _differs(f"the reloaded model at {shape}", lambda: call_model(result.model, inputs),
                           lambda: call_model(model, inputs))
            if why:
                return why
        return None


def _plan():
    from .measure import TimingPlan

    return TimingPlan(sessions=1, min_rounds=1, max_rounds=1, min_seconds=0.0, min_block_s=0.001, warmup_s=0.0,
                      max_warmup_blocks=1, generations=0)


def check_export(result, family: str) -> str | None:
    """Why the exported deployable file does not run, by its runtime alone, at a new batch size and sequence
    length (None when it does)."""
    from .storage import check_deployable

    with tempfile.TemporaryDirectory() as tmp:
        path = result.export(Path(tmp))
        for shape in NEW_SHAPES:
            try:  # loaded by its runtime alone, and compared with the model's outputs
                check_deployable(result.model, _new_shape(family, shape), path)
            except Exception as e:
                return f"the exported {path.name} fails at {shape}: {first_line(e, named=True)}"[:200]
    return None


def baseline(architecture: str):
    """(model, data, engine.Baseline) of a matrix architecture, measured once for all its cells."""
    from . import engine
    from .scoped import quiet

    model, data = load(architecture)
    with quiet():
        return model, data, engine.Baseline(model, data, device="cpu", batch_sizes=(1,), study=False, timing=_plan())


def run_cell(architecture: str, technique: str, measured=None, runs: dict | None = None) -> Cell:
    """One cell of the matrix: the technique on the architecture, checked as the module docstring says.
    measured: `baseline(architecture)`, to share one baseline between cells; runs: a row's results by recipe, so
    that a column running a recipe another ran (export: int8's) checks that result instead of running it again."""
    from .errors import WorkbenchError
    from .scoped import quiet

    arch = ARCHITECTURES[architecture]
    if not applies(arch, technique):
        return Cell(architecture, technique, "n/a")
    recipe, runs = recipe_for(arch, technique), {} if runs is None else runs
    try:
        model, data, base = measured or baseline(architecture)
        if recipe not in runs:
            try:
                with quiet():
                    runs[recipe] = base.run(recipe)
            except Exception as e:  # the next cell of this recipe is refused or fails the same way
                runs[recipe] = e
        result = runs[recipe]
        if isinstance(result, Exception):
            raise result
    except WorkbenchError as e:
        return Cell(architecture, technique, "refused", reason=first_line(e))
    except Exception as e:
        last = traceback.extract_tb(e.__traceback__)[-1]
        return Cell(architecture, technique, "fails",
                    reason=f"{first_line(e, named=True)} "
                           f"({Path(last.filename).name}:{last.lineno})"[:300])
    try:
        why = check_contract(model, result, arch.family, data)
        if why is None:
            why = (check_export if technique == "export" else check_saved)(result, arch.family)
    except WorkbenchError as e:
        return Cell(architecture, technique, "refused", reason=first_line(e))
    except Exception as e:
        why = f"{'export' if technique == 'export' else 'save/reload'} fails: {type(e).__name__}: " \
              f"{first_line(e)}"[:200]
    if why:
        return Cell(architecture, technique, "fails", result.measurement.metric, why)
    return Cell(architecture, technique, "works", result.measurement.metric,  # (an export is its own file)
                pickle=technique != "export" and bool(result.details.get("saved_as_pickle")))


def matrix(architectures=None, techniques=None, progress: Callable | None = None, workers: int = 1) -> list[Cell]:
    """Every cell (architecture x technique), one baseline per architecture. workers > 1: architectures run in
    that many processes with one thread each (tiny models gain nothing from a second thread, and a second core
    halves the wall time)."""
    names = list(architectures or ARCHITECTURES)
    columns = list(techniques or TECHNIQUES)
    if workers <= 1:
        cells = []
        for i, a in enumerate(names):
            if progress:
                progress(a, i / len(names))
            cells += _row(a, columns)
        return cells
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    rows = {}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_one_thread) as pool:
        futures = {pool.submit(_row, a, columns): a for a in names}
        from concurrent.futures import as_completed

        for i, future in enumerate(as_completed(futures)):
            rows[futures[future]] = future.result()
            if progress:
                progress(futures[future], (i + 1) / len(names))
    return [c for a in names for c in rows[a]]


def _one_thread() -> None:
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")


def _row(architecture: str, columns: list[str]) -> list[Cell]:
    """One architecture's cells against one shared baseline."""
    cells, measured, runs = [], None, {}
    for t in columns:
        if measured is None and applies(ARCHITECTURES[architecture], t):
            try:
                measured = baseline(architecture)
            except Exception:  # each cell then says why, in its own line
                measured = None
        cells.append(run_cell(architecture, t, measured, runs))
    if measured is not None:
        _, data, base = measured
        floor = data.fidelity_floor(base.model)
        for c in cells:
            c.floor = floor
    return cells


def summary(cells: list[Cell]) -> dict:
    """Counts: applicable cells, how many work, are refused (with a reason) or fail."""
    applicable = [c for c in cells if c.status != "n/a"]
    works = sum(c.status == "works" for c in applicable)
    return {"architectures": len({c.architecture for c in cells}), "applicable": len(applicable), "works": works,
            "refused": sum(c.status == "refused" for c in applicable),
            "fails": sum(c.status == "fails" for c in applicable),
            "share": works / len(applicable) if applicable else 0.0}


def markdown(cells: list[Cell]) -> str:
    """The README table: fidelity where a cell works, a numbered reason where it is refused."""
    columns = list(dict.fromkeys(c.technique for c in cells))
    rows = list(dict.fromkeys(c.architecture for c in cells))
    by = {(c.architecture, c.technique): c for c in cells}
    reasons: list[str] = []
    lines = ["| architecture | " + " | ".join(columns) + " | floor |", "|---" * (len(columns) + 2) + "|"]
    for a in rows:
        floor = by[(a, columns[0])].floor
        shown = []
        for t in columns:
            c = by[(a, t)]
            if c.status == "works":
                shown.append(f"{c.fidelity:.3f}" + (" (pickle)" if c.pickle else ""))
            elif c.status == "n/a":
                shown.append("–")
            else:
                if c.reason not in reasons:
                    reasons.append(c.reason)
                shown.append(f"{'refused' if c.status == 'refused' else 'FAILS'} [{reasons.index(c.reason) + 1}]")
        source = ARCHITECTURES[a].source if a in ARCHITECTURES else ""
        lines.append(f"| {a} ({source}) | " + " | ".join(shown) + f" | {'–' if floor is None else f'{floor:.3f}'} |")
    lines.append("")
    lines += [f"{i}. {r}" for i, r in enumerate(reasons, 1)]
    return "\n".join(lines)
