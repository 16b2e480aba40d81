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
    (dict(input_ids=torch.ones(2, 4, dtype=torch.int64), labels=torch.ones(2, 5, dtype=torch.int64)),
     ValueError, r"labels: expected shape \[2, 4\]"),
])
def test_bad_forward_inputs(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        model(**kwargs)


def test_cache_of_another_batch_size(model):
    cache = model.new_cache(3)
    with pytest.raises(ValueError, match="past_key_values: cache holds 3 sequences"):
        model(torch.ones(2, 1, dtype=torch.int64), past_key_values=cache)
    with pytest.raises(TypeError, match="past_key_values: expected a MomCache"):
        model(torch.ones(2, 1, dtype=torch.int64), past_key_values=[1, 2])


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


@pytest.mark.parametrize("overrides, match", [
    (dict(pad_token_id=300), r"MomConfig.pad_token_id: expected an id in \[0, vocab_size=97\)"),
    (dict(conv_size=2.5), "MomConfig.conv_size: expected an integer"),
    (dict(intermediate_size=0), "MomConfig.intermediate_size: expected a positive integer"),
])
def test_more_bad_configs(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_cuda_graph_generation_needs_cuda(model):
    with pytest.raises(ValueError, match="cuda_graph: needs the model and input_ids on a CUDA device"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2, cuda_graph=True)


def test_generate_refuses_a_cache_of_another_batch_or_kind(model):
    x = torch.zeros(2, 3, dtype=torch.long)
    functional = type(model.new_cache(2)).from_states(model.new_cache(2).states(), functional=True)
    bad = ((model.new_cache(3), "got batch 3"), ("cache", "got str"), (functional, "got MomCache"))
    for cache, got in bad:
        with pytest.raises(ValueError, match=rf"cache: expected model.new_cache\(2\).*{got}"):
            model.generate(x, max_new_tokens=2, cache=cache)
