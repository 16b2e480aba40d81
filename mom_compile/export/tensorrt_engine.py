"""TensorRT engines of an export folder (`python -m mom_compile.export --tensorrt OUT`).

    decode_step.engine  the plugin-mode decode graph: each layer's memory update is the two AOT
                        plugins of tensorrt_plugin.py, their Triton kernels compiled for this GPU
                        during the build; its present.X must be bound to past.X's buffer
    prefill.engine      the standard prefill graph: the chunked scan as plain ONNX ops (a Scan over
                        the longest segment), no plugin

Each engine has one optimisation profile: batch 1..max_batch (decode), 1..prefill_batch and seq
1..max_seq (prefill), optimised for the largest shapes. The prefill graph sorts its routed tokens
with one TopK, and TensorRT's TopK takes at most 3840 keys, so prefill_batch * max_seq *
(topk + shared memory) stays within that; the runtime prefills a larger batch in slices of rows.
The networks are strongly typed (TensorRT 11 builds no other kind): every dtype is the graph's.
The manifest's `tensorrt` section records the engines, their profiles and `state_in_place`.
"""
from __future__ import annotations

import os

TOPK_LIMIT = 3840  # keys one TensorRT TopK layer takes
ENGINE_FILES = {"decode_step": "decode_step.engine", "prefill": "prefill.engine"}
MIN_VERSION = "10.9"


def build_problem() -> str | None:
    """Why engines cannot be built here (TensorRT, triton for the plugins' kernels, a CUDA GPU), or
    None."""
    try:
        import tensorrt
        import tensorrt.plugin
    except ImportError:
        return (f"TensorRT is not installed: pip install 'tensorrt>={MIN_VERSION}' (the --onnx exports "
                "need nothing more)")
    if not hasattr(tensorrt.plugin, "aot_impl"):
        return (f"TensorRT {tensorrt.__version__} has no ahead-of-time plugins: pip install "
                f"'tensorrt>={MIN_VERSION}'")
    try:
        import triton  # noqa: F401
    except ImportError:
        return "the plugins' kernels need triton: pip install 'triton>=3.6'"
    import torch

    if not torch.cuda.is_available():
        return "building engines needs a CUDA GPU"
    return None


def prefill_batch(config, max_batch: int, max_seq: int) -> int:
    """Rows one prefill run takes: every routed token of the batch is one key of a TopK."""
    per_row = max_seq * config.chosen_memories
    if per_row > TOPK_LIMIT:
        raise ValueError(f"--max-seq: at most {TOPK_LIMIT // config.chosen_memories} for this model "
                         f"(TensorRT's TopK sorts seq * {config.chosen_memories} routed tokens per "
                         f"sequence, {TOPK_LIMIT} at most), got {max_seq}")
    return min(max_batch, TOPK_LIMIT // per_row)


def profiles(manifest: dict, max_batch: int, rows: int, max_seq: int) -> dict[str, dict[str, list]]:
    """{graph: {input: [min, opt, max] shapes}}: decode batch 1..max_batch, prefill batch 1..rows
    and seq 1..max_seq, each optimised for its largest shape; from the manifest's input shapes."""
    sizes = {"decode_step": {"batch": (1, max_batch, max_batch)},
             "prefill": {"batch": (1, rows, rows), "seq": (1, max_seq, max_seq)}}
    return {graph: {tensor["name"]: [[dims[d][i] if isinstance(d, str) else d for d in tensor["shape"]]
                                     for i in range(3)]
                    for tensor in manifest["graphs"][graph]["inputs"]}
            for graph, dims in sizes.items()}


def build_engine(onnx_path: str, engine_path: str, profile: dict[str, list[list[int]]]) -> None:
    """Parse, build and serialise one engine (to a temporary name, then renamed)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    shapes = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        shapes.set_shape(name, low, opt, high)
    config.add_optimization_profile(shapes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    partial = engine_path + ".partial"
    with open(partial, "wb") as f:
        f.write(serialized)
    os.replace(partial, engine_path)


def build_engines(out_dir: str, manifest: dict, config, max_batch: int, max_seq: int,
                  progress=print) -> tuple[dict, list[str]]:
    """Build both engines of an export folder (its manifest, the model's MomConfig); returns the
    manifest's `tensorrt` section and the engine files."""
    import time

    import tensorrt as trt

    from . import tensorrt_plugin

    tensorrt_plugin.register()
    rows = prefill_batch(config, max_batch, max_seq)
    shapes = profiles(manifest, max_batch, rows, max_seq)
    engines, paths = {}, []
    for graph in ("decode_step", "prefill"):
        start = time.perf_counter()
        path = os.path.join(out_dir, ENGINE_FILES[graph])
        build_engine(os.path.join(out_dir, manifest["graphs"][graph]["file"]), path, shapes[graph])
        engines[graph] = {"file": ENGINE_FILES[graph], "profile": {
            name: dict(zip(("min", "opt", "max"), triple)) for name, triple in shapes[graph].items()}}
        paths.append(path)
        progress(f"wrote {path}: {time.perf_counter() - start:.1f}s")
    plugins = tensorrt_plugin.PLUGINS
    section = {"version": trt.__version__, "plugins": [p.id for p in plugins],
               "state_in_place": any(p.in_place for p in plugins), "max_batch": max_batch,
               "prefill_batch": rows, "max_seq": max_seq, "engines": engines}
    return section, paths
