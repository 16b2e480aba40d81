"""Checkpoints in the reference `mom` layout (docs/math.md#checkpoint-layout): a folder with config.json and
model.safetensors (or sharded safetensors with an index, or pytorch_model.bin)."""
from __future__ import annotations

import json
import os

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..interrupts import replace_files
from ..ops._checks import FLOAT_DTYPES
from .config import CONFIG_NAME, MomConfig

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
TIED_HEAD = "lm_head.weight"


def _load_safetensors(file: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except SafetensorError as e:  # a truncated or corrupted file
        raise ValueError(f"{file}: damaged safetensors file ({e})") from e


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, on the CPU, under their stored names."""
    folder = os.fspath(path)
    single = os.path.join(folder, SAFETENSORS_NAME)
    index = os.path.join(folder, SAFETENSORS_INDEX)
    legacy = os.path.join(folder, TORCH_NAME)
    try:
        if os.path.isfile(single):
            return _load_safetensors(single)
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            weights: dict[str, torch.Tensor] = {}
            for shard in shards:
                weights.update(_load_safetensors(os.path.join(folder, shard)))
            return weights
        if os.path.isfile(legacy):
            return torch.load(legacy, map_location="cpu", weights_only=True)
    except (OSError, KeyError, RuntimeError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder}: cannot read the checkpoint's weights ({e})") from e
    raise FileNotFoundError(
        f"path: {folder!r} holds none of {SAFETENSORS_NAME}, {SAFETENSORS_INDEX}, {TORCH_NAME}")


def check_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Raise a ValueError naming the first missing, unexpected or misshapen weight."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    optional = {TIED_HEAD} if model.config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(weights) - optional)
    unexpected = sorted(set(weights) - set(expected))
    if missing:
        raise ValueError(f"checkpoint: missing weight {missing[0]!r} with shape "
                         f"{list(expected[missing[0]])} ({len(missing)} missing in all)")
    if unexpected:
        raise ValueError(f"checkpoint: unexpected weight {unexpected[0]!r} "
                         f"({len(unexpected)} unexpected in all); is the config right for it?")
    for name, tensor in weights.items():
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(f"checkpoint: weight {name!r} has shape {list(tensor.shape)}, "
                             f"the config expects {list(expected[name])}")
        if tensor.dtype not in FLOAT_DTYPES:
            raise ValueError(f"checkpoint: weight {name!r} is {tensor.dtype}, expected a floating-point "
                             f"dtype ({', '.join(str(d).removeprefix('torch.') for d in FLOAT_DTYPES)})")


def _dtype(value) -> torch.dtype | None:
    """from_pretrained's dtype: None or "auto" (the checkpoint's), a float dtype or its name."""
    if value is None or value == "auto":
        return None
    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype: expected None, 'auto', or float16, bfloat16, float32 or float64 (a "
                         f"torch.dtype or its name), got {value!r}")
    return dtype


def load_pretrained(cls, path, dtype=None, device=None):
    dtype = _dtype(dtype)
    config = MomConfig.from_pretrained(path)
    # a checkpoint folder, or its config.json (as MomConfig.from_pretrained takes)
    weights = read_weights(os.path.dirname(path) if os.path.isfile(path) else path)
    if dtype is None:
        dtype = weights["model.embeddings.weight"].dtype if "model.embeddings.weight" in weights \
            else torch.float32
    with torch.device("meta"):
        model = cls(config)
    check_weights(model, weights)
    if config.tie_word_embeddings:
        weights.pop(TIED_HEAD, None)
        weights[TIED_HEAD] = weights["model.embeddings.weight"]
    model.load_state_dict(weights, strict=True, assign=True)
    model.tie_weights()
    return model.to(device=device, dtype=dtype).eval()


def save_pretrained(model: nn.Module, path: str | os.PathLike) -> None:
    """config.json and model.safetensors into the folder `path`, moved in together
    (`replace_files`): never a truncated file or one model's config beside another's weights."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"path: cannot create folder {os.fspath(path)!r} ({e})") from e
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop(TIED_HEAD)

    def write_weights(file: str) -> None:
        save_file(state, file, metadata={"format": "pt"})
    # the config first: one JSON cannot hold fails before the weights are written
    replace_files({os.path.join(path, CONFIG_NAME): model.config.to_json_file,
                   os.path.join(path, SAFETENSORS_NAME): write_weights})
