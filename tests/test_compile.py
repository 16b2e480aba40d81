"""torch.compile(fullgraph=True) over training, prefill and decode: no graph breaks, no
recompilation across sequence lengths, and the same numbers as eager."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from mom_compile.ops.table import OPS

from models import ids, tiny_model

TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture
def model():
    torch._dynamo.reset()
    return tiny_model(dtype=torch.float32)


def graph_breaks(fn, *args, **kwargs) -> int:
    return torch._dynamo.explain(fn)(*args, **kwargs).graph_break_count


def test_no_graph_breaks_in_training_prefill_and_decode(model):
    x, mask = ids(2, 9), torch.ones(2, 9, dtype=torch.int64)
    mask[0, :3] = 0
    assert graph_breaks(model, x, attention_mask=mask, labels=x) == 0
    cache = model.new_cache(2)
    assert graph_breaks(model, x, attention_mask=mask, past_key_values=cache, use_cache=True) == 0
    assert graph_breaks(model, ids(2, 1), past_key_values=cache, use_cache=True) == 0


def mom_ops_traced(fn, *args, **kwargs) -> set[str]:
    """The `mom` ops in the graph that torch.compile captures of fn(*args, **kwargs)."""
    seen = set()

    def backend(gm, example_inputs):
        seen.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    torch.compile(fn, backend=backend, fullgraph=True)(*args, **kwargs)
    return {t.removeprefix("mom.").removesuffix(".default") for t in seen if t.startswith("mom.")}


def test_compiled_graphs_hold_every_op_but_the_eager_only_ones(model):
    """The op table's `eager_only` and each op's wrapper (which traces the formula when compiling)
    state one fact in two places; they agree when training and prefill graphs hold exactly the
    ops the layer calls less the eager-only ones. Training graphs scan with the forward that keeps
    its residuals (the plain one when the scan states are recomputed), inference graphs with the
    plain one."""
    layer_ops = {"route", "dispatch", "gather_rows", "segment_conv", "l2_normalize", "combine",
                 "gated_rms_norm"}
    expected = layer_ops - {op.name for op in OPS if op.eager_only}
    x = ids(2, 9)
    model.train()
    assert mom_ops_traced(model, x, labels=x) == expected | {"chunk_gated_delta_train"}
    model.gradient_checkpointing_enable("scan_states")
    assert mom_ops_traced(model, x, labels=x) == expected | {"chunk_gated_delta"}
    model.gradient_checkpointing_disable()
    model.eval()
    with torch.no_grad():
        assert mom_ops_traced(model, x, use_cache=True) == expected | {"chunk_gated_delta"}


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# on CUDA eager runs the Triton kernels of gather_rows and l2_normalize, compiled graphs their formulas
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("recompute", [None, "blocks", "scan_states"])
def test_compiled_training_step_matches_eager(model, recompute, device):
    model.to(device)
    x, mask = ids(2, 11).to(device), torch.ones(2, 11, dtype=torch.int64, device=device)
    mask[1, :4] = 0
    model.train()
    eager = model(x, attention_mask=mask, labels=x)
    eager.loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    if recompute:  # the blocks (or the scan states) recomputed inside the compiled backward
        model.gradient_checkpointing_enable(recompute)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, attention_mask=mask, labels=x)
    out.loss.backward()
    torch.testing.assert_close(out.loss, eager.loss, **TOL)
    torch.testing.assert_close(out.aux_loss, eager.aux_loss, **TOL)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[n], rtol=1e-3, atol=1e-5, msg=n)


def test_compiled_prefill_and_decode_match_eager(model):
    x = ids(3, 8)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        eager_out = model(x[:, :6], use_cache=True)
        comp_out = compiled(x[:, :6], use_cache=True)
        torch.testing.assert_close(comp_out.logits, eager_out.logits, **TOL)
        for t in (6, 7):
            e = model(x[:, t:t + 1], past_key_values=eager_out.past_key_values, use_cache=True)
            c = compiled(x[:, t:t + 1], past_key_values=comp_out.past_key_values, use_cache=True)
            torch.testing.assert_close(c.logits, e.logits, **TOL)
        for ce, cc in zip(eager_out.past_key_values.layers, comp_out.past_key_values.layers):
            torch.testing.assert_close(cc.recurrent, ce.recurrent, **TOL)
            torch.testing.assert_close(cc.conv, ce.conv, **TOL)


def test_dynamic_sequence_lengths_compile_once(model):
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    frames = []
    with torch.no_grad():
        for t in (5, 9, 14, 23):
            x = ids(2, t)
            torch.testing.assert_close(compiled(x).logits, model(x).logits, **TOL)
            frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames == frames[:1] * 4, frames


def test_out_of_range_ids_fail_on_device_without_a_graph_break(model):
    compiled = torch.compile(model, fullgraph=True)
    with pytest.raises(RuntimeError, match="input_ids: every id must be in"):
        compiled(torch.tensor([[1, 2, 97]]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_compiled_training_into_a_cache_matches_eager(device):
    """A training forward into a cache (truncated backpropagation through time), compiled with
    Inductor, gives eager's gradients: the start states it keeps for the backward are its own
    copies, not the cache's buffers, which the graph rewrites at its end."""
    model = tiny_model().to(device).train()
    x = ids(2, 6).to(device)

    def grads(forward):
        model.zero_grad(set_to_none=True)
        forward(x, labels=x, past_key_values=model.new_cache(2), use_cache=True).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    eager = grads(model)
    compiled = grads(torch.compile(model, fullgraph=True))
    for name, g in eager.items():
        torch.testing.assert_close(compiled[name], g, rtol=1e-9, atol=1e-12, msg=name)
