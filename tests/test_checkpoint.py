"""Checkpoints in the reference `mom` layout: names and shapes of docs/math.md#checkpoint-layout,
round trips, and clear errors."""
from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from mom_compile import MomConfig, MomForCausalLM

from models import ids, tiny_config, tiny_model


def spec_layout(c: MomConfig) -> dict[str, list[int]]:
    """Every weight name and shape, written out from docs/math.md#checkpoint-layout."""
    d, hk, hv, h, w, m = c.hidden_size, c.key_dim, c.value_dim, c.num_heads, c.conv_size, c.num_memories
    i = c.mlp_size
    out = {"model.embeddings.weight": [c.vocab_size, d], "model.norm.weight": [d],
           "lm_head.weight": [c.vocab_size, d]}
    for n in range(c.num_hidden_layers):
        p = f"model.layers.{n}."
        out.update({p + "attn_norm.weight": [d], p + "mlp_norm.weight": [d],
                    p + "mlp.gate_proj.weight": [i, d], p + "mlp.up_proj.weight": [i, d],
                    p + "mlp.down_proj.weight": [d, i]})
        a = p + "attn."
        out.update({a + "q_proj.weight": [hk, d], a + "gate.weight": [m, d], a + "A_log": [h],
                    a + "dt_bias": [h], a + "q_conv1d.weight": [hk, 1, w], a + "k_conv1d.weight": [hk, 1, w],
                    a + "v_conv1d.weight": [hv, 1, w], a + "o_norm.weight": [c.head_v_dim],
                    a + "o_proj.weight": [d, hv]})
        if c.use_output_gate:
            out[a + "g_proj.weight"] = [hv, d]
        if c.conv_bias:
            out.update({a + "q_conv1d.bias": [hk], a + "k_conv1d.bias": [hk], a + "v_conv1d.bias": [hv]})
        per_memory = {"k_proj": [hk, d], "v_proj": [hv, d], "b_proj": [h, d], "a_proj": [h, d]}
        if not c.single_kv_proj:
            for name, shape in per_memory.items():
                out.update({f"{a}{name}.{j}.weight": shape for j in range(m)})
        if c.shared_mem or c.single_kv_proj:
            for name, shape in zip(("shared_k", "shared_v", "shared_b", "shared_a"), per_memory.values()):
                out[f"{a}{name}.weight"] = shape
    return out


@pytest.mark.parametrize("overrides", [{}, dict(single_kv_proj=True), dict(shared_mem=False, conv_bias=True),
                                       dict(use_output_gate=False, expand_v=2.0)])
def test_state_dict_is_the_reference_layout(overrides):
    model = MomForCausalLM(tiny_config(**overrides))
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert got == spec_layout(model.config)


@pytest.mark.parametrize("tied", [False, True])
def test_num_parameters_counts_the_reference_layout(tied):
    """num_parameters: the reference checkpoint's entries (a tied head once), not the stacked
    weights' padding rows; device and dtype are the weights'."""
    model = MomForCausalLM(tiny_config(tie_word_embeddings=tied, num_memories=3)).to(torch.float64)
    layout = spec_layout(model.config)
    if tied:
        del layout["lm_head.weight"]
    assert model.num_parameters() == sum(math.prod(shape) for shape in layout.values())
    assert sum(p.numel() for p in model.parameters()) > model.num_parameters()  # padding rows
    assert (model.device, model.dtype) == (torch.device("cpu"), torch.float64)


def test_load_state_dict_names_a_missing_part_of_a_stacked_weight():
    """One memory's k projection missing: a strict load names that key (not the internal stacked
    parameter, and no present key as unexpected); a non-strict one loads every other part and
    keeps that one's current value."""
    sd = tiny_model(dtype=torch.float32).state_dict()
    missing = "model.layers.0.attn.k_proj.1.weight"
    del sd[missing]
    model = tiny_model(dtype=torch.float32, seed=3)
    kept = model.state_dict()[missing].clone()
    with pytest.raises(RuntimeError, match=f'Missing key\\(s\\) in state_dict: "{missing}". *$'):
        model.load_state_dict(sd)
    result = model.load_state_dict(sd, strict=False)
    assert result.missing_keys == [missing] and result.unexpected_keys == []
    now = model.state_dict()
    assert torch.equal(now[missing], kept)
    assert all(torch.equal(now[k], v) for k, v in sd.items())


