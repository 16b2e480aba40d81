"""The TensorRT plugin nodes of plugin-mode decode graphs (`--plugin`, `--tensorrt`).

In a plugin export every layer's `mom::memory_decode` is two nodes in domain "mom", one per plugin
of tensorrt_plugin.py, each built from that plugin's contract (inputs, outputs, dtype kinds,
shapes, attributes):

    memory_decode_conv(q, per_set, memory_idx, a_log, dt_bias, conv_w, conv_b, conv_src; single_set)
        -> (conv_dst, qkv, beta_g)
    memory_decode_step(memory_idx, qkv, beta_g, rec_src; scale) -> (rec_dst, o)

(the math of ops/memory_decode.py, split where its CUDA kernels split), plus the two attributes
TensorRT's ONNX parser reads: `plugin_namespace` "mom" (its plugin lookup) and `aot` 1 (the
ahead-of-time kernel). The prefill graph stays standard ONNX.

Registering the schemas lets onnx.checker (full check, with shape inference) validate plugin
graphs; `with_reference` replaces every conv/step pair by the standard translation of
`mom::memory_decode`, so that stock onnxruntime runs a plugin graph as a check.
"""
from __future__ import annotations

import os
import tempfile

import onnx
import onnx.inliner
from onnx import defs

from .tensorrt_plugin import (
    ACTIVATION,
    ACTIVATION_DTYPES,
    CONV,
    FIXED_DTYPES,
    INDEX,
    NAMESPACE,
    PLUGINS,
    STATE,
    STEP,
    Plugin,
)

DOMAIN, VERSION = NAMESPACE, 1
PARSER_ATTRIBUTES = {"plugin_namespace": NAMESPACE, "aot": 1}
# with_reference's function: the op's tensor arguments and outputs, named by the plugins' ports
REFERENCE_DOMAIN, REFERENCE = "mom.reference", "memory_decode"
REFERENCE_INPUTS = [p.name for p in CONV.inputs] + ["rec_src"]
REFERENCE_OUTPUTS = ["o", "conv_dst", "rec_dst"]
_ONNX_TYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
               "bfloat16": onnx.TensorProto.BFLOAT16, "int64": onnx.TensorProto.INT64}
_ATTRIBUTE_TYPES = {float: defs.OpSchema.AttrType.FLOAT, int: defs.OpSchema.AttrType.INT,
                    str: defs.OpSchema.AttrType.STRING}
_TYPE_PARAMS = {ACTIVATION: "A", STATE: "S", INDEX: "I"}


def _type_str(dtype: str) -> str:
    return "tensor(" + {"float32": "float"}.get(dtype, dtype) + ")"


def node_attributes(plugin: Plugin, **values) -> dict:
    """Every attribute of a node of `plugin`: the contract's (`values`, checked), then the parser's."""
    if set(values) != set(plugin.attributes):
        raise ValueError(f"{plugin.name}: expected attributes {list(plugin.attributes)}, got {list(values)}")
    return {name: kind(values[name]) for name, kind in plugin.attributes.items()} | PARSER_ATTRIBUTES


def _dims(value_type) -> tuple | None:
    """A value's shape: ints for known sizes, names for symbolic ones, None where unknown."""
    if value_type is None or not value_type.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                 for d in value_type.tensor_type.shape.dim)


def _inference(plugin: Plugin):
    def infer(ctx) -> None:
        """Output dtypes by kind (activations take the activation inputs' type), shapes by the
        contract's output_shapes where the sizes it reads are known."""
        types = [ctx.get_input_type(i) for i in range(len(plugin.inputs))]
        activation = next((t.tensor_type.elem_type for p, t in zip(plugin.inputs, types)
                           if p.kind == ACTIVATION and t is not None), onnx.TensorProto.UNDEFINED)
        elem = {ACTIVATION: activation, STATE: _ONNX_TYPES[FIXED_DTYPES[STATE]],
                INDEX: _ONNX_TYPES[FIXED_DTYPES[INDEX]]}
        shapes = {p.name: _dims(t) for p, t in zip(plugin.inputs, types)}
        try:
            out_shapes = plugin.output_shapes(shapes)
        except (TypeError, ValueError):  # a size the rule needs is unknown
            out_shapes = [None] * len(plugin.outputs)
        for i, (port, shape) in enumerate(zip(plugin.outputs, out_shapes)):
            ctx.set_output_type(i, onnx.helper.make_tensor_type_proto(elem[port.kind], shape))

    return infer


