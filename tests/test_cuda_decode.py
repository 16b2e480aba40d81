"""Decoding on a GPU: CUDA-graph generation (torch.compile mode="reduce-overhead") over the static
cache gives the eager tokens without re-recording per step, a decode step does no host sync, and
generate with an eos id syncs once per CHECK_EVERY steps. Runs only where CUDA is present."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from mom_compile.graphs.generation import CHECK_EVERY

from models import TINY_VOCAB, ids, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def recordings(monkeypatch) -> list:
    """One entry per CUDA graph that cudagraph trees record, from a fresh dynamo state."""
    from torch._inductor import cudagraph_trees

    torch._dynamo.reset()
    recorded = []
    record = cudagraph_trees.CUDAGraphTreeManager.record_function
    monkeypatch.setattr(cudagraph_trees.CUDAGraphTreeManager, "record_function",
                        lambda self, *a, **k: recorded.append(1) or record(self, *a, **k))
    return recorded


def test_cuda_graph_generation_matches_eager_without_recapture(recordings):
    """A generate() records its graphs once (prefill, decode step), however many tokens follow."""
    counters.clear()
    model = tiny_model(dtype=torch.float32).cuda()
    prompt = ids(2, 9).cuda()
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    eager = model.generate(prompt, attention_mask=mask, max_new_tokens=24, cuda_graph=False)
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    model.generate(prompt, attention_mask=mask, max_new_tokens=4)  # compile and warm up
    before = len(recordings)
    short = model.generate(prompt, attention_mask=mask, max_new_tokens=4)
    per_short = len(recordings) - before
    long = model.generate(prompt, attention_mask=mask, max_new_tokens=24)
    per_long = len(recordings) - before - per_short
    assert torch.equal(long, eager) and torch.equal(short, eager[:, :13])
    assert counters["inductor"].get("cudagraph_skips", 0) == 0
    # at most the prefill and decode-step graphs per call (cudagraph trees may record a new tree
    # path once), never one recording per step, which would be 23 for the long call
    assert per_short <= 2 and per_long <= 2, (per_short, per_long)


def test_generate_into_a_reused_cache_replays_without_recording(recordings):
    """With the same cache passed to every call, the states keep their addresses: once warm, a
    generate() records no graph at all, prefill included, and still gives the eager tokens."""
    model = tiny_model(dtype=torch.float32).cuda()
    prompt = ids(2, 9).cuda()
    eager = model.generate(prompt, max_new_tokens=12, cuda_graph=False)
    model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    cache = model.new_cache(2)
    for _ in range(3):  # compile, warm up, record
        model.generate(prompt, max_new_tokens=12, cache=cache)
    before = len(recordings)
    assert torch.equal(model.generate(prompt, max_new_tokens=12, cache=cache), eager)
    assert len(recordings) == before


def test_decode_step_does_no_host_sync():
    model = tiny_model(dtype=torch.float32).cuda()
    out = model(ids(2, 5).cuda(), use_cache=True)
    step = ids(2, 1).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            model(step, past_key_values=out.past_key_values, use_cache=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _sync_warnings(call) -> tuple[int, torch.Tensor]:
    """(host syncs that torch.cuda's sync debug mode reports during call, call's result)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught), result


def test_generate_with_eos_syncs_once_per_check_interval():
    """An eos id costs one host sync per CHECK_EVERY decode steps and one at the end, not one per
    step; the tokens are those of the run without it (the eos id never comes)."""
    model = tiny_model(dtype=torch.float32).cuda()
    prompt = ids(2, 5).cuda()
    new = 3 * CHECK_EVERY
    base, free = _sync_warnings(lambda: model.generate(prompt, max_new_tokens=new, eos_token_id=[]))
    never = next(i for i in range(TINY_VOCAB) if i not in free[:, 5:])
    syncs, got = _sync_warnings(lambda: model.generate(prompt, max_new_tokens=new, eos_token_id=never))
    assert torch.equal(got, free)
    assert syncs - base == new // CHECK_EVERY + 1, (syncs, base)


