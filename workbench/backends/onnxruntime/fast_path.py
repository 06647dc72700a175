"""One graph, two ways through it: unpad's packed graph with the dense graph as a fast path for batches that carry
no padding.

Packing real tokens pays where a batch has padding; where it has none (batch 1, or sentences of one length) the
gathers that pack and unpack are pure cost, and the packed graph cannot use ONNX Runtime's fused QAttention (it
needs the batch laid out [batch, length]). `with_fast_path` puts both graphs in one ONNX model behind an `If` on
"every attention_mask entry is 1": ONNX Runtime runs only the branch taken. Weights the two graphs hold byte for
byte alike are stored once (every layer but the Q/K/V projection, which the dense graph's QAttention holds fused).

    merged = with_fast_path(packed_bytes, dense_bytes, "attention_mask")
"""
from __future__ import annotations

import hashlib

FAST, PACKED = "fast/", "packed/"  # prefixes of each branch's own names (ONNX forbids shadowing outer names)


def _content_key(tensor) -> str:
    named = tensor.name
    tensor.name = ""
    try:
        return hashlib.sha256(tensor.SerializeToString()).hexdigest()
    finally:
        tensor.name = named


def _has_subgraphs(graph) -> bool:
    return any(a.type in (a.GRAPH, a.GRAPHS) for n in graph.node for a in n.attribute)


def with_fast_path(packed: bytes, dense: bytes, mask: str) -> bytes | None:
    """The packed graph and the dense one behind an `If` on the mask having no zero; None where the two graphs do
    not fit together (other inputs or outputs, or control flow of their own)."""
    import onnx
    from onnx import helper

    p, d = onnx.load_from_string(packed), onnx.load_from_string(dense)
    inputs = {i.name for i in p.graph.input}
    if (mask not in inputs or not {i.name for i in d.graph.input} <= inputs
            or len(p.graph.output) != len(d.graph.output) or _has_subgraphs(p.graph) or _has_subgraphs(d.graph)):
        return None
    shared, initializers = {}, []

    def branch(graph, prefix: str):
        outer = {v: v for v in inputs}
        outer[""] = ""  # an omitted optional input
        for init in graph.initializer:
            key = _content_key(init)
            if key not in shared:
                shared[key] = f"{prefix}{init.name}"
                moved = onnx.TensorProto()
                moved.CopyFrom(init)
                moved.name = shared[key]
                initializers.append(moved)
            outer[init.name] = shared[key]
        name = lambda value: outer[value] if value in outer else f"{prefix}{value}"  # noqa: E731
        nodes = []
        for i, node in enumerate(graph.node):
            renamed = onnx.NodeProto()
            renamed.CopyFrom(node)
            renamed.name = f"{prefix}{node.name or f'#{i}'}"
            for field in (renamed.input, renamed.output):
                values = [name(v) for v in field]
                del field[:]
                field.extend(values)
            nodes.append(renamed)
        outputs = []
        for out in graph.output:
            value = onnx.ValueInfoProto()
            value.name, value.type.tensor_type.elem_type = name(out.name), out.type.tensor_type.elem_type
            outputs.append(value)
        return helper.make_graph(nodes, prefix.rstrip("/"), [], outputs)

    then_branch, else_branch = branch(d.graph, FAST), branch(p.graph, PACKED)
    nodes = [helper.make_node("ReduceMin", [mask], ["no_padding.min"], name="no_padding.ReduceMin", keepdims=0),
             helper.make_node("Cast", ["no_padding.min"], ["no_padding"], name="no_padding.Cast",
                              to=onnx.TensorProto.BOOL),
             helper.make_node("If", ["no_padding"], [o.name for o in p.graph.output], name="fast_path",
                              then_branch=then_branch, else_branch=else_branch)]
    graph = helper.make_graph(nodes, p.graph.name, list(p.graph.input), list(p.graph.output), initializers)
    versions = {}
    for opset in [*p.opset_import, *d.opset_import]:
        versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(k, v) for k, v in versions.items()],
                              producer_name="workbench", ir_version=max(p.ir_version, d.ir_version))
    return model.SerializeToString()


def _fast_path(graph):
    return next((n for n in graph.node if n.op_type == "If" and n.name == "fast_path"), None)


def nodes(graph) -> list:
    """Every node the graph runs, in both branches where it is a merged one."""
    node = _fast_path(graph)
    return list(graph.node) if node is None else [n for a in node.attribute for n in a.g.node]


def weights(graph) -> list:
    """The graph's initializers; of a merged one, those the packed branch reads (the model's own parameters: the
    fast path adds only a second layout of Q/K/V)."""
    node = _fast_path(graph)
    if node is None:
        return list(graph.initializer)
    packed = next(a.g for a in node.attribute if a.name == "else_branch")
    read = {v for n in packed.node for v in n.input}
    return [i for i in graph.initializer if i.name in read]


MASK = "attention_mask"
FUSED_ATTENTION = ("Attention", "QAttention")


def add_fast_path(model, packed, lower, exclude: tuple, ctx):
    """`packed` (unpad's model lowered to an OrtModel) with the dense graph of the same weights as its fast path
    for batches without padding, where that graph gets ONNX Runtime's fused attention; `packed` as it is, with the
    reason in the log, where it does not. `lower(twin, exclude)` lowers the dense twin as `packed` was lowered."""
    import logging

    import onnx

    from ...techniques.packed_bert import dense_twin

    log = logging.getLogger(__name__)
    inputs = ctx.data.example_inputs
    twin = dense_twin(model) if isinstance(inputs, dict) and MASK in inputs and MASK in packed.input_names else None
    if twin is None:
        log.info("no fast path for unpadded batches: no attention_mask input, or a layer not laid back dense")
        return packed
    twin, rename = twin
    ctx.progress("unpad: the dense graph for batches without padding", None)
    try:
        dense = lower(twin, tuple(n for name in exclude for n in rename(name)))
        kinds = {n.op_type for n in onnx.load_from_string(dense.onnx_bytes).graph.node}
        if not kinds & set(FUSED_ATTENTION) or dense.layout != packed.layout:
            log.info("no fast path for unpadded batches: the dense graph has no fused attention")
            return packed
        merged = with_fast_path(packed.onnx_bytes, dense.onnx_bytes, MASK)
        if merged is None:
            return packed
        merged = packed.replace(merged, packed.label)
        merged.check_parity(packed, inputs)  # padded batches: the packed graph, as it was
        merged.check_parity(dense, {**inputs, MASK: inputs[MASK].new_ones(inputs[MASK].shape)})  # the dense one
    except Exception as e:  # the fast path is an extra: the packed graph alone still runs every batch
        log.info("no fast path for unpadded batches: %s", e)
        return packed
    ctx.note("unpad: batches without padding (batch 1, or sentences of one length) run the dense graph with ONNX "
             "Runtime's fused attention instead of the packed one; the two share their weights but Q/K/V")
    return merged
