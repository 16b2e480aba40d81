"""Bad input gets an error that names the argument and what was expected (generate's arguments:
test_generate_args.py)."""
from __future__ import annotations

import pytest
import torch

from mom_compile import MomCache, MomConfig

from models import tiny_config, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(dtype=torch.float32)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(input_ids=torch.randint(0, 97, (5,))), ValueError, r"input_ids: expected a \[batch, seq\] tensor"),
    (dict(input_ids=torch.rand(2, 3)), ValueError, "input_ids: expected an int64 or int32 tensor"),
    (dict(input_ids=torch.zeros(2, 0, dtype=torch.int64)), ValueError, "at least one token"),
    (dict(input_ids=torch.tensor([[1, 97]])), RuntimeError,
     r"input_ids: every id must be in \[0, vocab_size=97\)"),
    (dict(input_ids=torch.tensor([[-1, 3]])), RuntimeError, "input_ids: every id must be in"),
    (dict(input_ids=torch.ones(2, 4, dtype=torch.int64), attention_mask=torch.ones(2, 3)), ValueError,
     r"attention_mask: expected shape \[2, 4\]"),
    (dict(input_ids=torch.ones(2, 4, dtype=torch.int64), attention_mask=torch.ones(3, 4)), ValueError,
     r"attention_mask: expected shape \[2, 4\]"),
    (dict(input_ids=torch.ones(2, 4, dtype=torch.int64), attention_mask=torch.ones(2, 4)), ValueError,
     "attention_mask: expected 0/1 integers or bools"),
    (dict(input_ids=torch.ones(1, 3, dtype=torch.int64), attention_mask=torch.tensor([[1, 2, 2]])),
     RuntimeError, "attention_mask: expected 0/1 integers or bools, got another value"),
    (dict(input_ids=torch.ones(2, 4, dtype=torch.int64), labels=torch.ones(2, 5, dtype=torch.int64)),
     ValueError, r"labels: expected shape \[2, 4\]"),
    (dict(input_ids=torch.ones(2, 4, dtype=torch.int64), labels=torch.ones(2, 4)), ValueError,
     "labels: expected an int64 or int32 tensor, got torch.float32"),
    (dict(input_ids=torch.ones(1, 2, dtype=torch.int64), labels=torch.tensor([[1, 97]])), RuntimeError,
     r"labels: every label must be in \[0, vocab_size=97\) or -100"),
    (dict(input_ids=torch.ones(1, 2, dtype=torch.int64), labels=torch.tensor([[-1, 3]])), RuntimeError,
     "labels: every label must be in"),
    # another device than the model's (the meta device stands in for a GPU on a CPU-only machine)
    (dict(input_ids=torch.ones(1, 2, dtype=torch.int64, device="meta")), ValueError,
     "input_ids: expected a tensor on cpu \\(the model's device\\), got one on meta"),
    (dict(input_ids=torch.ones(1, 2, dtype=torch.int64), attention_mask=torch.ones(1, 2, device="meta")),
     ValueError, "attention_mask: expected a tensor on cpu"),
    (dict(input_ids=torch.ones(1, 2, dtype=torch.int64), labels=torch.ones(1, 2, dtype=torch.int64,
                                                                        device="meta")),
     ValueError, "labels: expected a tensor on cpu"),
])
def test_bad_forward_inputs(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        model(**kwargs)


def test_cache_unlike_new_cache_is_refused(model):
    x = torch.ones(2, 1, dtype=torch.int64)
    expected = r"past_key_values: expected what model.new_cache\(2\) makes: 2 layers of recurrent \[2, 5,"
    other_head = tiny_model(dtype=torch.float32, head_dim=16).new_cache(2)
    bad = ((model.new_cache(3), r"layer 0's recurrent \[3, "),
           (MomCache(model.config, 2, dtype=torch.float16), r"layer 0's conv \[2, 5, 3, \d+\] torch.float16"),
           (other_head, r"layer 0's recurrent \[2, 5, 2, 16, 16\]"),
           (model.new_cache(2, device="meta"), r"layer 0's recurrent .* on meta"))
    for cache, got in bad:
        with pytest.raises(ValueError, match=f"{expected}.*got {got}"):
            model(x, past_key_values=cache)
    with pytest.raises(TypeError, match="past_key_values: expected a MomCache"):
        model(x, past_key_values=[1, 2])


def test_layer_refuses_a_cache_entry_of_another_config(model):
    """MomLayer used on its own: its decode step checks the cache entry, the one argument it does
    not build, before the decode op (whose own checks the layer skips) reads it."""
    layer = model.model.layers[0].attn
    x = torch.randn(2, 1, model.config.hidden_size)
    other_head = tiny_model(dtype=torch.float32, head_dim=16).new_cache(2)[0]
    meta = model.new_cache(2, device="meta")[0]
    bad = ((other_head, r"got \[2, 5, 2, 16, 16\] torch.float32"), (model.new_cache(3)[0], r"got \[3, 5, "),
           (meta, r"got \[2, 5, 2, 8, 8\] torch.float32 on meta"))
    with torch.no_grad():
        for state, got in bad:
            expected = r"state: expected a recurrent state \[2, 5, 2, 8, 8\].*"
            with pytest.raises(ValueError, match=expected + got):
                layer(x, state=state)
        layer(x, state=model.new_cache(2)[0])  # this config's entry passes, in the model's dtype or another
        layer(x, state=MomCache(model.config, 2, dtype=torch.float16)[0])


@pytest.mark.parametrize("overrides, match", [
    (dict(topk=5), "MomConfig.topk: expected at most num_memories=4"),
    (dict(hidden_size=0), "MomConfig.hidden_size: expected a positive integer"),
    (dict(conv_size=1), "MomConfig.conv_size: expected at least 2"),
    (dict(use_short_conv=False), "MomConfig.use_short_conv"),
    (dict(hidden_act="gelu"), "MomConfig.hidden_act"),
])
def test_bad_configs(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)
    assert isinstance(tiny_config(), MomConfig)


def test_wider_mask_needs_a_cache(model):
    with pytest.raises(ValueError, match="with past_key_values"):
        model(torch.ones(2, 4, dtype=torch.int64), attention_mask=torch.ones(2, 6, dtype=torch.int64))


def test_cache_over_non_contiguous_tensors_is_refused(model):
    states = [torch.zeros(*t.shape[:1], t.shape[1] + 1, *t.shape[2:])[:, :-1]
              for t in model.new_cache(2).states()]
    with pytest.raises(ValueError, match=r"states\[0\]: expected a contiguous tensor"):
        MomCache.from_states(states)


def test_a_cache_made_in_inference_mode_is_refused_outside_it(model):
    """Under no_grad, a cache made under torch.inference_mode is refused by name before any layer
    writes, in a decode step, a prefill and generate (torch refused it only after the first layer had
    written its conv table, or inside cache.reset())."""
    with torch.inference_mode():
        cache = model.new_cache(2)
    before = [t.clone() for t in cache.states()]
    for tokens in (1, 5):
        with torch.no_grad(), pytest.raises(ValueError, match="past_key_values: made under torch.inference"):
            model(torch.ones(2, tokens, dtype=torch.int64), past_key_values=cache)
    with pytest.raises(ValueError, match="cache: made under torch.inference_mode"):
        model.generate(torch.ones(2, 5, dtype=torch.int64), cache=cache)
    assert all(torch.equal(a, b) for a, b in zip(cache.states(), before))


def test_a_cache_of_unpaired_states_or_integer_dtype_is_refused(model):
    with pytest.raises(ValueError, match="states: expected .recurrent, conv. pairs, one per layer, got 3"):
        MomCache.from_states(model.new_cache(2).states()[:3])
    with pytest.raises(ValueError, match="dtype: expected the model's floating-point dtype, got torch.int64"):
        MomCache(model.config, 2, dtype=torch.int64)


@pytest.mark.parametrize("overrides, match", [
    (dict(pad_token_id=300), r"MomConfig.pad_token_id: expected an id in \[0, vocab_size=97\)"),
    (dict(conv_size=2.5), "MomConfig.conv_size: expected an integer"),
    (dict(intermediate_size=0), "MomConfig.intermediate_size: expected a positive integer"),
    (dict(hidden_ratio=-1), "MomConfig.hidden_ratio: expected a positive number"),
    (dict(hidden_ratio=0.001), "MomConfig.hidden_ratio: .* gives an MLP of width 0"),
    (dict(tie_word_embeddings="false"), "MomConfig.tie_word_embeddings: expected true or false, got 'false'"),
    (dict(shared_mem="no"), "MomConfig.shared_mem: expected true or false"),
    (dict(norm_eps=None), "MomConfig.norm_eps: expected a positive number, got None"),
    (dict(initializer_range=-1), "MomConfig.initializer_range: expected a non-negative number"),
    (dict(aux_loss_scale="x"), "MomConfig.aux_loss_scale: expected a non-negative number"),
    (dict(pad_token_id=1.5), r"MomConfig.pad_token_id: expected an id in \[0, vocab_size=97\)"),
    (dict(eos_token_id=-1), r"MomConfig.eos_token_id: expected an id in \[0, vocab_size=97\), a non-empty"),
    (dict(eos_token_id=[]), r"MomConfig.eos_token_id: expected .* list of them, or null, got \[\]"),
    (dict(eos_token_id=[3, 97]), r"MomConfig.eos_token_id: expected .* got \[3, 97\]"),
    (dict(eos_token_id=(3,)), r"MomConfig.eos_token_id: expected .* got \(3,\)"),
    (dict(intermediate_size=True), "MomConfig.intermediate_size: expected a positive integer"),
])
def test_more_bad_configs(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_bad_cache_sizes_and_logits_to_keep(model):
    with pytest.raises(TypeError, match="batch_size: expected an integer, got 2.5"):
        model.new_cache(2.5)
    with pytest.raises(ValueError, match="batch_size: expected at least 1, got 0"):
        model.new_cache(0)
    with pytest.raises(ValueError, match="logits_to_keep: expected an int >= 0, got True"):
        model(torch.ones(1, 2, dtype=torch.int64), logits_to_keep=True)


def test_config_json_must_be_an_object():
    with pytest.raises(ValueError, match="config.json: expected a JSON object of settings, got list"):
        MomConfig.from_dict([1, 2])


def test_int32_labels_give_the_int64_loss(model):
    """int32 labels, ignored positions (-100) among them, give the loss of the int64 ones."""
    x = torch.randint(0, 97, (2, 6))
    labels = x.clone()
    labels[0, :3] = -100
    assert torch.equal(model(x, labels=labels.int()).loss, model(x, labels=labels).loss)


def test_cuda_graph_generation_needs_cuda(model):
    with pytest.raises(ValueError, match="cuda_graph: needs the model and input_ids on a CUDA device"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2, cuda_graph=True)


def test_cuda_graph_step_needs_cuda(model):
    with pytest.raises(ValueError, match="cuda graph step: needs the model on a CUDA device, got cpu"):
        model.cuda_graph_step(model.new_cache(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_step_needs_a_cache_of_this_model(model):
    gpu = tiny_model(dtype=torch.float32).cuda()
    with pytest.raises(TypeError, match="cache: expected a MomCache"):
        gpu.cuda_graph_step([1, 2])
    with pytest.raises(ValueError, match=r"cache: expected what model.new_cache\(2\) makes.* on cuda"):
        gpu.cuda_graph_step(model.new_cache(2))
    step = gpu.cuda_graph_step(gpu.new_cache(2))
    for bad in (torch.zeros(1, 1, dtype=torch.long, device="cuda"), torch.zeros(2, 1, device="cuda"),
                torch.zeros(2, 1, dtype=torch.long), [[1], [2]]):
        with pytest.raises(ValueError, match=r"ids: expected \[2, 1\] int64 or int32 ids on cuda"):
            step(bad)


def test_generate_refuses_a_cache_of_another_batch_or_kind(model):
    x = torch.zeros(2, 3, dtype=torch.long)
    functional = type(model.new_cache(2)).from_states(model.new_cache(2).states(), functional=True)
    with pytest.raises(ValueError, match=r"cache: expected what model.new_cache\(2\) makes.*got layer 0's "
                                         r"recurrent \[3, "):
        model.generate(x, max_new_tokens=2, cache=model.new_cache(3))
    with pytest.raises(TypeError, match="cache: expected a MomCache, got str"):
        model.generate(x, max_new_tokens=2, cache="cache")
    with pytest.raises(ValueError, match="cache: expected a cache updated in place"):
        model.generate(x, max_new_tokens=2, cache=functional)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_generate_into_new_cache_of_a_half_precision_model(dtype):
    """A 16-bit model's cache keeps float32 recurrent states: generate takes the model's own
    new_cache and decodes the tokens of a greedy loop over full forwards."""
    model = tiny_model(dtype=dtype)
    x = torch.randint(0, model.config.vocab_size, (2, 5))
    cache = model.new_cache(2)
    assert cache[0].recurrent.dtype == torch.float32 and cache[0].conv.dtype == dtype
    want = x  # greedy by full forwards, no cache at all
    with torch.no_grad():
        for _ in range(4):
            want = torch.cat([want, model(want).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(model.generate(x, max_new_tokens=4, cache=cache), want)
