"""ONNX export of the tiny model at the default opset and at opset 27 (the standard
LinearAttention op; that folder keeps its weights in the shared data file): checker, no scatter,
onnxruntime parity at many shapes, left padding, decode steps fed present -> past, one copy of the
weights, the manifest and its validation, and the torch-free runtime (I/O-bound) vs generate and
vs plain session runs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
np = pytest.importorskip("numpy")

from mom_compile.export.manifest import MANIFEST_NAME, read_manifest  # noqa: E402
from mom_compile.export.onnx_export import (  # noqa: E402
    DEFAULT_OPSET,
    WEIGHTS_FILE,
    example_states,
    export_onnx,
    graph_specs,
)
from mom_compile.export.onnx_ops import LINEAR_ATTENTION_OPSET  # noqa: E402
from mom_compile.export.runtime import Generator, OnnxGenerator  # noqa: E402
from mom_compile.export.verify import TOLERANCE, compare_all  # noqa: E402
from mom_compile.graphs.export_graphs import DecodeStepGraph, PrefillGraph  # noqa: E402

from models import tiny_model  # noqa: E402

ATOL = 2e-5


@pytest.fixture(scope="module", params=[DEFAULT_OPSET, LINEAR_ATTENTION_OPSET], ids=lambda v: f"opset{v}")
def opset(request):
    return request.param


@pytest.fixture(scope="module")
def exported(opset, tiny_onnx):
    model, folder, paths = tiny_onnx(opset)
    sessions = {name: ort.InferenceSession(path, providers=["CPUExecutionProvider"])
                for name, path in paths.items()}
    return model, folder, paths, sessions


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)


SCATTERS = {"Scatter", "ScatterND", "ScatterElements"}


def test_checker_and_standard_ops_only(exported):
    _, _, paths, _ = exported
    for path in paths.values():
        onnx.checker.check_model(path, full_check=True)
        model = onnx.load(path)
        assert {n.domain for n in _all_nodes(model.graph)} <= {"", "ai.onnx"}
        # a scatter's result is undefined where its indices repeat (issue 15): none at all
        assert not SCATTERS & {n.op_type for n in _all_nodes(model.graph)}
        assert not model.functions
        values = [*model.graph.input, *model.graph.output]
        batch_axes = {v.type.tensor_type.shape.dim[0].dim_param for v in values}
        assert batch_axes == {"batch"}


def _fx_target(node) -> str:
    """The op a node was exported from, by torch.onnx's metadata ("" when not recorded)."""
    fx = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.fx_node"), "")
    return fx.split("target=", 1)[1].split("]", 1)[0] if "target=" in fx else ""


def test_no_translation_writes_silu_as_x_times_sigmoid_x(tiny_onnx):
    """The translations write silu without the pattern onnxruntime fuses into QuickGelu (why:
    `onnx_ops._silu`); only torch's own silu (the output gate, the MLP) has it. At the default
    opset: the conversion to later opsets drops the nodes' origin."""
    _, _, paths = tiny_onnx(DEFAULT_OPSET)
    for path in paths.values():
        nodes = list(_all_nodes(onnx.load(path).graph))
        made_by = {out: node for node in nodes for out in node.output}
        fused = [node for node in nodes if node.op_type == "Mul" and any(
            made_by.get(x) is not None and made_by[x].op_type == "Sigmoid" and made_by[x].input[0] == other
            for x, other in (node.input, node.input[::-1]))]
        assert fused, "no x * Sigmoid(x) at all: the model's silu is expected to be exported that way"
        assert {_fx_target(node) for node in fused} == {"torch.ops.aten.silu.default"}


JOINS = {f"torch.ops.aten.{name}.default" for name in ("cat", "pad", "constant_pad_nd")}


