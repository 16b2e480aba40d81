"""The model-level equivalences of docs/math.md#correctness, the losses, and generation, in float64."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from mom_compile import MomForCausalLM, ops
from mom_compile.graphs.stacked import padding
from mom_compile.ops.chunk_gated_delta import residual_shapes

import oracle
from models import TINY_VOCAB, ids, tiny_config, tiny_model

TOL = dict(rtol=1e-9, atol=1e-10)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("overrides", [{}, dict(tie_word_embeddings=True, single_kv_proj=True)])
def test_model_matches_the_spec_oracle(overrides):
    model = tiny_model(**overrides)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    x = ids(2, 9)
    mask = torch.ones(2, 9, dtype=torch.int64)
    mask[1, :3] = 0
    got = model(x, attention_mask=mask).logits
    want = oracle.mom_model(sd, model.config, x, mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], **TOL)


@pytest.mark.parametrize("prefix", [1, 3, 8])
def test_prefill_then_steps_equals_forward_at_every_position(model, prefix):
    x = ids(3, 12)
    full = model(x).logits
    out = model(x[:, :prefix], use_cache=True)
    logits = [out.logits]
    for t in range(prefix, x.shape[1]):
        logits.append(model(x[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(logits, 1), full, **TOL)


def test_autocast_decoding_with_a_cache():
    """A float32 model under bfloat16 autocast decodes with its own (float32) cache: prefill and
    steps give the logits of one prefill of every token, and generate runs."""
    model = tiny_model(dtype=torch.float32)
    x = ids(2, 10)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(x, use_cache=True).logits
        out = model(x[:, :4], use_cache=True)
        logits = [out.logits] + [model(x[:, t:t + 1], past_key_values=out.past_key_values).logits
                                 for t in range(4, 10)]
        generated = model.generate(x, max_new_tokens=3, cache=model.new_cache(2))
    torch.testing.assert_close(torch.cat(logits, 1).float(), full.float(), rtol=0,
                               atol=2e-2 * full.abs().max().item())
    assert generated.shape == (2, 13) and torch.equal(generated[:, :10], x)


def test_logits_to_keep_gives_the_last_positions_of_the_oracle(model):
    """logits_to_keep=k: the oracle's logits at the last k positions, and nothing else; bad values
    and a loss without every position are refused by name."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    x = ids(2, 9)
    mask = torch.ones(2, 9, dtype=torch.int64)
    mask[1, :3] = 0
    want = oracle.mom_model(sd, model.config, x, mask)
    for keep in (1, 4):
        got = model(x, attention_mask=mask, logits_to_keep=keep).logits
        assert got.shape == (2, keep, model.config.vocab_size)
        torch.testing.assert_close(got, want[:, -keep:], **TOL)
    for bad in (-1, 1.0):
        with pytest.raises(ValueError, match="logits_to_keep: expected an int >= 0"):
            model(x, logits_to_keep=bad)
    with pytest.raises(ValueError, match="logits_to_keep: the loss needs every position"):
        model(x, labels=x, logits_to_keep=1)


def test_split_prefills_equal_forward_at_every_split_point(model):
    x = ids(2, 9)
    full = model(x).logits
    for split in range(1, x.shape[1]):
        first = model(x[:, :split], use_cache=True)
        second = model(x[:, split:], past_key_values=first.past_key_values, use_cache=True)
        torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full, **TOL)


def test_three_way_split_with_empty_memories(model):
    """Continuing with T > 1 from a cache where some (sequence, memory) pairs get no token
    (the reference crashes here, docs/math.md#correctness)."""
    x = ids(2, 7)
    full = model(x).logits
    out = model(x[:, :2], use_cache=True)
    mid = model(x[:, 2:4], past_key_values=out.past_key_values, use_cache=True)
    last = model(x[:, 4:], past_key_values=out.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([out.logits, mid.logits, last.logits], 1), full, **TOL)


