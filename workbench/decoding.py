"""Causal language models: the key/value cache kept through export, greedy decoding, and generation timing.

A decoder's speed is not its forward's latency: generation runs the prompt once (time to first token), then one
token at a time against the cache (tokens per second). Both are timed here with intervals, on torch modules
(Hugging Face decoders, quantized or pruned) and on ONNX Runtime graphs exported with the cache (past in, present
out, lengths dynamic), the original and the optimized model taking turns so that load hits both alike.

    >>> table = generation(models, data, target)       # {label: GenerationRun}, same prompts for all
    >>> tokens, ttft_s, total_s = greedy(model, ids, new_tokens=64)
"""
from __future__ import annotations

import time
from typing import Any

from .architectures import is_causal_lm
from .errors import WorkbenchError, first_line
from .measure.measurement import GenerationRun, Setting, median_interval

BATCHES = (1, 8)
PROMPTS = (32, 256)
NEW_TOKENS = 64


# -- the cache through export ----------------------------------------------------------------------------------
def cache_shapes(model) -> list[tuple[int, int]] | None:
    """(key/value heads, head size) of each layer's cache, read from one cached forward (so that pruned heads and
    grouped-query attention show as they are); None when `model` is not a Hugging Face decoder returning a cache
    (a forward that fails raises, so that its caller can say why)."""
    import torch

    from .target import of_model

    if not is_causal_lm(model) or not hasattr(model, "config"):
        return None
    ids = torch.zeros(1, 2, dtype=torch.long, device=of_model(model).device)
    with torch.inference_mode():
        cache = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).past_key_values
    layers = getattr(cache, "layers", None)
    return [(int(layer.keys.shape[1]), int(layer.keys.shape[-1])) for layer in layers] if layers else None


def cached_decoder(model):
    """A module for exporters: (input_ids, attention_mask, past key, past value, ... per layer) ->
    (logits, present key, present value, ...), the cache as plain tensors (batch x heads x length x head size)."""
    import torch
    from transformers import DynamicCache

    class CachedDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, *past):
            cache = DynamicCache(ddp_cache_data=[(past[i], past[i + 1]) for i in range(0, len(past), 2)],
                                 config=self.model.config)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache,
                             use_cache=True)
            return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])

    return CachedDecoder()


def empty_past(specs, rows: int) -> dict:
    """{name: zero-length cache array (rows x heads x 0 x head size)} for a decoder graph's past inputs, `specs`
    being (name, heads, head size): what its first call (the prompt) takes."""
    import numpy as np

    return {name: np.zeros((rows, heads, 0, dim), np.float32) for name, heads, dim in specs}


def graph_past(graph_inputs) -> list[tuple]:
    """(name, heads, head size) of a decoder graph's past inputs, read from its inputs (ONNX Runtime's NodeArgs or
    onnx ValueInfos' names and shapes)."""
    return [(i.name, i.shape[1], i.shape[3]) for i in graph_inputs if i.name.startswith("past_key_values.")]


def past_specs(layout: dict) -> list[tuple]:
    """(name, heads, head size) of each past input of an exported decoder's layout."""
    return [(p["name"], *p["shape"]) for p in layout.get("past") or ()]


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


# -- greedy decoding -------------------------------------------------------------------------------------------
class _TorchSteps:
    """A torch decoder's prefill and next-token steps against its own cache."""

    def __init__(self, model):
        self.model, self.cache = model, None

    def prefill(self, ids):
        out = self.model(input_ids=ids, attention_mask=ids.new_ones(ids.shape), use_cache=True)
        self.cache, self.length = out.past_key_values, ids.shape[1]
        return out.logits[:, -1]

    def step(self, ids):
        self.length += 1
        out = self.model(input_ids=ids, attention_mask=ids.new_ones(ids.shape[0], self.length),
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1]


class _GraphSteps:
    """The same steps on an ONNX Runtime graph exported with the cache (numpy in and out)."""

    def __init__(self, model):
        self.session = model.session
        self.specs = past_specs(model.layout)
        self.past = [name for name, _, _ in self.specs]

    def prefill(self, ids):
        return self._run(ids.numpy(), empty_past(self.specs, ids.shape[0]))

    def step(self, ids):
        return self._run(ids.numpy(), dict(zip(self.past, self.present)))

    def _run(self, ids, past):
        import numpy as np
        import torch

        self.length = ids.shape[1] + next(iter(past.values())).shape[2]
        out = self.session.run(None, {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], self.length),
                                                                                    np.int64), **past})
        self.present = out[1:1 + len(self.past)]
        return torch.from_numpy(out[0][:, -1])


def steps_for(model):
    """The decoding steps of `model`; a WorkbenchError saying why when it cannot generate with a cache."""
    if isinstance(getattr(model, "layout", None), dict):
        if model.layout.get("past"):
            return _GraphSteps(model)
        why = model.layout.get("cache_lost")
        raise WorkbenchError("this ONNX graph was exported without the key/value cache, so it cannot generate "
                             "token by token" + (f" (the cache export failed: {why})" if why else ""))
    if hasattr(model, "named_modules") and is_causal_lm(getattr(model, "module", model)):
        return _TorchSteps(getattr(model, "module", model))
    raise WorkbenchError(f"a {type(model).__name__} does not generate here: greedy decoding takes a Hugging Face "
                         "decoder (torch) or an ONNX Runtime graph the workbench exported with its cache")


