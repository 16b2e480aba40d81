"""`--verify`: run the written ONNX graphs in onnxruntime against PyTorch on fresh random inputs.

Shapes differ from the export example on purpose (batch 3, seq 13, one left-padded row), which
also proves the dynamic axes. Each output's max absolute error and max relative error (relative
to the reference's largest magnitude) is reported; plugin graphs run with the standard translation
of their plugin nodes inlined (plugin.with_reference). `compare_all` is the comparison itself, on
the same inputs for any artefact (the AOTInductor packages of aoti.py use it too).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch

from mom_compile.graphs import MomForCausalLM
from mom_compile.graphs.export_graphs import DecodeStepGraph, PrefillGraph

from . import plugin
from .onnx_export import DECODE, PREFILL, example_states, graph_specs

# Accepted max relative error per model dtype (fp32 kernels differ only by summation order; float64
# graphs compute in float64 throughout, constants included, so theirs is tight).
TOLERANCE = {torch.float64: 1e-11, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
VERIFY_BATCH, VERIFY_SEQ, VERIFY_PADDING = 3, 13, 5


@dataclass
class OutputError:
    graph: str
    name: str
    shape: tuple
    max_abs: float
    max_rel: float


def session(path: str, model: MomForCausalLM | None = None) -> ort.InferenceSession:
    """onnxruntime on `path`; a plugin graph runs with the standard translation of its plugin nodes
    for `model`, the MomForCausalLM it was exported from (plugin.with_reference). That graph is
    rewritten without its weights (a protobuf holds at most 2 GiB) into a file beside `path`, whose
    external weights it names, for as long as onnxruntime reads it."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if model is None:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    graph = plugin.with_reference(onnx.load(path, load_external_data=False), model)
    rewritten = f"{path}.reference.onnx"
    try:
        onnx.save(graph, rewritten)
        return ort.InferenceSession(rewritten, options, providers=["CPUExecutionProvider"])
    finally:
        if os.path.exists(rewritten):
            os.remove(rewritten)


def _compare(graph: str, names, got, ref) -> list[OutputError]:
    """One row per reference output; a missing output, one of another shape, or one holding a NaN
    or an infinity has an infinite error (never broadcast into a pass, never lost in a max)."""
    got = list(got) + [None] * (len(ref) - len(got))
    rows = []
    for name, g, r in zip(names, got, ref):
        r = r.detach().double().numpy()
        if isinstance(g, torch.Tensor):
            g = g.detach().double().numpy()
        elif g is not None:
            g = np.asarray(g, dtype=np.float64)
        if g is None or g.shape != r.shape or not (np.isfinite(g).all() and np.isfinite(r).all()):
            rows.append(OutputError(graph, name, r.shape, float("inf"), float("inf")))
            continue
        diff = float(np.abs(g - r).max())
        rows.append(OutputError(graph, name, r.shape, diff, diff / max(float(np.abs(r).max()), 1e-30)))
    return rows


def verify_inputs(model: MomForCausalLM, seed: int = 0) -> dict[str, tuple]:
    """The positional inputs of both graphs: a left-padded prefill batch, a step from random state."""
    config = model.config
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (VERIFY_BATCH, VERIFY_SEQ), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :VERIFY_PADDING] = 0
    step_ids = torch.randint(0, config.vocab_size, (VERIFY_BATCH, 1), generator=gen)
    return {PREFILL: (ids, mask), DECODE: (step_ids, example_states(model, VERIFY_BATCH, gen))}


def references(model: MomForCausalLM, inputs: dict[str, tuple]) -> dict[str, tuple[torch.Tensor, ...]]:
    """PyTorch eager outputs of both graphs on `inputs` (from verify_inputs)."""
    with torch.no_grad():
        return {PREFILL: PrefillGraph(model)(*inputs[PREFILL]),
                DECODE: DecodeStepGraph(model)(*inputs[DECODE])}


def compare_all(model: MomForCausalLM, run, seed: int = 0) -> list[OutputError]:
    """Errors of every output of both graphs, where run(graph name, inputs) gives the outputs of
    the artefact under test."""
    specs = graph_specs(model.config)
    inputs = verify_inputs(model, seed)
    ref = references(model, inputs)
    return [row for name in (PREFILL, DECODE)
            for row in _compare(name, specs[name].outputs, run(name, inputs[name]), ref[name])]


def verify(model: MomForCausalLM, paths: dict[str, str], use_plugin: bool = False,
           seed: int = 0) -> list[OutputError]:
    """onnxruntime's errors on every output of both graphs (prefill, then a decode step)."""
    specs = graph_specs(model.config)

    def run(name, inputs):
        ids, second = inputs
        arrays = [second.numpy()] if name == PREFILL else [t.numpy() for t in second]
        feed = dict(zip(specs[name].inputs, [ids.numpy(), *arrays]))
        return session(paths[name], model if use_plugin else None).run(None, feed)

    return compare_all(model, run, seed)


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE[dtype]