def test_load_state_dict_names_a_stacked_weights_misshapen_part():
    """A part of the wrong shape is named in the error (not the internal stacked parameter, nor a
    bare concatenation error), and nothing of that parameter changes."""
    model = tiny_model(dtype=torch.float32)
    before = model.state_dict()
    key = "model.layers.0.attn.q_proj.weight"
    for cut in (lambda w: w[:, :-1], lambda w: w[1:]):  # a column short, a row short
        sd = tiny_model(dtype=torch.float32, seed=3).state_dict()
        sd[key] = cut(sd[key])
        expected = f"size mismatch for {key}: copying a param with shape {list(sd[key].shape)}"
        with pytest.raises(RuntimeError, match=re.escape(expected)) as error:
            model.load_state_dict(sd, strict=False)
        assert "in_proj" not in str(error.value)
        assert torch.equal(model.state_dict()[key], before[key])


def test_meta_model_loads_a_partial_state_dict():
    """The low-memory pattern: a model built on the meta device, loaded with assign=True. With a
    stacked weight's part missing, a non-strict load reports it by name and loads every other
    part; the missing one is zeros (the meta device holds no value to keep)."""
    sd = tiny_model(dtype=torch.float32).state_dict()
    missing = "model.layers.0.attn.k_proj.1.weight"
    del sd[missing]
    with torch.device("meta"):
        model = MomForCausalLM(tiny_model(dtype=torch.float32).config)
    result = model.load_state_dict(sd, strict=False, assign=True)
    assert result.missing_keys == [missing] and result.unexpected_keys == []
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in sd.items())
    assert not now[missing].is_meta and not now[missing].any()


def test_a_model_pickles(tmp_path):
    """torch.save(model) and torch.load give the same model (the state-dict hooks pickle too)."""
    model = tiny_model(dtype=torch.float32)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    x = ids(2, 5)
    assert torch.equal(model(x).logits, loaded(x).logits)


def test_round_trip_is_exact(tmp_path):
    model = tiny_model(dtype=torch.float32)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mom"
    loaded = MomForCausalLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    x = ids(2, 7)
    assert torch.equal(model(x).logits, loaded(x).logits)


