"""The MoM language model (docs/math.md#block-model-and-loss): blocks, the backbone and the
causal-LM head."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..user_warning import warn
from .cache import MomCache, check_cache
from .checkpoint import TIED_HEAD, load_pretrained, save_pretrained
from .config import MomConfig
from .generation import CudaGraphStep, generate
from .layer import MomLayer
from .loss import IGNORE_INDEX, causal_lm_loss, load_balancing_loss
from .norm import RMSNorm
from .stacked import stacked_parameter

CheckpointingScope = Literal["blocks", "scan_states"]
CHECKPOINTING_SCOPES: tuple[str, ...] = get_args(CheckpointingScope)


class MomMLP(nn.Module):
    """SwiGLU MLP; the gate and up projections are one stacked parameter, `gate_up`."""

    def __init__(self, config: MomConfig) -> None:
        super().__init__()
        d, i = config.hidden_size, config.mlp_size
        self.gate_up = stacked_parameter(self, "gate_up", [("gate_proj.weight", (i, d)),
                                                           ("up_proj.weight", (i, d))])
        self.down_proj = nn.Linear(i, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class MomBlock(nn.Module):
    """Pre-norm block: h + layer(norm(h)), then h + mlp(norm(h))."""

    def __init__(self, config: MomConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attn = MomLayer(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MomMLP(config)

    def forward(self, h, mask=None, state=None) -> tuple[torch.Tensor, torch.Tensor]:
        a, router_logits = self.attn(self.attn_norm(h), mask, state)
        h = h + a
        return h + self.mlp(self.mlp_norm(h)), router_logits


class MomModel(nn.Module):
    """Embeddings -> blocks -> final norm. Returns (hidden states, router logits per layer).
    With `gradient_checkpointing`, training keeps only each block's input and recomputes the block
    in the backward."""

    def __init__(self, config: MomConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(MomBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.gradient_checkpointing = False

    def forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor | None = None,
        cache: MomCache | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.embeddings(input_ids)
        router_logits = []
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled() \
            and cache is None
        for i, block in enumerate(self.layers):
            if recompute:
                h, logits = checkpoint(block, h, mask, use_reentrant=False)
            else:
                h, logits = block(h, mask, None if cache is None else cache[i])
            router_logits.append(logits)
        return self.norm(h), router_logits


@dataclass
class MomCausalLMOutput:
    """What `MomForCausalLM.forward` returns (the Hugging Face field names). As Hugging Face's
    ModelOutput, it also indexes: by name, or by position among the fields that are not None, in
    Hugging Face's order (`out[0]` is the loss when labels were given, else the logits)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    past_key_values: MomCache | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None

    ORDER: ClassVar[tuple[str, ...]] = ("loss", "aux_loss", "logits", "past_key_values", "router_logits")

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, name) for name in self.ORDER if getattr(self, name) is not None)

    def __getitem__(self, key: int | slice | str):
        if isinstance(key, str):
            if key not in self.ORDER or getattr(self, key) is None:
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]


def _warn(message: str) -> None:
    if not torch.compiler.is_compiling():
        warn(message)


def _reset_submodules(module: nn.Module) -> None:
    for child in module.children():
        _reset_submodules(child)
        if hasattr(child, "reset_parameters"):
            child.reset_parameters()


