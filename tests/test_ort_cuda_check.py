"""benchmarks/ort_cuda_check.py's logic on the CPU: the same graph on both sides differs nowhere, a
planted difference is found at its node (not at the nodes after it), and a side that fails at a
node is cut there and the failing node named, with the shapes it was fed."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import helper as h  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ort_cuda_check.py"
CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("ort_cuda_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _graph(path, mul="Mul", shape=(3, 2)):
    """x [2, 3] -> add -> mul -> reshape(shape) -> matmul -> y; `mul` and `shape` plant a difference."""
    nodes = [h.make_node("Add", ["x", "one"], ["a"], name="add"),
             h.make_node(mul, ["a", "a"], ["b"], name="mul"),
             h.make_node("Reshape", ["b", "shape"], ["r"], name="reshape"),
             h.make_node("MatMul", ["r", "w"], ["y"], name="matmul")]
    inits = [onnx.numpy_helper.from_array(np.ones((1,), np.float32), "one"),
             onnx.numpy_helper.from_array(np.array(shape, np.int64), "shape"),
             onnx.numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=8), str(path))
    return str(path)


FEED = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}


@pytest.mark.parametrize("level", ["disabled", "all"])
def test_same_graph_differs_nowhere(check, tmp_path, level):
    path = _graph(tmp_path / "a.onnx")
    found = check.localise(path, path, FEED, CPU, CPU, level, 1e-6, lambda _: None)
    assert found.first is None and found.failure is None


def test_planted_difference_is_found_at_its_node(check, tmp_path):
    a, b = _graph(tmp_path / "a.onnx"), _graph(tmp_path / "b.onnx", mul="Sub")
    found = check.localise(a, b, FEED, CPU, CPU, "disabled", 1e-6, lambda _: None)
    assert (found.first.node, found.first.op_type, found.first.name) == ("mul", "Mul", "b")
    assert found.first.shape_a == (2, 3) and found.first.max_rel > 0.5
    assert found.failure is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]  # no leftovers


def test_failing_side_is_cut_before_the_failing_node(check, tmp_path):
    a, b = _graph(tmp_path / "a.onnx"), _graph(tmp_path / "b.onnx", shape=(4, 2))
    found = check.localise(a, b, FEED, CPU, CPU, "disabled", 1e-6, lambda _: None)
    assert found.first is None  # add and mul agree
    side, node, error = found.failure
    assert (side, node) == ("B", "reshape") and "Reshape" in error
    assert found.fed == ["b [2, 3] vs [2, 3]"]


def test_whole_run_on_an_export_folder(check, tiny_onnx, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    _, folder, _ = tiny_onnx(18)
    log = tmp_path / "check.log"
    assert check.main([folder, "--providers", CPU[0], CPU[0], "--generate", "--new-tokens", "4",
                       "--log", str(log)]) == 0
    table = capsys.readouterr().out.splitlines()
    rows = [r for r in table if r.startswith(("prefill", "decode_step"))]
    assert len(rows) == 6 and all(r.split()[2:4] == ["ok", "ok"] and r.endswith("none") for r in rows)
    assert sum("equal to side A" in r for r in table) == 2
    assert "node_Shape_0" in log.read_text()
