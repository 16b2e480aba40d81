"""`MomLayer`: one Mixture-of-Memories token mixer (spec section 3), built from the `mom` ops.

The shared memory is treated as one more memory (index num_memories) that every token chooses
with weight 1, so routed and shared memories go through one dispatch, one conv and one scan.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .cache import LayerState
from .config import MomConfig
from .norm import RMSNorm, rms_norm
from .precision import upcast

L2_EPS = 1e-6


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    xf = upcast(x)
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + L2_EPS)).to(x.dtype)


class MomLayer(nn.Module):
    """Input x [B, T, hidden] (the block's normed hidden states) -> output [B, T, hidden].

    The per-memory key/value/beta/alpha projections live in one stacked parameter
    `memory_proj` [sets, H*K + H*V + 2H, hidden] (one set per memory plus the shared one, or a
    single set with single_kv_proj), so all memories project in one matrix product; state_dict()
    and load_state_dict() speak the reference names (k_proj.{m}.weight, shared_k.weight, ...).
    """

    def __init__(self, config: MomConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.num_heads, self.head_dim, self.head_v_dim = c.num_heads, c.head_dim, c.head_v_dim
        self.scale = c.head_dim ** -0.5
        self.gate = nn.Linear(c.hidden_size, c.num_memories, bias=False)
        self.q_proj = nn.Linear(c.hidden_size, c.key_dim, bias=False)
        self.memory_proj = nn.Parameter(torch.empty(self._num_sets(), self._set_rows(), c.hidden_size))
        self.A_log = nn.Parameter(torch.empty(c.num_heads))
        self.dt_bias = nn.Parameter(torch.empty(c.num_heads))
        self.q_conv1d, self.k_conv1d, self.v_conv1d = (
            nn.Conv1d(dim, dim, c.conv_size, groups=dim, bias=c.conv_bias)
            for dim in (c.key_dim, c.key_dim, c.value_dim))
        if c.use_output_gate:
            self.g_proj = nn.Linear(c.hidden_size, c.value_dim, bias=False)
        self.o_norm = RMSNorm(c.head_v_dim, c.norm_eps)
        self.o_proj = nn.Linear(c.value_dim, c.hidden_size, bias=False)
        self.register_state_dict_post_hook(_split_memory_proj)
        self.register_load_state_dict_pre_hook(_stack_memory_proj)
        self.reset_parameters()

    # -- parameters ----------------------------------------------------------------------------
    def _num_sets(self) -> int:
        return 1 if self.config.single_kv_proj else self.config.memory_slots

    def _set_rows(self) -> int:
        c = self.config
        return c.key_dim + c.value_dim + 2 * c.num_heads

    def reference_names(self) -> list[list[str]]:
        """Reference parameter names of each set, in the order k, v, b, a."""
        c = self.config
        shared = ["shared_k", "shared_v", "shared_b", "shared_a"]
        if c.single_kv_proj:
            return [shared]
        sets = [[f"{p}.{m}" for p in ("k_proj", "v_proj", "b_proj", "a_proj")]
                for m in range(c.num_memories)]
        return sets + ([shared] if c.shared_mem else [])

    def _set_split(self) -> list[int]:
        c = self.config
        return [c.key_dim, c.value_dim, c.num_heads, c.num_heads]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference initialisation: Xavier-uniform (gain 2^-2.5) projections, A ~ U(0, 16),
        dt ~ logU(1e-3, 1e-1) stored through the inverse softplus."""
        for lin in (self.gate, self.q_proj, self.o_proj, getattr(self, "g_proj", None)):
            if lin is not None:
                nn.init.xavier_uniform_(lin.weight, gain=2 ** -2.5)
        for weights in self.memory_proj:
            for block in weights.split(self._set_split()):
                nn.init.xavier_uniform_(block, gain=2 ** -2.5)
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0, 16).log())
        dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(0.1) - math.log(0.001))
                       + math.log(0.001)).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
            conv.reset_parameters()
        self.o_norm.weight.fill_(1.0)

    def _conv_params(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        weight = torch.cat([c.weight.squeeze(1) for c in convs])
        bias = torch.cat([c.bias for c in convs]) if self.config.conv_bias else None
        return weight, bias

    # -- forward -------------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits [B, T, M], and each token's memories [B, T, k'] and float32 weights
        (k' = topk + 1 with the shared memory, which always has weight 1)."""
        logits = self.gate(x)
        probs = upcast(logits).softmax(-1)
        weights, memory_idx = probs.topk(self.config.topk, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        if self.config.shared_mem:
            memory_idx = F.pad(memory_idx, (0, 1), value=self.config.num_memories)
            weights = F.pad(weights, (0, 1), value=1.0)
        return logits, memory_idx, weights

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, state: LayerState | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, hidden]; mask [B, T] bool (False = padding) or None; state: this layer's cache
        entry, advanced in place. Returns (output [B, T, hidden], router logits [B, T, M])."""
        b, t, _ = x.shape
        logits, memory_idx, weights = self.route(x)
        if state is not None and t == 1:
            y = self._step(x, memory_idx, weights, mask, state)
        else:
            y = self._scan(x, memory_idx, weights, mask, state)
        z = upcast(self.g_proj(x).view(b, t, self.num_heads, self.head_v_dim)) \
            if self.config.use_output_gate else None
        o = rms_norm(y, self.o_norm.weight, self.o_norm.eps)
        if z is not None:
            o = o * F.silu(z)
        return self.o_proj(o.to(x.dtype).flatten(2)), logits

    def _rows(self, x: torch.Tensor, token: torch.Tensor, memory: torch.Tensor):
        """Pre-conv q|k|v [R, 2HK+HV] and beta, g [R, H] of the rows (token, memory)."""
        c = self.config
        flat = x.flatten(0, 1)
        per_set = F.linear(flat, self.memory_proj.flatten(0, 1)).view(flat.shape[0], self._num_sets(), -1)
        proj_set = torch.zeros_like(memory) if c.single_kv_proj else memory
        mem = per_set[token, proj_set]
        kv, b_pre, a_pre = mem.split([c.key_dim + c.value_dim, c.num_heads, c.num_heads], dim=-1)
        conv_in = torch.cat([self.q_proj(flat)[token], kv], dim=-1)
        beta = b_pre.sigmoid()
        g = -upcast(self.A_log).exp() * F.softplus(upcast(a_pre) + self.dt_bias)
        return conv_in, beta, g

    def _qkv(self, conv_out: torch.Tensor):
        c = self.config
        q, k, v = conv_out.split([c.key_dim, c.key_dim, c.value_dim], dim=-1)
        r = conv_out.shape[0]
        q = l2_normalize(q.view(r, c.num_heads, c.head_dim))
        k = l2_normalize(k.view(r, c.num_heads, c.head_dim))
        return q, k, v.reshape(r, c.num_heads, c.head_v_dim)

    def _scan(self, x, memory_idx, weights, mask, state):
        """Any T: dispatch tokens into (sequence, memory) segments, conv and scan them."""
        b, t, _ = x.shape
        slots = self.config.memory_slots
        if mask is None:
            mask = torch.ones(b, t, dtype=torch.bool, device=x.device)
        choice_of_row, row_of_choice, offsets = ops.dispatch(memory_idx, mask, slots)
        token = choice_of_row // memory_idx.shape[-1]
        conv_in, beta, g = self._rows(x, token, memory_idx.flatten()[choice_of_row])
        conv_weight, conv_bias = self._conv_params()
        conv_init = None if state is None else state.conv.flatten(0, 1)
        conv_out, conv_final = ops.segment_conv(conv_in, conv_weight, conv_bias, offsets, conv_init)
        q, k, v = self._qkv(conv_out)
        rec_init = None if state is None else state.recurrent.flatten(0, 1)
        o_rows, rec_final = ops.chunk_gated_delta(q, k, v, g, beta, offsets, rec_init, self.scale)
        if state is not None:
            state.recurrent.copy_(rec_final.view_as(state.recurrent))
            state.conv.copy_(conv_final.view_as(state.conv))
        return ops.combine(o_rows, weights, row_of_choice)

    def _step(self, x, memory_idx, weights, mask, state):
        """T = 1 with a cache: each token advances only the states of its k' memories."""
        b = x.shape[0]
        chosen = memory_idx.shape[-1]
        slots = self.config.memory_slots
        rows = b * chosen
        token = torch.arange(b, device=x.device).repeat_interleave(chosen)
        memory = memory_idx.flatten()
        slot = token * slots + memory
        conv_in, beta, g = self._rows(x, token, memory)
        conv_weight, conv_bias = self._conv_params()
        # views, not copies: the index_copy_ below must land in the cache's own buffers
        conv_states = state.conv.view(-1, *state.conv.shape[2:])
        rec_states = state.recurrent.view(-1, *state.recurrent.shape[2:])
        conv_prev, rec_prev = conv_states[slot], rec_states[slot]
        one_each = torch.arange(rows + 1, device=x.device)
        conv_out, conv_new = ops.segment_conv(conv_in, conv_weight, conv_bias, one_each, conv_prev)
        q, k, v = self._qkv(conv_out)
        o_rows, rec_new = ops.gated_delta_step(q, k, v, g, beta, rec_prev, self.scale)
        if mask is not None:  # a padding token changes no state
            keep = mask[:, -1].repeat_interleave(chosen)
            conv_new = torch.where(keep[:, None, None], conv_new, conv_prev)
            rec_new = torch.where(keep[:, None, None, None], rec_new, rec_prev)
        conv_states.index_copy_(0, slot, conv_new)
        rec_states.index_copy_(0, slot, rec_new)
        return ops.combine(o_rows, weights, torch.arange(rows, device=x.device).view(b, 1, chosen))


def _split_memory_proj(module: MomLayer, state_dict, prefix, local_metadata) -> None:
    stacked = state_dict.pop(prefix + "memory_proj")
    for names, weights in zip(module.reference_names(), stacked):
        for name, block in zip(names, weights.split(module._set_split())):
            state_dict[f"{prefix}{name}.weight"] = block


def _stack_memory_proj(module: MomLayer, state_dict, prefix, local_metadata, strict, missing_keys,
                       unexpected_keys, error_msgs) -> None:
    keys = [[f"{prefix}{name}.weight" for name in names] for names in module.reference_names()]
    if prefix + "memory_proj" in state_dict or not all(k in state_dict for ks in keys for k in ks):
        return  # leave the keys as they are: load_state_dict reports what is missing
    state_dict[prefix + "memory_proj"] = torch.stack(
        [torch.cat([state_dict.pop(k) for k in ks]) for ks in keys])