@pytest.fixture
def captures(monkeypatch) -> list:
    """One entry per CUDA graph recorded with torch.cuda.CUDAGraph (not by cudagraph trees)."""
    recorded = []
    capture = torch.cuda.CUDAGraph.capture_begin
    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin",
                        lambda self, *a, **k: recorded.append(1) or capture(self, *a, **k))
    return recorded


def padded_batch() -> tuple:
    """The tiny model on CUDA and a 3 x 7 prompt whose first row is left-padded by 3."""
    model = tiny_model(dtype=torch.float32).cuda()
    prompt = ids(3, 7).cuda()
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    return model, prompt, mask


def test_eager_generate_replays_a_cuda_graph_with_the_same_tokens(captures):
    """Without torch.compile, generate records the decode step once as a CUDA graph and replays it:
    one recording per call, and the tokens of step-by-step eager decoding (greedy on a left-padded
    batch with an eos id, and sampling with a seeded generator)."""
    from mom_compile.graphs import generation

    model, prompt, mask = padded_batch()
    for kwargs in (dict(eos_token_id=5), dict(do_sample=True, top_p=0.9)):
        runs = [model.generate(prompt, attention_mask=mask, max_new_tokens=20, cuda_graph=graph,
                               generator=torch.Generator("cuda").manual_seed(0), **kwargs)
                for graph in (False, True)]
        assert torch.equal(runs[0], runs[1]), kwargs
    assert len(captures) == 2
    assert not generation._is_compiled(model)


def test_cuda_graph_step_advances_the_cache_as_the_eager_step_does(captures):
    """`model.cuda_graph_step(cache)`, for users' own loops: each replay returns the eager step's
    logits and leaves the cache where the eager step leaves it, on a cache prefilled with a
    left-padded batch, with one recording for all the steps; a reset cache starts over."""
    model, prompt, mask = padded_batch()
    caches = [model.new_cache(3) for _ in range(2)]
    for cache in caches:
        model(prompt, attention_mask=mask, past_key_values=cache, use_cache=True)
    step = model.cuda_graph_step(caches[1])
    tokens = ids(3, 6).cuda()
    for i in range(6):
        want = model(tokens[:, i:i + 1], past_key_values=caches[0], use_cache=True).logits
        got = step(tokens[:, i:i + 1])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(caches[1].states(), caches[0].states()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    caches[1].reset()
    fresh = model.new_cache(3)
    torch.testing.assert_close(step(tokens[:, :1]).clone(),
                               model(tokens[:, :1], past_key_values=fresh, use_cache=True).logits,
                               rtol=1e-5, atol=1e-5)
    assert len(captures) == 1


def test_eager_steps_match_the_float64_forward_at_every_position():
    """Token-by-token eager decoding on the GPU (each layer's route, decode and norm launched from
    `ops/launch.py`'s cache after the first step) gives the logits of one forward over all the
    tokens with the CPU's reference ops, in float64, on a left-padded batch."""
    model = tiny_model()
    x = ids(3, 12)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    with torch.no_grad():
        want = model(x, attention_mask=mask).logits
        gpu = model.cuda()
        out = gpu(x[:, :3].cuda(), attention_mask=mask[:, :3].cuda(), use_cache=True)
        logits = [out.logits] + [gpu(x[:, t:t + 1].cuda(), attention_mask=mask[:, :t + 1].cuda(),
                                     past_key_values=out.past_key_values).logits for t in range(3, 12)]
    got = torch.cat(logits, 1).cpu()
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-7, atol=1e-9)


def test_cache_reset_zeroes_every_state_in_one_launch_per_kind():
    """A bf16 model's cache (float32 recurrent, bf16 conv states) is zeroed in place, at the same
    addresses, by two kernel launches however many layers: the host issues them right before a
    graph-replayed prefill."""
    from torch.profiler import ProfilerActivity, profile

    model = tiny_model(torch.bfloat16, num_hidden_layers=4).cuda()
    cache = model.new_cache(2)
    for t in cache.states():
        t.fill_(1)
    addresses = [t.data_ptr() for t in cache.states()]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        cache.reset()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 2, [e.name for e in kernels]
    assert [t.data_ptr() for t in cache.states()] == addresses
    assert all(t.count_nonzero() == 0 for t in cache.states())