def schema(plugin: Plugin) -> defs.OpSchema:
    """The ONNX schema of `plugin`'s nodes, from its contract."""
    formal = defs.OpSchema.FormalParameter
    allowed = {ACTIVATION: [_type_str(d) for d in ACTIVATION_DTYPES],
               STATE: [_type_str(FIXED_DTYPES[STATE])], INDEX: [_type_str(FIXED_DTYPES[INDEX])]}
    kinds = {p.kind for p in plugin.inputs + plugin.outputs}
    constraints = [(_TYPE_PARAMS[kind], types, kind) for kind, types in allowed.items() if kind in kinds]
    attributes = [defs.OpSchema.Attribute(name, _ATTRIBUTE_TYPES[kind], name)
                  for name, kind in plugin.attributes.items()]
    attributes += [defs.OpSchema.Attribute(name, _ATTRIBUTE_TYPES[type(value)], "read by TensorRT's parser")
                   for name, value in PARSER_ATTRIBUTES.items()]
    result = defs.OpSchema(
        plugin.name, DOMAIN, VERSION, doc=__doc__,
        inputs=[formal(p.name, _TYPE_PARAMS[p.kind], p.kind) for p in plugin.inputs],
        outputs=[formal(p.name, _TYPE_PARAMS[p.kind], p.kind) for p in plugin.outputs],
        type_constraints=constraints, attributes=attributes)
    if hasattr(result, "set_type_and_shape_inference_function"):
        result.set_type_and_shape_inference_function(_inference(plugin))
    return result


def register_schemas() -> None:
    """Make onnx aware of the plugin nodes (idempotent)."""
    for plugin in PLUGINS:
        if not defs.has(plugin.name, DOMAIN):
            defs.register_schema(schema(plugin))


def values(node: onnx.NodeProto, plugin: Plugin) -> dict[str, str]:
    """{port name: value name} of a node of `plugin`."""
    return dict(zip([p.name for p in plugin.inputs + plugin.outputs], [*node.input, *node.output]))


