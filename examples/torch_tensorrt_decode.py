"""Compile a MoM decode step with Torch-TensorRT; its memory updates run the two TensorRT plugins.

    pip install "torch-tensorrt>=2.8" "tensorrt>=10.9"          # on a CUDA machine with triton
    python examples/torch_tensorrt_decode.py [--checkpoint DIR] [--dtype bfloat16] [--tokens 16]

torch_tensorrt.compile takes the decode step as a function of flat tensors (input ids and every
past state in, logits and every present state out: graphs/export_graphs.DecodeStepGraph). A
converter registered for `mom::memory_decode` turns each call into the layers of the two plugins of
mom_compile/export/tensorrt_plugin.py, ahead-of-time (the engine launches their Triton kernels,
compiled for this GPU, without Python): the conv plugin, then the step plugin on its scratch. One
torch op becoming two plugins is beyond Torch-TensorRT's generate_plugin_converter (one op, one
plugin), so the converter makes the `network.add_plugin(..., aot=True)` calls that one makes. The
plugins write only the chosen slots of their output tables (the ONNX engines bind those to the
input tables' buffers); Torch-TensorRT allocates every engine output itself, so the converter takes
every other slot from the input table (a select over slots). The plugins always take a conv bias
tensor, so a model without one gets a zero bias (the same function).

The script decodes greedily from a prompt with the compiled step and with PyTorch, and prints the
tokens of both and the largest difference of the first step's logits.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mom_compile import MomConfig, MomForCausalLM  # noqa: E402
from mom_compile.export import tensorrt_plugin  # noqa: E402
from mom_compile.export.tensorrt_plugin import CONV, NAMESPACE, STEP  # noqa: E402
from mom_compile.graphs.export_graphs import DecodeStepGraph  # noqa: E402


class FlatDecodeStep(torch.nn.Module):
    """(input_ids [B, 1], *past states) -> (logits [B, 1, vocab], *present states)."""

    def __init__(self, model: MomForCausalLM) -> None:
        super().__init__()
        self.step = DecodeStepGraph(model)

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.step(input_ids, list(past))


def with_conv_bias(model: MomForCausalLM) -> MomForCausalLM:
    """Every layer gets a conv bias tensor (zeros where it had none): the plugin takes one."""
    for block in model.model.layers:
        if block.attn.conv_bias is None:
            weight = block.attn.conv_weight
            block.attn.conv_bias = torch.nn.Parameter(weight.new_zeros(weight.shape[0]), requires_grad=False)
    return model


def keep_unwritten(net, memory_idx, written, table):
    """`written` (a plugin's output table [B, S, ...]) at the slots memory_idx [B, k'] chose, `table`
    (its input) everywhere else."""
    import tensorrt as trt

    slots = table.shape[1]
    idx = net.add_shuffle(net.add_cast(memory_idx, trt.int32).get_output(0))
    idx.reshape_dims = (0, 0, 1)  # [B, k', 1]
    every_slot = net.add_constant((1, 1, slots), np.arange(slots, dtype=np.int32)).get_output(0)
    hit = net.add_elementwise(idx.get_output(0), every_slot, trt.ElementWiseOperation.EQUAL).get_output(0)
    chosen = net.add_reduce(net.add_cast(hit, trt.int32).get_output(0), trt.ReduceOperation.MAX,
                            axes=1 << 1, keep_dims=False).get_output(0)  # [B, S]: 1 where written
    zero = net.add_constant((1, 1), np.zeros((1, 1), dtype=np.int32)).get_output(0)
    mask = net.add_shuffle(net.add_elementwise(chosen, zero, trt.ElementWiseOperation.GREATER).get_output(0))
    mask.reshape_dims = (0, 0) + (1,) * (len(table.shape) - 2)
    return net.add_select(mask.get_output(0), written, table).get_output(0)


def memory_decode_converter(ctx, target, args, kwargs, name):
    """mom::memory_decode as the conv plugin's and the step plugin's layers."""
    import tensorrt.plugin as trtp
    from torch_tensorrt.dynamo.conversion.converter_utils import get_trt_tensor

    *tensors, scale, single_set = args
    inputs = [get_trt_tensor(ctx, t, f"{name}_{port.name}") for t, port in zip(tensors, CONV.inputs)]
    rec_states = get_trt_tensor(ctx, tensors[-1], f"{name}_rec_src")
    plugins = getattr(trtp.op, NAMESPACE)
    conv = ctx.net.add_plugin(getattr(plugins, CONV.name)(*inputs, single_set=int(single_set)), aot=True)
    conv_dst, qkv, beta_g = (conv.get_output(i) for i in range(len(CONV.outputs)))
    step = getattr(plugins, STEP.name)(inputs[2], qkv, beta_g, rec_states, scale=float(scale))
    step = ctx.net.add_plugin(step, aot=True)
    rec_dst, o = (step.get_output(i) for i in range(len(STEP.outputs)))
    memory_idx, conv_states = inputs[2], inputs[-1]
    return (o, keep_unwritten(ctx.net, memory_idx, conv_dst, conv_states),
            keep_unwritten(ctx.net, memory_idx, rec_dst, rec_states))


def compile_step(model: MomForCausalLM, example: tuple[torch.Tensor, ...]) -> torch.nn.Module:
    import torch_tensorrt
    from torch_tensorrt.dynamo.conversion import dynamo_tensorrt_converter

    tensorrt_plugin.register()
    dynamo_tensorrt_converter(torch.ops.mom.memory_decode.default,
                              supports_dynamic_shapes=True)(memory_decode_converter)
    program = torch.export.export(FlatDecodeStep(model), example)
    return torch_tensorrt.dynamo.compile(program, arg_inputs=example, use_explicit_typing=True,
                                         min_block_size=1)


def greedy(step, ids: torch.Tensor, past: list[torch.Tensor], tokens: int):
    """Greedy ids [B, tokens] and the first step's logits."""
    out, first = [], None
    for _ in range(tokens):
        logits, *past = step(ids, *past)
        first = logits if first is None else first
        ids = logits[:, -1].argmax(-1, keepdim=True)
        out.append(ids)
    return torch.cat(out, dim=1), first


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a reference `mom` checkpoint folder (default: tiny random model)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("error: Torch-TensorRT needs a CUDA GPU", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    model = (MomForCausalLM.from_pretrained(args.checkpoint, dtype=dtype) if args.checkpoint
             else MomForCausalLM(MomConfig.preset("tiny")).to(dtype))
    model = with_conv_bias(model).cuda().eval()

    prompt = torch.randint(0, model.config.vocab_size, (2, 12), device="cuda")
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        ids = out.logits[:, -1].argmax(-1, keepdim=True)
        past = out.past_key_values.states()
        compiled = compile_step(model, (ids, *past))
        eager_ids, eager_logits = greedy(FlatDecodeStep(model), ids, [t.clone() for t in past], args.tokens)
        trt_ids, trt_logits = greedy(compiled, ids, [t.clone() for t in past], args.tokens)
    diff = (trt_logits.float() - eager_logits.float()).abs().max().item()
    print(f"PyTorch        : {eager_ids.tolist()}")
    print(f"Torch-TensorRT : {trt_ids.tolist()}")
    print(f"first step's logits: max abs difference {diff:.3e}")
    return 0 if torch.equal(trt_ids, eager_ids) else 3


if __name__ == "__main__":
    sys.exit(main())
