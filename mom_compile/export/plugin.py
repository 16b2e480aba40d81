"""The `mom::MemoryStep` custom-domain op of `--plugin` exports: its registered schema.

In a plugin export the recurrent memory step stays one node, `MemoryStep` in domain "mom", for a
TensorRT plugin (or any runtime kernel) to implement:

    MemoryStep(q [R, H, K], k [R, H, K], v [R, H, V], g [R, H], beta [R, H], state [R, H, K, V];
               scale: float) -> (o [R, H, V], new_state [R, H, K, V])
    S <- exp(g) S;  u = beta (v - S^T k);  S <- S + k u^T;  o = S^T (scale q)     (per row, head)

Registering the schema lets onnx.checker (full check, with shape inference) validate graphs that
contain the node. The same math as an ONNX function is `onnx_ops.MemoryStep`; `with_reference`
attaches it to a plugin graph so that onnxruntime can run it as a check.
"""
from __future__ import annotations

import onnx
from onnx import defs

DOMAIN = "mom"
OP_TYPE = "MemoryStep"
VERSION = 1


def _infer_shapes(ctx) -> None:
    """o takes v's type and shape; new_state takes state's."""
    ctx.set_output_type(0, ctx.get_input_type(2))
    ctx.set_output_type(1, ctx.get_input_type(5))


def memory_step_schema() -> defs.OpSchema:
    T = "T"
    formal = defs.OpSchema.FormalParameter
    schema = defs.OpSchema(
        OP_TYPE, DOMAIN, VERSION,
        doc=__doc__,
        inputs=[formal("q", T, "queries [R, H, K]"), formal("k", T, "keys [R, H, K]"),
                formal("v", T, "values [R, H, V]"), formal("g", T, "log decay [R, H], <= 0"),
                formal("beta", T, "write strength [R, H]"),
                formal("state", T, "memory states [R, H, K, V]")],
        outputs=[formal("o", T, "read-out [R, H, V]"), formal("new_state", T, "[R, H, K, V]")],
        type_constraints=[(T, ["tensor(float)", "tensor(double)"], "the state's type")],
        attributes=[defs.OpSchema.Attribute("scale", defs.OpSchema.AttrType.FLOAT, "query scale")],
    )
    if hasattr(schema, "set_type_and_shape_inference_function"):
        schema.set_type_and_shape_inference_function(_infer_shapes)
    return schema


def register_schema() -> None:
    """Make onnx aware of mom::MemoryStep (idempotent)."""
    if not defs.has(OP_TYPE, DOMAIN):
        defs.register_schema(memory_step_schema())


def with_reference(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a plugin graph in which MemoryStep nodes are replaced by the ONNX function of
    the same math (inlined), so that stock onnxruntime runs it."""
    from . import onnx_ops

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    function = onnx_ops.MemoryStep.to_function_proto()
    model_opset = next(o.version for o in copy.opset_import if o.domain == "")
    for imported in function.opset_import:  # same op semantics, the model's version (see onnx_export)
        if imported.domain == "":
            imported.version = model_opset
    copy.functions.append(function)
    copy = onnx.inliner.inline_local_functions(copy)
    del copy.functions[:]
    imports = [o for o in copy.opset_import if o.domain != DOMAIN]
    del copy.opset_import[:]
    copy.opset_import.extend(imports)
    return copy
