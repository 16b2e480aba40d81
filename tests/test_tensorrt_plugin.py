"""The TensorRT plugins of `mom::memory_decode` (export/tensorrt_plugin.py), without TensorRT.

- Their contract against the op: the conv plugin takes the op's tensor arguments in order, the
  attributes are the op's other arguments, and the conv plugin then the step plugin give the
  outputs (shapes, dtypes) of the op's fake kernel.
- The artefacts aot_impl returns, compiled for sm_90 on any machine: PTX entries whose parameters
  are exactly TensorRT's call (input pointers, int32 scalars, output pointers) without Triton's
  hidden scratch pointers, which ptxas assembles.
- register()'s glue through stand-ins for tensorrt.plugin, to the rules TensorRT applies.
- On CPU under Triton's interpreter: the launch plans (grids, int32 scalars, scratch, tables bound
  in place) in TensorRT's argument binding, conv then step, against the float64 reference.
- On a GPU (cupy): each artefact loaded by the CUDA driver and launched with TensorRT's argument
  list, conv then step with the state tables bound in place, against the float64 reference, in
  bfloat16 and float32, at batches 1, 3 and 8 and every tactic; the entry Triton emits (with the
  scratch pointers) fails the launch's parameter check.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import inspect
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402

import mom_compile.ops  # noqa: E402,F401  (registers the ops)
from mom_compile.export import tensorrt_plugin as tp  # noqa: E402
from mom_compile.export.tensorrt_plugin import CONV, PLUGINS, STEP  # noqa: E402

from inputs import decode_inputs  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)
H, K, V, WIDTH, BATCH, SLOTS, CHOICES = 2, 16, 32, 4, 3, 5, 3
C = 2 * H * K + H * V
SHAPES = {CONV: {"q": (BATCH, H * K), "per_set": (BATCH, SLOTS, H * K + H * V + 2 * H),
                 "memory_idx": (BATCH, CHOICES), "a_log": (H,), "dt_bias": (H,), "conv_w": (C, WIDTH),
                 "conv_b": (C,), "conv_src": (BATCH, SLOTS, WIDTH - 1, C)},
          STEP: {"memory_idx": (BATCH, CHOICES), "qkv": (BATCH, CHOICES, H, 2 * K + V),
                 "beta_g": (BATCH, CHOICES, H, 2), "rec_src": (BATCH, SLOTS, H, K, V)}}
ATTRIBUTES = {CONV: {"single_set": 0}, STEP: {"scale": 0.25}}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- the contract against the op ----------------------------------------------------------------
def test_plugins_take_the_ops_arguments():
    """The conv plugin's inputs are the op's first tensor arguments in order, the step plugin's
    table is the last one, and the attributes are the op's other arguments."""
    schema = torch.ops.mom.memory_decode.default._schema
    tensors = [a for a in schema.arguments if "Tensor" in str(a.type)]
    others = {a.name: str(a.type) for a in schema.arguments if "Tensor" not in str(a.type)}
    assert len(tensors) == len(CONV.inputs) + 1 and tensors[-1].name == "rec_states"
    assert [p.name for p in STEP.inputs][-1] == "rec_src" and STEP.in_place == {"rec_dst": "rec_src"}
    assert CONV.in_place == {"conv_dst": "conv_src"}
    assert others == {"scale": "float", "single_set": "bool"}
    assert {**CONV.attributes, **STEP.attributes} == {"single_set": int, "scale": float}


