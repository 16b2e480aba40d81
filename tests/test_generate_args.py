"""`MomForCausalLM.generate` and the onnxruntime generator refuse the same bad input with the same
message (one shared check), and accept nested lists alike."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from mom_compile import MomConfig, MomForCausalLM

VOCAB = MomConfig.preset("tiny").vocab_size


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def generator(request, tiny_onnx):
    """(generate, as_array) of one generator, where as_array makes nested lists its array type."""
    if request.param == "torch":
        torch.manual_seed(0)
        model = MomForCausalLM(MomConfig.preset("tiny")).eval()
        return model.generate, torch.tensor
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)
    from mom_compile.export.runtime import OnnxGenerator

    return OnnxGenerator(tiny_onnx(18)[1]).generate, np.array


PROMPT = [[5, 6, 7]]


@pytest.mark.parametrize("ids, mask, kwargs, match", [
    ([[5, 6, 0]], [[1, 1, 0]], {}, "attention_mask: generate expects left padding"),
    ([[5.0, 6.0, 7.0]], None, {}, "input_ids: expected an int64 or int32 array, got float"),
    ([[True, False]], None, {}, "input_ids: expected an int64 or int32 array, got bool"),
    ([5, 6, 7], None, {}, r"input_ids: expected a non-empty \[batch, seq\] array, got shape \[3\]"),
    (np.zeros((1, 0), np.int64), None, {}, r"input_ids: expected a non-empty \[batch, seq\] array"),
    ([[0, VOCAB]], None, {}, rf"input_ids: ids must lie in \[0, {VOCAB}\), got values in \[0, {VOCAB}\]"),
    ([[-1, 3]], None, {}, rf"input_ids: ids must lie in \[0, {VOCAB}\), got values in \[-1, 3\]"),
    (PROMPT, [[1, 1]], {}, r"attention_mask: expected shape \[1, 3\] like input_ids, got \[1, 2\]"),
    (PROMPT, [[1.0, 1.0, 1.0]], {}, "attention_mask: expected 0/1 integers or bools, got float"),
    (PROMPT, None, dict(max_new_tokens=-1), "max_new_tokens: expected an integer >= 0, got -1"),
    (PROMPT, None, dict(max_new_tokens=2.5), "max_new_tokens: expected an integer >= 0, got 2.5"),
    (PROMPT, None, dict(temperature=0.0, do_sample=True), "temperature: expected a finite .* got 0.0"),
    (PROMPT, None, dict(temperature=math.inf, do_sample=True), "temperature: expected a finite .* got inf"),
    (PROMPT, [[1, 2, 1]], {}, r"attention_mask: expected 0/1 integers or bools, got values in \[1, 2\]"),
    (PROMPT, None, dict(top_k=-1, do_sample=True), r"top_k: expected an integer >= 0 \(0: no cut\).* -1"),
    (PROMPT, None, dict(top_p=1.5, do_sample=True), r"top_p: expected a value in \(0, 1\] \(1: no cut\)"),
    (PROMPT, None, dict(do_sample="False"), "do_sample: expected True or False, got 'False'"),
    (PROMPT, None, dict(eos_token_id=-1), rf"eos_token_id: expected an id or a list of ids in \[0, {VOCAB}"),
    (PROMPT, None, dict(eos_token_id=[2, "x"]), "eos_token_id: expected an id or a list of ids"),
    (PROMPT, None, dict(pad_token_id=VOCAB), rf"pad_token_id: expected an id in \[0, {VOCAB}\) or None"),
])
@pytest.mark.parametrize("as_list", [True, False], ids=["lists", "arrays"])
def test_bad_input_same_error(generator, ids, mask, kwargs, match, as_list):
    generate, as_array = generator
    if not as_list:
        ids, mask = (v if v is None else as_array(v) for v in (ids, mask))
    with pytest.raises(ValueError, match=match):
        generate(ids, mask, **kwargs)


def test_sampling_arguments_as_hugging_face_reads_them(generator):
    """Greedy decoding ignores temperature, top_k and top_p with one warning at the caller's line
    (temperature=0 included); top_k=0 and top_p=1 cut nothing, so they sample what None does from
    the same seed (top_p=1 cut ~a third of a 256-id vocabulary: a float32 cumulative sum reached 1
    early)."""
    generate, _ = generator
    greedy = np.asarray(generate(PROMPT, max_new_tokens=6, eos_token_id=[]))
    with pytest.warns(UserWarning, match="do_sample is False, so temperature=0, top_k=5 ignored") as caught:
        ignored = np.asarray(generate(PROMPT, max_new_tokens=6, eos_token_id=[], temperature=0, top_k=5))
    assert caught[0].filename == __file__
    np.testing.assert_array_equal(ignored, greedy)
    with warnings.catch_warnings():  # unset (None) or no cut: nothing ignored, nothing to warn about
        warnings.simplefilter("error")
        unset = generate(PROMPT, max_new_tokens=6, eos_token_id=[], temperature=None, top_k=0, top_p=1.0)
    np.testing.assert_array_equal(np.asarray(unset), greedy)
    seed = (lambda: dict(generator=torch.Generator().manual_seed(3))) if "seed" not in \
        generate.__code__.co_varnames else (lambda: dict(seed=3))
    sample = lambda **kw: np.asarray(generate(PROMPT, max_new_tokens=12, eos_token_id=[],  # noqa: E731
                                              do_sample=True, temperature=3.0, **seed(), **kw))
    free = sample()
    np.testing.assert_array_equal(sample(top_k=0, top_p=1.0), free)
    assert not np.array_equal(sample(top_k=2), free)  # the cut is applied: another sample


def test_ragged_lists(generator):
    generate, _ = generator
    with pytest.raises(ValueError, match=r"input_ids: expected a .* or nested lists of token ids \[batch"):
        generate([[1, 2], [3]])


def test_right_padding_is_refused_but_left_padding_is_not(generator):
    """Right padding is refused (above); the left-padded form of [[5, 6]] gives its tokens."""
    generate, as_array = generator
    alone = np.asarray(generate(as_array([[5, 6]]), max_new_tokens=4))
    padded = np.asarray(generate(as_array([[0, 5, 6]]), as_array([[0, 1, 1]]), max_new_tokens=4))
    np.testing.assert_array_equal(padded[:, 1:], alone)


def test_nested_lists_and_int32_equal_int64_arrays(generator):
    generate, as_array = generator
    ids, mask = [[9, 4, 7], [0, 3, 8]], [[1, 1, 1], [0, 1, 1]]
    ref = np.asarray(generate(as_array(ids), as_array(mask), max_new_tokens=5))
    np.testing.assert_array_equal(np.asarray(generate(ids, mask, max_new_tokens=5)), ref)
    int32 = np.asarray(generate(as_array(np.array(ids, np.int32)), as_array(mask), max_new_tokens=5))
    np.testing.assert_array_equal(int32, ref)


def test_both_generators_give_the_same_tokens(tiny_onnx):
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)
    from mom_compile.export.runtime import OnnxGenerator

    model, folder, _ = tiny_onnx(18)
    ids, mask = [[9, 4, 7, 1], [0, 0, 3, 8]], [[1, 1, 1, 1], [0, 0, 1, 1]]
    ref = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[3, 4])
    got = OnnxGenerator(folder).generate(ids, mask, max_new_tokens=12, eos_token_id=[3, 4])
    np.testing.assert_array_equal(got, ref.numpy())


def test_default_eos_is_the_models(tiny_onnx, monkeypatch):
    """Without eos_token_id both generators stop at the model's (its config's, the export's
    manifest's), as Hugging Face's generate does; [] generates max_new_tokens whatever comes."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)
    from mom_compile.export.runtime import OnnxGenerator

    model, folder, _ = tiny_onnx(18)
    gen = OnnxGenerator(folder)
    ids, mask = [[9, 4, 7, 1], [0, 0, 3, 8]], [[1, 1, 1, 1], [0, 0, 1, 1]]
    free = model.generate(ids, mask, max_new_tokens=12, eos_token_id=[]).numpy()
    assert free.shape == (2, 16)
    eos = int(free[0, 5])  # row 0's second generated token: row 0 stops there
    unused = next(i for i in range(model.config.vocab_size) if i not in free)
    for model_eos in (eos, [unused, eos]):  # config.json may hold a list (Hugging Face's convention)
        monkeypatch.setattr(model.config, "eos_token_id", model_eos)
        monkeypatch.setitem(gen.manifest, "eos_token_id", model_eos)
        for run in (lambda **kw: model.generate(ids, mask, max_new_tokens=12, **kw).numpy(),
                    lambda **kw: gen.generate(ids, mask, max_new_tokens=12, **kw)):
            default = run()
            pad = model_eos if isinstance(model_eos, int) else model_eos[0]  # the first eos id pads
            np.testing.assert_array_equal(default, run(eos_token_id=eos, pad_token_id=pad))
            assert not np.array_equal(default, free)  # it stopped: row 0 pads after its eos
            np.testing.assert_array_equal(run(eos_token_id=[]), free)


def test_onnx_backend_steps_only_the_prefilled_batch_and_keeps_the_id_dtype(tiny_onnx):
    """A step with another batch than the prefilled one is one error naming input_ids (it was an
    onnxruntime Reshape failure); generate returns the prompt's id dtype, as torch's does."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)
    from mom_compile.export.runtime import OnnxBackend, OnnxGenerator

    model, folder, _ = tiny_onnx(18)
    backend = OnnxBackend(folder)
    with pytest.raises(RuntimeError, match="call prefill first"):
        backend.step(np.zeros((2, 1), np.int64))
    backend.prefill(np.array([[5, 6, 7], [1, 2, 3]]), np.ones((2, 3), np.int64))
    with pytest.raises(ValueError, match=r"input_ids: expected \[2, 1\].*got shape \[3, 1\]"):
        backend.step(np.zeros((3, 1), np.int64))
    prompt = np.array([[5, 6, 7]], np.int32)
    got = OnnxGenerator(folder).generate(prompt, max_new_tokens=3)
    want = model.generate(torch.from_numpy(prompt), max_new_tokens=3)
    assert got.dtype == np.int32 and want.dtype == torch.int32
    np.testing.assert_array_equal(got, want.numpy())