def test_step_path_equals_scan_path_for_one_token(model):
    layer = model.model.layers[0].attn
    x = torch.randn(3, 5, layer.config.hidden_size, dtype=torch.float64)
    states = [model.new_cache(3)[0] for _ in range(2)]
    for s in states:
        layer(x[:, :4], None, s)
    logits, q, _, per_set = layer.project(x[:, 4:])
    memory_idx, weights = layer.route(logits)
    with torch.no_grad():  # the fused decode op is inference-only
        o_step, mix = layer._step(q, per_set, memory_idx, weights, None, states[0])
    y_scan = layer._scan(q, per_set, memory_idx, weights, None, states[1])
    torch.testing.assert_close((mix[..., None, None] * o_step).sum(-3), y_scan, **TOL)  # the combine
    torch.testing.assert_close(states[0].recurrent, states[1].recurrent, **TOL)
    torch.testing.assert_close(states[0].conv, states[1].conv, **TOL)


def test_left_padded_batch_equals_sequences_alone(model):
    lengths = [6, 2, 9]
    seqs = [ids(1, n) for n in lengths]
    t = max(lengths)
    batch = torch.zeros(len(seqs), t, dtype=torch.int64)
    mask = torch.zeros(len(seqs), t, dtype=torch.int64)
    for i, s in enumerate(seqs):
        batch[i, t - s.shape[1]:] = s[0]
        mask[i, t - s.shape[1]:] = 1
    padded = model(batch, attention_mask=mask, use_cache=True)
    for i, s in enumerate(seqs):
        alone = model(s, use_cache=True)
        torch.testing.assert_close(padded.logits[i, t - s.shape[1]:], alone.logits[0], **TOL)
        for got, want in zip(padded.past_key_values.layers, alone.past_key_values.layers):
            torch.testing.assert_close(got.recurrent[i], want.recurrent[0], **TOL)
            torch.testing.assert_close(got.conv[i], want.conv[0], **TOL)


def test_padding_token_in_a_decode_step_changes_no_state(model):
    x = ids(2, 5)
    out = model(x, use_cache=True)
    before = [t.clone() for t in out.past_key_values.states()]
    model(ids(2, 1), attention_mask=torch.tensor([[1] * 5 + [0], [1] * 5 + [0]]),
          past_key_values=out.past_key_values, use_cache=True)
    for b, s in zip(before, out.past_key_values.states()):
        torch.testing.assert_close(s, b, rtol=0, atol=0)


def test_losses_match_direct_computation(model):
    x = ids(2, 10)
    mask = torch.ones(2, 10, dtype=torch.int64)
    mask[1, :4] = 0
    labels = x.clone()
    labels[1, :4] = -100
    out = model(x, attention_mask=mask, labels=labels, output_router_logits=True)
    assert model(x, attention_mask=mask, labels=labels).router_logits is None  # asked for only
    aux = oracle.load_balancing(out.router_logits, model.config.topk, mask)
    torch.testing.assert_close(out.aux_loss, aux.to(out.aux_loss.dtype), **TOL)
    ce_terms = [-F.log_softmax(out.logits[b, t], -1)[labels[b, t + 1]]
                for b in range(2) for t in range(9) if labels[b, t + 1] != -100]
    ce = torch.stack(ce_terms).mean()
    torch.testing.assert_close(out.loss, ce + model.config.aux_loss_scale * aux, **TOL)


def test_load_balancing_counts_the_routers_choices_on_ties():
    """Tied logits: the loss counts the memories the router chose (ties to the lower index), as the
    oracle's explicit ranking does; torch.topk picked other tied memories (a different loss)."""
    from mom_compile.graphs.loss import load_balancing_loss
    logits = torch.tensor([[[1.0, 0, 0, 0], [0, 5, 0, 0], [0, 0, 2, 2]]])  # [B, T, M]
    got = load_balancing_loss([logits], topk=2)
    p = logits[0].double().softmax(-1)
    chosen = [[0, 1], [1, 0], [2, 3]]  # the second choice of token 0: memory 1 (tied with 2 and 3)
    want = 4 * sum(p[:, e].mean() * sum(e in c for c in chosen) / 3 for e in range(4))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(oracle.load_balancing([logits], 2).to(got.dtype), got, rtol=1e-6, atol=0)


def test_training_with_short_sequences_and_shared_memory():
    """The reference asserts on shared memory with T <= 64 in training (docs/math.md#correctness)."""
    model = tiny_model().train()
    for t in (1, 3, 64):
        x = ids(2, t)
        out = model(x, labels=x)
        out.loss.backward()
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        model.zero_grad()


