"""The exported graphs on onnxruntime's CUDA provider, where the installed onnxruntime has one
(onnxruntime-gpu): prefill and decode-step outputs against PyTorch, at opset 18 and at the newest
opset that onnxruntime runs, in float32 and float16, and OnnxGenerator's tokens on that provider
against MomForCausalLM.generate (states I/O-bound on the GPU), with the decode step also replayed
from onnxruntime's CUDA graphs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu: the CUDA libraries from torch's NVIDIA wheels
    ort.preload_dlls()

from mom_compile import MomConfig, MomForCausalLM  # noqa: E402
from mom_compile.export.__main__ import onnxruntime_max_opset  # noqa: E402
from mom_compile.export.manifest import build_manifest, write_manifest  # noqa: E402
from mom_compile.export.onnx_export import export_files, export_onnx, graph_specs  # noqa: E402
from mom_compile.export.runtime import OnnxGenerator, graph_session  # noqa: E402
from mom_compile.export.verify import TOLERANCE, compare_all  # noqa: E402

CUDA = "CUDAExecutionProvider"
pytestmark = pytest.mark.skipif(CUDA not in ort.get_available_providers(),
                                reason="needs onnxruntime's CUDA provider (onnxruntime-gpu)")
OPSETS = sorted({18, onnxruntime_max_opset(onnx.defs.onnx_opset_version()) or 18})


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """exports(opset, dtype) -> (model, folder): the tiny preset (seed 0) exported once each."""
    done = {}

    def export(opset: int, dtype: torch.dtype):
        if (opset, dtype) not in done:
            torch.manual_seed(0)
            model = MomForCausalLM(MomConfig.preset("tiny")).to(dtype).eval()
            folder = str(tmp_path_factory.mktemp(f"ort{opset}{str(dtype)[6:]}"))
            export_onnx(model, folder, opset=opset, progress=lambda _: None)
            write_manifest(folder, build_manifest(model.config, dtype, opset, False, export_files(folder)))
            done[opset, dtype] = model, folder
        return done[opset, dtype]

    return export


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("opset", OPSETS)
def test_graphs_on_the_cuda_provider_match_pytorch(exports, opset, dtype):
    model, folder = exports(opset, dtype)
    specs = graph_specs(model.config)

    def run(name, inputs):
        ids, second = inputs
        arrays = [second.numpy()] if name == "prefill" else [t.numpy() for t in second]
        # float32 MatMuls in float32, not TF32 (the provider's default), to hold float32's tolerance
        session = graph_session(f"{folder}/{name}.onnx", name, [(CUDA, {"use_tf32": 0})])
        assert session.get_providers()[0] == CUDA
        return session.run(None, dict(zip(specs[name].inputs, [ids.numpy(), *arrays])))

    worst = max(compare_all(model, run, seed=3), key=lambda e: e.max_rel)
    assert worst.max_rel <= TOLERANCE[dtype], worst


@pytest.mark.parametrize("opset", OPSETS)
def test_generator_on_the_cuda_provider_gives_generate_tokens(exports, opset):
    model, folder = exports(opset, torch.float32)
    prompt = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(prompt)
    mask[0, :4] = 0
    want = model.generate(prompt, attention_mask=mask, max_new_tokens=12)
    generator = OnnxGenerator(folder, providers=[(CUDA, {"use_tf32": 0})])
    assert generator.backend.device[0] == "cuda"  # the states stay on the GPU between steps
    got = generator.generate(prompt.numpy(), mask.numpy(), max_new_tokens=12)
    np.testing.assert_array_equal(got, want.numpy())


def test_generator_replaying_cuda_graphs_gives_generate_tokens(exports):
    """The decode step captured as CUDA graphs (one per state set): replayed again for a second
    prompt batch of the same size, captured anew when the batch size changes."""
    model, folder = exports(18, torch.float32)
    generator = OnnxGenerator(folder, providers=[(CUDA, {"use_tf32": 0, "enable_cuda_graph": "1"})])
    assert generator.backend.cuda_graph
    for batch, seed in ((3, 1), (3, 2), (2, 3), (3, 4)):
        gen = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, model.config.vocab_size, (batch, 9), generator=gen)
        want = model.generate(prompt, max_new_tokens=12)
        np.testing.assert_array_equal(generator.generate(prompt.numpy(), max_new_tokens=12), want.numpy())