def test_an_interrupted_save_leaves_the_earlier_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C while the weights of another model are written over a saved one: the folder still
    loads the first model, exactly, and holds no temporary file."""
    from mom_compile.graphs import checkpoint
    first = tiny_model(dtype=torch.float32)
    first.save_pretrained(tmp_path)
    real = checkpoint.save_file

    def write_half_then_interrupt(state, name, metadata):
        real(state, name, metadata=metadata)
        with open(name, "r+b") as f:
            f.truncate(os.path.getsize(name) // 2)
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save_file", write_half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        tiny_model(dtype=torch.float32, seed=1, hidden_size=48).save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded = MomForCausalLM.from_pretrained(tmp_path)
    assert loaded.config == first.config
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), loaded.state_dict().values()))


def test_a_config_json_cannot_hold_leaves_the_earlier_checkpoint(tmp_path):
    """A save that fails on the config (a value JSON cannot hold in `extra`) raises before any
    file is replaced: the folder still loads the first model and holds no temporary file."""
    first = tiny_model(dtype=torch.float32)
    first.save_pretrained(tmp_path)
    other = tiny_model(dtype=torch.float32, seed=1, hidden_size=48)
    other.config.extra["torch_dtype"] = torch.float32
    with pytest.raises(TypeError, match="not JSON serializable"):
        other.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded = MomForCausalLM.from_pretrained(tmp_path)
    assert loaded.config == first.config
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), loaded.state_dict().values()))


def test_dtype_by_name_and_eval_mode(tmp_path):
    """from_pretrained returns an eval-mode model (Hugging Face's convention) in the dtype asked
    for, by torch.dtype or by name; "auto" keeps the checkpoint's; anything else is named."""
    model = tiny_model(dtype=torch.float32)
    model.save_pretrained(tmp_path)
    for dtype, want in ((torch.float16, torch.float16), ("bfloat16", torch.bfloat16),
                        ("torch.float64", torch.float64), ("auto", torch.float32)):
        loaded = MomForCausalLM.from_pretrained(tmp_path, dtype=dtype)
        assert not loaded.training
        for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            assert b.dtype == want and torch.equal(a.to(want), b), k
    for bad in (torch.complex64, "half8", 16):
        with pytest.raises(ValueError, match="dtype: expected None, 'auto', or float16, bfloat16"):
            MomForCausalLM.from_pretrained(tmp_path, dtype=bad)


def test_loads_a_folder_written_by_hand_in_the_reference_layout(tmp_path):
    """A checkpoint built from docs/math.md's name list alone (no model of ours involved), in bf16,
    as pytorch_model.bin, with reference-only config keys."""
    config = tiny_config()
    weights = {k: torch.randn(shape).to(torch.bfloat16) for k, shape in spec_layout(config).items()}
    torch.save(weights, tmp_path / "pytorch_model.bin")
    values = config.to_dict() | {"fuse_norm": True, "attn_mode": "chunk", "capacity": 1.0,
                                 "transformers_version": "4.57.0", "use_cache": True}
    (tmp_path / "config.json").write_text(json.dumps(values))
    model = MomForCausalLM.from_pretrained(tmp_path)
    assert model.lm_head.weight.dtype == torch.bfloat16
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    model32 = MomForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert model32.lm_head.weight.dtype == torch.float32


def test_sharded_safetensors_and_tied_embeddings(tmp_path):
    model = tiny_model(dtype=torch.float32, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embeddings.weight
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    state = load_file(tmp_path / "model.safetensors")
    names = sorted(state)
    half = len(names) // 2
    save_file({k: state[k] for k in names[:half]}, tmp_path / "a.safetensors")
    save_file({k: state[k] for k in names[half:]}, tmp_path / "b.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: ("a" if i < half else "b") + ".safetensors" for i, k in enumerate(names)}}))
    os.remove(tmp_path / "model.safetensors")
    loaded = MomForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embeddings.weight
    x = ids(1, 5)
    assert torch.equal(model(x).logits, loaded(x).logits)


def write_checkpoint(path, config, weights):
    config.save_pretrained(path)
    save_file(weights, os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("change, message", [
    (lambda w: w.pop("model.layers.1.attn.k_proj.2.weight"),
     "missing weight 'model.layers.1.attn.k_proj.2.weight'"),
    (lambda w: w.update(extra=torch.zeros(1)), "unexpected weight 'extra'"),
    (lambda w: w.update({"model.layers.0.attn.A_log": torch.zeros(3)}),
     r"weight 'model.layers.0.attn.A_log' has shape \[3\], the config expects \[2\]"),
    (lambda w: w.update({"model.layers.0.attn.A_log": torch.zeros(2, dtype=torch.int64)}),
     "weight 'model.layers.0.attn.A_log' is torch.int64, expected a floating-point dtype"),
])
def test_bad_weights_are_named(tmp_path, change, message):
    config = tiny_config()
    weights = {k: torch.randn(shape) for k, shape in spec_layout(config).items()}
    change(weights)
    write_checkpoint(tmp_path, config, weights)
    with pytest.raises(ValueError, match=message):
        MomForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("values, message", [
    ({"attn": {"layers": [1], "num_heads": 4}}, "MomConfig.attn: hybrid softmax-attention"),
    ({"mom_backend": "gla"}, "MomConfig.mom_backend: only 'gated_deltanet'"),
    ({"topk": 5}, "MomConfig.topk: expected at most num_memories=4, got 5"),
    ({"model_type": "llama"}, "model_type must be 'mom'"),
])
def test_unsupported_configs_are_named(tmp_path, values, message):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict() | values))
    with pytest.raises(ValueError, match=message):
        MomForCausalLM.from_pretrained(tmp_path)


def test_from_pretrained_takes_the_config_file_too(tmp_path):
    """The path of config.json loads the checkpoint of its folder (MomConfig.from_pretrained
    takes either, so MomForCausalLM's does too)."""
    model = tiny_model(dtype=torch.float32)
    model.save_pretrained(tmp_path)
    loaded = MomForCausalLM.from_pretrained(tmp_path / "config.json")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MomForCausalLM.from_pretrained(tmp_path)
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds none of model.safetensors"):
        MomForCausalLM.from_pretrained(tmp_path)


def test_reference_config_keys_round_trip(tmp_path):
    values = tiny_config().to_dict() | {"fuse_norm": True, "attn_mode": "chunk", "capacity": 1.0,
                                        "use_cache": True, "transformers_version": "4.57.0",
                                        "eos_token_id": [2, 7]}
    (tmp_path / "config.json").write_text(json.dumps(values))
    config = MomConfig.from_pretrained(tmp_path)
    assert config.extra == {"fuse_norm": True, "attn_mode": "chunk", "use_cache": True,
                            "transformers_version": "4.57.0"}
    config.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == values
