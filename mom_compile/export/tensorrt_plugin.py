"""`mom::memory_decode` as two TensorRT plugins whose Triton kernels are compiled ahead of time.

On CUDA the decode op is two Triton kernels (ops/memory_decode_triton.py): the conv kernel (gates,
short convolution, L2 norms; it shifts the conv history) writes a small float32 scratch (`qkv`,
`beta_g`) that the step kernel (one gated delta step per state slice) reads. Each kernel is one
quickly deployable plugin (QDP) here, `mom::memory_decode_conv` and `mom::memory_decode_step`: in a
plugin-mode decode graph (`--plugin`, plugin.py) every layer's `mom::memory_decode` is a conv node
feeding a step node, which TensorRT's ONNX parser maps to these plugins (op type = plugin name,
namespace "mom", `aot = 1`). While an engine builds, a plugin's `aot_impl` compiles its kernel to
PTX for the GPU of the build; the engine then launches the PTX itself, without Python.

How TensorRT (10.9+ and 11) calls an AOT kernel, from its sources:
  - `kernel(input pointers..., int32 scalars..., output pointers...)`: the scalars are the
    `SymIntExprs` that aot_impl returns, "located after the tensor inputs and before the tensor
    outputs" (python/packaging/bindings_wheel/tensorrt/plugin/_lib.py, aot_impl's docstring);
  - nothing else: getLaunchParams carries grid, block, shared memory and those scalars only
    (include/impl/NvInferPythonPlugin.h, IPluginV3QuickAOTBuild), and the kernels written for it
    end their parameter list at the last output (samples/python/quickly_deployable_plugins/
    oait_kernels.py `circ_pad_kernel`; Torch-TensorRT's examples/dynamo/nvrtc_aot_plugin.py);
  - floats cannot be passed, so the norm's epsilon and the query scale are compile-time constants.
Triton 3.3+ appends a global-scratch pointer, and 3.4+ a profile-scratch pointer, to every PTX
entry; TensorRT passes neither (the driver would read them from past the end of its argument
array). `kernel_artifact` checks that the kernel needs no scratch memory (both sizes 0, neither
parameter read) and removes them, so that the entry ends where TensorRT's argument list does.

States in place: each kernel reads a state table through one parameter and writes it through
another (`conv_src`/`conv_dst`, `rec_src`/`rec_dst`), and writes only the chosen slots' rows. The
plugins declare no aliasing (TensorRT would then copy whole tables to honour it); instead the
engine's present.X is bound to past.X's buffer (`in_place` below; model.json records it as
`tensorrt.state_in_place`), so every slot a token does not touch keeps its value.

Everything specific to the kernels (their tensors in order, dtypes, shapes, tactics, grid, int32
scalars, constants, attributes) is the contract section below, one `Plugin` per kernel in PLUGINS;
the rest is generic over that list. The module imports without TensorRT: `register()` imports it.
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

NAMESPACE = "mom"

# Dtype kinds of the plugins' tensors: the model's activation dtype, float32 state, int64 index.
ACTIVATION, STATE, INDEX = "activation", "state", "index"
ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")
FIXED_DTYPES = {STATE: "float32", INDEX: "int64"}

Shapes = Mapping[str, Sequence]  # port name -> shape (ints, or TensorRT shape expressions)


@dataclass(frozen=True)
class Port:
    """One tensor of a plugin: its name (the kernel parameter's) and dtype kind."""

    name: str
    kind: str


@dataclass(frozen=True)
class Launch:
    """How to compile and launch a kernel for one shape, attribute values and tactic."""

    grid: tuple
    num_warps: int
    constexprs: dict
    scalars: tuple = ()  # (kernel parameter, int32 value or expression), between inputs and outputs


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: one object per plugin
class Plugin:
    """One Triton kernel as a TensorRT plugin."""

    name: str  # the plugin's (and the ONNX node's op type)
    kernel: str  # its Triton kernel in mom_compile/ops/memory_decode_triton.py
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    attributes: dict[str, type]  # the node's attributes, in order
    output_shapes: Callable[[Shapes], list[tuple]]
    launch: Callable[[Shapes, Mapping, int], Launch]  # (input shapes, attribute values, tactic)
    tactics: Callable[[Shapes], list[int]] = lambda shapes: []  # none: TensorRT's default (0) only
    in_place: dict[str, str] = field(default_factory=dict)  # output -> the input table it updates

    @property
    def id(self) -> str:
        return f"{NAMESPACE}::{self.name}"


# -- the contract of the two decode kernels: the one place that changes with them ---------------
# Ports in the kernels' parameter order. The conv plugin takes the functional op's tensor arguments
# in the op's order (the bias always a tensor, zeros where the model has none); the step plugin
# takes the conv plugin's scratch and the recurrent table. q and per_set arrive contiguous, so
# their strides follow from their shapes. Output shapes use +, *, // only, so that they hold for
# ints and TensorRT's shape expressions alike.
def _conv_output_shapes(s: Shapes) -> list[tuple]:
    """conv_dst like conv_src; qkv [B, k', H, 2K + V] (C // H for conv_w's C channels); beta_g
    [B, k', H, 2]."""
    batch, choices = s["memory_idx"]
    h, c = s["a_log"][0], s["conv_w"][0]
    return [tuple(s["conv_src"]), (batch, choices, h, c // h), (batch, choices, h, 2)]


def _conv_launch(s: Shapes, attributes: Mapping, tactic: int) -> Launch:
    import triton.language as tl

    from mom_compile.ops.l2_normalize import L2_EPS
    from mom_compile.ops.memory_decode_triton import decode_launch, history_block

    batch, choices = s["memory_idx"][0], _static("memory_idx", s["memory_idx"][1])
    h = _static("a_log", s["a_log"][0])
    k = _static("q", s["q"][1]) // h
    channels, width = (_static("conv_w", d) for d in s["conv_w"])
    v = (channels - 2 * h * k) // h
    sets, set_width = (_static("per_set", d) for d in list(s["per_set"])[1:])
    plan = decode_launch(batch * choices, h, k, v, block_v=1)  # block_v: the step's, unused here
    constexprs = dict(eps=L2_EPS, CHOICES=choices, H=h, K=k, V=v, W=width, BLOCK_K=plan.block_k,
                      BLOCK_V=plan.block_v_conv, BLOCK_W=history_block(width), HAS_BIAS=True,
                      SINGLE_SET=bool(attributes["single_set"]),
                      COMPUTE=tl.float32, PDL=False)
    scalars = (("q_stride", h * k), ("set_stride_b", sets * set_width), ("set_stride_s", set_width),
               ("slots", _static("conv_src", s["conv_src"][1])))
    return Launch(grid=plan.conv_grid, num_warps=plan.conv_warps, constexprs=constexprs, scalars=scalars)


def _step_output_shapes(s: Shapes) -> list[tuple]:
    """rec_dst like rec_src [B, S, H, K, V]; o [B, k', H, V]."""
    batch, choices = s["memory_idx"]
    rec = tuple(s["rec_src"])
    return [rec, (batch, choices, rec[2], rec[4])]


def _step_tactics(s: Shapes) -> list[int]:
    """The V-block widths TensorRT times: powers of two from 8 to the widest the kernel allows."""
    from mom_compile.ops.memory_decode_triton import step_block_sizes

    k, v = (_static("rec_src", d) for d in list(s["rec_src"])[3:])
    widest = max(8, step_block_sizes(k, v)[1])
    return [8 << i for i in range(widest.bit_length() - 3)]


def _step_launch(s: Shapes, attributes: Mapping, tactic: int) -> Launch:
    import triton.language as tl

    from mom_compile.ops.memory_decode_triton import decode_launch
    from mom_compile.ops.triton_precision import split_scale

    batch, choices = s["memory_idx"][0], _static("memory_idx", s["memory_idx"][1])
    slots, h, k, v = (_static("rec_src", d) for d in list(s["rec_src"])[1:])
    plan = decode_launch(batch * choices, h, k, v, block_v=tactic or _step_tactics(s)[-1])
    hi, lo = split_scale(attributes["scale"])
    constexprs = dict(scale_hi=hi, scale_lo=lo, CHOICES=choices, H=h, K=k, V=v, BLOCK_K=plan.block_k,
                      BLOCK_V=plan.block_v, COMPUTE=tl.float32, PDL=False)
    return Launch(grid=plan.step_grid, num_warps=plan.step_warps, constexprs=constexprs,
                  scalars=(("slots", slots),))


CONV = Plugin(
    "memory_decode_conv", "_decode_conv_kernel",
    inputs=(Port("q", ACTIVATION), Port("per_set", ACTIVATION), Port("memory_idx", INDEX),
            Port("a_log", ACTIVATION), Port("dt_bias", ACTIVATION), Port("conv_w", ACTIVATION),
            Port("conv_b", ACTIVATION), Port("conv_src", ACTIVATION)),
    outputs=(Port("conv_dst", ACTIVATION), Port("qkv", STATE), Port("beta_g", STATE)),
    attributes={"single_set": int},
    output_shapes=_conv_output_shapes, launch=_conv_launch, in_place={"conv_dst": "conv_src"})
STEP = Plugin(
    "memory_decode_step", "_decode_step_kernel",
    inputs=(Port("memory_idx", INDEX), Port("qkv", STATE), Port("beta_g", STATE), Port("rec_src", STATE)),
    outputs=(Port("rec_dst", STATE), Port("o", STATE)),
    attributes={"scale": float},
    output_shapes=_step_output_shapes, launch=_step_launch, tactics=_step_tactics,
    in_place={"rec_dst": "rec_src"})
PLUGINS = (CONV, STEP)


# -- generic over PLUGINS -----------------------------------------------------------------------
def _static(tensor: str, dim) -> int:
    if isinstance(dim, int):
        return dim
    raise ValueError(f"{tensor}: every dimension but the batch must be static (the kernel's constants), "
                     f"got {dim!r}")


def port_dtype(port: Port, activation: str) -> str:
    """The dtype of `port` in a model whose activations are `activation`."""
    return activation if port.kind == ACTIVATION else FIXED_DTYPES[port.kind]


def kernel(plugin: Plugin):
    """The Triton kernel of `plugin`."""
    from mom_compile.ops import memory_decode_triton

    return getattr(memory_decode_triton, plugin.kernel)


# -- the artefact that aot_impl returns, in plain Python ----------------------------------------
TRITON_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "i64"}
PTX_KINDS = {"u64": "pointer", "u32": "int32"}  # how Triton declares pointer and i32 parameters
# Triton's launch features that TensorRT's launch lacks: metadata field -> the value it must have.
PLAIN_LAUNCH = {"global_scratch_size": 0, "profile_scratch_size": 0, "num_ctas": 1,
                "launch_cooperative_grid": False, "launch_pdl": False}
MAX_SHARED_MEM = 48 * 1024  # dynamic shared memory a launch gets without raising the function's limit
_ENTRY = re.compile(r"\.entry\s+([\w$]+)\s*\(([^)]*)\)")


@dataclass(frozen=True)
class KernelArtifact:
    """What aot_impl hands TensorRT: the kernel, and how to launch it."""

    name: str
    ptx: str
    grid: tuple  # ints or TensorRT shape expressions
    block: tuple[int, int, int]
    shared_mem: int
    scalars: tuple = ()  # int32 arguments between the inputs and the outputs


def tensorrt_call(plugin: Plugin, scalars: Sequence = ()) -> list[tuple[str, str]]:
    """The arguments TensorRT launches the kernel with, as (kind, kernel parameter)."""
    return ([("pointer", p.name) for p in plugin.inputs] + [("int32", name) for name, _ in scalars]
            + [("pointer", p.name) for p in plugin.outputs])


def ptx_entry(ptx: str) -> tuple[str, list[tuple[str, str]]]:
    """(kernel name, [(PTX type, parameter name), ...]) of the one `.entry` of a PTX module."""
    entries = _ENTRY.findall(ptx)
    if len(entries) != 1:
        raise ValueError(f"ptx: expected one .entry, found {len(entries)}")
    name, params = entries[0]
    declared = [decl.split() for decl in params.split(",") if decl.strip()]
    return name, [(words[1].lstrip("."), words[-1]) for words in declared]


def drop_trailing_params(ptx: str, keep: int) -> str:
    """The PTX with the entry's parameters after the first `keep` removed; each must be unread."""
    match = _ENTRY.search(ptx)
    _, params = ptx_entry(ptx)
    body = ptx[match.end():]
    for _, name in params[keep:]:
        if re.search(rf"\b{re.escape(name)}\b", body):
            raise ValueError(f"the kernel reads its parameter {name}, which TensorRT does not pass")
    kept = ",\n".join("\t" + " ".join(decl.split()) for decl in match.group(2).split(",")[:keep])
    return ptx[:match.start(2)] + "\n" + kept + "\n" + ptx[match.end(2):]


def plan(plugin: Plugin, shapes: Shapes, attributes: Mapping, tactic: int) -> Launch:
    """The launch of `plugin` for these input shapes, attribute values and tactic (0: TensorRT's
    default tactic)."""
    if set(attributes) != set(plugin.attributes):
        raise ValueError(f"{plugin.id}: expected attributes {list(plugin.attributes)}, "
                         f"got {list(attributes)}")
    allowed = plugin.tactics(shapes)
    if tactic and tactic not in allowed:
        raise ValueError(f"tactic: {plugin.id} takes {allowed or 'only'} or 0 (TensorRT's default), "
                         f"got {tactic}")
    return plugin.launch(shapes, attributes, tactic)


def compile_kernel(plugin: Plugin, shapes: Shapes, activation: str, attributes: Mapping, tactic: int,
                   target=None):
    """(Launch, Triton's CompiledKernel) of `plugin` for these input shapes, activation dtype,
    attribute values and tactic; `target` (a triton GPUTarget) defaults to the current GPU."""
    import triton
    from triton.compiler import ASTSource

    if activation not in ACTIVATION_DTYPES:
        raise ValueError(f"activation: expected one of {ACTIVATION_DTYPES}, got {activation!r}")
    launch = plan(plugin, shapes, attributes, tactic)
    fn = kernel(plugin)
    call = [name for _, name in tensorrt_call(plugin, launch.scalars)]
    runtime_params = [name for name in fn.arg_names if name not in launch.constexprs]
    if runtime_params != call:
        raise ValueError(f"{fn.__name__}: TensorRT passes {call} (inputs, int32 scalars, outputs); the "
                         f"kernel's non-constexpr parameters are {runtime_params}")
    pointers = {p.name: "*" + TRITON_TYPES[port_dtype(p, activation)] for p in plugin.inputs + plugin.outputs}
    scalars = dict(launch.scalars)
    signature = {name: pointers.get(name, "i32" if name in scalars else "constexpr") for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, launch.constexprs), target=target,
                              options={"num_warps": launch.num_warps})
    return launch, compiled


def kernel_artifact(plugin: Plugin, shapes: Shapes, activation: str, attributes: Mapping, tactic: int,
                    target=None) -> KernelArtifact:
    """The kernel as TensorRT launches it: PTX whose entry takes exactly TensorRT's arguments."""
    launch, compiled = compile_kernel(plugin, shapes, activation, attributes, tactic, target)
    meta = compiled.metadata
    for key, plain in PLAIN_LAUNCH.items():
        if getattr(meta, key, plain) != plain:
            raise ValueError(f"{meta.name}: {key} = {getattr(meta, key)}, but TensorRT launches kernels "
                             f"as if {key} = {plain}")
    if meta.shared > MAX_SHARED_MEM:
        raise ValueError(f"{meta.name}: needs {meta.shared} bytes of shared memory, over the "
                         f"{MAX_SHARED_MEM} a launch gets by default")
    call = tensorrt_call(plugin, launch.scalars)
    ptx = drop_trailing_params(compiled.asm["ptx"], keep=len(call))
    name, params = ptx_entry(ptx)
    if [PTX_KINDS.get(kind) for kind, _ in params] != [kind for kind, _ in call]:
        raise ValueError(f"{name}: PTX parameters {params} do not match TensorRT's call {call}")
    return KernelArtifact(name=name, ptx=ptx, grid=launch.grid, block=(meta.num_warps * 32, 1, 1),
                          shared_mem=meta.shared, scalars=tuple(value for _, value in launch.scalars))


def autotune_types(plugin: Plugin) -> list[str]:
    """TensorRT's type strings for every input and output: the activations vary together."""
    names = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16", "int64": "INT64"}
    return ["|".join(names[d] for d in ACTIVATION_DTYPES) if p.kind == ACTIVATION
            else names[FIXED_DTYPES[p.kind]] for p in plugin.inputs + plugin.outputs]


# -- TensorRT's decorators ----------------------------------------------------------------------
_registered: set[str] = set()


def register() -> None:
    """Declare every plugin (register, autotune, aot_impl) to TensorRT 10.9+, once per process."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    if not hasattr(trtp, "aot_impl"):
        raise RuntimeError(f"TensorRT {trt.__version__} has no ahead-of-time plugins (10.9 or newer has)")
    for plugin in PLUGINS:
        if plugin.id not in _registered:
            _register(plugin, trt, trtp)
            _registered.add(plugin.id)


def _register(plugin: Plugin, trt, trtp) -> None:
    names = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16", trt.int64: "int64"}
    types = {name: dtype for dtype, name in names.items()}
    n_in, n_attr = len(plugin.inputs), len(plugin.attributes)
    descs_type = tuple[(trtp.TensorDesc,) * len(plugin.outputs)]

    def param(name, annotation):
        return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation)

    inputs = [param(p.name, trtp.TensorDesc) for p in plugin.inputs]
    attributes = [param(name, kind) for name, kind in plugin.attributes.items()]
    outputs = param("outputs", descs_type)

    def activation_of(descs) -> str:
        """The activation dtype (the first activation input's; float32 without one), every input's
        dtype checked against it."""
        activation = next((names.get(d.dtype) for p, d in zip(plugin.inputs, descs) if p.kind == ACTIVATION),
                          "float32")
        for port, desc in zip(plugin.inputs, descs):
            if names.get(desc.dtype) != port_dtype(port, activation):
                raise TypeError(f"{plugin.id}: input {port.name} is {desc.dtype}, expected "
                                f"{port_dtype(port, activation)}")
        return activation

    def describe(*descs, **_attributes):
        activation = activation_of(descs)
        shapes = {p.name: tuple(d.shape_expr) for p, d in zip(plugin.inputs, descs)}
        return tuple(trtp.from_shape_expr(tuple(shape), dtype=types[port_dtype(port, activation)])
                     for port, shape in zip(plugin.outputs, plugin.output_shapes(shapes)))

    describe.__signature__ = inspect.Signature(inputs + attributes, return_annotation=descs_type)

    def autotune(*args):
        shapes = {p.name: tuple(d.shape) for p, d in zip(plugin.inputs, args[:n_in])}
        return [trtp.AutoTuneCombination(", ".join(autotune_types(plugin)), "LINEAR",
                                         plugin.tactics(shapes) or None)]

    autotune.__signature__ = inspect.Signature(inputs + [outputs],
                                               return_annotation=list[trtp.AutoTuneCombination])

    def aot_impl(*args):
        descs, values, tactic = args[:n_in], args[n_in:n_in + n_attr], args[-1]

        def dim(expr):
            return expr.constant_value() if expr.is_constant else expr

        shapes = {p.name: tuple(dim(e) for e in d.shape_expr) for p, d in zip(plugin.inputs, descs)}
        attrs = {name: kind(value) for (name, kind), value in zip(plugin.attributes.items(), values)}
        art = kernel_artifact(plugin, shapes, activation_of(descs), attrs, int(tactic))
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = (tuple(art.grid) + (1, 1))[:3]
        params.block_x, params.block_y, params.block_z = art.block
        params.shared_mem = art.shared_mem
        extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(s) for s in art.scalars])
        return art.name, art.ptx, params, extra

    aot_impl.__signature__ = inspect.Signature(
        inputs + attributes + [outputs, param("tactic", int)],
        return_annotation=tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymIntExprs])

    trtp.register(plugin.id)(describe)
    trtp.autotune(plugin.id)(autotune)
    trtp.aot_impl(plugin.id)(aot_impl)