def decode_pairs(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """Every (conv node, step node) of a plugin graph: the step reads the conv's scratch (qkv, beta_g)
    and its memory_idx, the ports the two plugins share."""
    shared = [p.name for p in STEP.inputs if p.name in {q.name for q in CONV.inputs + CONV.outputs}]
    convs = {values(n, CONV)["qkv"]: n for n in graph.node if (n.domain, n.op_type) == (DOMAIN, CONV.name)}
    pairs = []
    for step in (n for n in graph.node if (n.domain, n.op_type) == (DOMAIN, STEP.name)):
        conv = convs.pop(values(step, STEP)["qkv"], None)
        if conv is None or any(values(step, STEP)[name] != values(conv, CONV)[name] for name in shared):
            raise ValueError(f"{STEP.name} node {step.name!r}: expected to read a {CONV.name} node's "
                             f"{', '.join(shared)}")
        pairs.append((conv, step))
    if convs:
        raise ValueError(f"{CONV.name} nodes without a {STEP.name} node: {[n.name for n in convs.values()]}")
    return pairs


def _attribute(node: onnx.NodeProto, name: str):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def reference_function(model, scale: float, single_set: bool, opset: int) -> onnx.FunctionProto:
    """The standard translation of mom::memory_decode for `model` (a MomForCausalLM: its sizes and
    dtypes) as a model-local function REFERENCE_DOMAIN::REFERENCE, from a one-op export; its inputs
    are the conv node's and rec_src, its outputs (o, conv_dst, rec_dst)."""
    import torch

    from mom_compile.graphs.cache import state_specs

    from .onnx_export import GraphSpec, to_onnx

    class OneOp(torch.nn.Module):
        def forward(self, *args):
            return torch.ops.mom.memory_decode(*args, scale, single_set)

    config, layer = model.config, model.model.layers[0].attn
    batch, h, k = 2, config.num_heads, config.head_dim
    (rec_shape, rec_dtype), (conv_shape, dtype) = state_specs(config, batch, model.dtype)[:2]
    sets, set_width = len(layer.memory_set_names()), config.key_dim + config.value_dim + 2 * h
    choices = config.chosen_memories
    weight = layer.conv_weight.detach().squeeze(1)
    bias = weight.new_zeros(weight.shape[0]) if layer.conv_bias is None else layer.conv_bias.detach()
    args = (torch.randn(batch, h * k, dtype=dtype), torch.randn(batch, sets, set_width, dtype=dtype),
            torch.stack([torch.randperm(config.memory_slots)[:choices] for _ in range(batch)]),
            layer.A_log.detach(), layer.dt_bias.detach(), weight, bias,
            torch.zeros(conv_shape, dtype=dtype), torch.zeros(rec_shape, dtype=rec_dtype))
    dim = torch.export.Dim("batch")
    dynamic = [{0: dim}, {0: dim}, {0: dim}, None, None, None, None, {0: dim}, {0: dim}]
    with torch.no_grad():
        program = torch.export.export(OneOp(), args, dynamic_shapes=(tuple(dynamic),))
    spec = GraphSpec(REFERENCE, REFERENCE_INPUTS, REFERENCE_OUTPUTS)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "one_op.onnx")
        to_onnx(program, spec, path, opset, use_plugin=False, external_data=False)
        graph = onnx.load(path).graph
    constants = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in graph.initializer]
    return onnx.helper.make_function(
        REFERENCE_DOMAIN, REFERENCE, [i.name for i in graph.input], [o.name for o in graph.output],
        constants + list(graph.node), [onnx.helper.make_opsetid("", opset)])


def with_reference(graph_model: onnx.ModelProto, model) -> onnx.ModelProto:
    """A copy of a plugin graph whose conv/step node pairs are the standard translation of
    mom::memory_decode (for `model`, the MomForCausalLM it was exported from), inlined, so that
    stock onnxruntime runs it."""
    copy = onnx.ModelProto()
    copy.CopyFrom(graph_model)
    pairs = decode_pairs(copy.graph)
    if not pairs:
        return copy
    scales = {_attribute(step, "scale") for _, step in pairs}
    singles = {_attribute(conv, "single_set") for conv, _ in pairs}
    if len(scales) != 1 or len(singles) != 1:
        raise ValueError(f"plugin nodes: expected one scale and one single_set shared by every layer, got "
                         f"{sorted(scales)} and {sorted(singles)}")
    opset = next(o.version for o in copy.opset_import if o.domain == "")
    calls = {}  # the step's first output -> the call replacing the pair, where the step node was
    for conv, step in pairs:
        names = values(conv, CONV) | values(step, STEP)
        calls[step.output[0]] = onnx.helper.make_node(
            REFERENCE, [names[n] for n in REFERENCE_INPUTS], [names[n] for n in REFERENCE_OUTPUTS],
            name=step.name, domain=REFERENCE_DOMAIN)
    dropped = {conv.output[0] for conv, _ in pairs}
    nodes = [calls.get(n.output[0], n) if n.output else n for n in copy.graph.node
             if not (n.output and n.output[0] in dropped)]
    replaced = onnx.helper.make_graph(nodes, copy.graph.name, copy.graph.input, copy.graph.output,
                                      copy.graph.initializer, value_info=copy.graph.value_info)
    copy.graph.CopyFrom(replaced)
    copy.opset_import.append(onnx.helper.make_opsetid(REFERENCE_DOMAIN, 1))
    copy.functions.append(reference_function(model, scales.pop(), bool(singles.pop()), opset))
    copy = onnx.inliner.inline_local_functions(copy)
    del copy.functions[:]
    imports = [o for o in copy.opset_import if o.domain not in (DOMAIN, REFERENCE_DOMAIN)]
    del copy.opset_import[:]
    copy.opset_import.extend(imports)
    return copy