@pytest.mark.parametrize("activation", tp.ACTIVATION_DTYPES)
def test_conv_then_step_give_the_ops_outputs(activation):
    """Port dtypes against real arguments of the op, and the outputs of conv then step (shapes
    and dtypes from the contract) against the op's fake kernel: o, conv table, recurrent table."""
    args = decode_inputs(BATCH, H, K, V, WIDTH, SLOTS, CHOICES, dtype=TORCH_DTYPES[activation])
    for port, arg in zip([*CONV.inputs, STEP.inputs[-1]], args):
        assert tp.port_dtype(port, activation) == dtype_name(arg.dtype), port.name
    conv_shapes = {p.name: tuple(a.shape) for p, a in zip(CONV.inputs, args)}
    conv_dst, qkv, beta_g = CONV.output_shapes(conv_shapes)
    step_shapes = {"memory_idx": conv_shapes["memory_idx"], "qkv": qkv, "beta_g": beta_g,
                   "rec_src": tuple(args[-1].shape)}
    assert step_shapes == SHAPES[STEP] and (qkv, beta_g) == (SHAPES[STEP]["qkv"], SHAPES[STEP]["beta_g"])
    rec_dst, o = STEP.output_shapes(step_shapes)
    with torch.device("meta"):
        expected = torch.ops.mom.memory_decode(*[a.to("meta") for a in args], 0.25, False)
    ports = [STEP.outputs[1], CONV.outputs[0], STEP.outputs[0]]
    assert [tuple(t.shape) for t in expected] == [o, conv_dst, rec_dst]
    assert [dtype_name(t.dtype) for t in expected] == [tp.port_dtype(p, activation) for p in ports]


# -- the artefacts, compiled for sm_90 here -----------------------------------------------------
@functools.cache
def artifact(plugin: tp.Plugin, activation: str, tactic: int) -> tp.KernelArtifact:
    return tp.kernel_artifact(plugin, SHAPES[plugin], activation, ATTRIBUTES[plugin], tactic, target=SM90)


CPU_CASES = ([(CONV, a, 0) for a in tp.ACTIVATION_DTYPES]
             + [(STEP, "float32", t) for t in STEP.tactics(SHAPES[STEP])])


@pytest.mark.parametrize("plugin,activation,tactic", CPU_CASES,
                         ids=[f"{p.name}-{a}-{t}" for p, a, t in CPU_CASES])
def test_ptx_entry_is_tensorrts_call(plugin, activation, tactic):
    art = artifact(plugin, activation, tactic)
    name, params = tp.ptx_entry(art.ptx)
    launch = tp.plan(plugin, SHAPES[plugin], ATTRIBUTES[plugin], tactic)
    call = tp.tensorrt_call(plugin, launch.scalars)
    assert name == art.name == plugin.kernel
    assert [tp.PTX_KINDS.get(kind) for kind, _ in params] == [kind for kind, _ in call]
    assert len(params) == len(plugin.inputs) + len(launch.scalars) + len(plugin.outputs)
    assert art.grid == launch.grid and art.block[0] % 32 == 0 and art.block[1:] == (1, 1)
    assert 0 <= art.shared_mem <= tp.MAX_SHARED_MEM


