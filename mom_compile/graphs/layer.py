"""`MomLayer`: one Mixture-of-Memories token mixer (docs/math.md#routing-and-segments and the
sections after it), built from the `mom` ops.

The shared memory is treated as one more memory (index num_memories) that every token chooses
with weight 1, so routed and shared memories go through one dispatch, one conv and one scan.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..ops._checks import STATE_DTYPES, check_writable
from ..ops.direct_call import call
from ..ops.gated_rms_norm import gated_rms_norm_op
from ..ops.memory_decode import gates, memory_decode_inplace_op
from ..ops.route import route_op
from .cache import LayerState, state_specs
from .config import MomConfig
from .norm import RMSNorm
from .stacked import Part, blocks, padding, stacked_parameter


class MomLayer(nn.Module):
    """Input x [B, T, hidden] (the block's normed hidden states) -> output [B, T, hidden].

    Every projection of x lives in one stacked parameter `in_proj` (rows: router gate | q | output
    gate | k, v, beta, alpha of each memory set, the shared one last), and the q/k/v short convs in
    `conv_weight` (and `conv_bias`), so that one matrix product projects every memory;
    state_dict() and load_state_dict() speak the reference names (gate.weight, k_proj.{m}.weight,
    shared_k.weight, q_conv1d.weight, ...).
    `keep_scan_states` (default True): in training the scan keeps its chunk states for the backward;
    False has the backward recompute them (`MomForCausalLM.gradient_checkpointing_enable`).
    """

    def __init__(self, config: MomConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.num_heads, self.head_dim, self.head_v_dim = c.num_heads, c.head_dim, c.head_v_dim
        self.scale = c.head_dim ** -0.5
        # padded to 8 rows (16 bytes in bf16): the router's M rows would misalign the output
        self.in_proj = stacked_parameter(self, "in_proj", self._in_parts(), multiple_of=8)
        # project()'s split, computed once: an eager decode step is bound by the host
        self._columns, self._set_width = self._head_split(), sum(self._set_split())
        # a cache entry's recurrent and conv shapes but the batch (`_check_state`)
        self._state_shapes = [shape[1:] for shape, _ in state_specs(c, 0, torch.float32)[:2]]
        self.A_log = nn.Parameter(torch.empty(c.num_heads))
        self.dt_bias = nn.Parameter(torch.empty(c.num_heads))
        convs = [(f"{n}_conv1d", dim) for n, dim in (("q", c.key_dim), ("k", c.key_dim), ("v", c.value_dim))]
        self.conv_weight = stacked_parameter(self, "conv_weight",
                                             [(f"{n}.weight", (dim, 1, c.conv_size)) for n, dim in convs])
        self.conv_bias = stacked_parameter(self, "conv_bias", [(f"{n}.bias", (dim,)) for n, dim in convs]) \
            if c.conv_bias else None
        self.o_norm = RMSNorm(c.head_v_dim, c.norm_eps)
        self.o_proj = nn.Linear(c.value_dim, c.hidden_size, bias=False)
        self.keep_scan_states = True
        self.reset_parameters()

    # -- parameters ----------------------------------------------------------------------------
    def _in_parts(self) -> list[Part]:
        c = self.config
        d = c.hidden_size
        parts = [("gate.weight", (c.num_memories, d)), ("q_proj.weight", (c.key_dim, d))]
        if c.use_output_gate:
            parts.append(("g_proj.weight", (c.value_dim, d)))
        for names in self.memory_set_names():
            parts += [(f"{name}.weight", (rows, d)) for name, rows in zip(names, self._set_split())]
        return parts

    def memory_set_names(self) -> list[list[str]]:
        """Reference names of each memory set's projections, in the order k, v, beta, alpha."""
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

    def _head_split(self) -> list[int]:
        """Columns of x @ in_proj^T: router logits, q, output gate, the memory sets, padding."""
        c = self.config
        sets = len(self.memory_set_names()) * sum(self._set_split())
        split = [c.num_memories, c.key_dim, c.value_dim if c.use_output_gate else 0, sets]
        return split + [self.in_proj.shape[0] - sum(split)]

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference initialisation: Xavier-uniform (gain 2^-2.5) projections, A ~ U(0, 16),
        dt ~ logU(1e-3, 1e-1) stored through the inverse softplus, convs as nn.Conv1d's default."""
        for block in blocks(self.in_proj, self._in_parts()) + [self.o_proj.weight]:
            nn.init.xavier_uniform_(block, gain=2 ** -2.5)
        padding(self.in_proj, self._in_parts()).zero_()
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0, 16).log())
        dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(0.1) - math.log(0.001))
                       + math.log(0.001)).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        bound = self.config.conv_size ** -0.5  # nn.Conv1d's default for a depthwise conv
        for p in (self.conv_weight, self.conv_bias):
            if p is not None:
                p.uniform_(-bound, bound)
        self.o_norm.reset_parameters()

    # -- forward -------------------------------------------------------------------------------
    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x @ in_proj^T, split: router logits [..., M], q [..., HK], output gate [..., HV] (empty
        without one), the memory sets [..., sets, HK + HV + 2H]."""
        logits, q, z, per_set, _ = F.linear(x, self.in_proj).split(self._columns, dim=-1)
        return logits, q, z, per_set.unflatten(-1, (-1, self._set_width))

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's memories [B, T, k'] and float32 weights from router logits [B, T, M]
        (k' = topk + 1 with the shared memory, which always has weight 1): `mom::route`."""
        return ops.route(logits, self.config.topk, self.config.shared_mem)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, state: LayerState | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, hidden]; mask [B, T] bool (False = padding) or None; state: this layer's cache
        entry, advanced in place. Returns (output [B, T, hidden], router logits [B, T, M])."""
        b, t, _ = x.shape
        c = self.config
        logits, q, z, per_set = self.project(x)
        if state is not None and q.dtype != state.conv.dtype:
            # under autocast: the memories run in the cache's dtype, the model's (docs/math.md#precision)
            q, per_set = q.to(state.conv.dtype), per_set.to(state.conv.dtype)
        # the fused decode op has no autograd; with gradients on, one token goes through the scan
        one_step = state is not None and t == 1 and not torch.is_grad_enabled()
        # the eager step on an in-place cache is bound by the host: its ops are called without their
        # wrappers' argument checks, all arguments being the layer's own (`_step` checks the cache)
        direct = one_step and not state.functional and not torch.compiler.is_compiling()
        memory_idx, weights = call(route_op, logits, c.topk, c.shared_mem) if direct else self.route(logits)
        rows = (q, per_set, memory_idx, weights, mask, state)
        y, mix = self._step(*rows) if one_step else (self._scan(*rows), None)
        norm = (y, z if c.use_output_gate else None, self.o_norm.weight, float(self.o_norm.eps), x.dtype, mix)
        o = call(gated_rms_norm_op, *norm) if direct else ops.gated_rms_norm(*norm)
        return self.o_proj(o.flatten(2)), logits

    def _qkv(self, conv_out: torch.Tensor):
        c = self.config
        q, k, v = conv_out.split([c.key_dim, c.key_dim, c.value_dim], dim=-1)
        r = conv_out.shape[0]
        q = ops.l2_normalize(q.view(r, c.num_heads, c.head_dim))
        k = ops.l2_normalize(k.view(r, c.num_heads, c.head_dim))
        # v is a column slice of conv_out: made contiguous once here (Inductor fuses the copy), the
        # scan's forward and backward take it as it is instead of each copying the strided view
        return q, k, v.reshape(r, c.num_heads, c.head_v_dim).contiguous()

    def _scan(self, q, per_set, memory_idx, weights, mask, state):
        """Any T: dispatch tokens into (sequence, memory) segments, conv and scan them."""
        b, t, _ = q.shape
        slots = self.config.memory_slots
        if mask is None:
            mask = torch.ones(b, t, dtype=torch.bool, device=q.device)
        token, memory, row_of_choice, offsets = ops.dispatch(memory_idx, mask, slots)
        sets = torch.zeros_like(memory) if self.config.single_kv_proj else memory
        conv_in, gate_in = ops.gather_rows(q.flatten(0, 1), per_set.flatten(0, 1), token, sets,
                                           row_of_choice.flatten(0, 1), sum(self._set_split()[:2]))
        beta, g = gates(*gate_in.split(self.num_heads, dim=-1), self.A_log, self.dt_bias)
        conv_init, rec_init = self._start_states(state)
        conv_out, conv_final = ops.segment_conv(conv_in, self.conv_weight.squeeze(1), self.conv_bias,
                                                offsets, conv_init)
        q, k, v = self._qkv(conv_out)
        o_rows, rec_final = ops.chunk_gated_delta(q, k, v, g, beta, offsets, rec_init, self.scale,
                                                   self.keep_scan_states)
        if state is not None:
            state.update(rec_final.view_as(state.recurrent), conv_final.view_as(state.conv))
        return ops.combine(o_rows, weights, row_of_choice)

    @staticmethod
    def _start_states(state: LayerState | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The cache's (conv, recurrent) states as the scan's start states, None without a cache.
        With gradients on they are copies: the ops keep them for the backward, and the update
        after the scan rewrites the cache's own. The copy is copysign(|x|, x), bitwise x, because
        Inductor drops a clone (or copy_, same-dtype .to, cat) of a graph input as a no-op, which
        would leave the compiled backward reading the states after the update."""
        if state is None:
            return None, None
        conv, recurrent = state.conv.flatten(0, 1), state.recurrent.flatten(0, 1)
        if torch.is_grad_enabled() and not state.functional:
            conv, recurrent = (torch.copysign(t.abs(), t) for t in (conv, recurrent))
        return conv, recurrent

    def _step(self, q, per_set, memory_idx, weights, mask, state):
        """T = 1 with a cache, no autograd: each token advances only its k' memories' states, every
        row in one `mom::memory_decode_`, which reads the projections where they lie and writes the
        cache in place (a functional cache takes new tables from `mom::memory_decode` instead).
        Returns the memories' outputs [B, 1, k', H, V] and their weights [B, 1, k'], which the
        output norm mixes (`mom::gated_rms_norm`'s mix: the combine in the norm's launch)."""
        memory = memory_idx[:, 0]
        if mask is not None:  # a padding token changes no state
            memory = torch.where(mask[:, -1:], memory, -1)
        args = (q[:, 0], per_set[:, 0], memory, self.A_log, self.dt_bias, self.conv_weight.squeeze(1),
                self.conv_bias)
        single_set = self.config.single_kv_proj
        if state.functional:
            o, conv, recurrent = ops.memory_decode(*args, state.conv, state.recurrent, self.scale, single_set)
            state.update(recurrent, conv)
        else:
            # the cache entry is the one argument the layer did not build: checked here, and the
            # op's own checks skipped (`forward`'s direct calls)
            self._check_state(state, q)
            o = call(memory_decode_inplace_op, *args, state.conv, state.recurrent, self.scale, single_set)
        return o[:, None], weights

    def _check_state(self, state: LayerState, q: torch.Tensor) -> None:
        """Raise unless `state` holds what `MomCache` makes for this layer's config, batch and device."""
        rec, conv = state.recurrent, state.conv
        rec_shape, conv_shape = ((q.shape[0], *shape) for shape in self._state_shapes)
        if (rec.shape != rec_shape or conv.shape != conv_shape or rec.dtype not in STATE_DTYPES
                or conv.dtype != q.dtype or rec.device != q.device or conv.device != q.device):
            raise ValueError(f"state: expected a recurrent state {list(rec_shape)} float32 or float64 and a "
                             f"conv state {list(conv_shape)} {q.dtype} on {q.device} (this layer's entry of "
                             f"a MomCache for its config), got {list(rec.shape)} {rec.dtype} on {rec.device} "
                             f"and {list(conv.shape)} {conv.dtype} on {conv.device}")
        check_writable("state.recurrent", rec)
        check_writable("state.conv", conv)
