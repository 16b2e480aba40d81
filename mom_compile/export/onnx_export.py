"""From a MomForCausalLM to `prefill.onnx` and `decode_step.onnx`.

Steps per graph: torch.export of the functional wrapper (graphs/export_graphs.py) with dynamic
batch (and seq for prefill), the dynamo ONNX exporter with the `mom` op translations of
onnx_ops.py, a linear-time optimisation (`optimize`), then a finishing pass on the ONNX model:
  - the scripted helper functions the translations call (MemoryStep, GatedDeltaScan) are made
    part of the model and inlined, so the graph holds default-domain ops only, but for the TensorRT
    plugin nodes of a plugin-mode decode graph (domain "mom", plugin.py);
  - LinearAttention nodes (opset 27 and newer), recorded in a staging domain that the exporter's
    opset conversion passes through, move to the default domain;
  - the exporter's intermediate value_info is dropped (onnxruntime infers it again);
  - the symbolic axes of the graph inputs and outputs are named `batch` and `seq`.
Weights above EXTERNAL_DATA_BYTES (protobuf stops at 2 GB) go to one external data file,
WEIGHTS_FILE, that both graphs reference: a tensor of either graph whose bytes are already there
(matched by content, whatever its name) points at the same byte range, so the folder holds one copy
of the weights.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import onnx
import onnx.inliner
import onnx_ir
import onnx_ir.passes.common as common_passes
import onnxscript.optimizer
import torch

from mom_compile.graphs import MomForCausalLM
from mom_compile.graphs.cache import state_specs
from mom_compile.graphs.export_graphs import DecodeStepGraph, PrefillGraph, state_names

from . import onnx_ops, plugin

PREFILL = "prefill"
DECODE = "decode_step"
DEFAULT_OPSET = 18
# Export examples: batch 2 and seq 8 (sizes 0 and 1 would be specialised by torch.export).
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8
EXTERNAL_DATA_BYTES = 1 << 30  # above this the weights go to a side file (protobuf stops at 2 GB)
WEIGHTS_FILE = "weights.onnx.data"


@dataclass
class GraphSpec:
    """Names of one graph's inputs and outputs, in order."""

    name: str
    inputs: list[str]
    outputs: list[str]


def graph_specs(config) -> dict[str, GraphSpec]:
    past, present = state_names(config, "past"), state_names(config, "present")
    return {
        PREFILL: GraphSpec(PREFILL, ["input_ids", "attention_mask"], ["logits", *present]),
        DECODE: GraphSpec(DECODE, ["input_ids", *past], ["logits", *present]),
    }


