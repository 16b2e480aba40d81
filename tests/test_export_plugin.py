"""Plugin-mode exports: each decode step's `mom::memory_decode` is a `memory_decode_conv` node feeding
a `memory_decode_step` node, which match the TensorRT plugins' registration (tensorrt_plugin.py)
exactly: op type, domain and namespace, attributes, input and output dtypes and shapes; the
prefill graph is standard ONNX; with the standard translation inlined, the plugin graphs match
PyTorch."""
from __future__ import annotations

import os

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
np = pytest.importorskip("numpy")

from mom_compile import MomForCausalLM  # noqa: E402
from mom_compile.export import plugin, tensorrt_plugin  # noqa: E402
from mom_compile.export.onnx_export import DECODE, DEFAULT_OPSET, PREFILL, export_onnx  # noqa: E402
from mom_compile.export.onnx_ops import LINEAR_ATTENTION_OPSET  # noqa: E402
from mom_compile.export.tensorrt_plugin import CONV, PLUGINS, STEP  # noqa: E402
from mom_compile.export.verify import tolerance, verify  # noqa: E402
from mom_compile.graphs import MomConfig  # noqa: E402

ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
               onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT64: "int64"}
CASES = [(DEFAULT_OPSET, torch.float32), (LINEAR_ATTENTION_OPSET, torch.float16)]
# the plugins' inputs at batch 3, H = 2, K = 16, V = 8, 3 choices of 5 slots, conv width 4
SHAPES = {CONV.name: {"q": (3, 32), "per_set": (3, 5, 52), "memory_idx": (3, 3), "a_log": (2,),
                      "dt_bias": (2,), "conv_w": (80, 4), "conv_b": (80,), "conv_src": (3, 5, 3, 80)},
          STEP.name: {"memory_idx": (3, 3), "qkv": (3, 3, 2, 40), "beta_g": (3, 3, 2, 2),
                      "rec_src": (3, 5, 2, 16, 8)}}
# their outputs, by hand: the conv table, q|k|v [B, k', H, 2K + V], beta|g [B, k', H, 2]; the
# recurrent table and o [B, k', H, V]
OUTPUT_SHAPES = {CONV.name: [(3, 5, 3, 80), (3, 3, 2, 40), (3, 3, 2, 2)],
                 STEP.name: [(3, 5, 2, 16, 8), (3, 3, 2, 8)]}


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"opset{c[0]}-{str(c[1])[6:]}")
def exported(request, tmp_path_factory):
    opset, dtype = request.param
    torch.manual_seed(1)
    model = MomForCausalLM(MomConfig.preset("tiny")).to(dtype).eval()
    folder = str(tmp_path_factory.mktemp("plugin"))
    return model, export_onnx(model, folder, opset=opset, use_plugin=True, progress=lambda _: None)


def test_decode_graph_has_one_plugin_pair_per_layer(exported):
    model, paths = exported
    decoded = onnx.load(paths[DECODE])
    pairs = plugin.decode_pairs(decoded.graph)
    assert len(pairs) == model.config.num_hidden_layers
    assert {n.op_type for n in decoded.graph.node if n.domain} == {CONV.name, STEP.name}
    assert {(o.domain, o.version) for o in decoded.opset_import} == {("", next(
        o.version for o in decoded.opset_import if o.domain == "")), (plugin.DOMAIN, plugin.VERSION)}
    assert not decoded.functions


