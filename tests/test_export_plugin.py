"""--plugin exports: the recurrent step is a mom::MemoryStep node with a registered schema, also
at opsets that have the standard LinearAttention op."""
from __future__ import annotations

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
np = pytest.importorskip("numpy")

from mom_compile import MomForCausalLM  # noqa: E402
from mom_compile.export import plugin  # noqa: E402
from mom_compile.export.onnx_export import DECODE, DEFAULT_OPSET, PREFILL, export_onnx  # noqa: E402
from mom_compile.export.onnx_ops import LINEAR_ATTENTION_OPSET  # noqa: E402
from mom_compile.export.verify import verify  # noqa: E402
from mom_compile.graphs import MomConfig  # noqa: E402


@pytest.fixture(scope="module", params=[DEFAULT_OPSET, LINEAR_ATTENTION_OPSET], ids=lambda v: f"opset{v}")
def exported(request, tmp_path_factory):
    torch.manual_seed(1)
    model = MomForCausalLM(MomConfig.preset("tiny")).eval()
    folder = str(tmp_path_factory.mktemp("plugin"))
    return model, export_onnx(model, folder, opset=request.param, use_plugin=True, progress=lambda _: None)


def _memory_steps(graph):
    found = []
    for node in graph.node:
        if node.op_type == plugin.OP_TYPE:
            found.append(node)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found += _memory_steps(attr.g)
    return found


def test_decode_graph_has_one_memory_step_per_layer(exported):
    model, paths = exported
    config = model.config
    decoded = onnx.load(paths[DECODE])
    nodes = _memory_steps(decoded.graph)
    assert len(nodes) == config.num_hidden_layers
    for node in nodes:
        assert node.domain == plugin.DOMAIN
        assert len(node.input) == 6 and len(node.output) == 2
        (scale,) = [a for a in node.attribute if a.name == "scale"]
        assert scale.f == pytest.approx(config.head_dim ** -0.5)
    assert {(o.domain, o.version) for o in decoded.opset_import} >= {(plugin.DOMAIN, plugin.VERSION)}
    assert not decoded.functions  # the body is the plugin's business


def test_prefill_scan_body_uses_memory_step(exported):
    model, paths = exported
    assert len(_memory_steps(onnx.load(paths[PREFILL]).graph)) == model.config.num_hidden_layers


def test_no_scatter(exported):
    """No scatter in plugin graphs either (a scatter is undefined where its indices repeat)."""
    _, paths = exported
    for path in paths.values():
        ops = {n.op_type for n in onnx.load(path).graph.node}
        assert not {"Scatter", "ScatterND", "ScatterElements"} & ops


def test_schema_shapes_and_full_check(exported):
    _, paths = exported
    plugin.register_schema()
    assert onnx.defs.has(plugin.OP_TYPE, plugin.DOMAIN)
    for path in paths.values():
        onnx.checker.check_model(path, full_check=True)
    # shape inference through the schema: o takes v's shape, new_state takes state's
    f32 = onnx.TensorProto.FLOAT
    shapes = {"q": [5, 2, 16], "k": [5, 2, 16], "v": [5, 2, 8], "g": [5, 2], "beta": [5, 2],
              "state": [5, 2, 16, 8]}
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node(plugin.OP_TYPE, list(shapes), ["o", "s"], domain=plugin.DOMAIN, scale=0.25)],
        "one_step", [onnx.helper.make_tensor_value_info(n, f32, s) for n, s in shapes.items()],
        [onnx.helper.make_tensor_value_info(name, f32, None) for name in ("o", "s")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18),
                                                         onnx.helper.make_opsetid(plugin.DOMAIN, 1)])
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    dims = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in inferred.graph.output}
    assert dims == {"o": [5, 2, 8], "s": [5, 2, 16, 8]}


def test_plugin_graph_with_reference_matches_pytorch(exported):
    model, paths = exported
    rows = verify(model, paths, use_plugin=True, seed=4)
    assert max(r.max_rel for r in rows) < 1e-4