def test_the_model_concatenates_and_pads_no_int64_tensor(tiny_onnx):
    """The router builds each token's memory index in float and casts it last: onnxruntime's CUDA
    provider runs an int64 Pad on the CPU and, with memory reuse on, mishandles an int64 Concat.
    Checked on the nodes exported from torch's cat and pad (the
    translations' own Concats build shape and gather indices), at the default opset, where the
    nodes keep their origin."""
    _, _, paths = tiny_onnx(DEFAULT_OPSET)
    for path in paths.values():
        model = onnx.shape_inference.infer_shapes(onnx.load(path, load_external_data=False))
        types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
        joins = [node for node in _all_nodes(model.graph) if _fx_target(node) in JOINS]
        assert joins, "the router's pad is expected among the exported nodes"
        kinds = {node.name: types.get(node.output[0]) for node in joins}
        assert None not in kinds.values(), kinds  # every type inferred, so the check below can fail
        int64 = [name for name, kind in kinds.items() if kind == onnx.TensorProto.INT64]
        assert not int64, f"{os.path.basename(path)}: int64 {int64}"


def test_onnxruntime_fuses_every_norm_of_the_decode_step(tiny_onnx, tmp_path):
    """Each RMS norm (three a block, the final one) and the decode op's q and k L2 norms become
    one SimplifiedLayerNormalization node in onnxruntime's optimised decode graph: a provider pays
    for every node of a graph run once per token. Fails if a norm is written in a form
    onnxruntime does not fuse (x * rsqrt(...) is not)."""
    model, _, paths = tiny_onnx(DEFAULT_OPSET)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "decode_step.opt.onnx")
    ort.InferenceSession(paths["decode_step"], options, providers=["CPUExecutionProvider"])
    nodes = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    layers = model.config.num_hidden_layers
    assert nodes["SimplifiedLayerNormalization"] == 3 * layers + 1 + 2 * layers, nodes
    assert not {"Pow", "ReduceMean", "Sqrt"} & set(nodes), nodes  # what an unfused norm leaves


@pytest.mark.parametrize("use_plugin", [False, True])
def test_every_inference_op_has_a_translation(use_plugin):
    """Every op of the op table that inference graphs can contain has an ONNX translation, at both
    opsets: all but the training-only ops, the in-place memory_decode_ (export graphs hold a
    functional cache, which takes the functional memory_decode) and the eager-only ops, whose
    formulas are traced instead (an exported graph holding one would fail to translate)."""
    from mom_compile.export.onnx_ops import translation_table
    from mom_compile.ops.table import OPS
    wanted = {op.op for op in OPS if not (op.training_only or op.eager_only or op.name.endswith("_"))}
    for opset in (DEFAULT_OPSET, LINEAR_ATTENTION_OPSET):
        assert set(translation_table(opset, use_plugin)) == wanted


def _op_counts(path: str) -> Counter:
    return Counter(n.op_type for n in _all_nodes(onnx.load(path).graph))


def test_recurrence_is_linear_attention_from_opset_27(exported, opset):
    model, _, paths, _ = exported
    layers = model.config.num_hidden_layers
    for name, path in paths.items():
        assert {(o.domain, o.version) for o in onnx.load(path).opset_import} == {("", opset)}
        ops = _op_counts(path)
        if opset >= LINEAR_ATTENTION_OPSET:  # one node per layer: the padded segment grid, or one step
            assert (ops["LinearAttention"], ops["Scan"]) == (layers, 0)
        else:
            assert (ops["LinearAttention"], ops["Scan"]) == (0, layers if name == "prefill" else 0)


def test_float64_keeps_the_scan_at_opset_27(tmp_path):
    """LinearAttention takes no float64, so a float64 model keeps the scripted recurrence. (Not run
    here: onnxruntime 1.32 has no float64 Softplus kernel above opset 18.)"""
    model = tiny_model(torch.float64)
    paths = export_onnx(model, str(tmp_path), opset=LINEAR_ATTENTION_OPSET, progress=lambda _: None)
    for name, path in paths.items():
        onnx.checker.check_model(path, full_check=True)
        ops = _op_counts(path)
        assert ops["LinearAttention"] == 0
        assert ops["Scan"] == (model.config.num_hidden_layers if name == "prefill" else 0)