def greedy(model, ids, new_tokens: int = NEW_TOKENS, steps=None) -> tuple[Any, float, float]:
    """(new token ids (rows x new_tokens), seconds to the first new token, seconds in all) of greedy decoding
    from prompts `ids` (rows x length, no padding), cache on, no early stop at end-of-text (every run decodes the
    same number of tokens, so that runs compare)."""
    import torch

    from .target import of_model

    if ids is None or getattr(ids, "dim", lambda: 0)() != 2 or ids.shape[1] == 0:
        raise WorkbenchError("greedy decoding needs prompts as token ids, rows x length (decoding.prompts gives None "
                             "when the validation text has too few rows that long)")
    if new_tokens < 1:
        raise WorkbenchError(f"new_tokens={new_tokens}: decode at least one token")
    steps = steps or steps_for(model)
    ids = ids.to(of_model(steps.model).device) if isinstance(steps, _TorchSteps) else ids.cpu()
    out = []
    with torch.inference_mode():
        start = time.perf_counter()
        token = steps.prefill(ids).argmax(-1, keepdim=True)
        first = time.perf_counter() - start
        out.append(token)
        for _ in range(new_tokens - 1):
            token = steps.step(token).argmax(-1, keepdim=True)
            out.append(token)
        total = time.perf_counter() - start
    return torch.cat(out, dim=1).cpu(), first, total


# -- timing ----------------------------------------------------------------------------------------------------
def paired_ratio(a: Setting, b: Setting) -> tuple:
    """(median, low, high) of `a`'s tokens per second over `b`'s, run by run: both from one `generation` call,
    whose runs took turns, so that each pair was timed moments apart."""
    return median_interval([x / y for x, y in zip(a.rates, b.rates)])


def prompts(data, rows: int, length: int):
    """`rows` prompts of `length` tokens: the starts of the validation batches' token rows (rows of real tokens
    only); None when the validation text has too few rows that long."""
    import torch

    from .data import token_mask

    found = []
    for inputs, _ in data.val_batches():
        if not isinstance(inputs, dict) or "input_ids" not in inputs:
            return None
        ids, mask = inputs["input_ids"].cpu(), token_mask(inputs)
        for i in range(ids.shape[0]):
            if ids.shape[1] >= length and (mask is None or bool(mask[i, :length].all())):
                found.append(ids[i, :length])
            if len(found) == rows:
                return torch.stack(found)
    return None


def generation(models: dict, data, target, batches=BATCHES, lengths=PROMPTS, new_tokens: int = NEW_TOKENS,
               repeats: int = 7, reference: str | None = None, progress=None) -> dict:
    """{label: GenerationRun} for each model of `models` ({label: model}), each setting's runs interleaved
    (A B, B A, ...) on the same prompts; `reference` (a label) is the model whose greedy tokens the others are
    compared with; `repeats` timed generations per model and setting after one untimed. CPU only: a model on a
    GPU is reported as not timed."""
    if new_tokens < 2 or repeats < 1:
        raise WorkbenchError(f"generation timing needs new_tokens >= 2 (tokens/s is timed after the first) and "
                             f"repeats >= 1; got new_tokens={new_tokens}, repeats={repeats}")
    runs, steps = {}, {}
    for label, model in models.items():
        try:
            if target.is_cuda:
                raise WorkbenchError("generation is timed on the CPU here")
            steps[label] = steps_for(model)
            runs[label] = GenerationRun(new_tokens=new_tokens)
        except WorkbenchError as e:
            runs[label] = GenerationRun(skipped=first_line(e))
    live = [label for label in models if label in steps]
    if not live:
        return runs
    tokens: dict = {label: [] for label in live}
    with target.threads_fixed():
        for b in batches:
            for length in lengths:
                ids = prompts(data, b, length)
                if ids is None:
                    for label in live:
                        runs[label].skipped = runs[label].skipped or \
                            f"the validation text has fewer than {b} rows of {length} real tokens"
                    continue
                if progress:
                    progress(f"timing generation: batch {b}, prompt {length}, {new_tokens} new tokens", None)
                first: dict = {label: [] for label in live}
                rate: dict = {label: [] for label in live}
                for r in range(repeats + 1):  # the first round warms up and is not counted
                    for label in (live if r % 2 == 0 else live[::-1]):
                        out, ttft, total = greedy(models[label], ids, new_tokens, steps[label])
                        if r == 0:
                            if b == max(batches):  # distinct prompts: the smaller batches' are among them
                                tokens[label].append(out)
                            continue
                        first[label].append(ttft * 1e3)
                        rate[label].append(b * (new_tokens - 1) / max(total - ttft, 1e-9))
                done = {label: Setting(b, length, median_interval(first[label]), median_interval(rate[label]),
                                       rates=tuple(rate[label])) for label in live}
                for label, setting in done.items():
                    if reference in done and label != reference:
                        setting.ratio = paired_ratio(setting, done[reference])
                    runs[label].settings.append(setting)
    if reference in tokens:
        import torch

        ref = torch.cat(tokens[reference]) if tokens[reference] else None
        for label in live:
            if label != reference and ref is not None:
                mine = torch.cat(tokens[label])
                runs[label].same_tokens = float((mine == ref).all(dim=1).float().mean())
                runs[label].same_prefix = float((mine == ref).int().cumprod(dim=1).sum(dim=1).float().mean())
                runs[label].prompts_compared = int(ref.shape[0])
    return runs