def _types(graph: onnx.GraphProto) -> dict:
    types = {v.name: v.type.tensor_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({t.name: onnx.helper.make_tensor_type_proto(t.data_type, t.dims).tensor_type
                  for t in graph.initializer})
    return types


def test_nodes_match_the_registration(exported):
    """Op type, domain, attributes (exactly the registered ones and the parser's plugin_namespace and
    aot), and every input's and output's dtype and rank, against tensorrt_plugin's contract."""
    model, paths = exported
    config = model.config
    activation = str(model.lm_head.weight.dtype).removeprefix("torch.")
    plugin.register_schemas()
    graph = onnx.shape_inference.infer_shapes(onnx.load(paths[DECODE]), strict_mode=True).graph
    types = _types(graph)
    expected = {CONV: {"single_set": int(config.single_kv_proj)}, STEP: {"scale": config.head_dim ** -0.5}}
    for conv, step in plugin.decode_pairs(graph):
        for node, spec in ((conv, CONV), (step, STEP)):
            assert (node.domain, node.op_type) == (tensorrt_plugin.NAMESPACE, spec.name)
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attributes.pop("plugin_namespace") == tensorrt_plugin.NAMESPACE.encode()
            assert attributes.pop("aot") == 1
            assert attributes == pytest.approx(expected[spec])
            assert (len(node.input), len(node.output)) == (len(spec.inputs), len(spec.outputs))
            for port, name in zip([*spec.inputs, *spec.outputs], [*node.input, *node.output]):
                dtype = ONNX_DTYPES[types[name].elem_type]
                assert dtype == tensorrt_plugin.port_dtype(port, activation), port.name
            outputs = [len(types[name].shape.dim) for name in node.output]
            assert outputs == [len(s) for s in spec.output_shapes(
                {p.name: (1,) * len(types[name].shape.dim) for p, name in zip(spec.inputs, node.input)})]
        # the state tables in and out are the graph's past and present: bound to one buffer
        for spec, node in ((CONV, conv), (STEP, step)):
            (out, src), = spec.in_place.items()
            names = plugin.values(node, spec)
            assert names[src].startswith("past.") and names[out] == names[src].replace("past.", "present.")


def test_prefill_graph_is_standard(exported):
    _, paths = exported
    prefill = onnx.load(paths[PREFILL])
    assert not [n for n in prefill.graph.node if n.domain]
    assert {o.domain for o in prefill.opset_import} == {""}


def test_no_scatter(exported):
    """No scatter in plugin graphs either (a scatter is undefined where its indices repeat)."""
    _, paths = exported
    for path in paths.values():
        ops = {n.op_type for n in onnx.load(path).graph.node}
        assert not {"Scatter", "ScatterND", "ScatterElements"} & ops


@pytest.mark.parametrize("spec", PLUGINS, ids=lambda p: p.name)
def test_schema_infers_the_contracts_outputs(spec):
    """onnx shape inference through a registered schema gives the contract's output shapes, and
    dtypes by kind, for a float16 model."""
    plugin.register_schemas()
    onnx_types = {"float16": onnx.TensorProto.FLOAT16, "float32": onnx.TensorProto.FLOAT,
                  "int64": onnx.TensorProto.INT64}
    shapes = SHAPES[spec.name]
    inputs = [onnx.helper.make_tensor_value_info(p.name, onnx_types[tensorrt_plugin.port_dtype(p, "float16")],
                                                 shapes[p.name]) for p in spec.inputs]
    outputs = [p.name for p in spec.outputs]
    attributes = {"single_set": 0} if spec is CONV else {"scale": 0.25}
    node = onnx.helper.make_node(spec.name, [p.name for p in spec.inputs], outputs, domain=plugin.DOMAIN,
                                 **plugin.node_attributes(spec, **attributes))
    graph = onnx.helper.make_graph([node], "one", inputs,
                                   [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None)
                                    for n in outputs])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18),
                                                         onnx.helper.make_opsetid(plugin.DOMAIN, 1)])
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.output
    assert len(inferred) == len(OUTPUT_SHAPES[spec.name])
    for out, port, shape in zip(inferred, spec.outputs, OUTPUT_SHAPES[spec.name]):
        assert [d.dim_value for d in out.type.tensor_type.shape.dim] == list(shape)
        assert ONNX_DTYPES[out.type.tensor_type.elem_type] == tensorrt_plugin.port_dtype(port, "float16")
    with pytest.raises(ValueError, match="expected attributes"):
        plugin.node_attributes(spec, other=1)


def test_plugin_graph_with_reference_matches_pytorch(exported, tmp_path):
    """Also with the weights in an external file, read by onnxruntime from disk, never loaded into
    the rewritten graph (a protobuf holds at most 2 GiB: the 340m preset in float32 is more);
    the rewritten graph is gone afterwards."""
    model, paths = exported
    rows = verify(model, paths, use_plugin=True, seed=4)
    assert max(r.max_rel for r in rows) < tolerance(model.lm_head.weight.dtype)
    external = {}
    for name, path in paths.items():
        external[name] = str(tmp_path / os.path.basename(path))
        onnx.save(onnx.load(path), external[name], save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{name}.weights")
    loads, real = [], onnx.load

    def load(path, **kwargs):
        loads.append((str(path), kwargs.get("load_external_data", True)))
        return real(path, **kwargs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx, "load", load)
        again = verify(model, external, use_plugin=True, seed=4)
    tested = [flag for path, flag in loads if path in external.values()]
    assert len(tested) == len(external) and not any(tested)
    assert [r.max_rel for r in again] == [r.max_rel for r in rows]
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(p) for p in external.values()] +
                                                  [f"{name}.weights" for name in external])