def test_float64_graphs_compute_in_float64(tmp_path):
    """A float64 export computes in float64 throughout (the precision rule), constants included, so
    both graphs match PyTorch to float64 rounding, far below float32's. Head size 12: its query
    scale 12^-1/2 is inexact in float32, so a scale (or a norm's 1e-6) rounded to float32, as an
    ONNX float attribute or a traced Python float is, shows."""
    model = tiny_model(torch.float64, head_dim=12)
    paths = export_onnx(model, str(tmp_path), opset=DEFAULT_OPSET, progress=lambda _: None)
    sessions = {name: ort.InferenceSession(path, providers=["CPUExecutionProvider"])
                for name, path in paths.items()}
    spec = graph_specs(model.config)["decode_step"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 5), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    got, ref = _prefill_both(model, sessions["prefill"], ids, mask)
    past = example_states(model, 3, gen)
    with torch.no_grad():
        ref = [*ref, *DecodeStepGraph(model)(ids[:, :1], past)]
    got += sessions["decode_step"].run(None, dict(zip(spec.inputs, [ids[:, :1].numpy(),
                                                                    *(t.numpy() for t in past)])))
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r.numpy(), atol=1e-13, rtol=1e-12)


def test_compare_all_fails_an_output_holding_a_nan_or_an_infinity():
    """The artefact under test replaced by PyTorch itself (error 0 everywhere) except one NaN in
    the prefill's logits and one infinity in a decode state: those two rows, and only they, have
    an infinite error (a NaN error would slip through every max over the rows)."""
    model = tiny_model(torch.float32)

    graphs = {"prefill": PrefillGraph(model), "decode_step": DecodeStepGraph(model)}

    def run(name, inputs):
        with torch.no_grad():
            outs = list(graphs[name](*inputs))
        outs[0 if name == "prefill" else 1].view(-1)[2] = float("nan" if name == "prefill" else "inf")
        return outs

    specs = graph_specs(model.config)
    rows = compare_all(model, run)
    assert [(r.graph, r.name) for r in rows if r.max_rel == float("inf")] == [
        ("prefill", specs["prefill"].outputs[0]), ("decode_step", specs["decode_step"].outputs[1])]
    assert sum(r.max_rel == 0.0 for r in rows) == len(rows) - 2


def test_float16_graphs_match_pytorch(tmp_path):
    """float16 exports (what the CUDA provider runs: it has no bfloat16 MatMul) against the float16
    model, here on the CPU provider, so that their types and roundings are checked without a GPU."""
    model = tiny_model(torch.float16)
    paths = export_onnx(model, str(tmp_path), opset=DEFAULT_OPSET, progress=lambda _: None)
    specs = graph_specs(model.config)

    def run(name, inputs):
        ids, second = inputs
        arrays = [second.numpy()] if name == "prefill" else [t.numpy() for t in second]
        session = ort.InferenceSession(paths[name], providers=["CPUExecutionProvider"])
        return session.run(None, dict(zip(specs[name].inputs, [ids.numpy(), *arrays])))

    worst = max(compare_all(model, run, seed=3), key=lambda e: e.max_rel)
    assert worst.max_rel <= TOLERANCE[torch.float16], worst


def _prefill_both(model, session, ids, mask):
    with torch.no_grad():
        ref = PrefillGraph(model)(ids, mask)
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    return got, ref


@pytest.mark.parametrize("batch,seq,pad", [(1, 1, 0), (1, 2, 0), (2, 8, 0), (3, 17, 6), (4, 3, 2),
                                           (1, 70, 0), (5, 1, 0)])
