"""`model.json`: what a client needs to drive the two ONNX graphs without this package.

It lists every graph's inputs and outputs (name, shape with `batch`/`seq` for the dynamic axes,
dtype), the state layout (which present.X feeds which past.X, and what the axes mean), the model
config, the token ids generation uses, and every file of the export with its size. A `--tensorrt`
export adds a `tensorrt` section (tensorrt_engine.build_engines): the engines, their optimisation
profiles, and `state_in_place`: the decode engine's present.X must be bound to past.X's buffer.

Reading (`read_manifest`) is torch-free, for the onnxruntime runtime; building imports the model
code when called.
"""
from __future__ import annotations

import json
import os
from typing import Any

MANIFEST_NAME = "model.json"
FORMAT = "mom_compile.onnx/2"
STATE_LAYOUT = {
    "recurrent": "[batch, memory_slots, heads, head_dim, head_v_dim]: the gated-delta state S of "
                 "each memory (routed memories 0..M-1, then the shared one); zeros = no history",
    "conv": "[batch, memory_slots, conv_size-1, 2*heads*head_dim + heads*head_v_dim]: the last "
            "conv_size-1 pre-conv q|k|v projections of each memory's own sub-sequence, oldest first",
}
# Keys a reader relies on, with their JSON types (a dotted key descends into objects; `state.*`
# applies to every entry of the state list).
REQUIRED_KEYS: list[tuple[str, type | tuple[type, ...]]] = [
    ("graphs", dict), ("graphs.prefill", dict), ("graphs.prefill.file", str),
    ("graphs.prefill.inputs", list), ("graphs.prefill.outputs", list),
    ("graphs.decode_step", dict), ("graphs.decode_step.file", str),
    ("graphs.decode_step.inputs", list), ("graphs.decode_step.outputs", list),
    ("state", list), ("state.*.past", str), ("state.*.present", str), ("state.*.shape", list),
    ("state.*.dtype", str), ("plugin", bool), ("vocab_size", int), ("eos_token_id", (int, list, type(None))),
    ("pad_token_id", (int, type(None))), ("files", dict),
]
# The `tensorrt` section of a --tensorrt export (tensorrt_runtime.read_engine_manifest checks it).
TENSORRT_KEYS: list[tuple[str, type | tuple[type, ...]]] = [
    ("tensorrt.max_batch", int), ("tensorrt.max_seq", int), ("tensorrt.prefill_batch", int),
    ("tensorrt.engines", dict), ("tensorrt.state_in_place", bool),
]


def build_manifest(config, dtype, opset: int, use_plugin: bool, files: list[str]) -> dict:
    """The manifest of an export of `config` in torch dtype `dtype` whose files are `files`."""
    from mom_compile.graphs.cache import state_specs
    from mom_compile.graphs.export_graphs import state_names

    from .onnx_export import DECODE, PREFILL, graph_specs

    def dtype_name(dt) -> str:
        return str(dt).removeprefix("torch.")

    specs = graph_specs(config)
    states = [dict(past=past, present=present, shape=list(shape), dtype=dtype_name(dt))
              for past, present, (shape, dt) in zip(state_names(config, "past"),
                                                     state_names(config, "present"),
                                                     state_specs(config, "batch", dtype))]
    by_name = {s[key]: s for s in states for key in ("past", "present")}

    def tensors(names, seq):
        out = []
        for name in names:
            if name in ("input_ids", "attention_mask"):
                out.append(dict(name=name, shape=["batch", seq], dtype="int64"))
            elif name == "logits":
                out.append(dict(name=name, shape=["batch", 1, config.vocab_size], dtype=dtype_name(dtype)))
            else:
                out.append(dict(name=name, shape=by_name[name]["shape"], dtype=by_name[name]["dtype"]))
        return out

    return {
        "format": FORMAT,
        "dtype": dtype_name(dtype),
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
        "files": file_sizes(files),
        "state": states,
        "state_layout": STATE_LAYOUT,
        "memory_slots": config.memory_slots,
        "vocab_size": config.vocab_size,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "config": config.to_dict(),
    }


def file_sizes(files) -> dict[str, int]:
    """{file name: bytes} of the export's files (paths)."""
    return {os.path.basename(f): os.path.getsize(f) for f in files}


def write_manifest(out_dir: str, manifest: dict) -> str:
    """Write out_dir/model.json (through a temporary name, so a reader never sees half of it)."""
    path = os.path.join(out_dir, MANIFEST_NAME)
    with open(path + ".tmp", "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)
    return path


def _lookup(value: Any, key: list[str], path: str) -> list[tuple[str, Any]]:
    """(dotted key, value) of every value at key (`*` ranges over a list)."""
    if not key:
        return [(path, value)]
    head, rest = key[0], key[1:]
    if head == "*":
        return [hit for i, item in enumerate(value) for hit in _lookup(item, rest, f"{path}.{i}")]
    name = f"{path}.{head}" if path else head
    if not isinstance(value, dict) or head not in value:
        raise KeyError(name)
    return _lookup(value[head], rest, name)


def check_keys(manifest: dict, keys: list[tuple[str, type | tuple[type, ...]]], path: str) -> None:
    """ValueError naming the first of `keys` (dotted key, JSON type) that `manifest` lacks or holds
    with another type."""
    for key, kind in keys:
        try:
            hits = _lookup(manifest, key.split("."), "")
        except KeyError as e:
            raise ValueError(f"{path}: not an export manifest: missing key {e.args[0]!r}") from None
        for name, value in hits:
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise ValueError(f"{path}: key {name!r}: expected {_type_names(kind)}, got {value!r}")


def read_manifest(folder: str | os.PathLike) -> dict:
    """The validated model.json of an export folder. Raises FileNotFoundError for a missing manifest
    or listed file, ValueError for anything else that is not this version's manifest of the folder
    (not JSON, another format, a missing key or a wrong type, a listed file of another size)."""
    folder = os.fspath(folder)
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: no {MANIFEST_NAME} (an export folder is written by "
                                "python -m mom_compile.export --onnx)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not an export manifest: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: not an export manifest: expected a JSON object, got "
                         f"{type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: key 'format' is {manifest.get('format')!r}, expected {FORMAT!r} "
                         "(export the model again with this version of mom_compile)")
    check_keys(manifest, REQUIRED_KEYS, path)
    eos = manifest["eos_token_id"]
    if isinstance(eos, list) and not all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
        raise ValueError(f"{path}: key 'eos_token_id': expected an integer, a list of integers or null, "
                         f"got {eos!r}")
    for name, size in manifest["files"].items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: missing ({MANIFEST_NAME} lists it)")
        if os.path.getsize(file) != size:
            raise ValueError(f"{file}: {os.path.getsize(file)} bytes, {MANIFEST_NAME} says {size} "
                             "(an incomplete copy?)")
    return manifest


def _type_names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "an integer",
             type(None): "null"}
    return " or ".join(names[k] for k in kinds)
