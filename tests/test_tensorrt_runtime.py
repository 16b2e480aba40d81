"""The TensorRT path around the engines, without TensorRT:
- `--tensorrt` where TensorRT is missing: one error line naming what to install, exit 1, and no
  output folder; the engine flags without --tensorrt;
- the engines' optimisation profiles from model.json, and the prefill batch TopK allows;
- TensorRTBackend's binding (one set of state buffers, bound as past.X and present.X alike; prefill
  in slices of rows at their offsets; last-position logits) over stand-ins for the GPU and the
  engines (a host heap, and onnxruntime running the standard graphs on the heap's tensors),
  through the shared generation loop, token for token against OnnxGenerator.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil

import pytest
import torch

np = pytest.importorskip("numpy")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from test_export_cli import assert_one_line_error, cli  # noqa: E402

from mom_compile.export import tensorrt_runtime  # noqa: E402
from mom_compile.export.runtime import Generator, OnnxBackend, OnnxGenerator  # noqa: E402
from mom_compile.export.tensorrt_engine import TOPK_LIMIT, prefill_batch, profiles  # noqa: E402
from mom_compile.export.tensorrt_runtime import (  # noqa: E402
    TensorRTBackend,
    read_engine_manifest,
    to_float32,
)
from mom_compile.graphs import MomConfig  # noqa: E402


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_cli_without_tensorrt_says_what_to_install(tmp_path):
    out = tmp_path / "new" / "engines"
    result = cli("--tensorrt", str(out))
    assert_one_line_error(result, 1, "--tensorrt", "TensorRT is not installed", "pip install",
                          "--onnx exports need nothing more")
    assert not (tmp_path / "new").exists()
    assert os.listdir(tmp_path) == []  # no staging folder left beside OUT either


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_runtime_without_tensorrt_says_what_to_install(exported, tmp_path, monkeypatch):
    monkeypatch.setattr(tensorrt_runtime, "read_engine_manifest", lambda folder: {})  # a valid folder
    with pytest.raises(ImportError, match=r"running TensorRT engines needs TensorRT: pip install "
                                          r"'tensorrt>=10.9' cuda-python"):
        TensorRTBackend(exported[1])


def test_engine_flags_need_tensorrt(tmp_path):
    assert_one_line_error(cli("--onnx", str(tmp_path), "--max-batch", "4"), 1, "--max-batch", "--tensorrt")
    assert_one_line_error(cli("--onnx", str(tmp_path), "--dtype", "bfloat16"), 1, "bfloat16", "--tensorrt")
    assert_one_line_error(cli("--onnx", str(tmp_path), "--tensorrt", str(tmp_path)), 2, "not allowed with")


@pytest.fixture(scope="module")
def exported(tiny_onnx):
    model, folder, _ = tiny_onnx(18)
    return model, folder


def test_prefill_batch_keeps_topk_within_tensorrts_limit():
    config = MomConfig.preset("tiny")
    routed = config.topk + 1  # the tiny preset has a shared memory
    b = prefill_batch(config, 8, 512)
    assert b * 512 * routed <= TOPK_LIMIT and (b == 8 or (b + 1) * 512 * routed > TOPK_LIMIT)
    assert prefill_batch(config, 1, TOPK_LIMIT // routed) == 1
    with pytest.raises(ValueError, match=f"--max-seq: at most {TOPK_LIMIT // routed}"):
        prefill_batch(config, 1, TOPK_LIMIT // routed + 1)


def test_profiles_cover_every_graph_input(exported):
    _, folder = exported
    manifest = json.loads(open(os.path.join(folder, "model.json")).read())
    shapes = profiles(manifest, max_batch=8, rows=2, max_seq=512)
    for graph, spec in manifest["graphs"].items():
        assert list(shapes[graph]) == [t["name"] for t in spec["inputs"]]
    assert shapes["prefill"]["input_ids"] == [[1, 1], [2, 512], [2, 512]]
    assert shapes["decode_step"]["input_ids"] == [[1, 1], [8, 1], [8, 1]]
    state = manifest["state"][0]
    assert shapes["decode_step"][state["past"]] == [[b, *state["shape"][1:]] for b in (1, 8, 8)]


def test_bfloat16_logits_come_down_as_float32():
    values = np.array([1.0, -2.5, 3.140625, 0.0], dtype=np.float32)
    raw = (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    assert np.array_equal(to_float32(raw, "bfloat16"), values)
    assert np.array_equal(to_float32(values.astype(np.float16).view(np.uint8), "float16"), values)


# -- TensorRTBackend over stand-ins -------------------------------------------------------------
class HostHeap:
    """Device memory stand-in: pointers are offsets into one host array; every access must lie
    inside a live allocation, so a wrong offset or size fails instead of reading a neighbour."""

    def __init__(self, nbytes: int = 1 << 24) -> None:
        self.heap = np.full(nbytes, 0xFF, dtype=np.uint8)  # NaN-ish garbage where nothing was written
        self.top, self.live = 256, {}

    def alloc(self, nbytes: int) -> int:
        ptr = self.top
        self.top += -(-nbytes // 256) * 256
        assert self.top <= self.heap.size
        self.live[ptr] = nbytes
        return ptr

    def free(self, ptr: int) -> None:
        del self.live[ptr]

    def span(self, ptr: int, nbytes: int) -> np.ndarray:
        assert any(base <= ptr and ptr + nbytes <= base + size for base, size in self.live.items()), \
            f"[{ptr}, {ptr + nbytes}) is outside every buffer"
        return self.heap[ptr:ptr + nbytes]

    def upload(self, ptr: int, array: np.ndarray) -> None:
        raw = np.ascontiguousarray(array).view(np.uint8).ravel()
        self.span(ptr, raw.size)[:] = raw

    def download(self, ptr: int, nbytes: int) -> np.ndarray:
        return self.span(ptr, nbytes).copy()

    def execute(self, context) -> None:
        context.run(self)


class OrtContext:
    """Execution context stand-in: onnxruntime runs the graph on the tensors at the bound
    addresses, with the shapes set for the inputs; it records the addresses of every run."""

    def __init__(self, path: str, spec: dict) -> None:
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.spec, self.shapes, self.addresses, self.runs = spec, {}, {}, []

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def run(self, heap: HostHeap) -> None:
        def view(name, shape, dtype):
            return heap.span(self.addresses[name], math.prod(shape) * np.dtype(dtype).itemsize).view(dtype)

        self.runs.append(dict(self.addresses))
        shapes = {name: self.shapes[name] for name in (t["name"] for t in self.spec["inputs"])}
        feed = {t["name"]: view(t["name"], shapes[t["name"]], t["dtype"]).reshape(shapes[t["name"]]).copy()
                for t in self.spec["inputs"]}
        outputs = self.session.run([t["name"] for t in self.spec["outputs"]], feed)
        for t, value in zip(self.spec["outputs"], outputs):
            view(t["name"], value.shape, value.dtype)[:] = value.ravel()


def stand_in_backend(folder, prefill_rows: int = 2) -> TensorRTBackend:
    manifest = json.loads(open(os.path.join(folder, "model.json")).read())
    manifest["tensorrt"] = {"max_batch": 4, "max_seq": 32, "prefill_batch": prefill_rows,
                            "state_in_place": True, "engines": {}, "version": "stand-in"}
    contexts = {graph: OrtContext(os.path.join(folder, spec["file"]), spec)
                for graph, spec in manifest["graphs"].items()}
    backend = TensorRTBackend.__new__(TensorRTBackend)  # no engines to load: the binding logic only
    backend._start(manifest, contexts, HostHeap())
    return backend


def prompts(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(0, vocab, (3, 9), generator=gen).numpy()
    mask = np.ones_like(ids)
    mask[0, :4] = 0  # left padding in the row of the first prefill slice
    mask[2, :2] = 0  # and in the second slice
    return ids, mask


def test_backend_logits_match_onnxruntime(exported):
    _, folder = exported
    backend, reference = stand_in_backend(folder), OnnxBackend(folder)
    ids, mask = prompts(backend.vocab)
    np.testing.assert_allclose(backend.prefill(ids, mask), reference.prefill(ids, mask), rtol=1e-6, atol=1e-6)
    for step in range(4):
        next_ids = np.arange(3, dtype=np.int64)[:, None] * 7 + step
        np.testing.assert_allclose(backend.step(next_ids), reference.step(next_ids), rtol=1e-5, atol=1e-6)
    for run in backend.contexts["decode_step"].runs:  # every step reads and writes the one state set
        assert [run[s["past"]] for s in backend.states] == [run[s["present"]] for s in backend.states] \
            == backend.buffers


@pytest.mark.parametrize("prefill_rows", [1, 2, 4])
def test_generation_through_the_shared_loop_matches_onnx_generator(exported, prefill_rows):
    _, folder = exported
    ids, mask = prompts(json.loads(open(os.path.join(folder, "model.json")).read())["vocab_size"])
    expected = OnnxGenerator(folder).generate(ids, mask, max_new_tokens=10)
    backend = stand_in_backend(folder, prefill_rows=prefill_rows)
    got = Generator(backend).generate(ids, mask, max_new_tokens=10)
    assert np.array_equal(got, expected)


def test_backend_refuses_what_the_engines_cannot_take(exported, tmp_path):
    _, folder = exported
    backend = stand_in_backend(folder)
    with pytest.raises(RuntimeError, match="call prefill first"):
        backend.step(np.zeros((2, 1), dtype=np.int64))
    backend.prefill(np.zeros((3, 2), dtype=np.int64), np.ones((3, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"input_ids: expected \[3, 1\], one id for each of the prefilled"):
        backend.step(np.zeros((2, 1), dtype=np.int64))
    with pytest.raises(ValueError, match="batch <= 4 and seq <= 32"):
        backend.prefill(np.zeros((5, 3), dtype=np.int64), np.ones((5, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="no TensorRT engines"):
        TensorRTBackend(folder)


def test_engine_manifest_is_checked(exported, tmp_path):
    _, folder = exported
    copy = shutil.copytree(folder, tmp_path / "engines")
    manifest = json.loads((copy / "model.json").read_text())
    section = {"max_batch": 4, "max_seq": 32, "prefill_batch": 2, "engines": {}, "state_in_place": True}
    for broken, message in (({k: v for k, v in section.items() if k != "max_seq"}, "'tensorrt.max_seq'"),
                            (dict(section, max_batch="4"), "'tensorrt.max_batch': expected an integer"),
                            (dict(section, state_in_place=False), "state_in_place")):
        (copy / "model.json").write_text(json.dumps(dict(manifest, tensorrt=broken)))
        with pytest.raises(ValueError, match=message):
            read_engine_manifest(str(copy))
    (copy / "model.json").write_text(json.dumps(dict(manifest, tensorrt=section)))
    assert read_engine_manifest(str(copy))["tensorrt"] == section


def test_cli_records_the_engines_in_model_json(tmp_path, monkeypatch, capsys):
    """--tensorrt end to end with the engine build stubbed (no TensorRT here): the plugin-mode
    export, the engines published with the graphs, and model.json's `tensorrt` section and file
    list, which the TensorRT runtime's manifest check accepts."""
    from mom_compile.export import __main__ as cli_main
    from mom_compile.export import tensorrt_engine

    def build_engines(out_dir, manifest, config, max_batch, max_seq, progress=print):
        assert manifest["plugin"] and (max_batch, max_seq) == (3, 64)
        paths = [os.path.join(out_dir, name) for name in tensorrt_engine.ENGINE_FILES.values()]
        for path in paths:
            with open(path, "wb") as f:
                f.write(b"engine " + path.encode())
        section = {"max_batch": max_batch, "max_seq": max_seq, "engines": {}, "state_in_place": True,
                   "prefill_batch": prefill_batch(config, max_batch, max_seq)}
        return section, paths

    monkeypatch.setattr(tensorrt_engine, "build_problem", lambda: None)
    monkeypatch.setattr(tensorrt_engine, "build_engines", build_engines)
    out = tmp_path / "trt"
    too_long = str(TOPK_LIMIT)
    assert cli_main.main(["--tensorrt", str(out), "--max-seq", too_long]) == 1
    assert "--max-seq: at most" in capsys.readouterr().err and not out.exists()
    assert cli_main.main(["--tensorrt", str(out), "--max-batch", "3", "--max-seq", "64"]) == 0
    manifest = read_engine_manifest(str(out))
    assert manifest["plugin"] and manifest["tensorrt"]["max_batch"] == 3
    assert set(tensorrt_engine.ENGINE_FILES.values()) < set(manifest["files"])