def test_prefill_parity(exported, batch, seq, pad):
    model, _, _, sessions = exported
    gen = torch.Generator().manual_seed(batch * 100 + seq)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    got, ref = _prefill_both(model, sessions["prefill"], ids, mask)
    assert len(got) == len(ref) == 1 + 2 * model.config.num_hidden_layers
    for g, r in zip(got, ref):
        assert g.shape == tuple(r.shape)
        np.testing.assert_allclose(g, r.numpy(), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("batch", [1, 4])
def test_decode_step_parity_from_random_state(exported, batch):
    model, _, _, sessions = exported
    specs = graph_specs(model.config)
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), generator=gen)
    past = example_states(model, batch, gen)
    with torch.no_grad():
        ref = DecodeStepGraph(model)(ids, past)
    got = sessions["decode_step"].run(None, dict(zip(specs["decode_step"].inputs,
                                                     [ids.numpy(), *(t.numpy() for t in past)])))
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r.numpy(), atol=ATOL, rtol=1e-4)


def test_left_padded_row_equals_row_alone(exported):
    model, _, _, sessions = exported
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    run = sessions["prefill"].run
    batch = run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    alone_ids = ids[:1, 4:].numpy()
    alone = run(None, {"input_ids": alone_ids, "attention_mask": np.ones_like(alone_ids)})
    np.testing.assert_allclose(batch[0][0], alone[0][0], atol=ATOL)  # the last position's logits
    for b, a in zip(batch[1:], alone[1:]):
        np.testing.assert_allclose(b[:1], a, atol=ATOL)


def test_decode_steps_fed_present_to_past(exported):
    model, _, _, sessions = exported
    config = model.config
    specs = graph_specs(config)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, config.vocab_size, (3, 6), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    steps = torch.randint(0, config.vocab_size, (3, 4), generator=gen)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        cache = out.past_key_values
        ref_logits = [model(steps[:, i:i + 1], past_key_values=cache).logits for i in range(steps.shape[1])]
    outputs = sessions["prefill"].run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    np.testing.assert_allclose(outputs[0], out.logits[:, -1:].numpy(), atol=ATOL)
    for i, ref in enumerate(ref_logits):
        feed = dict(zip(specs["decode_step"].inputs, [steps[:, i:i + 1].numpy(), *outputs[1:]]))
        outputs = sessions["decode_step"].run(None, feed)
        np.testing.assert_allclose(outputs[0], ref.numpy(), atol=ATOL)
    final = [t for layer in cache.layers for t in (layer.recurrent, layer.conv)]
    for g, r in zip(outputs[1:], final):
        np.testing.assert_allclose(g, r.numpy(), atol=ATOL)


def test_manifest_describes_the_graphs(exported):
    model, folder, paths, sessions = exported
    with open(os.path.join(folder, "model.json")) as f:
        manifest = json.load(f)
    for name, session in sessions.items():
        described = manifest["graphs"][name]
        assert [i["name"] for i in described["inputs"]] == [i.name for i in session.get_inputs()]
        assert [o["name"] for o in described["outputs"]] == [o.name for o in session.get_outputs()]
        for entry, actual in zip(described["inputs"], session.get_inputs()):
            assert len(entry["shape"]) == len(actual.shape)
            fixed = [d for d in entry["shape"] if isinstance(d, int) and d != 1]
            assert fixed == [d for d in actual.shape if isinstance(d, int) and d != 1]
    assert [s["present"].replace("present", "past") for s in manifest["state"]] == \
        [s["past"] for s in manifest["state"]]
    assert manifest["config"]["hidden_size"] == model.config.hidden_size


def _prompts(model, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :5] = 0
    return ids, mask


def test_runtime_greedy_tokens_match_generate(exported):
    model, folder, _, _ = exported
    ids, mask = _prompts(model, 11)
    ref = model.generate(ids, mask, max_new_tokens=40)
    got = OnnxGenerator(folder).generate(ids.numpy(), mask.numpy(), max_new_tokens=40)
    assert got.shape == (3, 47)
    np.testing.assert_array_equal(got, ref.numpy())