def test_gradient_checkpointing_keeps_less_and_changes_no_gradient():
    """Recomputing each block in the backward gives the same loss and gradients, bit for bit, while
    autograd keeps well under half the bytes outside the recomputed blocks; recomputing only the
    scan states keeps exactly the scans' residuals less."""
    model = tiny_model().train()
    x = ids(2, 12)
    residuals = []  # the bytes each layer's scan keeps for its backward, from the rows it sees
    real_scan = ops.chunk_gated_delta

    def scan(q, k, v, g, beta, offsets, *args):
        shapes = residual_shapes(q.shape[0], offsets.shape[0] - 1, *q.shape[1:], v.shape[2])
        residuals.append(sum(math.prod(s) for s in shapes) * q.element_size())
        return real_scan(q, k, v, g, beta, offsets, *args)

    def run():
        kept = []

        def pack(t):
            kept.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x, labels=x).loss
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        return loss.detach(), grads, sum(kept)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "chunk_gated_delta", scan)
        loss, grads, kept = run()
    model.gradient_checkpointing_enable()
    loss_c, grads_c, kept_c = run()
    model.gradient_checkpointing_enable("scan_states")
    loss_s, grads_s, kept_s = run()
    model.gradient_checkpointing_disable()
    assert torch.equal(loss, loss_c) and torch.equal(loss, loss_s)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(grads, grads_c, grads_s))
    assert kept_c < kept / 2, (kept_c, kept)
    assert len(residuals) == 2 and kept - kept_s == sum(residuals), (kept, kept_s, residuals)
    with pytest.raises(ValueError, match="scope: expected one of"):
        model.gradient_checkpointing_enable("layers")


def test_gradient_checkpointing_with_a_cache_warns():
    """use_cache=True under gradient checkpointing runs without a cache and says so (Hugging Face's
    behaviour): same loss, the blocks still recomputed. With a cache passed in, checkpointing
    cannot apply (the blocks update it in place) and the warning says that instead."""
    model = tiny_model().train()
    model.gradient_checkpointing_enable()
    x = ids(2, 6)

    def kept_bytes(**kwargs):  # what autograd keeps for the backward, and the output
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.nbytes) or t, lambda t: t):
            out = model(x, labels=x, **kwargs)
        return sum(kept), out
    plain_kept, plain = kept_bytes()
    with pytest.warns(UserWarning, match="use_cache=True is incompatible with gradient checkpoint") as caught:
        cached_kept, cached = kept_bytes(use_cache=True)
    assert caught[0].filename == __file__  # the caller's line, not torch's module call
    assert cached.past_key_values is None and torch.equal(cached.loss, plain.loss)
    assert cached_kept == plain_kept  # the blocks still recomputed
    with pytest.warns(UserWarning, match="gradient checkpointing does not apply to a forward with "
                                         "past_key_values"):
        out = model(x, labels=x, past_key_values=model.new_cache(2))
    assert torch.allclose(out.loss, plain.loss)
    with warnings.catch_warnings():  # evaluation: nothing to warn about
        warnings.simplefilter("error")
        model.eval()
        model(x, use_cache=True)


def test_reset_parameters_initialises_a_meta_built_model():
    """The meta-device pattern (build on meta, to_empty, reset_parameters) leaves no parameter
    uninitialised: every one is finite after starting as NaN, norms are ones, the stacked weight's
    padding rows zero, the head tied again, and each weight's spread is a new model's."""
    config = tiny_config(tie_word_embeddings=True)
    fresh = MomForCausalLM(config)
    with torch.device("meta"):
        model = MomForCausalLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.reset_parameters()
    assert model.lm_head.weight is model.model.embeddings.weight
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.isfinite(p).all(), name
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif p.numel() > 16:
            assert 0.7 < (p.std() / q.std()).item() < 1.4, name
    layer = model.model.layers[0].attn
    assert not padding(layer.in_proj, layer._in_parts()).any()