def test_launches_and_scalars_follow_the_shapes():
    """One program per (row, head) for the conv and per (row, head, V-block) for the step; the int32
    scalars are the contiguous strides of q and per_set and the slot count."""
    rows = BATCH * CHOICES
    conv = tp.plan(CONV, SHAPES[CONV], ATTRIBUTES[CONV], 0)
    assert conv.grid == (rows, H)
    set_width = SHAPES[CONV]["per_set"][2]
    assert conv.scalars == (("q_stride", H * K), ("set_stride_b", SLOTS * set_width),
                            ("set_stride_s", set_width), ("slots", SLOTS))
    for tactic in STEP.tactics(SHAPES[STEP]):
        step = tp.plan(STEP, SHAPES[STEP], ATTRIBUTES[STEP], tactic)
        assert step.grid == (rows, H, -(-V // tactic)) and step.scalars == (("slots", SLOTS),)
    assert STEP.tactics(SHAPES[STEP]) == [8, 16, 32] and CONV.tactics(SHAPES[CONV]) == []


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_triton_adds_unread_scratch_pointers_that_are_removed(plugin):
    """Triton's own entry ends in pointer parameters that TensorRT does not pass (global and
    profile scratch, from Triton 3.3/3.4 on); the artefact's entry drops them, nothing else."""
    _, compiled = tp.compile_kernel(plugin, SHAPES[plugin], "bfloat16", ATTRIBUTES[plugin], 0, target=SM90)
    _, raw = tp.ptx_entry(compiled.asm["ptx"])
    _, trimmed = tp.ptx_entry(artifact(plugin, "bfloat16", 0).ptx)
    assert raw[:len(trimmed)] == trimmed
    assert all(kind == "u64" for kind, _ in raw[len(trimmed):])
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 4):
        assert len(raw) == len(trimmed) + 2


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_trimmed_ptx_assembles(plugin, tmp_path):
    # the ptxas Triton itself runs (TRITON_PTXAS_PATH, else its bundled one): an image may pair a
    # newer CUDA's ptxas with a Triton whose bundled one cannot read the PTX it now emits
    knobs = getattr(triton, "knobs", None)
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    ptxas = Path(knobs.nvidia.ptxas.path) if knobs else bundled
    if not ptxas.exists():
        pytest.skip("Triton's ptxas is missing")
    ptx = tmp_path / "kernel.ptx"
    ptx.write_text(artifact(plugin, "bfloat16", 0).ptx)
    result = subprocess.run([str(ptxas), f"-arch=sm_{SM90.arch}a", str(ptx), "-o", os.devnull],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_read_trailing_parameter_is_not_dropped():
    ptx = (".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u64 k_param_1\n)\n{\n"
           "\tld.param.u64 \t%rd1, [k_param_1];\n}\n")
    with pytest.raises(ValueError, match="reads its parameter k_param_1"):
        tp.drop_trailing_params(ptx, keep=1)
    assert tp.ptx_entry(tp.drop_trailing_params(ptx.replace("[k_param_1]", "[k_param_0]"), keep=1))[1] \
        == [("u64", "k_param_0")]


def test_kernel_parameters_out_of_tensorrts_order_are_refused():
    swapped = dataclasses.replace(STEP, outputs=STEP.outputs[::-1])
    with pytest.raises(ValueError, match="TensorRT passes"):
        tp.compile_kernel(swapped, SHAPES[STEP], "float32", ATTRIBUTES[STEP], 0, target=SM90)


def test_bad_requests_are_refused():
    with pytest.raises(ValueError, match="activation"):
        tp.kernel_artifact(CONV, SHAPES[CONV], "float64", ATTRIBUTES[CONV], 0, target=SM90)
    with pytest.raises(ValueError, match="tactic"):
        tp.plan(STEP, SHAPES[STEP], ATTRIBUTES[STEP], 12)
    with pytest.raises(ValueError, match="tactic"):
        tp.plan(CONV, SHAPES[CONV], ATTRIBUTES[CONV], 8)
    with pytest.raises(ValueError, match="expected attributes"):
        tp.plan(STEP, SHAPES[STEP], {"scale": 0.25, "single_set": 0}, 0)
    symbolic = dict(SHAPES[STEP], rec_src=(BATCH, SLOTS, object(), K, V))
    with pytest.raises(ValueError, match="rec_src: every dimension but the batch must be static"):
        tp.plan(STEP, symbolic, ATTRIBUTES[STEP], 8)


# -- register() through stand-ins for tensorrt and tensorrt.plugin -----------------------------
class _Expr:
    """A shape expression: a build-time constant, or a function of the symbolic batch; +, *, //
    build new expressions, as TensorRT's do."""

    def __init__(self, value=None, fn=None):
        self.value = value
        self.fn = fn or (lambda batch: value)

    @property
    def is_constant(self):
        return self.value is not None

    def constant_value(self):
        return self.value

    def __call__(self, batch: int) -> int:
        return self.fn(batch)

    def _op(self, other, f):
        other = other if isinstance(other, _Expr) else _Expr(other)
        value = f(self.value, other.value) if self.is_constant and other.is_constant else None
        return _Expr(value, lambda batch: f(self(batch), other(batch)))

    def __add__(self, other):
        return self._op(other, lambda a, b: a + b)

    def __mul__(self, other):
        return self._op(other, lambda a, b: a * b)

    def __floordiv__(self, other):
        return self._op(other, lambda a, b: a // b)


class _TensorDesc:
    def __init__(self, shape_expr=(), dtype=None, shape=None):
        self.shape_expr, self.dtype, self.shape = tuple(shape_expr), dtype, shape


class _LaunchParams:
    """KernelLaunchParams: grid, block and shared memory (defaults as TensorRT's)."""

    def __init__(self):
        self.grid_x = self.grid_y = self.grid_z = self.block_x = self.block_y = self.block_z = 1
        self.shared_mem = 0


class _SymIntExprs(tuple):
    @classmethod
    def from_tuple(cls, values):
        return cls(values)


def fake_tensorrt():
    """Modules standing in for tensorrt and tensorrt.plugin: dtype tokens, descriptors, and
    decorators that record the functions."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.9.0"
    for name in ("float32", "float16", "bfloat16", "int64"):
        setattr(trt, name, f"trt.{name}")
    trtp = types.ModuleType("tensorrt.plugin")
    trtp.registered = {}

    def decorator(kind):
        def outer(plugin_id):
            def inner(fn):
                assert (kind, plugin_id) not in trtp.registered, f"{kind} of {plugin_id} registered twice"
                trtp.registered[(kind, plugin_id)] = fn
                return fn
            return inner
        return outer

    trtp.register, trtp.autotune, trtp.aot_impl = (decorator(k) for k in ("register", "autotune", "aot_impl"))
    trtp.TensorDesc, trtp.KernelLaunchParams, trtp.SymIntExprs = _TensorDesc, _LaunchParams, _SymIntExprs
    trtp.from_shape_expr = lambda shape, dtype: _TensorDesc(shape, dtype)
    trtp.SymInt32 = lambda value: ("SymInt32", value)
    trtp.AutoTuneCombination = lambda types_, layouts, tactics=None: (types_, layouts, tactics)
    trt.plugin = trtp
    return trt, trtp


@pytest.fixture
def registered(monkeypatch):
    trt, trtp = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(tp, "_registered", set())
    monkeypatch.setattr(tp, "kernel_artifact", functools.partial(tp.kernel_artifact, target=SM90))
    tp.register()
    tp.register()  # once per process: the second call must not register again
    kinds = ("register", "autotune", "aot_impl")
    return {plugin: {kind: trtp.registered[(kind, plugin.id)] for kind in kinds} for plugin in PLUGINS}


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_registered_signatures_follow_tensorrts_schema(registered, plugin):
    """register: (inputs, attributes); autotune: (inputs, outputs); aot_impl: (inputs, attributes,
    outputs, tactic), with a 4-tuple return annotation (tensorrt/plugin/_validate.py)."""
    names = [p.name for p in plugin.inputs]
    signature = {kind: inspect.signature(fn) for kind, fn in registered[plugin].items()}
    assert list(signature["register"].parameters) == names + list(plugin.attributes)
    assert list(signature["autotune"].parameters) == names + ["outputs"]
    assert list(signature["aot_impl"].parameters) == names + list(plugin.attributes) + ["outputs", "tactic"]
    annotations = [signature["register"].parameters[n].annotation for n in plugin.attributes]
    assert annotations == list(plugin.attributes.values())
    assert len(signature["aot_impl"].return_annotation.__args__) == 4


BATCHED = {"q", "per_set", "memory_idx", "conv_src", "qkv", "beta_g", "rec_src"}  # the rest: weights


def descs(plugin: tp.Plugin, activation: str) -> list[_TensorDesc]:
    """The plugin's inputs as TensorRT describes them while building: the batch symbolic."""
    def expr(name, axis, size):
        return _Expr(fn=lambda b: b) if axis == 0 and name in BATCHED else _Expr(size)

    return [_TensorDesc([expr(p.name, i, d) for i, d in enumerate(SHAPES[plugin][p.name])],
                        f"trt.{tp.port_dtype(p, activation)}", shape=SHAPES[plugin][p.name])
            for p in plugin.inputs]


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_registered_functions(registered, plugin):
    functions, attrs = registered[plugin], ATTRIBUTES[plugin]
    inputs = descs(plugin, "bfloat16")
    outputs = functions["register"](*inputs, **attrs)
    assert [d.dtype for d in outputs] == [f"trt.{tp.port_dtype(p, 'bfloat16')}" for p in plugin.outputs]
    at_batch_7 = [tuple(e(7) if isinstance(e, _Expr) else e for e in d.shape_expr) for d in outputs]
    shapes_7 = {name: (7, *shape[1:]) if name in BATCHED else shape for name, shape in SHAPES[plugin].items()}
    assert at_batch_7 == plugin.output_shapes(shapes_7)
    types_, layouts, tactics = functions["autotune"](*inputs, outputs)[0]
    assert types_.split(", ") == tp.autotune_types(plugin) and layouts == "LINEAR"
    assert tactics == (plugin.tactics(SHAPES[plugin]) or None)
    tactic = (tactics or [0])[0]
    name, ptx, params, extra = functions["aot_impl"](*inputs, *attrs.values(), outputs, tactic)
    art = artifact(plugin, "bfloat16", tactic)
    assert (name, ptx) == (art.name, art.ptx)
    assert params.grid_x(7) == 7 * CHOICES  # one program row per (sequence, choice), symbolic
    assert (params.grid_y, params.grid_z) == (tuple(art.grid) + (1,))[1:3]
    assert (params.block_x, params.shared_mem) == (art.block[0], art.shared_mem)
    assert list(extra) == [("SymInt32", s) for s in art.scalars]
    wrong = descs(plugin, "bfloat16")
    wrong[0].dtype = "trt.float16"
    with pytest.raises(TypeError, match=f"input {plugin.inputs[0].name}|input {plugin.inputs[1].name}"):
        functions["aot_impl"](*wrong, *attrs.values(), outputs, tactic)


# -- on the GPU: the artefacts launched as TensorRT launches them -------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Driver:
    """The CUDA driver calls TensorRT makes to run an AOT kernel, through cupy (and ctypes for
    cuFuncGetParamInfo, which cupy does not wrap)."""

    def __init__(self):
        self.cupy = pytest.importorskip("cupy")
        self.cupy.cuda.Device(torch.cuda.current_device()).use()
        self.cupy.cuda.runtime.free(0)  # the device's primary context (torch's too), current from here on
        self.functions = {}  # PTX -> loaded function
        self.libcuda = ctypes.CDLL("libcuda.so.1")
        size_p = ctypes.POINTER(ctypes.c_size_t)
        self.libcuda.cuFuncGetParamInfo.argtypes = [ctypes.c_void_p, ctypes.c_size_t, size_p, size_p]

    def load(self, art: tp.KernelArtifact) -> int:
        if art.ptx not in self.functions:
            driver = self.cupy.cuda.driver
            module = driver.moduleLoadData(art.ptx.encode() + b"\0")
            self.functions[art.ptx] = driver.moduleGetFunction(module, art.name)
        return self.functions[art.ptx]

    def param_sizes(self, function: int) -> list[int]:
        sizes, offset, size = [], ctypes.c_size_t(), ctypes.c_size_t()
        while self.libcuda.cuFuncGetParamInfo(ctypes.c_void_p(function), len(sizes), ctypes.byref(offset),
                                              ctypes.byref(size)) == 0:
            sizes.append(size.value)
        return sizes

    def launch_like_tensorrt(self, art: tp.KernelArtifact, grid, inputs, outputs) -> None:
        """kernel(inputs..., int32 scalars..., outputs...) and nothing more, after checking that
        the loaded function takes exactly those parameters."""
        function = self.load(art)
        args = ([ctypes.c_uint64(t.data_ptr()) for t in inputs] + [ctypes.c_int32(s) for s in art.scalars]
                + [ctypes.c_uint64(t.data_ptr()) for t in outputs])
        expected = [ctypes.sizeof(a) for a in args]
        if self.param_sizes(function) != expected:
            raise AssertionError(f"{art.name} takes parameters of {self.param_sizes(function)} bytes; "
                                 f"TensorRT passes {expected}")
        pointers = (ctypes.c_void_p * len(args))(*[ctypes.cast(ctypes.pointer(a), ctypes.c_void_p)
                                                   for a in args])
        grid = (tuple(grid) + (1, 1))[:3]
        torch.cuda.synchronize()
        self.cupy.cuda.driver.launchKernel(function, *grid, *art.block, art.shared_mem, 0,
                                           ctypes.addressof(pointers), 0)
        torch.cuda.synchronize()


def tensorrt_style(launch, tactic: int):
    """An implementation of mom::memory_decode_ for check_decode, as a TensorRT engine runs the two
    plugins: the conv kernel, then the step kernel on its scratch, through `launch(plugin, shapes,
    activation, attributes, tactic, inputs, outputs)`; TensorRT's tensors are dense, and the state
    tables are bound as both the input and the output they update (`in_place`), as the engines
    bind them."""

    def run(plugin, tensors: dict, attributes: dict, activation: str, device):
        shapes = {p.name: tuple(tensors[p.name].shape) for p in plugin.inputs}
        for port, shape in zip(plugin.outputs, plugin.output_shapes(shapes)):
            if port.name in plugin.in_place:
                tensors[port.name] = tensors[plugin.in_place[port.name]]
            else:  # NaN where a kernel writes nothing, so that a read of it shows
                tensors[port.name] = torch.full(shape, float("nan"), device=device,
                                                dtype=TORCH_DTYPES[tp.port_dtype(port, activation)])
        launch(plugin, shapes, activation, attributes, tactic if plugin.tactics(shapes) else 0,
               [tensors[p.name] for p in plugin.inputs], [tensors[p.name] for p in plugin.outputs])

    def impl(q, per_set, memory_idx, a_log, dt_bias, conv_w, conv_b, conv_states, rec_states, scale,
             single_set):
        if conv_b is None:  # the plugin always takes a bias
            conv_b = torch.zeros_like(conv_w[:, 0])
        args = [q, per_set, memory_idx, a_log, dt_bias, conv_w, conv_b]
        tensors = {p.name: t.contiguous() for p, t in zip(CONV.inputs, args)}
        tensors.update(conv_src=conv_states, rec_src=rec_states)
        activation = dtype_name(q.dtype)
        run(CONV, tensors, {"single_set": int(single_set)}, activation, q.device)
        run(STEP, tensors, {"scale": scale}, activation, q.device)
        return tensors["o"]

    return impl


def driver_launch(driver: Driver, compiled: dict):
    """launch for tensorrt_style: each artefact compiled once per (plugin, dtype, static shapes,
    attributes, tactic), as TensorRT compiles it per engine, and launched at every batch."""

    def launch(plugin, shapes, activation, attributes, tactic, inputs, outputs):
        static = tuple(s[1:] for s in shapes.values())
        key = (plugin.name, activation, static, tuple(attributes.items()), tactic)
        if key not in compiled:
            compiled[key] = tp.kernel_artifact(plugin, shapes, activation, attributes, tactic)
        grid = tp.plan(plugin, shapes, attributes, tactic).grid  # TensorRT evaluates the grid expressions
        driver.launch_like_tensorrt(compiled[key], grid, inputs, outputs)

    return launch


def interpret(plugin, shapes, activation, attributes, tactic, inputs, outputs):
    """launch for tensorrt_style under Triton's interpreter: the plan's grid, constants and int32
    scalars, each argument bound to the kernel parameter TensorRT's call puts it at."""
    plan = tp.plan(plugin, shapes, attributes, tactic)
    names = [name for _, name in tp.tensorrt_call(plugin, plan.scalars)]
    values = [*inputs, *(value for _, value in plan.scalars), *outputs]
    tp.kernel(plugin)[plan.grid](**dict(zip(names, values)), **plan.constexprs, num_warps=plan.num_warps)


# (H, K, V, conv bias, single projection set): a 340M layer (K = V = 256), expand_v 2, tiny heads
GPU_SHAPES = [(4, 256, 256, True, False), (2, 128, 256, True, False), (2, 16, 16, False, True)]


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("h,k,v,bias,single_set", GPU_SHAPES)
def test_cuda_artifacts_launched_like_tensorrt_match_reference(dtype, h, k, v, bias, single_set):
    from test_triton_kernels import TOLERANCE, check_decode

    driver, compiled = Driver(), {}
    tactics = STEP.tactics({"rec_src": (1, 1, h, k, v)})
    for tactic in tactics:
        impl = tensorrt_style(driver_launch(driver, compiled), tactic)
        for batch in (1, 3, 8):  # 3 choices each; the last sequence is padding when batch > 1
            errors = check_decode(impl, batch, h, k, v, bias, single_set, dtype=dtype, device="cuda",
                                  seed=batch)
            assert max(errors.values()) <= TOLERANCE[dtype], (tactic, batch, errors)
    assert len(compiled) == 1 + len(tactics)  # one conv kernel and one per tactic served every batch


@cuda
@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_cuda_entry_with_scratch_pointers_fails_the_launch(plugin):
    """The entry Triton emits (with its scratch pointers) is not what TensorRT calls: the launch
    check refuses it, so a kernel whose entry does not match TensorRT's call fails these tests."""
    shapes, attributes = SHAPES[plugin], ATTRIBUTES[plugin]
    art = tp.kernel_artifact(plugin, shapes, "float32", attributes, 0)
    _, compiled = tp.compile_kernel(plugin, shapes, "float32", attributes, 0)
    raw = dataclasses.replace(art, ptx=compiled.asm["ptx"])
    inputs = [torch.zeros(shapes[p.name], dtype=TORCH_DTYPES[tp.port_dtype(p, "float32")], device="cuda")
              for p in plugin.inputs]
    inputs[[p.name for p in plugin.inputs].index("memory_idx")] -= 1  # padding: the kernels read no state
    outputs = [torch.zeros(s, dtype=torch.float32, device="cuda") for s in plugin.output_shapes(shapes)]
    driver = Driver()
    driver.launch_like_tensorrt(art, art.grid, inputs, outputs)
    with pytest.raises(AssertionError, match="TensorRT passes"):
        driver.launch_like_tensorrt(raw, raw.grid, inputs, outputs)


# -- on CPU: the same launches under Triton's interpreter ---------------------------------------
# (batch, conv bias, single projection set, tactic) at H=2, K=16, V=32, float32: the plans' grids,
# int32 scalars, scratch and in-place tables, checked without a GPU (a subprocess: the interpreter
# must be on before triton loads).
INTERPRETER_CASES = [(1, True, False, 8), (3, True, False, 32), (3, False, True, 8)]


def test_interpreted_launches_like_tensorrt_match_reference():
    from test_triton_kernels import TOLERANCE

    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), str(root / "tests"), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, __file__, "--interpret"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(INTERPRETER_CASES)
    for case, errors in zip(INTERPRETER_CASES, results):
        assert max(errors.values()) <= TOLERANCE[torch.float32], (case, errors)


def _interpret_all() -> None:
    """Subprocess entry: every interpreter case; one JSON line, a list of each case's errors."""
    from test_triton_kernels import check_decode

    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before triton loads"
    results = [check_decode(tensorrt_style(interpret, tactic), batch, H, K, V, bias, single_set,
                            dtype=torch.float32, device="cpu", seed=batch)
               for batch, bias, single_set, tactic in INTERPRETER_CASES]
    print(json.dumps(results))


if __name__ == "__main__" and sys.argv[1:] == ["--interpret"]:
    _interpret_all()
