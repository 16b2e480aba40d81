"""python -m mom_compile.export: write the ONNX (and optionally torch.export) artefacts of a MoM model.

Every failure a user can cause (bad arguments, unreadable checkpoint, unwritable output folder,
missing packages) ends in one `error:` line and a non-zero exit status; set MOM_EXPORT_DEBUG=1 to
see the traceback of an unexpected failure.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings

EXIT_USAGE, EXIT_FAILURE, EXIT_MISMATCH = 2, 1, 3
DTYPES = ("float32", "float16")
MIN_OPSET = 18

DESCRIPTION = """\
Export a Mixture-of-Memories (MoM) language model to two ONNX graphs that stock onnxruntime runs:

  OUT/prefill.onnx      input_ids [batch, seq] + attention_mask [batch, seq]
                        -> logits [batch, seq, vocab] + present.<layer>.{recurrent,conv}
  OUT/decode_step.onnx  input_ids [batch, 1] + past.<layer>.{recurrent,conv}
                        -> logits [batch, 1, vocab] + present.<layer>.{recurrent,conv}
  OUT/model.json        names, shapes, dtypes and the state layout

Generate by running prefill once, then decode_step per token, feeding each present.X back as
past.X (mom_compile/export/runtime.py and examples/onnx_generate.py do exactly that)."""

EPILOG = """\
examples:
  python -m mom_compile.export --onnx out/tiny --verify
      tiny random model (seconds), then check onnxruntime against PyTorch
  python -m mom_compile.export --onnx out/mom --checkpoint path/to/mom-checkpoint --verify
      a reference `mom` checkpoint folder (config.json + model.safetensors)
  python -m mom_compile.export --onnx out/340m --config 340m
      the paper's 340M configuration with random weights
  python -m mom_compile.export --onnx out/trt --plugin
      keep the recurrent step as mom::MemoryStep nodes for a TensorRT plugin
  python -m mom_compile.export --onnx out/tiny --pt2 --aoti --verify
      also torch.export programs and AOTInductor packages, all checked against PyTorch"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m mom_compile.export", description=DESCRIPTION, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--onnx", metavar="OUT", required=True,
                   help="output folder (created if missing); existing files of the same name are replaced")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="DIR",
                     help="model folder in the reference `mom` layout, or one saved by this package")
    src.add_argument("--config", choices=("tiny", "340m", "1.3b"), default=None,
                     help="without --checkpoint: a built-in size with random weights (default: tiny)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="weights and activations of the exported graphs (states stay float32); "
                        "default float32")
    p.add_argument("--opset", type=int, default=None, metavar="N",
                   help=f"ONNX opset of the graphs, {MIN_OPSET} or newer (default {MIN_OPSET}); from 27 on, "
                        "the memories' recurrence is the standard LinearAttention op instead of a "
                        "Scan (prefill) and plain step ops (decode), except with --plugin")
    p.add_argument("--verify", action="store_true",
                   help="run both graphs in onnxruntime against PyTorch on fresh random inputs and "
                        "print the max absolute / relative error of every output (with --aoti, "
                        "of the AOTInductor packages too)")
    p.add_argument("--plugin", action="store_true",
                   help="emit the recurrent memory step as custom-domain mom::MemoryStep nodes "
                        "(for a TensorRT plugin) instead of standard ops")
    p.add_argument("--pt2", action="store_true",
                   help="also write OUT/prefill.pt2 and OUT/decode_step.pt2 (torch.export.save); "
                        "load them after `import mom_compile`")
    p.add_argument("--aoti", action="store_true",
                   help="also compile OUT/prefill.aoti.pt2 and OUT/decode_step.aoti.pt2 with "
                        "AOTInductor for this CPU (needs a C++ compiler; minutes for large models); "
                        "load them with mom_compile.export.aoti.Package; --verify checks them too")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    return p


class _Failure(Exception):
    """A user-facing error: printed as one line."""


def _progress(message: str) -> None:
    print(message, flush=True)


