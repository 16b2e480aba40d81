"""Weights stored stacked, saved and loaded under the reference checkpoint's names.

Weights that multiply the same input (the router, q and output-gate projections with every
memory's k/v/beta/alpha projections; the MLP's gate and up projections; the three short convs) are
kept as one parameter, concatenated along dim 0, so that one kernel applies them all: a decode step
is bound by the number of kernels it launches. `stacked_parameter` makes state_dict() split the
parameter into the reference names and shapes, and load_state_dict() join them back.

A stacked weight can end in zero padding rows that no state-dict entry shows (`multiple_of`): the
rows of a product's output are its weight's row count apart, and cuBLAS runs bf16 products on
Hopper's fast kernels only when that stride is a multiple of 16 bytes.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn as nn

Part = tuple[str, tuple[int, ...]]  # a reference name and its shape; parts share shape[1:]


def stacked_parameter(module: nn.Module, name: str, parts: Sequence[Part], multiple_of: int = 1,
                      ) -> nn.Parameter:
    """Create module.<name> [sum of the parts' rows, rounded up to multiple_of, *shape[1:]] whose
    state-dict entries are the parts; the parts are uninitialised, the padding rows zero (a
    module's reset_parameters zeroes them again: nothing may ever make them non-zero, since
    backward multiplies them by their outputs' zero gradients)."""
    parts = list(parts)
    tails = {shape[1:] for _, shape in parts}
    if len(tails) != 1:
        raise ValueError(f"parts: stacked weights must agree beyond dim 0, got shapes {parts}")
    tail = tails.pop()
    rows = sum(shape[0] for _, shape in parts)
    param = nn.Parameter(torch.empty(rows - rows % -multiple_of, *tail))
    with torch.no_grad():
        padding(param, parts).zero_()
    module.register_parameter(name, param)
    # partials of module-level functions, so that the module still pickles (torch.save(model))
    module.register_state_dict_post_hook(functools.partial(_split, name=name, parts=parts))
    module.register_load_state_dict_pre_hook(functools.partial(_join, name=name, parts=parts))
    return param


def _split(module, state_dict, prefix, local_metadata, *, name: str, parts: list[Part]) -> None:
    """state_dict(): the stacked tensor as its parts."""
    stacked = state_dict.pop(prefix + name)
    for (part, _), block in zip(parts, blocks(stacked, parts)):
        state_dict[prefix + part] = block


def _join(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs,
          *, name: str, parts: list[Part]) -> None:
    """load_state_dict(): the parts back into the stacked tensor. A part the state dict lacks keeps
    its current value (zeros on the meta device, which has none) and is reported missing under its
    own name; a part of the wrong shape is reported under its own name, and the load raises."""
    if prefix + name in state_dict:
        return
    current = getattr(module, name).detach()
    given = [state_dict.pop(prefix + part, None) for part, _ in parts]
    missing_keys.extend(prefix + part for (part, _), t in zip(parts, given) if t is None)
    wrong = [f"size mismatch for {prefix}{part}: copying a param with shape {list(t.shape)} from "
             f"checkpoint, the shape in current model is {list(shape)}."
             for (part, shape), t in zip(parts, given) if t is not None and tuple(t.shape) != tuple(shape)]
    error_msgs.extend(wrong)
    like = next((t for t in given if t is not None), None)
    if wrong or like is None:  # nothing to join: the parameter stays as it is
        state_dict[prefix + name] = current
        return
    kept = torch.zeros_like(current, device=like.device, dtype=like.dtype) if current.is_meta else \
        current.to(device=like.device, dtype=like.dtype)
    joined = [now if t is None else t for t, now in zip(given, blocks(kept, parts))]
    state_dict[prefix + name] = torch.cat(joined + [torch.zeros_like(padding(kept, parts))])


def blocks(param: torch.Tensor, parts: Sequence[Part]) -> list[torch.Tensor]:
    """Views of param's parts, in order (for initialising them one by one)."""
    rows = [shape[0] for _, shape in parts]
    return list(param.split(rows + [param.shape[0] - sum(rows)]))[:len(parts)]


def padding(param: torch.Tensor, parts: Sequence[Part]) -> torch.Tensor:
    """View of param's padding rows (after the parts)."""
    return param[sum(shape[0] for _, shape in parts):]