def test_one_runtime_serves_changing_batch_sizes(exported):
    """One OnnxGenerator, prompts of 3, 2, then 3 rows again (its states and bindings made anew on
    each change of size, kept while it repeats): every call gives generate's tokens."""
    model, folder, _, _ = exported
    generator = OnnxGenerator(folder)
    for rows, seed in ((3, 15), (2, 16), (2, 17), (3, 18)):
        ids, mask = _prompts(model, seed)
        ids, mask = ids[:rows], mask[:rows]
        got = generator.generate(ids.numpy(), mask.numpy(), max_new_tokens=9)
        np.testing.assert_array_equal(got, model.generate(ids, mask, max_new_tokens=9).numpy())


def test_runtime_sampling(exported):
    model, folder, _, _ = exported
    gen = OnnxGenerator(folder)
    ids, mask = _prompts(model, 12)
    a = gen.generate(ids.numpy(), mask.numpy(), max_new_tokens=12, do_sample=True, top_k=40,
                     top_p=0.9, temperature=0.8, seed=5)
    b = gen.generate(ids.numpy(), mask.numpy(), max_new_tokens=12, do_sample=True, top_k=40,
                     top_p=0.9, temperature=0.8, seed=5)
    np.testing.assert_array_equal(a, b)
    assert ((a >= 0) & (a < model.config.vocab_size)).all()
    greedy = gen.generate(ids.numpy(), mask.numpy(), max_new_tokens=12)
    top1 = gen.generate(ids.numpy(), mask.numpy(), max_new_tokens=12, do_sample=True, top_k=1, seed=1)
    np.testing.assert_array_equal(top1, greedy)


def test_runtime_names_a_bad_seed_and_an_unloadable_graph(exported, tmp_path):
    model, folder, _, _ = exported
    ids, mask = _prompts(model, 14)
    with pytest.raises(ValueError, match="seed: expected an integer >= 0 or None, got -1"):
        OnnxGenerator(folder).generate(ids.numpy(), mask.numpy(), max_new_tokens=2, do_sample=True, seed=-1)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    graph = copy / "prefill.onnx"
    graph.write_bytes(b"\xff" * graph.stat().st_size)  # the size model.json lists, not a graph
    with pytest.raises(ValueError, match="prefill.onnx: onnxruntime cannot load this graph"):
        OnnxGenerator(copy).generate(ids.numpy(), mask.numpy(), max_new_tokens=2)


