"""Independent float64 oracles written straight from docs/math.md, token by token, with Python
loops.

They read weights by their reference checkpoint names (state_dict), never through the package's
ops or its stacked parameters, so they check the implementation rather than restate it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def recurrence(q, k, v, g, beta, scale, state=None):
    """Gated delta rule over one sequence: q, k [L, H, K]; v [L, H, V]; g, beta [L, H].
    Returns (o [L, H, V], final state [H, K, V])."""
    length, h, dk = k.shape
    s = torch.zeros(h, dk, v.shape[-1], dtype=v.dtype) if state is None else state.clone()
    outs = []
    for j in range(length):
        s = s * g[j].exp()[:, None, None]
        u = beta[j][:, None] * (v[j] - torch.einsum("hk,hkv->hv", k[j], s))
        s = s + k[j][:, :, None] * u[:, None, :]
        outs.append(torch.einsum("hk,hkv->hv", scale * q[j], s))
    o = torch.stack(outs) if outs else v.new_zeros(0, h, v.shape[-1])
    return o, s


def segments_recurrence(q, k, v, g, beta, offsets, scale, initial=None):
    """`recurrence` for each packed segment; rows outside segments give zero."""
    o = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=v.dtype)
    finals = []
    for s in range(len(offsets) - 1):
        a, b = int(offsets[s]), int(offsets[s + 1])
        o_s, f = recurrence(q[a:b], k[a:b], v[a:b], g[a:b], beta[a:b], scale,
                            None if initial is None else initial[s])
        o[a:b] = o_s
        finals.append(f)
    empty = q.new_zeros(0, q.shape[1], k.shape[-1], v.shape[-1], dtype=v.dtype)
    return o, torch.stack(finals) if finals else empty


def causal_conv(x, weight, bias=None, history=None):
    """Causal depthwise conv + SiLU over one sequence x [L, D] with weight [D, W]; history
    [W-1, D] holds the inputs before x (zero if None). Returns (y, last W-1 inputs)."""
    width = weight.shape[1]
    if history is None:
        history = x.new_zeros(width - 1, x.shape[1])
    seq = torch.cat([history, x])
    ys = []
    for j in range(x.shape[0]):
        window = seq[j:j + width]                      # [W, D], oldest first
        z = (window.t() * weight).sum(-1) + (0 if bias is None else bias)
        ys.append(F.silu(z))
    y = torch.stack(ys) if ys else x.new_zeros(0, x.shape[1])
    return y, seq[-(width - 1):]


def _memory_names(config, memory):
    if config.single_kv_proj or memory == config.num_memories:
        return "shared_k", "shared_v", "shared_b", "shared_a"
    return tuple(f"{p}.{memory}" for p in ("k_proj", "v_proj", "b_proj", "a_proj"))


def _run_memory(sd, config, memory, xs):
    """One memory over one sub-sequence xs [L, d] (docs/math.md#the-gated-delta-rule): returns
    o [L, H, V]."""
    h, dk, dv = config.num_heads, config.head_dim, config.head_v_dim
    kn, vn, bn, an = _memory_names(config, memory)

    def conv(name, pre):
        w = sd[f"{name}.weight"][:, 0, :]
        return causal_conv(pre, w, sd.get(f"{name}.bias"))[0]

    q = conv("q_conv1d", xs @ sd["q_proj.weight"].t()).view(-1, h, dk)
    k = conv("k_conv1d", xs @ sd[f"{kn}.weight"].t()).view(-1, h, dk)
    v = conv("v_conv1d", xs @ sd[f"{vn}.weight"].t()).view(-1, h, dv)
    beta = torch.sigmoid(xs @ sd[f"{bn}.weight"].t())
    g = -sd["A_log"].exp() * F.softplus(xs @ sd[f"{an}.weight"].t() + sd["dt_bias"])
    l2 = lambda t: t / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-6)  # noqa: E731
    return recurrence(l2(q), l2(k), v, g, beta, dk ** -0.5)[0]


def mom_layer(sd, config, x, mask=None):
    """One MoM layer (docs/math.md#routing-and-segments) on x [B, T, d] float64, mask [B, T]
    (1 = token)."""
    b_size, t_size, _ = x.shape
    h, dv, m_count = config.num_heads, config.head_v_dim, config.num_memories
    z = x @ sd["gate.weight"].t()
    probs = z.softmax(-1)
    idx = torch.tensor([[top_choices(z[b, t], config.topk) for t in range(t_size)] for b in range(b_size)],
                       dtype=torch.int64).view(b_size, t_size, config.topk)
    w = probs.gather(-1, idx)
    w = w / w.sum(-1, keepdim=True)
    y = torch.zeros(b_size, t_size, h, dv, dtype=x.dtype)
    for b in range(b_size):
        real = [t for t in range(t_size) if mask is None or bool(mask[b, t])]
        for m in range(m_count):
            times = [t for t in real if m in idx[b, t].tolist()]
            if times:
                o = _run_memory(sd, config, m, x[b, times])
                for j, t in enumerate(times):
                    y[b, t] += w[b, t, idx[b, t].tolist().index(m)] * o[j]
        if config.shared_mem and real:
            y[b, real] += _run_memory(sd, config, m_count, x[b, real])
    normed = rms_norm(y, sd["o_norm.weight"], config.norm_eps)
    if config.use_output_gate:
        z = (x @ sd["g_proj.weight"].t()).view(b_size, t_size, h, dv)
        normed = normed * z * torch.sigmoid(z)
    return normed.flatten(2) @ sd["o_proj.weight"].t()


def top_choices(z, k):
    """The k memories with the largest logits z [M], largest first, ties to the lower index."""
    values = z.detach().tolist()
    return sorted(range(len(values)), key=lambda e: (-values[e], e))[:k]


def load_balancing(router_logits, topk, mask=None):
    """Switch/Mixtral aux loss with explicit counting loops over tokens
    (docs/math.md#block-model-and-loss)."""
    num_memories = router_logits[0].shape[-1]
    share = torch.zeros(topk, num_memories, dtype=torch.float64)
    prob = torch.zeros(num_memories, dtype=torch.float64)
    count = 0
    for logits in router_logits:
        for b in range(logits.shape[0]):
            for t in range(logits.shape[1]):
                if mask is not None and not bool(mask[b, t]):
                    continue
                p = logits[b, t].double().softmax(-1)
                for i, e in enumerate(top_choices(logits[b, t].double(), topk)):
                    share[i, e] += 1
                prob += p
                count += 1
    return num_memories * ((share / count) * (prob / count)).sum()


def rms_norm(x, w, eps):
    """RMSNorm over the last dim, in x's dtype (float64 here)."""
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def mom_model(sd, config, ids, mask=None):
    """Logits of the whole model (docs/math.md#block-model-and-loss): embeddings, pre-norm blocks
    of `mom_layer` and a SwiGLU MLP, final norm, lm_head; weights read by their reference names."""
    eps = config.norm_eps
    h = sd["model.embeddings.weight"][ids]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        layer_sd = {k[len(p + "attn."):]: v for k, v in sd.items() if k.startswith(p + "attn.")}
        h = h + mom_layer(layer_sd, config, rms_norm(h, sd[p + "attn_norm.weight"], eps), mask)
        u = rms_norm(h, sd[p + "mlp_norm.weight"], eps)
        gate = F.silu(u @ sd[p + "mlp.gate_proj.weight"].t())
        h = h + (gate * (u @ sd[p + "mlp.up_proj.weight"].t())) @ sd[p + "mlp.down_proj.weight"].t()
    head = sd.get("lm_head.weight", sd["model.embeddings.weight"])
    return rms_norm(h, sd["model.norm.weight"], eps) @ head.t()
