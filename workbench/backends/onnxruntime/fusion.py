"""ONNX Runtime's transformer fusions for BERT encoders: Attention (which int8 turns into QAttention), embedding
LayerNorm, bias + GELU; kept only where the fused graph matches the torch model (the session checks parity).

Exported with eager attention: the pattern ORT's Attention fusion recognises (with SDPA it fuses none).
"""
from __future__ import annotations

import copy
import logging
import os
import tempfile
from pathlib import Path

from ...architectures import bert_encoders
from ...scoped import quiet
from .export import export_onnx


def fuse_bert(model, example_inputs, on_cpu: bool = True) -> tuple[bytes, dict] | None:
    """The model's graph with ONNX Runtime's BERT fusions and its layout (see `export_onnx`), or None where they
    do not apply.

    On CPU the SkipLayerNormalization fusion is left out: its CPU kernel measured slower than the Add +
    LayerNormalization it replaces (minilm int8, 2 threads, batch 32: 171 ms without it vs 190 ms with it).
    """
    names = bert_encoders(model)
    if len(names) != 1:  # none, or several encoders (the fusion assumes one)
        return None
    try:
        from onnxruntime.transformers.fusion_options import FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError:
        return None
    eager = copy.deepcopy(model).eval()
    bert = eager.get_submodule(names[0]) if names[0] else eager
    shapes = {(layer.attention.self.num_attention_heads, layer.attention.self.all_head_size)
              for layer in bert.encoder.layer}
    if not hasattr(bert, "set_attn_implementation") or len(shapes) != 1:  # one shape for every layer
        return None
    (heads, width), = shapes
    try:
        bert.set_attn_implementation("eager")
        onnx_bytes, layout = export_onnx(eager, example_inputs)
        with tempfile.TemporaryDirectory() as tmp, quiet():
            src, dst = os.path.join(tmp, "a.onnx"), os.path.join(tmp, "fused.onnx")
            Path(src).write_bytes(onnx_bytes)
            options = FusionOptions("bert")
            options.use_raw_attention_mask(True)  # its default (a length per row) assumes right padding
            options.enable_skip_layer_norm = not on_cpu
            optimized = optimize_model(src, model_type="bert", num_heads=heads, hidden_size=width,
                                       optimization_options=options)
            if not optimized.get_fused_operator_statistics().get("Attention"):
                return None
            optimized.save_model_to_file(dst)
            return Path(dst).read_bytes(), layout
    except Exception as e:
        logging.getLogger(__name__).info("ONNX Runtime's BERT fusion did not apply: %s", e)
        return None
