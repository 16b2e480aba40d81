"""`direct_call.call`: eager calls skip torch's dispatcher only where nothing needs it, and then
compute exactly what the dispatched op computes, mutations and version counters included."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from mom_compile import ops
from mom_compile.ops.direct_call import call
from mom_compile.ops.table import OPS, op_named

from inputs import combine_inputs, op_inputs

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs CUDA"))]


@pytest.fixture
def dispatched(monkeypatch):
    """dispatched(op) -> a list that grows by one for every call of op that reaches the dispatcher."""
    def watch(op):
        calls, overload = [], op.definition._opoverload

        class Counted:  # the overload, counting its calls
            def __call__(self, *args):
                calls.append(args)
                return overload(*args)

            def __getattr__(self, name):
                return getattr(overload, name)
        monkeypatch.setattr(op.definition, "_opoverload", Counted())
        return calls
    return watch


def copies(args: tuple, device: str) -> tuple:
    return tuple(a.detach().clone().to(device) if isinstance(a, torch.Tensor) else a for a in args)


def flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS, ids=lambda op: op.name)
def test_call_skips_the_dispatcher_and_matches_it(op, device, dispatched):
    """Every op of the table, every input case: in plain eager under no_grad, `call` never reaches
    the dispatcher and returns, and writes, bit for bit what the dispatched op does, and bumps the
    version of each argument the op mutates (how often is torch's business: a CPU reference's own
    in-place writes bump it too where the dispatcher hides them)."""
    for args in op_inputs(op.name, torch.float32):
        via_op, direct = copies(args, device), copies(args, device)
        with torch.no_grad():
            expected = op.op(*via_op)
            calls = dispatched(op)
            got = call(op.definition, *direct)
        assert calls == [], op.name
        for e, g in zip(flat(expected), flat(got), strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=0, equal_nan=True)
        for a, b in zip(via_op, direct):  # mutated arguments: same values, versions bumped
            if isinstance(a, torch.Tensor):
                torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)
                assert (b._version > 0) == (a._version > 0) and b._version >= a._version, op.name


class PassThroughDispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class PassThroughFunction(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class Subclass(torch.Tensor):
    pass


def route_args(**change):
    logits, topk, shared = op_inputs("route", torch.float32)[0]
    return (change.get("logits", logits), topk, shared)


FALLBACKS = {
    "profiler": (lambda: torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]),
                 route_args),
    "dispatch mode": (PassThroughDispatch, route_args),
    "function mode": (PassThroughFunction, route_args),
    "input needing a gradient": (
        torch.enable_grad, lambda: route_args(logits=route_args()[0].requires_grad_())),
    "tensor subclass": (torch.no_grad, lambda: route_args(logits=route_args()[0].as_subclass(Subclass))),
}


@pytest.mark.parametrize("case", FALLBACKS, ids=str)
def test_call_keeps_the_dispatcher_where_something_needs_it(case, dispatched):
    """Profiling, a dispatch or function mode, autograd recording a call, or a tensor subclass each
    send the call through the dispatcher, with the dispatched op's result."""
    context, make_args = FALLBACKS[case]
    op = op_named("route")
    args = make_args()
    expected = op.reference(*args)
    calls = dispatched(op)
    with context():
        got = call(op.definition, *args)
    assert len(calls) == 1
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(torch.as_tensor(g), torch.as_tensor(e), rtol=0, atol=0)


def test_in_place_write_to_an_inference_tensor_is_left_to_the_dispatcher(dispatched):
    """A decode cache made under inference_mode, advanced outside it: the call goes to the
    dispatcher (a Triton kernel called directly would write it), which decides (torch 2.13 refuses;
    2.11 lets the CPU reference write it), and the outcome is the dispatched op's. Inside inference
    mode it runs directly."""
    op = op_named("memory_decode_")
    args = op_inputs("memory_decode_", torch.float32)[0]

    def with_inference_states():
        with torch.inference_mode():
            states = [t.clone() for t in args[7:9]]
        return (*args[:7], *states, *args[9:])

    def outcome(fn, args):
        try:
            return [t.clone() for t in (fn(*args), *args[7:9])]
        except RuntimeError as error:
            assert "nference" in str(error)
            return "refused"

    with torch.no_grad():
        expected = outcome(op.op, with_inference_states())
        calls = dispatched(op)
        got = outcome(lambda *a: call(op.definition, *a), with_inference_states())
    assert len(calls) == 1
    if expected == "refused":
        assert got == "refused"
    else:
        for e, g in zip(expected, got, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
    with torch.inference_mode():
        call(op.definition, *with_inference_states())
    assert len(calls) == 1


def test_meta_tensors_take_the_fake_kernel(dispatched):
    """Meta tensors (shape inference, models built on the meta device) go through the dispatcher to
    the op's fake kernel, which gives the shapes the reference gives real tensors; the reference
    itself would read values a meta tensor does not have."""
    op = op_named("chunk_gated_delta")
    args = op_inputs("chunk_gated_delta", torch.float32)[0]
    on_meta = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    calls = dispatched(op)
    with torch.no_grad():
        got = call(op.definition, *on_meta)
    assert len(calls) == 1
    expected = op.reference(*args)
    assert [(g.device.type, g.shape, g.dtype) for g in flat(got)] == \
        [("meta", e.shape, e.dtype) for e in flat(expected)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_call_honours_a_disabled_kernel(dispatched):
    """With an op's CUDA kernel disabled, the direct call runs what the dispatcher would: the
    reference kernel."""
    op = op_named("gated_rms_norm")
    args = copies(op_inputs("gated_rms_norm", torch.float32)[0], "cuda")
    with torch.no_grad(), op.definition.set_kernel_enabled("cuda", False):
        calls = dispatched(op)
        got = call(op.definition, *args)
    assert calls == []
    torch.testing.assert_close(got, op.reference(*args), rtol=0, atol=0)


def test_compiled_calls_do_not_guard_on_the_profiler():
    """Compiling through `call` traces the op without reading the profiler's state, so profiling
    a compiled function runs the graph it profiles rather than compiling another one."""
    args = combine_inputs()
    counter = CompileCounter()
    combined = torch.compile(ops.combine, backend=counter, fullgraph=True)
    combined(*args)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        combined(*args)
    assert counter.frame_count == 1