def test_runtime_stops_at_eos(exported):
    model, folder, _, _ = exported
    ids, mask = _prompts(model, 13)
    greedy = OnnxGenerator(folder).generate(ids.numpy(), mask.numpy(), max_new_tokens=6)
    eos = int(greedy[0, 7])  # the first sequence's first new token
    out = OnnxGenerator(folder).generate(ids.numpy(), mask.numpy(), max_new_tokens=6,
                                         eos_token_id=eos, pad_token_id=0)
    ref = model.generate(ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(out, ref.numpy())


def test_runtime_runs_without_torch(exported):
    """examples/onnx_generate.py in a process where importing torch fails."""
    model, folder, _, _ = exported
    ids, mask = _prompts(model, 14)
    ref = model.generate(ids[:1, 3:], max_new_tokens=5, eos_token_id=model.config.eos_token_id)[0, 4:]
    blocker = "import sys, runpy; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; " \
              "runpy.run_path(sys.argv[0], run_name='__main__')"
    prompt = ",".join(str(i) for i in ids[0, 3:].tolist())
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "onnx_generate.py")
    run = subprocess.run([sys.executable, "-c", blocker, script, folder, "--prompt", prompt,
                          "--max-new-tokens", "5"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"{prompt.replace(',', ' ')} -> {' '.join(map(str, ref.tolist()))}"
    bad = subprocess.run([sys.executable, script, folder, "--prompt", prompt, "--max-new-tokens", "-1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--max-new-tokens: expected at least 0, got -1" in bad.stderr, bad.stderr


def _external_ranges(path: str) -> set[tuple[str, int, int]]:
    model = onnx.load(path, load_external_data=False)
    return {(info["location"], int(info["offset"]), int(info["length"]))
            for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
            for info in [{e.key: e.value for e in t.external_data}]}


def test_one_copy_of_the_weights(exported, opset):
    """Above the threshold (lowered to 0 for the opset-27 folder), both graphs read one data file,
    identical weights from the same byte range; below it they keep the weights inside."""
    model, folder, paths, _ = exported
    manifest = read_manifest(folder)
    on_disk = {f: os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f != MANIFEST_NAME}
    assert manifest["files"] == on_disk
    ranges = {name: _external_ranges(path) for name, path in paths.items()}
    if opset < LINEAR_ATTENTION_OPSET:
        assert set(on_disk) == {"prefill.onnx", "decode_step.onnx"}
        assert ranges == {"prefill": set(), "decode_step": set()}
        return
    assert set(on_disk) == {"prefill.onnx", "decode_step.onnx", WEIGHTS_FILE}
    assert {loc for r in ranges.values() for loc, _, _ in r} == {WEIGHTS_FILE}
    shared = ranges["prefill"] & ranges["decode_step"]
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert sum(length for _, _, length in shared) >= 0.9 * weight_bytes  # the weights, stored once
    assert on_disk[WEIGHTS_FILE] < 1.5 * weight_bytes  # a copy per graph would be twice the weights


class PlainBackend:
    """The graphs run the plain way, session.run with numpy feeds, as the reference for the I/O
    binding of OnnxBackend."""

    def __init__(self, folder: str) -> None:
        self.manifest = read_manifest(folder)
        self.sessions = {name: ort.InferenceSession(os.path.join(folder, graph["file"]),
                                                    providers=["CPUExecutionProvider"])
                         for name, graph in self.manifest["graphs"].items()}
        self.past = [s["past"] for s in self.manifest["state"]]

    def _run(self, name: str, feed: dict) -> np.ndarray:
        logits, *self.states = self.sessions[name].run(None, feed)
        return logits[:, -1]

    def prefill(self, input_ids, attention_mask):
        return self._run("prefill", {"input_ids": input_ids, "attention_mask": attention_mask})

    def step(self, input_ids):
        return self._run("decode_step", {"input_ids": input_ids, **dict(zip(self.past, self.states))})


def test_io_bound_states_equal_a_plain_run(exported):
    model, folder, _, _ = exported
    ids, mask = _prompts(model, 15)
    bound, plain = OnnxGenerator(folder).backend, PlainBackend(folder)
    np.testing.assert_array_equal(bound.prefill(ids.numpy(), mask.numpy()),
                                  plain.prefill(ids.numpy(), mask.numpy()))
    for i in range(5):
        step = ids[:, i:i + 1].numpy()
        np.testing.assert_array_equal(bound.step(step), plain.step(step))
    got = [Generator(backend).generate(ids.numpy(), mask.numpy(), max_new_tokens=16, do_sample=True,
                                       top_k=20, seed=4) for backend in (bound, plain)]
    np.testing.assert_array_equal(got[0], got[1])
    # and the sampled tokens are top_k tokens of the PyTorch model at their positions
    tokens = torch.from_numpy(got[0])
    full_mask = torch.cat([mask, torch.ones(3, 16, dtype=mask.dtype)], 1)
    with torch.no_grad():
        logits = model(tokens, attention_mask=full_mask).logits[:, ids.shape[1] - 1:-1]
    chosen = logits.gather(-1, tokens[:, ids.shape[1]:, None])
    assert ((logits > chosen + 1e-4).sum(-1) < 20).all()


@pytest.mark.parametrize("edit, error, match", [
    (lambda m: "{not json", ValueError, "model.json: not an export manifest: not valid JSON"),
    (lambda m: [1, 2], ValueError, "model.json: not an export manifest: expected a JSON object"),
    (lambda m: {**m, "format": "mom_compile.onnx/1"}, ValueError,
     "model.json: key 'format' is 'mom_compile.onnx/1', expected 'mom_compile.onnx/2'"),
    (lambda m: {k: v for k, v in m.items() if k != "files"}, ValueError,
     "model.json: not an export manifest: missing key 'files'"),
    (lambda m: {**m, "graphs": {**m["graphs"], "decode_step": {"inputs": []}}}, ValueError,
     "missing key 'graphs.decode_step.file'"),
    (lambda m: {**m, "state": [{**m["state"][0], "past": 3}]}, ValueError,
     "key 'state.0.past': expected a string, got 3"),
    (lambda m: {**m, "vocab_size": "256"}, ValueError, "key 'vocab_size': expected an integer"),
    (lambda m: {**m, "eos_token_id": "2"}, ValueError,
     "key 'eos_token_id': expected an integer or a list or null, got '2'"),
    (lambda m: {**m, "eos_token_id": [2, "x"]}, ValueError,
     r"key 'eos_token_id': expected an integer, a list of integers or null, got \[2, 'x'\]"),
    (lambda m: {**m, "files": {**m["files"], "gone.onnx": 5}}, FileNotFoundError,
     "gone.onnx: missing .model.json lists it."),
    (lambda m: {**m, "files": {**m["files"], "prefill.onnx": 5}}, ValueError,
     "prefill.onnx: .* bytes, model.json says 5"),
])
def test_a_folder_that_is_no_export_gets_one_clear_error(exported, tmp_path, edit, error, match):
    _, folder, _, _ = exported
    copy = shutil.copytree(folder, tmp_path / "copy")
    manifest = read_manifest(copy)
    edited = edit(manifest)
    (copy / MANIFEST_NAME).write_text(edited if isinstance(edited, str) else json.dumps(edited))
    with pytest.raises(error, match=match):
        OnnxGenerator(copy)




@pytest.mark.parametrize("single_set", [False, True])
def test_decode_translation_with_padding_rows(tmp_path, single_set):
    """The ONNX translation of the functional decode op against the op itself, on inputs the export
    graphs never produce: a padding token (every choice -1) and a single projection set."""
    from mom_compile.export.onnx_ops import translation_table
    from mom_compile.ops import memory_decode

    from inputs import decode_inputs

    args = decode_inputs(batch=3, h=2, dk=4, dv=3, dtype=torch.float32, single_set=single_set)
    args[0], args[1] = args[0].contiguous(), args[1].contiguous()  # graph inputs, not views

    class Decode(torch.nn.Module):
        def forward(self, *tensors):
            return memory_decode(*tensors[:6], None, *tensors[6:], 0.5, single_set)

    inputs = [a for i, a in enumerate(args) if i != 6]  # without the absent conv bias
    program = torch.onnx.export(Decode(), tuple(inputs), dynamo=True, optimize=False, verbose=False,
                                custom_translation_table=translation_table(DEFAULT_OPSET))
    path = str(tmp_path / "decode.onnx")
    program.save(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), inputs)})
    want = memory_decode(*args[:6], None, *args[7:], 0.5, single_set)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(g), w, rtol=1e-5, atol=1e-6)
    assert not torch.from_numpy(got[0])[-1].any()  # the padding token reads out 0


def test_dispatch_translation_with_choices_out_of_range(tmp_path):
    """The ONNX translation of dispatch against the op, on inputs the export graphs never produce:
    choices naming no memory in range, which the op places with the padding."""
    from mom_compile.export.onnx_ops import translation_table
    from mom_compile.ops import dispatch

    from inputs import op_inputs

    idx, mask, m = op_inputs("dispatch", torch.float32)[1]

    class Dispatch(torch.nn.Module):
        def forward(self, memory_idx, valid):
            return dispatch(memory_idx, valid, m)

    program = torch.onnx.export(Dispatch(), (idx, mask), dynamo=True, optimize=False, verbose=False,
                                custom_translation_table=translation_table(DEFAULT_OPSET))
    path = str(tmp_path / "dispatch.onnx")
    program.save(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {"memory_idx": idx.numpy(), "valid": mask.numpy()})
    for g, w in zip(got, dispatch(idx, mask, m), strict=True):
        assert g.tolist() == w.tolist()