class MomForCausalLM(nn.Module):
    """MoM causal language model with the Hugging Face calling conventions.

    >>> model = MomForCausalLM(MomConfig(hidden_size=64, num_hidden_layers=2, head_dim=16))
    >>> out = model(input_ids, labels=input_ids)      # out.logits, out.loss, out.aux_loss
    >>> ids = model.generate(input_ids, max_new_tokens=8)
    """

    def __init__(self, config: MomConfig) -> None:
        super().__init__()
        self.config = config
        self.model = MomModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._init_weights()  # the token mixers and norms initialised themselves
        self.tie_weights()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Every parameter as a new model initialises it, e.g. after building on the meta device and
        `to_empty()`: each submodule's own reset_parameters (the inner ones first, so that a module's
        initialisation of its children's weights wins), then the model's; the head tied again."""
        _reset_submodules(self)
        self._init_weights()
        self.tie_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """The reference initialisation of embeddings, MLPs and the head: N(0, initializer_range)."""
        std = self.config.initializer_range
        weights = [self.lm_head.weight, self.model.embeddings.weight] + [
            p for block in self.model.layers for p in block.mlp.parameters()]
        for weight in weights:
            nn.init.normal_(weight, std=std)
        if self.config.pad_token_id is not None:
            self.model.embeddings.weight[self.config.pad_token_id].zero_()

    def gradient_checkpointing_enable(self, scope: CheckpointingScope = "blocks") -> None:
        """Trade compute for memory in training (Hugging Face's name). "blocks": each block's
        activations are recomputed in the backward instead of kept, about one more forward per step.
        "scan_states": only the scans' chunk states are recomputed, one more sequential state pass
        per layer (docs/math.md#the-chunked-form)."""
        if scope not in CHECKPOINTING_SCOPES:
            raise ValueError(f"scope: expected one of {CHECKPOINTING_SCOPES}, got {scope!r}")
        self.gradient_checkpointing_disable()
        if scope == "blocks":
            self.model.gradient_checkpointing = True
        else:
            for block in self.model.layers:
                block.attn.keep_scan_states = False

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False
        for block in self.model.layers:
            block.attn.keep_scan_states = True

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: MomCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        output_router_logits: bool = False,
    ) -> MomCausalLMOutput:
        """input_ids [B, T] int; attention_mask [B, T] (or [B, past + T], as generate loops pass
        it) with 1 for tokens and 0 for (left) padding; labels [B, T] with -100 = ignore.
        With use_cache (or a past_key_values cache), the cache is advanced in place and returned.
        logits_to_keep > 0 computes the logits of the last that many positions only (Hugging Face's
        name; a prompt's prefill needs one); 0 keeps all. output_router_logits: also return each
        layer's router logits [B, T, M] (Hugging Face's name; off, a compiled or graph-replayed
        call returns no more tensors than it needs)."""
        mask = self._check_inputs(input_ids, attention_mask, labels, past_key_values)
        if not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep: expected an int >= 0, got {logits_to_keep!r}")
        if logits_to_keep and labels is not None:
            raise ValueError("logits_to_keep: the loss needs every position's logits; pass 0 with labels")
        if self.model.gradient_checkpointing and self.training and torch.is_grad_enabled() and \
                (use_cache or past_key_values is not None):
            # a block recomputed in the backward would update an in-place cache a second time
            if past_key_values is None:  # as Hugging Face's models do
                _warn("use_cache=True is incompatible with gradient checkpointing; running with "
                      "use_cache=False")
                use_cache = False
            else:
                _warn("gradient checkpointing does not apply to a forward with past_key_values (its "
                      "blocks update the cache in place): this forward keeps every block's activations")
        if use_cache and past_key_values is None:
            past_key_values = self.new_cache(input_ids.shape[0], device=input_ids.device)
        hidden, router_logits = self.model(input_ids, mask, past_key_values)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        loss = aux_loss = None
        if labels is not None:
            aux_loss = load_balancing_loss(router_logits, self.config.topk, mask)
            loss = causal_lm_loss(logits, labels) + self.config.aux_loss_scale * aux_loss
        return MomCausalLMOutput(logits=logits, loss=loss, aux_loss=aux_loss,
                                 past_key_values=past_key_values,
                                 router_logits=tuple(router_logits) if output_router_logits else None)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def num_parameters(self) -> int:
        """Parameters in the reference layout (Hugging Face's name): a tied head counted once, the
        stacked weights' zero padding rows not at all."""
        tied = {TIED_HEAD} if self.config.tie_word_embeddings else set()
        return sum(t.numel() for name, t in self.state_dict().items() if name not in tied)

    def new_cache(self, batch_size: int, device: torch.device | str | None = None) -> MomCache:
        """Zeroed decoding state for `batch_size` sequences, in this model's dtype and device."""
        return MomCache(self.config, batch_size, dtype=self.dtype, device=device or self.device)

    def _check_inputs(self, input_ids, attention_mask, labels, cache) -> torch.Tensor | None:
        """Shape and dtype checks (free at trace time) plus a device-side range check of the ids.
        Returns the padding mask for the T new tokens as bool, or None."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = list(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids: expected a [batch, seq] tensor, got {got}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids: expected an int64 or int32 tensor, got {input_ids.dtype}")
        device = self.device
        for name, tensor in (("input_ids", input_ids), ("attention_mask", attention_mask),
                             ("labels", labels)):
            if isinstance(tensor, torch.Tensor) and tensor.device != device:
                raise ValueError(f"{name}: expected a tensor on {device} (the model's device), got one on "
                                 f"{tensor.device}")
        b, t = input_ids.shape
        if b == 0 or t == 0:
            raise ValueError(f"input_ids: expected at least one sequence of at least one token, "
                             f"got shape {list(input_ids.shape)}")
        torch._assert_async(((input_ids >= 0) & (input_ids < self.config.vocab_size)).all(),
                            f"input_ids: every id must be in [0, vocab_size={self.config.vocab_size})")
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
                raise ValueError(f"labels: expected shape {list(input_ids.shape)} like input_ids, got "
                                 f"{list(labels.shape) if isinstance(labels, torch.Tensor) else labels!r}")
            if labels.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"labels: expected an int64 or int32 tensor, got {labels.dtype}")
            in_vocab = (labels >= 0) & (labels < self.config.vocab_size)
            torch._assert_async((in_vocab | (labels == IGNORE_INDEX)).all(),
                                f"labels: every label must be in [0, vocab_size={self.config.vocab_size}) or "
                                f"{IGNORE_INDEX} (ignored)")
        if cache is not None:
            check_cache("past_key_values", cache, self.config, b, self.dtype, input_ids.device)
        if attention_mask is None:
            return None
        longer_ok = cache is not None  # with a cache, HF loops pass the mask of past + new tokens
        if (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2
                or attention_mask.shape[0] != b or attention_mask.shape[1] < t
                or (attention_mask.shape[1] > t and not longer_ok)):
            got = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
            wanted = f"[{b}, {t}] (or [{b}, past + {t}] with past_key_values)"
            raise ValueError(f"attention_mask: expected shape {wanted} to match input_ids, got {got}")
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise ValueError(f"attention_mask: expected 0/1 integers or bools, got {attention_mask.dtype}")
        # on the device, like the ids' range: a mask of packed sequence ids would silently mix them
        torch._assert_async(((attention_mask == 0) | (attention_mask == 1)).all(),
                            "attention_mask: expected 0/1 integers or bools, got another value")
        return attention_mask[:, -t:] != 0

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:
        """Token ids [B, T + new]: the prompt followed by the generated tokens. See
        `mom_compile.graphs.generation.generate` for the sampling arguments."""
        return generate(self, input_ids, attention_mask, **kwargs)

    def cuda_graph_step(self, cache: MomCache) -> CudaGraphStep:
        """For your own decoding loop on a GPU: `step = model.cuda_graph_step(cache)`, then
        `logits = step(ids)` with ids [batch, 1] does what `model(ids, past_key_values=cache,
        use_cache=True).logits` does (the cache advances in place) as one CUDA-graph replay, where
        the eager step is bound by launching its kernels from Python. The first call records the
        graph; the logits are a buffer that the next call overwrites. `generate` uses it unless
        `forward` is compiled. Needs the Triton kernels; `cache.reset()` starts new sequences."""
        return CudaGraphStep(self, cache)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
    ) -> MomForCausalLM:
        """Load a folder in the reference `mom` layout (config.json + model.safetensors, sharded
        safetensors, or pytorch_model.bin), in eval mode. dtype: a float dtype or its name; None or
        "auto" keeps the checkpoint's."""
        return load_pretrained(cls, path, dtype=dtype, device=device)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write config.json and model.safetensors in the reference layout."""
        save_pretrained(self, path)