def greedy_by_hand(model, x, mask, steps):
    """Greedy decoding by re-running the full forward on the growing sequence."""
    for _ in range(steps):
        logits = model(x, attention_mask=mask).logits[:, -1]
        x = torch.cat([x, logits.argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return x


def test_generate_equals_greedy_loop_over_forward_with_left_padding(model):
    x = ids(3, 6)
    mask = torch.ones(3, 6, dtype=torch.int64)
    mask[0, :2] = 0
    mask[2, :5] = 0
    got = model.generate(x, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(got, greedy_by_hand(model, x, mask, 8))


def test_generate_into_a_reused_cache_equals_a_fresh_one(model):
    """The cache passed to generate is reset first: after another prompt went through it, the
    tokens are those of a new cache, and its buffers stay where they were."""
    x = ids(3, 6)
    mask = torch.ones(3, 6, dtype=torch.int64)
    mask[1, :3] = 0
    cache = model.new_cache(3)
    addresses = [t.data_ptr() for t in cache.states()]
    fresh = model.generate(x, attention_mask=mask, max_new_tokens=7)
    model.generate(ids(3, 4), max_new_tokens=3, cache=cache)
    assert torch.equal(model.generate(x, attention_mask=mask, max_new_tokens=7, cache=cache), fresh)
    assert [t.data_ptr() for t in cache.states()] == addresses


def test_generate_of_no_tokens_still_checks_and_resets_the_cache(model):
    """max_new_tokens=0 returns a copy of the prompt, and the cache is checked and reset first, as
    for any other count (a cache for another batch passed, a used one kept its states)."""
    x = ids(2, 5)
    with pytest.raises(ValueError, match=r"cache: expected what model.new_cache\(2\) makes"):
        model.generate(x, max_new_tokens=0, cache=model.new_cache(3))
    cache = model.new_cache(2)
    model(x, past_key_values=cache)
    out = model.generate(x, max_new_tokens=0, cache=cache)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    assert not any(t.any() for t in cache.states())


@pytest.mark.parametrize("new", [6, 20])  # below and above the steps between two looks at the end
def test_generate_stops_at_eos_and_pads_finished_rows(model, new):
    x = ids(2, 4)
    free = model.generate(x, max_new_tokens=new, eos_token_id=[])
    eos = int(free[0, 5])  # the second generated token of row 0
    got = model.generate(x, max_new_tokens=new, eos_token_id=eos, pad_token_id=0)
    expect = []
    for row in free[:, 4:].tolist():  # each row: its tokens up to its first eos, then padding
        cut = row.index(eos) + 1 if eos in row else len(row)
        expect.append(row[:cut] + [0] * (len(row) - cut))
    steps = max(r.index(eos) + 1 if eos in r else new for r in free[:, 4:].tolist())
    assert got.shape[1] == 4 + steps  # exactly where every row had finished
    assert got[:, 4:].tolist() == [r[:steps] for r in expect]


def _host_syncs(monkeypatch, call) -> tuple[int, torch.Tensor]:
    """(number of calls that read a tensor's value on the host, call's result)."""
    calls = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _f=original, **k: calls.append(1) or _f(self, *a, **k))
    try:
        result = call()
    finally:
        monkeypatch.undo()
    return len(calls), result


def test_generate_with_eos_looks_at_the_host_once_per_check_interval(model, monkeypatch):
    """With an eos id, generate reads the device every CHECK_EVERY steps and once at the end, not
    every step (the CUDA version of this: test_cuda_decode.py)."""
    from mom_compile.graphs.generation import CHECK_EVERY

    x, new = ids(2, 4), 3 * CHECK_EVERY
    base, free = _host_syncs(monkeypatch, lambda: model.generate(x, max_new_tokens=new, eos_token_id=[]))
    never = next(i for i in range(TINY_VOCAB) if i not in free[:, 4:])
    syncs, got = _host_syncs(monkeypatch, lambda: model.generate(x, max_new_tokens=new, eos_token_id=never))
    assert torch.equal(got, free)
    assert syncs - base == new // CHECK_EVERY + 1


def test_sampling_controls(model):
    x = ids(2, 5)
    greedy = model.generate(x, max_new_tokens=5)
    assert torch.equal(model.generate(x, max_new_tokens=5, do_sample=True, top_k=1), greedy)
    assert torch.equal(model.generate(x, max_new_tokens=5, do_sample=True, top_p=1e-9), greedy)
    a = model.generate(x, max_new_tokens=5, do_sample=True, generator=torch.Generator().manual_seed(3))
    b = model.generate(x, max_new_tokens=5, do_sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(a[:, :5], x)


def test_decode_steps_update_the_cache_buffers_in_place(model):
    out = model(ids(2, 4), use_cache=True)
    cache = out.past_key_values
    addresses = [(s.recurrent.data_ptr(), s.conv.data_ptr()) for s in cache.layers]
    before = [s.recurrent.clone() for s in cache.layers]
    for _ in range(3):
        assert model(ids(2, 1), past_key_values=cache, use_cache=True).past_key_values is cache
    assert [(s.recurrent.data_ptr(), s.conv.data_ptr()) for s in cache.layers] == addresses
    assert all(not torch.equal(b, s.recurrent) for b, s in zip(before, cache.layers))


def test_output_indexes_like_hugging_face_model_outputs(model):
    """By name, and by position among the fields set, loss first: `model(x, labels=x)[0]` is the
    loss, `model(x)[0]` the logits; a field not set is a KeyError by name."""
    x = ids(2, 5)
    out = model(x, labels=x)
    assert out[0] is out.loss and out["logits"] is out.logits and out[1] is out.aux_loss
    assert out.to_tuple() == (out.loss, out.aux_loss, out.logits)
    plain = model(x, use_cache=True)
    assert plain[0] is plain.logits and plain[-1] is plain.past_key_values
    with pytest.raises(KeyError):
        plain["loss"]


def test_gradients_through_a_forward_with_a_cache_stop_at_the_cache():
    """With gradients on, a forward into a cache backpropagates (its start states are kept as
    copies, the cache being rewritten after the scan): from a new cache the gradients are those of
    a forward without one; across two chunks of one sequence (truncated backpropagation through
    time) the second chunk's are those of the same chunk from a cache filled without gradients,
    and the cache's buffers never carry autograd history."""
    model = tiny_model()
    x = ids(2, 11)
    second = ids(2, 6)

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads(model(x, labels=x).loss)
    out = model(x, labels=x, use_cache=True)
    assert all(not t.requires_grad for t in out.past_key_values.states())
    for a, b in zip(grads(out.loss), plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    after_chunk = grads(model(second, labels=second, past_key_values=out.past_key_values).loss)
    with torch.no_grad():
        cache = model(x, use_cache=True).past_key_values
    for a, b in zip(after_chunk, grads(model(second, labels=second, past_key_values=cache).loss)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_rms_norm_eager_and_traced_follow_the_precision_rule(dtype):
    """Eager runs torch's rms_norm, a traced graph the formula: both compute in float32 at least
    and match the float64 oracle to the output dtype's rounding."""
    from mom_compile.graphs.norm import rms_norm

    x = torch.randn(3, 5, 64, dtype=torch.float64).to(dtype)
    w = (1 + torch.randn(64, dtype=torch.float64) / 4).to(dtype)
    want = oracle.rms_norm(x.double(), w.double(), 1e-5)
    traced = torch.compile(rms_norm, backend="aot_eager", fullgraph=True)
    for got in (rms_norm(x, w, 1e-5), traced(x, w, 1e-5)):
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
def test_rms_norm_module_rounds_once_from_float32(device, traced):
    """A bf16 RMSNorm is the float64 oracle's norm rounded once to bf16, up to the float32
    arithmetic's rare rounding flips (computing in bf16, or rounding before the weight, would
    differ in many elements)."""
    from mom_compile.graphs.norm import RMSNorm

    norm = RMSNorm(256, 1e-5).to(device, torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(256) / 4)
    x = (torch.randn(64, 256) * 3).to(device, torch.bfloat16)
    call = torch.compile(norm, backend="aot_eager", fullgraph=True) if traced else norm
    got = call(x)
    want = oracle.rms_norm(x.double(), norm.weight.double(), 1e-5).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16
    ulp = want.float().abs() * 2.0 ** -7  # at least one bf16 unit in the last place
    assert ((got.float() - want.float()).abs() <= ulp).all()
    assert (got != want).float().mean() < 0.01  # float32 rounding flips only
