"""`model.json`: what a client needs to drive the two ONNX graphs without this package.

It lists every graph's inputs and outputs (name, shape with `batch`/`seq` for the dynamic axes,
dtype), the state layout (which present.X feeds which past.X, and what the axes mean), the model
config, and the token ids generation uses.
"""
from __future__ import annotations

import json
import os

import torch

from mom_compile.graphs import MomConfig
from mom_compile.graphs.cache import state_specs
from mom_compile.graphs.export_graphs import state_names

from .onnx_export import DECODE, PREFILL, graph_specs

MANIFEST_NAME = "model.json"
FORMAT = "mom_compile.onnx/1"
STATE_LAYOUT = {
    "recurrent": "[batch, memory_slots, heads, head_dim, head_v_dim]: the gated-delta state S of "
                 "each memory (routed memories 0..M-1, then the shared one); zeros = no history",
    "conv": "[batch, memory_slots, conv_size-1, 2*heads*head_dim + heads*head_v_dim]: the last "
            "conv_size-1 pre-conv q|k|v projections of each memory's own sub-sequence, oldest first",
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def build_manifest(config: MomConfig, dtype: torch.dtype, opset: int, use_plugin: bool) -> dict:
    specs = graph_specs(config)
    states = [dict(past=past, present=present, shape=list(shape), dtype=_dtype_name(dt))
              for past, present, (shape, dt) in zip(state_names(config, "past"),
                                                     state_names(config, "present"),
                                                     state_specs(config, "batch", dtype))]
    by_present = {s["present"]: s for s in states}
    by_past = {s["past"]: s for s in states}
    logits_dtype = _dtype_name(dtype)

    def tensors(names, seq):
        out = []
        for name in names:
            if name in ("input_ids", "attention_mask"):
                out.append(dict(name=name, shape=["batch", seq], dtype="int64"))
            elif name == "logits":
                out.append(dict(name=name, shape=["batch", seq, config.vocab_size], dtype=logits_dtype))
            else:
                state = by_present.get(name) or by_past[name]
                out.append(dict(name=name, shape=state["shape"], dtype=state["dtype"]))
        return out

    return {
        "format": FORMAT,
        "dtype": logits_dtype,
        "opset": opset,
        "plugin": use_plugin,
        "graphs": {
            PREFILL: dict(file=f"{PREFILL}.onnx", inputs=tensors(specs[PREFILL].inputs, "seq"),
                          outputs=tensors(specs[PREFILL].outputs, "seq"),
                          note="attention_mask: 1 = token, 0 = left padding"),
            DECODE: dict(file=f"{DECODE}.onnx", inputs=tensors(specs[DECODE].inputs, 1),
                         outputs=tensors(specs[DECODE].outputs, 1),
                         note="feed every present.X of the previous call as past.X"),
        },
        "state": states,
        "state_layout": STATE_LAYOUT,
        "memory_slots": config.memory_slots,
        "vocab_size": config.vocab_size,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "config": config.to_dict(),
    }


def write_manifest(out_dir: str, manifest: dict) -> str:
    path = os.path.join(out_dir, MANIFEST_NAME)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return path
