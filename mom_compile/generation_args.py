"""The checks of `generate`'s arguments, shared by `MomForCausalLM.generate` (torch) and the
torch-free onnxruntime generator (`mom_compile.export.runtime`), so that both refuse the same input
with the same message.

The checks read only `.shape`, `.dtype`, `min()`, `max()`, comparisons and `all()`, which torch
tensors and numpy arrays share; nothing here imports either. Each generator first turns array-likes
(nested lists of ids) into its own array type with `as_array`.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from .user_warning import warn

ID_DTYPES = ("int64", "int32")


def _dtype_name(array: Any) -> str:
    return str(array.dtype).removeprefix("torch.")


def as_array(name: str, value: Any, is_array: Callable[[Any], bool], convert: Callable[[Any], Any],
             kind: str) -> Any:
    """value itself if is_array(value), else convert(value) (nested lists of ids), with one clear
    error when that fails."""
    if is_array(value):
        return value
    try:
        return convert(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name}: expected a {kind} or nested lists of token ids [batch, seq], got "
                         f"{type(value).__name__} that does not convert ({e})") from None


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class Sampling(NamedTuple):
    """How the next id is chosen: the argmax, or (do_sample) a sample from softmax(logits /
    temperature) cut to the top_k ids and to the smallest set whose probability reaches top_p
    (None: no cut)."""
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None


def check_sampling(do_sample: Any, temperature: Any, top_k: Any, top_p: Any) -> Sampling:
    """As Hugging Face's generate: without do_sample, temperature, top_k and top_p are ignored (a
    warning names those that would change a sample); top_k=0 and top_p=1 cut nothing; None is
    unset."""
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample: expected True or False, got {do_sample!r}")
    temperature = 1.0 if temperature is None else temperature  # None: unset, as in Hugging Face's
    if not do_sample:
        ignored = [f"temperature={temperature!r}"] if temperature != 1 else []
        ignored += [f"top_k={top_k!r}"] if top_k not in (None, 0) else []
        ignored += [f"top_p={top_p!r}"] if top_p not in (None, 1) else []
        if ignored:
            warn(f"do_sample is False, so {', '.join(ignored)} ignored (greedy decoding); pass "
                 "do_sample=True to sample")
        return Sampling(False, 1.0, None, None)
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool) or \
            not 0 < temperature < math.inf:
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if top_k is not None and (not _integer(top_k) or top_k < 0):
        raise ValueError(f"top_k: expected an integer >= 0 (0: no cut) or None, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, numbers.Real) or isinstance(top_p, bool)
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p: expected a value in (0, 1] (1: no cut) or None, got {top_p!r}")
    return Sampling(True, float(temperature), int(top_k) if top_k else None,
                    float(top_p) if top_p is not None and top_p < 1 else None)


def check_generate_args(
    input_ids: Any, attention_mask: Any, max_new_tokens: Any, do_sample: Any, temperature: Any, top_k: Any,
    top_p: Any, eos_token_id: Any, pad_token_id: Any, vocab_size: int, default_pad_token_id: int | None,
    default_eos_token_id: int | list[int] | None,
) -> tuple[list[int], int, Sampling]:
    """Raise a ValueError naming the first bad argument; return (eos ids, pad id, `check_sampling`'s
    choice of the next id).

    input_ids and attention_mask are arrays (torch or numpy) already: [batch, seq] int64/int32 ids
    in [0, vocab_size), and a mask of the same shape of 0/1 integers or bools whose last column is
    all 1 (left padding). As in Hugging Face's generate, eos_token_id None means the model's
    default_eos_token_id (none if that is None); an empty list means no eos (always max_new_tokens).
    The pad id defaults to default_pad_token_id, else the first eos id, else 0.
    Costs the host one look at the ids' range and two at the mask (its values, its last column)."""
    if not _integer(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an integer >= 0, got {max_new_tokens!r}")
    sampling = check_sampling(do_sample, temperature, top_k, top_p)

    shape = tuple(input_ids.shape)
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"input_ids: expected a non-empty [batch, seq] array, got shape {list(shape)}")
    if _dtype_name(input_ids) not in ID_DTYPES:
        raise ValueError(f"input_ids: expected an int64 or int32 array, got {_dtype_name(input_ids)}")
    if bool(((input_ids < 0) | (input_ids >= vocab_size)).any()):  # one look; the range only to report
        lo, hi = int(input_ids.min()), int(input_ids.max())
        raise ValueError(f"input_ids: ids must lie in [0, {vocab_size}), got values in [{lo}, {hi}]")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != shape:
            raise ValueError(f"attention_mask: expected shape {list(shape)} like input_ids, got "
                             f"{list(attention_mask.shape)}")
        dtype = _dtype_name(attention_mask)
        if not (dtype == "bool" or dtype.startswith(("int", "uint"))):
            raise ValueError(f"attention_mask: expected 0/1 integers or bools, got {dtype}")
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):  # e.g. packed sequence ids
            raise ValueError(f"attention_mask: expected 0/1 integers or bools, got values in "
                             f"[{int(attention_mask.min())}, {int(attention_mask.max())}]")
        if not bool((attention_mask[:, -1] != 0).all()):
            raise ValueError("attention_mask: generate expects left padding (the last column all 1); "
                             "a right-padded prompt would continue from a padding position")

    if eos_token_id is None:
        eos_token_id = [] if default_eos_token_id is None else default_eos_token_id
    eos = [eos_token_id] if _integer(eos_token_id) else eos_token_id
    if not isinstance(eos, Sequence) or not all(_integer(i) and 0 <= i < vocab_size for i in eos):
        raise ValueError(f"eos_token_id: expected an id or a list of ids in [0, {vocab_size}) ([] for "
                         f"none, None for the model's), got {eos_token_id!r}")
    if pad_token_id is None:
        pad_token_id = default_pad_token_id if default_pad_token_id is not None else ([*eos, 0])[0]
    if not _integer(pad_token_id) or not 0 <= pad_token_id < vocab_size:
        raise ValueError(f"pad_token_id: expected an id in [0, {vocab_size}) or None, got {pad_token_id!r}")
    return [int(i) for i in eos], int(pad_token_id), sampling
