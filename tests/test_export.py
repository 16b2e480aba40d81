"""ONNX export of the tiny model at the default opset and at opset 27 (the standard
LinearAttention op): checker, onnxruntime parity at many shapes, left padding, decode steps fed
present -> past, the manifest, and the torch-free runtime vs generate."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
np = pytest.importorskip("numpy")

from mom_compile import MomForCausalLM  # noqa: E402
from mom_compile.export.manifest import build_manifest, write_manifest  # noqa: E402
from mom_compile.export.onnx_export import DEFAULT_OPSET, example_states, export_onnx, graph_specs  # noqa: E402
from mom_compile.export.onnx_ops import LINEAR_ATTENTION_OPSET  # noqa: E402
from mom_compile.export.runtime import OnnxGenerator  # noqa: E402
from mom_compile.graphs import MomConfig  # noqa: E402
from mom_compile.graphs.export_graphs import DecodeStepGraph, PrefillGraph  # noqa: E402

from models import tiny_model  # noqa: E402

ATOL = 2e-5


@pytest.fixture(scope="module", params=[DEFAULT_OPSET, LINEAR_ATTENTION_OPSET], ids=lambda v: f"opset{v}")
def opset(request):
    return request.param


@pytest.fixture(scope="module")
def exported(opset, tmp_path_factory):
    torch.manual_seed(0)
    model = MomForCausalLM(MomConfig.preset("tiny")).eval()
    folder = str(tmp_path_factory.mktemp(f"onnx{opset}"))
    paths = export_onnx(model, folder, opset=opset, progress=lambda _: None)
    write_manifest(folder, build_manifest(model.config, torch.float32, opset, False))
    sessions = {name: ort.InferenceSession(path, providers=["CPUExecutionProvider"])
                for name, path in paths.items()}
    return model, folder, paths, sessions


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)


def test_checker_and_standard_ops_only(exported):
    _, _, paths, _ = exported
    for path in paths.values():
        onnx.checker.check_model(path, full_check=True)
        model = onnx.load(path)
        assert {n.domain for n in _all_nodes(model.graph)} <= {"", "ai.onnx"}
        assert not model.functions
        values = [*model.graph.input, *model.graph.output]
        batch_axes = {v.type.tensor_type.shape.dim[0].dim_param for v in values}
        assert batch_axes == {"batch"}


@pytest.mark.parametrize("use_plugin", [False, True])
def test_every_inference_op_has_a_translation(use_plugin):
    """Every op of the op table that inference graphs can contain (all but the backward ops) has
    an ONNX translation, at both opsets."""
    from mom_compile.export.onnx_ops import translation_table
    from mom_compile.ops.table import OPS
    wanted = {op.op for op in OPS if not op.name.endswith("_backward")}
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


def test_float64_decode_step_computes_in_float64(tmp_path):
    """A float64 export computes in float64 throughout (the precision rule), so its decode step
    matches PyTorch to float64 rounding, far below float32's."""
    model = tiny_model(torch.float64)
    paths = export_onnx(model, str(tmp_path), opset=DEFAULT_OPSET, progress=lambda _: None)
    session = ort.InferenceSession(paths["decode_step"], providers=["CPUExecutionProvider"])
    spec = graph_specs(model.config)["decode_step"]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 1), generator=gen)
    past = example_states(model, 3, gen)
    with torch.no_grad():
        ref = DecodeStepGraph(model)(ids, past)
    got = session.run(None, dict(zip(spec.inputs, [ids.numpy(), *(t.numpy() for t in past)])))
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r.numpy(), atol=1e-11, rtol=1e-10)


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
    np.testing.assert_allclose(batch[0][0, 4:], alone[0][0], atol=ATOL)
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
    np.testing.assert_allclose(outputs[0], out.logits.numpy(), atol=ATOL)
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