def example_states(model: MomForCausalLM, batch: int,
                   generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Random (non-zero, so no branch sees a special value) state tensors for tracing/checks."""
    return [(torch.randn(shape, generator=generator) * 0.1).to(dt)
            for shape, dt in state_specs(model.config, batch, model.dtype)]


def export_programs(model: MomForCausalLM,
                    graphs=(PREFILL, DECODE)) -> dict[str, torch.export.ExportedProgram]:
    """torch.export of the named graphs (default both) with dynamic batch (and seq for prefill)."""
    config = model.config
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    # seq >= 2 at trace time: the model takes its T == 1 step path for one token; both paths
    # compute the same function (docs/math.md#correctness), and the exported scan path runs T = 1 too.
    seq = torch.export.Dim("seq", min=2, max=1 << 20)
    ids = torch.randint(0, config.vocab_size, (EXAMPLE_BATCH, EXAMPLE_SEQ))
    mask = torch.ones(EXAMPLE_BATCH, EXAMPLE_SEQ, dtype=torch.int64)
    programs = {}
    with torch.no_grad():
        if PREFILL in graphs:
            programs[PREFILL] = torch.export.export(
                PrefillGraph(model), (ids, mask),
                dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})
        if DECODE in graphs:
            past = example_states(model, EXAMPLE_BATCH)
            # A contiguous example: AOTInductor compiles the example's strides into its kernels,
            # and a sliced ids[:, :1] (row stride 8) would make it misread every real [B, 1] input.
            step_ids = ids[:, :1].contiguous()
            programs[DECODE] = torch.export.export(
                DecodeStepGraph(model), (step_ids, past),
                dynamic_shapes={"input_ids": {0: batch}, "past": [{0: batch}] * len(past)})
    return programs


def _weight_bytes(model: MomForCausalLM) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def to_onnx(program: torch.export.ExportedProgram, spec: GraphSpec, path: str, opset: int,
            use_plugin: bool, external_data: bool) -> None:
    """Translate one ExportedProgram to ONNX at `path` and finish it (see the module doc)."""
    onnx_program = torch.onnx.export(
        program, dynamo=True, custom_translation_table=onnx_ops.translation_table(opset, use_plugin),
        input_names=spec.inputs, output_names=spec.outputs, opset_version=opset, verbose=False,
        optimize=False)
    optimize(onnx_program.model)
    onnx_program.save(path, external_data=external_data)
    model = onnx.load(path, load_external_data=False)
    model = finish(model, spec, use_plugin)
    onnx.save(model, path)


def optimize(model: onnx_ir.Model) -> None:
    """The exporter's optimize=True, less onnxscript's default rewrite rules: one of them matches
    multi-node patterns by scanning the whole graph once per node, which is quadratic: the 340m
    decode step was still in it after 6 minutes on 2 cores, and exports in ~50 s without it.
    Constant folding, dead nodes, constants as initializers and common subexpressions stay;
    onnxruntime's own graph optimizer does the rules' fusions at session creation."""
    onnxscript.optimizer.fold_constants(model)
    onnx_ir.passes.Sequential(
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.RemoveUnusedNodesPass(),
    )(model)


def finish(model: onnx.ModelProto, spec: GraphSpec, use_plugin: bool) -> onnx.ModelProto:
    helpers = [onnx_ops.GatedDeltaScan, onnx_ops.MemoryStep]
    present = {(f.domain, f.name) for f in model.functions}
    for fn in helpers:
        proto = fn.to_function_proto()
        if (proto.domain, proto.name) not in present:
            model.functions.append(proto)
    # The helpers are scripted against opset 18; every op they use means the same up to the
    # newest opset, so they adopt the model's default-domain version (the checker wants one).
    model_opset = next(o.version for o in model.opset_import if o.domain == "")
    for function in model.functions:
        for imported in function.opset_import:
            if imported.domain == "":
                imported.version = model_opset
    domains = {o.domain for o in model.opset_import}
    for fn in helpers:
        if fn.opset.domain not in domains:
            model.opset_import.append(onnx.helper.make_opsetid(fn.opset.domain, fn.opset.version))
    model = onnx.inliner.inline_local_functions(model)
    dropped = {fn.opset.domain for fn in helpers}
    if use_plugin and plugin.decode_pairs(model.graph):
        dropped.discard(plugin.DOMAIN)
    for node in model.graph.node:
        if node.domain == onnx_ops.STAGING_DOMAIN:
            node.domain = ""
    dropped.add(onnx_ops.STAGING_DOMAIN)
    del model.functions[:]
    imports = [o for o in model.opset_import if o.domain not in dropped]
    del model.opset_import[:]
    model.opset_import.extend(imports)
    del model.graph.value_info[:]
    _name_axes(model, spec)
    model.doc_string = (f"mom_compile {spec.name} graph: inputs {', '.join(spec.inputs[:2])}, ...; "
                        "outputs logits and present.<layer>.<state>; see model.json")
    return model


def _name_axes(model: onnx.ModelProto, spec: GraphSpec) -> None:
    """Axis 0 of every graph input/output is `batch`; axis 1 of the token tensors is `seq`."""
    seq_tensors = {"input_ids", "attention_mask"} if spec.name == PREFILL else set()
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if not dims:
            continue
        dims[0].dim_param = "batch"
        if value.name in seq_tensors:
            dims[1].dim_param = "seq"


def export_onnx(model: MomForCausalLM, out_dir: str, opset: int = DEFAULT_OPSET,
                use_plugin: bool = False, programs=None, progress=print,
                external_data_bytes: int = EXTERNAL_DATA_BYTES) -> dict[str, str]:
    """Write prefill.onnx and decode_step.onnx into out_dir, and WEIGHTS_FILE for weights above
    external_data_bytes. Returns {graph name: path}."""
    specs = graph_specs(model.config)
    if programs is None:
        start = time.perf_counter()
        programs = export_programs(model)
        progress(f"torch.export of both graphs: {time.perf_counter() - start:.1f}s")
    external = _weight_bytes(model) > external_data_bytes
    weights = os.path.join(out_dir, WEIGHTS_FILE)
    if external and os.path.exists(weights):
        os.remove(weights)
    stored: dict[bytes, tuple[int, int]] = {}
    paths = {}
    for name, program in programs.items():
        start = time.perf_counter()
        path = os.path.join(out_dir, f"{name}.onnx")
        to_onnx(program, specs[name], path, opset, use_plugin, external)
        if external:
            share_external_data(path, weights, stored)
        if use_plugin:
            plugin.register_schemas()
        onnx.checker.check_model(path, full_check=True)
        paths[name] = path
        progress(f"wrote {path}: {time.perf_counter() - start:.1f}s")
    if external:
        progress(f"wrote {weights}: {os.path.getsize(weights) / 1e9:.2f} GB, the weights of both graphs")
    return paths


def export_files(out_dir: str) -> list[str]:
    """The ONNX export's files in out_dir: both graphs and, for large models, the weights file."""
    names = [f"{PREFILL}.onnx", f"{DECODE}.onnx", WEIGHTS_FILE]
    return [os.path.join(out_dir, n) for n in names if os.path.exists(os.path.join(out_dir, n))]


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in a graph: initializers and attribute tensors, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _tensors(sub)


def _aligned(offset: int, size: int) -> int:
    """Where a tensor of `size` bytes starts at or after `offset`: large ones on 64 KiB boundaries
    (so onnxruntime can map them), the rest on 64 bytes."""
    align = 1 << 16 if size >= 1 << 20 else 64
    return -(-offset // align) * align


def share_external_data(graph_path: str, shared_path: str, stored: dict[bytes, tuple[int, int]]) -> None:
    """Move the external tensors of graph_path into shared_path and point them there; bytes already
    stored (`stored`: content hash -> (offset, length), updated) are reused, not written again. The
    graph's own data files are deleted."""
    model = onnx.load(graph_path, load_external_data=False)
    folder = os.path.dirname(graph_path)
    sources = set()
    with open(shared_path, "ab") as out:
        for tensor in _tensors(model.graph):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            source = os.path.join(folder, info["location"])
            sources.add(source)
            with open(source, "rb") as f:
                f.seek(int(info.get("offset", 0)))
                data = f.read(int(info["length"])) if "length" in info else f.read()
            key = hashlib.sha256(data).digest()
            if key not in stored:
                offset = _aligned(out.tell(), len(data))
                out.write(bytes(offset - out.tell()))
                out.write(data)
                stored[key] = (offset, len(data))
            offset, length = stored[key]
            del tensor.external_data[:]
            for k, v in (("location", os.path.basename(shared_path)), ("offset", offset), ("length", length)):
                tensor.external_data.add(key=k, value=str(v))
    onnx.save(model, graph_path)
    for source in sources - {shared_path}:
        os.remove(source)
