import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory):
    """tiny_onnx(opset) -> (model, folder, {graph: path}): the tiny preset model (seed 0) exported
    with its model.json, once per opset and session. From opset 27 on the weights go to the shared
    data file (threshold 0), so both layouts of an export folder are under test."""
    from mom_compile import MomConfig, MomForCausalLM
    from mom_compile.export.manifest import build_manifest, write_manifest
    from mom_compile.export.onnx_export import export_files, export_onnx
    from mom_compile.export.onnx_ops import LINEAR_ATTENTION_OPSET

    done = {}

    def export(opset: int):
        if opset not in done:
            torch.manual_seed(0)
            model = MomForCausalLM(MomConfig.preset("tiny")).eval()
            folder = str(tmp_path_factory.mktemp(f"onnx{opset}"))
            threshold = 0 if opset >= LINEAR_ATTENTION_OPSET else 1 << 30
            paths = export_onnx(model, folder, opset=opset, progress=lambda _: None,
                                external_data_bytes=threshold)
            write_manifest(folder, build_manifest(model.config, torch.float32, opset, False,
                                                  export_files(folder)))
            done[opset] = model, folder, paths
        return done[opset]

    return export


@pytest.fixture
def one_thread():
    """Training tests run on one intra-op thread: the CPU reference scan of many short segments
    slows down when two threads contend for two shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
