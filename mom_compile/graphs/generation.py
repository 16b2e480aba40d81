"""Autoregressive generation: one prefill over the prompt, then one cached decode step per token.

Decode steps pass no attention mask (a new token is never padding), so every step has the same
shapes: a compiled `forward` (`model.forward = torch.compile(model.forward)`) is traced once for
the decode step and reused. The loop keeps its state on the device: whether every sequence has
finished is looked at every CHECK_EVERY steps (a host sync each), finished sequences pad
meanwhile, and the output is cut where they had all finished, so it equals stopping at once.

On CUDA, unless `forward` is compiled, the decode step is recorded once as a CUDA graph and
replayed (`CudaGraphStep`): an eager step launches hundreds of small kernels from Python, and the
replay launches them all at once, so eager users skip the per-kernel launch cost.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..generation_args import as_array, check_generate_args
from ..ops import triton_status
from .cache import MomCache, check_cache

CHECK_EVERY = 8  # decode steps between two host syncs that look for the end (with an eos id)


def pick_next_token(
    logits: torch.Tensor, do_sample: bool = False, temperature: float = 1.0,
    top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next ids [B] from last-position logits [B, vocab]: argmax, or a sample from the softmax
    of logits / temperature restricted to the top_k ids and to the smallest set whose
    probability reaches top_p."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keeps the id that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class CudaGraphStep:
    """model's decode step over `cache` replayed from a CUDA graph (`MomForCausalLM.cuda_graph_step`).
    The first call runs the step eagerly on a side stream (a real step, which also warms up every
    kernel), then records it; each later call copies the ids into the recorded input buffer and
    replays. The cache's tensors are updated where they lie, as an eager step updates them; the
    returned logits are a buffer that the next call overwrites."""

    def __init__(self, model: nn.Module, cache) -> None:
        device = model.device
        if device.type != "cuda":
            raise ValueError(f"cuda graph step: needs the model on a CUDA device, got {device}")
        if not triton_status().available:
            raise ValueError(f"cuda graph step: needs the Triton kernels, which did not load "
                             f"({triton_status().reason})")
        _check_cache(cache, model, None, device)
        self.model, self.cache, self.device = model, cache, device
        self.graph: torch.cuda.CUDAGraph | None = None

    def _step(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, past_key_values=self.cache, use_cache=True).logits

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [batch, 1] int64 or int32 on the model's device -> logits [batch, 1, vocab]."""
        device = self.device
        if not (isinstance(ids, torch.Tensor) and ids.shape == (self.cache.batch_size, 1)
                and ids.dtype in (torch.int64, torch.int32) and ids.device == device):
            got = f"{list(ids.shape)} {ids.dtype} on {ids.device}" if isinstance(ids, torch.Tensor) \
                else type(ids).__name__
            raise ValueError(f"ids: expected [{self.cache.batch_size}, 1] int64 or int32 ids on {device} "
                             f"(one token for each of the cache's sequences), got {got}")
        if self.graph is not None:
            self.ids.copy_(ids)
            self.graph.replay()
            return self.logits
        self.ids = ids.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self._step(self.ids)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step(self.ids)
        return logits


def _check_cache(cache: MomCache, model: nn.Module, batch: int | None, device: torch.device) -> None:
    """Raise naming `cache` unless it is what model.new_cache(batch) makes on `device` (batch None:
    any)."""
    check_cache("cache", cache, model.config, batch, model.dtype, device)
    if any(layer.functional for layer in cache):
        raise ValueError("cache: expected a cache updated in place (model.new_cache), got a functional one")


def _is_compiled(model: nn.Module) -> bool:
    """model.forward replaced by torch.compile, or the module compiled in place (Module.compile)."""
    return hasattr(model.forward, "_torchdynamo_orig_callable") or \
        getattr(model, "_compiled_call_impl", None) is not None


def _as_tensor(name: str, value, model: nn.Module) -> torch.Tensor:
    device = model.device
    return as_array(name, value, torch.is_tensor, lambda v: torch.as_tensor(v, device=device), "torch.Tensor")


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    cuda_graph: bool | None = None,
    cache: MomCache | None = None,
) -> torch.Tensor:
    """Batched generation with left padding. Returns [B, T + n] ids, n <= max_new_tokens: it stops
    early once every sequence has produced an eos id (eos_token_id: by default the config's, as in
    Hugging Face's generate; `[]` for none, which always gives max_new_tokens); a finished sequence
    is filled with pad_token_id (default: the config's, else the first eos id). input_ids and
    attention_mask may also be nested lists (made tensors on the model's device). cuda_graph:
    replay the decode step from a CUDA graph (`CudaGraphStep`); default: on CUDA when `forward` is
    not compiled and the Triton kernels loaded. cache: a `model.new_cache(batch)` to generate into,
    reset first (default: a new one each call); passing the same one to every call keeps the
    states at fixed addresses, so that a forward compiled with mode="reduce-overhead" replays its
    prefill and decode-step graphs instead of recording them again."""
    config = model.config
    input_ids = _as_tensor("input_ids", input_ids, model)
    attention_mask = None if attention_mask is None else _as_tensor("attention_mask", attention_mask, model)
    eos, pad_token_id, sampling = check_generate_args(
        input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id,
        pad_token_id, config.vocab_size, config.pad_token_id, config.eos_token_id)
    if cuda_graph is None:  # the reference kernels (Triton missing) sync with the host: no capture
        cuda_graph = input_ids.is_cuda and not _is_compiled(model) and triton_status().available
    elif cuda_graph and not input_ids.is_cuda:
        raise ValueError(f"cuda_graph: needs the model and input_ids on a CUDA device, got "
                         f"{input_ids.device}")
    # The cache is made (or reset) here, outside any compiled forward, so that its buffers are
    # static addresses that a CUDA-graph step may update in place.
    if cache is not None:
        _check_cache(cache, model, input_ids.shape[0], input_ids.device)
        cache.reset()
    if max_new_tokens == 0:
        return input_ids.clone()
    if cache is None:
        cache = model.new_cache(input_ids.shape[0], device=input_ids.device)
    step = CudaGraphStep(model, cache) if cuda_graph else \
        (lambda ids: model(ids, past_key_values=cache, use_cache=True).logits)
    logits = model(input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                   logits_to_keep=1).logits
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    running = torch.zeros((), dtype=torch.int64, device=input_ids.device)  # steps begun unfinished
    tokens = [input_ids]
    for i in range(max_new_tokens):
        next_ids = pick_next_token(logits[:, -1], *sampling, generator)
        next_ids = torch.where(finished, pad_token_id, next_ids).to(input_ids.dtype)
        tokens.append(next_ids[:, None])
        if eos:
            running += ~finished.all()
            finished |= torch.stack([next_ids == e for e in eos]).any(0)  # no host-to-device copy
            if (i + 1) % CHECK_EVERY == 0 and bool(finished.all()):  # a host sync
                break
        if i + 1 < max_new_tokens:
            logits = step(next_ids[:, None])
    ids = torch.cat(tokens, dim=1)
    # the steps after the one that finished the last sequence only padded: cut them (one sync)
    return ids[:, :input_ids.shape[1] + int(running)] if eos else ids
