"""MomLayer against the token-by-token float64 oracle (docs/math.md), values and gradients."""
from __future__ import annotations

import pytest
import torch

from mom_compile import MomConfig, MomLayer

import oracle
from models import tiny_model

f64 = torch.float64

VARIANTS = {
    "default": {},
    "no_shared": dict(shared_mem=False),
    "single_kv": dict(single_kv_proj=True),
    "single_kv_no_shared": dict(single_kv_proj=True, shared_mem=False),
    "expand_v2_bias_nogate": dict(expand_v=2.0, conv_bias=True, use_output_gate=False),
    "top1_of_3_conv2": dict(num_memories=3, topk=1, conv_size=2),
}


def layer_and_weights(seed=0, **overrides):
    model = tiny_model(seed=seed, **overrides)
    layer = model.model.layers[0].attn
    return layer, {k: v.detach() for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(2, 9), (1, 1), (3, 70)])
def test_layer_matches_oracle(variant, shape):
    layer, sd = layer_and_weights(**VARIANTS[variant])
    x = torch.randn(*shape, layer.config.hidden_size, dtype=f64)
    out, _ = layer(x)
    torch.testing.assert_close(out, oracle.mom_layer(sd, layer.config, x), rtol=1e-9, atol=1e-10)


def test_layer_with_left_padding_matches_oracle():
    layer, sd = layer_and_weights()
    x = torch.randn(3, 8, layer.config.hidden_size, dtype=f64)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, :3] = False
    mask[2, :7] = False
    out, _ = layer(x, mask)
    expect = oracle.mom_layer(sd, layer.config, x, mask)
    torch.testing.assert_close(out[mask], expect[mask], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("where", ["right", "middle", "every_third"])
def test_layer_with_padding_anywhere_matches_oracle(where):
    layer, sd = layer_and_weights()
    x = torch.randn(2, 10, layer.config.hidden_size, dtype=f64)
    mask = torch.ones(2, 10, dtype=torch.bool)
    if where == "right":
        mask[0, 6:] = False
    elif where == "middle":
        mask[1, 3:7] = False
    else:
        mask[:, ::3] = False
    out, _ = layer(x, mask)
    torch.testing.assert_close(out[mask], oracle.mom_layer(sd, layer.config, x, mask)[mask],
                               rtol=1e-9, atol=1e-10)


def test_strong_decay_and_beta_near_one_match_oracle():
    layer, sd = layer_and_weights()
    sd["A_log"] = torch.full_like(sd["A_log"], 3.0)  # exp(A) ~ 20: the state forgets within a few tokens
    for name in [n for n in sd if n.startswith(("b_proj.", "shared_b"))]:
        sd[name] = torch.zeros_like(sd[name])
        sd[name][:, 0] = 50.0  # beta ~ 1
    layer.load_state_dict(sd)
    x = torch.randn(2, 70, layer.config.hidden_size, dtype=f64).abs()
    torch.testing.assert_close(layer(x)[0], oracle.mom_layer(sd, layer.config, x), rtol=1e-8, atol=1e-10)


def test_tiny_prefill_keeps_time_order():
    """B*T*k <= 32: the case where the reference's unstable sort loses time order
    (docs/math.md#correctness)."""
    layer, sd = layer_and_weights()
    for t in (2, 3, 5):
        x = torch.randn(2, t, layer.config.hidden_size, dtype=f64)
        assert 2 * t * (layer.config.topk + 1) <= 32
        torch.testing.assert_close(layer(x)[0], oracle.mom_layer(sd, layer.config, x), rtol=1e-9, atol=1e-10)


def test_memories_without_tokens_and_all_tokens_to_one_memory():
    layer, sd = layer_and_weights(topk=1)
    d = layer.config.hidden_size
    common = torch.randn(d, dtype=f64)
    x = common + 0.1 * torch.randn(2, 6, d, dtype=f64)
    sd["gate.weight"] = torch.zeros_like(sd["gate.weight"])  # memory 2 gets a dominant logit on
    sd["gate.weight"][2] = 10 * common                       # every token; 0, 1 and 3 get none
    layer.load_state_dict(sd)
    memory_idx, _ = layer.route(layer.project(x)[0])
    assert (memory_idx[..., 0] == 2).all()
    torch.testing.assert_close(layer(x)[0], oracle.mom_layer(sd, layer.config, x), rtol=1e-9, atol=1e-10)


def grads_by_reference_name(layer) -> dict[str, torch.Tensor]:
    """The layer's parameter gradients under the reference names, through its state-dict split."""
    saved = {name: p.data for name, p in layer.named_parameters()}
    try:
        for p in layer.parameters():
            p.data = torch.zeros_like(p) if p.grad is None else p.grad
        return {k: v.clone() for k, v in layer.state_dict().items()}
    finally:
        for name, p in layer.named_parameters():
            p.data = saved[name]


@pytest.mark.parametrize("variant", ["default", "single_kv", "expand_v2_bias_nogate"])
def test_layer_gradients_match_autograd_through_oracle(variant):
    layer, _ = layer_and_weights(**VARIANTS[variant])
    x = torch.randn(2, 7, layer.config.hidden_size, dtype=f64, requires_grad=True)
    w = torch.randn(2, 7, layer.config.hidden_size, dtype=f64)
    (layer(x)[0] * w).sum().backward()
    sd = {k: v.detach().clone().requires_grad_() for k, v in layer.state_dict().items()}
    x_ref = x.detach().clone().requires_grad_()
    (oracle.mom_layer(sd, layer.config, x_ref) * w).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-8, atol=1e-10)
    mine = grads_by_reference_name(layer)
    assert set(mine) == set(sd)
    for k, ref in sd.items():
        expect = torch.zeros_like(ref) if ref.grad is None else ref.grad
        torch.testing.assert_close(mine[k], expect, rtol=1e-8, atol=1e-10, msg=k)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_top_k_matches_torch_topk_and_breaks_ties_to_the_lower_index(device):
    from mom_compile.ops.route import top_k
    logits = torch.randn(5, 7, 6, dtype=f64, device=device)
    assert torch.equal(top_k(logits, 3), logits.topk(3, dim=-1).indices)
    tied = torch.tensor([[0.1, 0.3, 0.3, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3]] * 3, dtype=f64, device=device)
    assert top_k(tied, 6).tolist() == [[1, 2, 4, 5, 6, 7]] * 3
    nan, inf = float("nan"), float("inf")  # NaN logits (diverged weights): distinct memories in range
    nans = torch.tensor([[nan, 0.5, nan, nan], [nan] * 4, [-inf, nan, -inf, 1.0]], dtype=f64, device=device)
    assert top_k(nans, 2).tolist() == [[1, 0], [0, 1], [3, 0]]


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
def test_router_weights_are_the_softmax_of_the_chosen_logits(traced):
    layer = MomLayer(MomConfig(hidden_size=32, num_heads=2, head_dim=8, num_memories=6, topk=3))
    route = torch.compile(layer.route, backend="aot_eager", fullgraph=True) if traced else layer.route
    logits = (torch.stack([torch.randperm(6) for _ in range(10)]).view(2, 5, 6) / 4 - 1).bfloat16()  # no ties
    memory_idx, weights = route(logits)
    top = logits.double().topk(3, dim=-1)
    assert torch.equal(memory_idx[..., :3], top.indices) and (memory_idx[..., 3] == 6).all()
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights[..., :3].double(), top.values.softmax(-1), rtol=1e-6, atol=1e-7)
    assert (weights[..., 3] == 1).all()


def test_in_proj_padding_is_zero_and_invisible_to_the_state_dict():
    """in_proj ends in zero rows up to a multiple of 8 (aligned output rows for cuBLAS): no
    state-dict entry shows them, loading the reference names zeroes them whatever they held, and a
    gradient never makes them non-zero."""
    from mom_compile.graphs.stacked import padding
    layer, sd = layer_and_weights(num_memories=3, topk=1)  # 179 rows: 5 padding rows
    parts = layer._in_parts()
    assert layer.in_proj.shape[0] == 184 and not any("in_proj" in k for k in sd)
    with torch.no_grad():
        layer.in_proj.fill_(float("nan"))
    layer.load_state_dict(sd)
    assert torch.equal(padding(layer.in_proj, parts), torch.zeros(5, 32, dtype=f64))
    x = torch.randn(2, 9, 32, dtype=f64)
    layer(x)[0].sum().backward()
    assert torch.equal(padding(layer.in_proj.grad, parts), torch.zeros(5, 32, dtype=f64))
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert torch.equal(padding(layer.in_proj, parts), torch.zeros(5, 32, dtype=f64))
