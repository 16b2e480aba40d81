"""`--verify`: run the written ONNX graphs in onnxruntime against PyTorch on fresh random inputs.

Shapes differ from the export example on purpose (batch 3, seq 13, one left-padded row), which
also proves the dynamic axes. Each output's max absolute error and max relative error (relative
to the reference's largest magnitude) is reported; plugin graphs run with the MemoryStep
reference function attached (plugin.with_reference).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch

from mom_compile.graphs import MomForCausalLM
from mom_compile.graphs.export_graphs import DecodeStepGraph, PrefillGraph

from . import plugin
from .onnx_export import DECODE, PREFILL, example_states, graph_specs

# Accepted max relative error per model dtype (fp32 kernels differ only by summation order).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
VERIFY_BATCH, VERIFY_SEQ, VERIFY_PADDING = 3, 13, 5


@dataclass
class OutputError:
    graph: str
    name: str
    shape: tuple
    max_abs: float
    max_rel: float


def session(path: str, use_plugin: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if use_plugin:
        model = plugin.with_reference(onnx.load(path))
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _compare(graph: str, names, got, ref) -> list[OutputError]:
    rows = []
    for name, g, r in zip(names, got, ref):
        g = np.asarray(g, dtype=np.float64)
        r = r.detach().double().numpy()
        diff = float(np.abs(g - r).max())
        rows.append(OutputError(graph, name, tuple(r.shape), diff, diff / max(float(np.abs(r).max()), 1e-30)))
    return rows


def verify(model: MomForCausalLM, paths: dict[str, str], use_plugin: bool = False,
           seed: int = 0) -> list[OutputError]:
    """Errors of every output of both graphs (prefill, then a decode step from random state)."""
    config = model.config
    specs = graph_specs(config)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (VERIFY_BATCH, VERIFY_SEQ), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :VERIFY_PADDING] = 0
    with torch.no_grad():
        ref = PrefillGraph(model)(ids, mask)
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    got = session(paths[PREFILL], use_plugin).run(None, feed)
    rows = _compare(PREFILL, specs[PREFILL].outputs, got, ref)

    step_ids = torch.randint(0, config.vocab_size, (VERIFY_BATCH, 1), generator=gen)
    past = example_states(model, VERIFY_BATCH, gen)
    with torch.no_grad():
        ref = DecodeStepGraph(model)(step_ids, past)
    feed = dict(zip(specs[DECODE].inputs, [step_ids.numpy()] + [p.numpy() for p in past]))
    got = session(paths[DECODE], use_plugin).run(None, feed)
    return rows + _compare(DECODE, specs[DECODE].outputs, got, ref)


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE[dtype]