def _quiet_exporter() -> None:
    """The exporter logs every optional library it cannot find; none of that concerns the user."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _check_args(args) -> None:
    if args.opset is not None:
        import onnx.defs

        newest = onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= args.opset <= newest:
            raise _Failure(f"--opset: expected {MIN_OPSET}..{newest} (the installed onnx's newest), "
                           f"got {args.opset}")
    if args.aoti:
        from .aoti import compiler

        if compiler() is None:
            raise _Failure(f"--aoti: no C++ compiler {os.environ.get('CXX') or 'g++'!r} on PATH "
                           "(install g++ or set CXX)")


def _prepare_out(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise _Failure(f"--onnx: {path!r} exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".mom_export_probe")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise _Failure(f"--onnx: cannot write to {path!r} ({e.strerror or e})") from None


def _load_model(args):
    import torch

    from mom_compile.graphs import MomConfig, MomForCausalLM

    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    if args.checkpoint:
        if not os.path.isdir(args.checkpoint):
            raise _Failure(f"--checkpoint: {args.checkpoint!r} is not a folder")
        try:
            model = MomForCausalLM.from_pretrained(args.checkpoint, dtype=dtype)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise _Failure(f"--checkpoint: cannot load {args.checkpoint!r}: {e}") from None
        what = f"checkpoint {args.checkpoint}"
    else:
        name = args.config or "tiny"
        torch.manual_seed(args.seed)
        model = MomForCausalLM(MomConfig.preset(name)).to(dtype)
        what = f"config {name!r} with random weights"
    params = sum(p.numel() for p in model.parameters())
    _progress(f"model: {what}, {params / 1e6:.1f}M parameters, {args.dtype} "
              f"({time.perf_counter() - start:.1f}s)")
    return model.eval()


def run(args) -> int:
    _check_args(args)
    _prepare_out(args.onnx)
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
        if args.verify:
            import onnxruntime  # noqa: F401
    except ImportError as e:
        raise _Failure(f"missing package {e.name!r}: pip install onnx onnxscript onnxruntime") from None
    _quiet_exporter()
    from .manifest import build_manifest, write_manifest
    from .onnx_export import DEFAULT_OPSET, export_onnx, export_programs

    opset = args.opset or DEFAULT_OPSET
    model = _load_model(args)
    start = time.perf_counter()
    programs = export_programs(model)
    _progress(f"torch.export of prefill and decode_step: {time.perf_counter() - start:.1f}s")
    paths = export_onnx(model, args.onnx, opset=opset, use_plugin=args.plugin, programs=programs,
                        progress=_progress)
    manifest = write_manifest(args.onnx, build_manifest(model.config, model.lm_head.weight.dtype,
                                                        opset, args.plugin))
    _progress(f"wrote {manifest}")
    if args.pt2:
        from .pt2 import save_programs

        start = time.perf_counter()
        for path in save_programs(programs, args.onnx).values():
            _progress(f"wrote {path}")
        _progress(f"torch.export.save: {time.perf_counter() - start:.1f}s")
    packages = _build_aoti(programs, args.onnx) if args.aoti else None
    if args.verify:
        return _verify(model, paths, packages, args)
    return 0


def _build_aoti(programs, out_dir: str) -> dict[str, str]:
    from .aoti import build_packages

    _progress("AOTInductor: compiling C++ kernels (the slowest step)")
    try:
        return build_packages(programs, out_dir, progress=_progress)
    except Exception as e:  # a compiler or Inductor failure: name the flag, keep one line
        if os.environ.get("MOM_EXPORT_DEBUG"):
            raise
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise _Failure(f"--aoti: AOTInductor build failed: {type(e).__name__}: {first_line}") from None


def _verify(model, paths, packages, args) -> int:
    from .verify import VERIFY_BATCH, VERIFY_PADDING, VERIFY_SEQ, tolerance, verify

    start = time.perf_counter()
    sections = [("onnxruntime CPU", verify(model, paths, use_plugin=args.plugin, seed=args.seed + 1))]
    if packages:
        from .aoti import verify_packages

        sections.append(("AOTInductor CPU", verify_packages(model, packages, seed=args.seed + 1)))
    limit = tolerance(model.lm_head.weight.dtype)
    rows = [r for _, section in sections for r in section]
    width = max(len(r.name) for r in rows)
    _progress(f"verify against PyTorch on fresh inputs (prefill batch x seq = {VERIFY_BATCH} x "
              f"{VERIFY_SEQ}, {VERIFY_PADDING} tokens of left padding in row 0; decode batch "
              f"{VERIFY_BATCH} from random state):")
    for runtime, section in sections:
        _progress(f"  {runtime}:")
        for r in section:
            flag = "" if r.max_rel <= limit else "   <-- above tolerance"
            _progress(f"    {r.graph:<11} {r.name:<{width}}  max abs {r.max_abs:.3e}  "
                      f"max rel {r.max_rel:.3e}{flag}")
    worst_runtime, worst = max(((name, r) for name, section in sections for r in section),
                               key=lambda pair: pair[1].max_rel)
    ok = worst.max_rel <= limit
    _progress(f"verify: {'OK' if ok else 'FAILED'}: worst relative error {worst.max_rel:.3e} "
              f"({worst_runtime} {worst.graph} {worst.name}), tolerance {limit:g} "
              f"({time.perf_counter() - start:.1f}s)")
    return 0 if ok else EXIT_MISMATCH


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        code = run(args)
    except _Failure as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as e:  # an unexpected failure: one line, the traceback on request
        if os.environ.get("MOM_EXPORT_DEBUG"):
            raise
        first_line = (str(e).strip().splitlines() or [""])[0]
        print(f"error: export failed: {type(e).__name__}: {first_line} "
              "(set MOM_EXPORT_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILURE
    _progress(f"done in {time.perf_counter() - start:.1f}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
