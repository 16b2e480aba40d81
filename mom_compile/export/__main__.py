"""python -m mom_compile.export: write the ONNX (optionally torch.export and TensorRT) artefacts of a
MoM model.

Every failure a user can cause (bad arguments, unreadable checkpoint, unwritable output folder,
missing packages) ends in one `error:` line and a non-zero exit status; set MOM_EXPORT_DEBUG=1 to
see the traceback of an unexpected failure. The files are written into a temporary folder beside
OUT and moved into OUT once all are written (and, with --verify, have matched PyTorch), so a failed,
interrupted or mismatching export changes nothing.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings

try:
    import fcntl
except ImportError:  # Windows: no locks, and no cleanup of killed exports' folders
    fcntl = None

from .. import cli_args
from ..interrupts import caused_by_interrupt, check_interrupted, interrupts_held, sigterm_as_interrupt
from .tensorrt_engine import ENGINE_FILES

EXIT_USAGE, EXIT_FAILURE, EXIT_MISMATCH = 2, 1, 3
DTYPES = ("float32", "float16", "bfloat16")
MIN_OPSET = 18
MAX_BATCH, MAX_SEQ = 8, 512  # --tensorrt's engine profiles, by default
# Every file name an export of any version of this command writes into OUT.
ARTEFACTS = ("model.json", "prefill.onnx", "decode_step.onnx", "weights.onnx.data", "prefill.onnx.data",
             "decode_step.onnx.data", "prefill.pt2", "decode_step.pt2", "prefill.aoti.pt2",
             "decode_step.aoti.pt2", *ENGINE_FILES.values())
_LOCK = ".lock"  # in a staging folder, locked by the exporting process until it publishes

DESCRIPTION = """\
Export a Mixture-of-Memories (MoM) language model to two ONNX graphs that stock onnxruntime runs:

  OUT/prefill.onnx      input_ids [batch, seq] + attention_mask [batch, seq]
                        -> logits [batch, 1, vocab] (the last position) + present.<layer>.{recurrent,conv}
  OUT/decode_step.onnx  input_ids [batch, 1] + past.<layer>.{recurrent,conv}
                        -> logits [batch, 1, vocab] + present.<layer>.{recurrent,conv}
  OUT/weights.onnx.data the weights of both graphs, for models above 1 GB of weights (smaller
                        ones keep them inside each graph)
  OUT/model.json        names, shapes, dtypes, the state layout and every file with its size

Generate by running prefill once, then decode_step per token, feeding each present.X back as
past.X (mom_compile/export/runtime.py and examples/onnx_generate.py do exactly that).

--tensorrt OUT writes the plugin-mode graphs and builds TensorRT engines from them (TensorRT 10.9+,
triton and a CUDA GPU): OUT/decode_step.engine, whose memory updates run the mom::memory_decode_conv
and mom::memory_decode_step plugins (their Triton kernels compiled for this GPU), and
OUT/prefill.engine, both recorded in OUT/model.json."""

EPILOG = """\
examples:
  python -m mom_compile.export --onnx out/tiny --verify
      tiny random model (seconds), then check onnxruntime against PyTorch
  python -m mom_compile.export --onnx out/mom --checkpoint path/to/mom-checkpoint --verify
      a reference `mom` checkpoint folder (config.json + model.safetensors)
  python -m mom_compile.export --onnx out/340m --config 340m
      the MoM paper's "340M" configuration (545M parameters) with random weights
  python -m mom_compile.export --onnx out/plugin --plugin --verify
      each decode step's memory updates as the nodes of the TensorRT plugins, checked with their
      standard translation inlined
  python -m mom_compile.export --onnx out/tiny --pt2 --aoti --verify
      also torch.export programs and AOTInductor packages, all checked against PyTorch
  python -m mom_compile.export --tensorrt out/trt --checkpoint path/to/ckpt --dtype bfloat16 --max-batch 8
      TensorRT engines for batches up to 8 and prompts up to 512 tokens"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m mom_compile.export", description=DESCRIPTION, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--onnx", type=cli_args.path, metavar="OUT",
                     help="output folder (created if missing). The export is written beside it and moved "
                          "in when complete: a failed or interrupted export leaves OUT as it was (Ctrl-C "
                          "during the final moves waits for them). In an "
                          "existing OUT, the files an export writes (" + ", ".join(ARTEFACTS) + ") are "
                          "replaced or, if this export does not write them, removed; other files stay")
    out.add_argument("--tensorrt", type=cli_args.path, metavar="OUT",
                     help="like --onnx, with the plugin-mode graphs (--plugin) and their TensorRT engines "
                          "(needs TensorRT 10.9+, triton and a CUDA GPU)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", type=cli_args.path, metavar="DIR",
                     help="model folder in the reference `mom` layout, or one saved by this package")
    src.add_argument("--config", choices=("tiny", "340m", "1.3b"), default=None,
                     help="without --checkpoint: a built-in size with random weights (default: tiny). "
                          "340m and 1.3b are the MoM paper's names of its two sizes, after the dense "
                          "models of the same width and depth; with their memories' own projections and "
                          "untied 32K-token embeddings they have 545M and 1.62B parameters")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="weights and activations of the exported graphs, and the conv states (the "
                        "recurrent states stay float32); "
                        "default float32; bfloat16 with --tensorrt only")
    p.add_argument("--opset", type=int, default=None, metavar="N",
                   help=f"ONNX opset of the graphs, {MIN_OPSET} or newer (default {MIN_OPSET}); from 27 on, "
                        "the memories' recurrence is the standard LinearAttention op instead of a "
                        "Scan (prefill) and plain step ops (decode; --plugin's decode keeps its plugin "
                        "nodes); an opset the installed onnxruntime cannot load gets a warning (an error "
                        "with --verify)")
    p.add_argument("--verify", action="store_true",
                   help="run both graphs in onnxruntime against PyTorch on fresh random inputs and "
                        "print the max absolute / relative error of every output (with --aoti, "
                        "of the AOTInductor packages too); OUT is left as it was if one is above "
                        f"tolerance (exit status {EXIT_MISMATCH})")
    p.add_argument("--plugin", action="store_true",
                   help="emit each decode step's memory updates as the nodes of the TensorRT plugins "
                        "mom::memory_decode_conv and mom::memory_decode_step "
                        "(mom_compile/export/tensorrt_plugin.py); prefill stays standard")
    p.add_argument("--pt2", action="store_true",
                   help="also write OUT/prefill.pt2 and OUT/decode_step.pt2 (torch.export.save); "
                        "load them after `import mom_compile`")
    p.add_argument("--aoti", action="store_true",
                   help="also compile OUT/prefill.aoti.pt2 and OUT/decode_step.aoti.pt2 with "
                        "AOTInductor for this CPU (needs a C++ compiler; minutes for large models); "
                        "load them with mom_compile.export.aoti.Package; --verify checks them too")
    p.add_argument("--max-batch", type=int, default=None, metavar="N",
                   help=f"with --tensorrt: the largest batch the engines take (default {MAX_BATCH})")
    p.add_argument("--max-seq", type=int, default=None, metavar="N",
                   help=f"with --tensorrt: the longest prompt the prefill engine takes (default {MAX_SEQ})")
    p.add_argument("--seed", type=cli_args.seed, default=0, help="seed of the random weights and inputs")
    return p


class _Failure(Exception):
    """A user-facing error: printed as one line."""


def _progress(message: str) -> None:
    print(message, flush=True)


def _quiet_exporter() -> None:
    """The exporter logs every optional library it cannot find, and onnxscript's opset converter
    says which converter it falls back to; none of that concerns the user."""
    for name in ("torch.onnx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _check_packages(args) -> None:
    """torch first (everything needs it), then what the ONNX export needs."""
    names = ["torch", "onnx", "onnxscript"] + (["onnxruntime"] if args.verify else [])
    for name in names:
        try:
            __import__(name)
        except ImportError:
            raise _Failure(f"missing package {name!r}: pip install torch onnx onnxscript onnxruntime "
                           "(or pip install -e '.[export]' in the repository)") from None


def onnxruntime_max_opset(newest: int) -> int | None:
    """The newest default-domain opset (up to `newest`) whose models the installed onnxruntime
    loads, found by loading a one-node model at each opset; None without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    import onnx
    import onnx.helper as h

    value = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = h.make_graph([h.make_node("Identity", ["x"], ["x_out"])], "probe", [value],
                         [h.make_tensor_value_info("x_out", onnx.TensorProto.FLOAT, [1])])
    for opset in range(newest, MIN_OPSET - 1, -1):
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], ir_version=8)
        try:
            onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 (onnxruntime's errors share no public type)
            continue
        return opset
    return None


def _check_args(args) -> None:
    if args.opset is not None:
        import onnx.defs

        newest = onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= args.opset <= newest:
            raise _Failure(f"--opset: expected {MIN_OPSET}..{newest} (the installed onnx's newest), "
                           f"got {args.opset}")
        runnable = onnxruntime_max_opset(newest)
        if runnable is not None and args.opset > runnable:
            import onnxruntime

            why = (f"the installed onnxruntime {onnxruntime.__version__} runs opsets up to {runnable}")
            if args.verify:
                raise _Failure(f"--opset {args.opset} --verify: {why}; export with --opset {runnable} "
                               "to check the graphs here")
            print(f"warning: --opset {args.opset}: {why}, so the graphs will not load in it (they may "
                  f"elsewhere); --opset {runnable} runs here", file=sys.stderr, flush=True)
    _check_tensorrt_args(args)
    if args.aoti:
        from .aoti import compiler

        if compiler() is None:
            raise _Failure(f"--aoti: no C++ compiler {os.environ.get('CXX') or 'g++'!r} on PATH "
                           "(install g++ or set CXX)")


def _check_tensorrt_args(args) -> None:
    """The --tensorrt options, and what building engines needs, before anything is written."""
    if args.dtype == "bfloat16" and (args.verify or not args.tensorrt):
        raise _Failure("--dtype bfloat16: only with --tensorrt and without --verify (onnxruntime's CPU "
                       "kernels lack bfloat16)")
    for flag, value in (("--max-batch", args.max_batch), ("--max-seq", args.max_seq)):
        if value is not None and not args.tensorrt:
            raise _Failure(f"{flag}: only with --tensorrt")
        if value is not None and value < 1:
            raise _Failure(f"{flag}: expected a positive number, got {value}")
    if not args.tensorrt:
        return
    from .tensorrt_engine import build_problem

    problem = build_problem()
    if problem:
        raise _Failure(f"--tensorrt: {problem}")


def _remove_abandoned(folder: str, base: str) -> None:
    """Remove the staging folders of exports to `base` whose process died without cleaning up
    (SIGKILL, the OOM killer): their lock file is no longer locked. A running export holds the
    lock of its own (`_Staging`), and a folder without one is left alone."""
    if fcntl is None:
        return
    try:
        names = os.listdir(folder)
    except OSError:  # a folder we may write to but not list
        return
    for name in names:
        if not (name.startswith(f".{base}.") and name.endswith(".partial")):
            continue
        lock = os.path.join(folder, name, _LOCK)
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # unlinked while we waited: its export released it to publish, the folder is no longer ours
            if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
        except OSError:  # locked: a running export
            pass
        finally:
            os.close(fd)


class _Staging:
    """A temporary folder that receives the export, on OUT's filesystem (files move between
    filesystems only by copying): inside OUT when it exists (a mount point or a link to another
    disk, say), else beside it. The export holds a lock on a file in it until it publishes, so
    that the next export to OUT removes it if the process was killed. `publish` moves its files
    into OUT, `discard` removes it (and the parent folders made for it)."""

    def __init__(self, out: str, flag: str) -> None:
        self.out = os.path.abspath(out)
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise _Failure(f"{flag}: {out!r} exists and is not a folder")
        parent = os.path.dirname(self.out)
        self.lock = None  # the lock file's descriptor while staging
        self.made = []  # parent folders created here, deepest last
        while not os.path.exists(parent) and parent != os.path.dirname(parent):
            self.made.insert(0, parent)
            parent = os.path.dirname(parent)
        try:
            for folder in self.made:
                os.mkdir(folder)
            base = os.path.basename(self.out)
            for folder in {os.path.dirname(self.out), self.out}:  # where earlier exports staged
                if os.path.isdir(folder):
                    _remove_abandoned(folder, base)
            where = self.out if os.path.isdir(self.out) else os.path.dirname(self.out)
            self.path = tempfile.mkdtemp(prefix=f".{base}.", suffix=".partial", dir=where)
            if fcntl is not None:
                self.lock = os.open(os.path.join(self.path, _LOCK), os.O_CREAT | os.O_RDWR, 0o600)
                fcntl.flock(self.lock, fcntl.LOCK_EX)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.path, 0o777 & ~umask)  # mkdtemp's 0700 would become OUT's
        except OSError as e:
            self.discard()
            raise _Failure(f"{flag}: cannot write to {out!r} ({e.strerror or e})") from None

    def publish(self) -> None:
        """Move the export into OUT: the whole folder if OUT is new, else file by file with Ctrl-C
        and SIGTERM held back: the old model.json first (a folder without one is no export, where
        one stopped halfway would mix two models), then the files of an earlier export that this
        one does not write, the new files, and model.json last."""
        self._unlock()
        if not os.path.exists(self.out):
            os.rename(self.path, self.out)
            self.made = []
            return
        with interrupts_held():
            names = sorted(os.listdir(self.path), key=lambda n: n == "model.json")
            for stale in ["model.json", *sorted(set(ARTEFACTS) - set(names))]:
                if os.path.isfile(os.path.join(self.out, stale)):
                    os.remove(os.path.join(self.out, stale))
            for name in names:
                os.replace(os.path.join(self.path, name), os.path.join(self.out, name))
            os.rmdir(self.path)
            self.made = []

    def _unlock(self) -> None:
        """Remove the lock file, then release it: a cleanup that locks it after finds it gone."""
        if self.lock is not None:
            os.unlink(os.path.join(self.path, _LOCK))
            os.close(self.lock)
            self.lock = None

    def discard(self) -> None:
        if hasattr(self, "path"):
            shutil.rmtree(self.path, ignore_errors=True)
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None
        for folder in reversed(self.made):
            try:
                os.rmdir(folder)
            except OSError:
                break
        self.made = []


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
        what = f"config {name!r}" + (" (the MoM paper's size name)" if name != "tiny" else "") + \
            " with random weights"
    params = model.num_parameters()
    _progress(f"model: {what}, {params / 1e6:.1f}M parameters, {args.dtype} "
              f"({time.perf_counter() - start:.1f}s)")
    return model.eval()


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def run(args) -> int:
    _check_packages(args)
    _check_args(args)
    flag = "--tensorrt" if args.tensorrt else "--onnx"
    if args.tensorrt:  # the plugin-mode export, then its engines
        args.onnx, args.plugin = args.tensorrt, True
    staging = _Staging(args.onnx, flag)

    def progress(message: str) -> None:  # name the files where they will be
        _progress(message.replace(staging.path, args.onnx))

    try:
        paths, packages, model, manifest = _export(args, staging.path, progress)
        # verified where written: an export that fails --verify is not published
        code = _verify(model, paths, packages, args) if args.verify else 0
        if code == 0:
            check_interrupted()  # an interruption lost on the way still stops the export here
            staging.publish()
    finally:
        staging.discard()
    if code:
        _progress(f"{args.onnx} left as it was: the export failed verification")
        return code
    _progress(f"wrote {args.onnx}: " + ", ".join(f"{name} ({_size(size)})" for name, size in
                                                 manifest["files"].items()) + ", listed in model.json")
    return 0


def _export(args, out: str, progress):
    """Every artefact into `out`; returns (ONNX paths, AOTI package paths or None, model, manifest)."""
    _quiet_exporter()
    from .manifest import build_manifest, file_sizes, write_manifest
    from .onnx_export import DEFAULT_OPSET, export_files, export_onnx, export_programs

    opset = args.opset or DEFAULT_OPSET
    model = _load_model(args)
    if args.tensorrt:
        _engine_limits(model.config, args)
    start = time.perf_counter()
    programs = export_programs(model)
    progress(f"torch.export of prefill and decode_step: {time.perf_counter() - start:.1f}s")
    paths = export_onnx(model, out, opset=opset, use_plugin=args.plugin, programs=programs,
                        progress=progress)
    files = export_files(out)
    if args.pt2:
        from .pt2 import save_programs

        start = time.perf_counter()
        files += save_programs(programs, out).values()
        progress(f"torch.export.save: {time.perf_counter() - start:.1f}s")
    packages = _build_aoti(programs, out, progress) if args.aoti else None
    files += (packages or {}).values()
    manifest = build_manifest(model.config, model.dtype, opset, args.plugin, files)
    if args.tensorrt:
        manifest["tensorrt"], engines = _build_engines(model.config, manifest, out, args, progress)
        manifest["files"] |= file_sizes(engines)
    write_manifest(out, manifest)
    return paths, packages, model, manifest


def _engine_limits(config, args) -> None:
    """Default --max-batch/--max-seq, checked against the prefill graph's TopK before exporting."""
    from .tensorrt_engine import prefill_batch

    args.max_batch, args.max_seq = args.max_batch or MAX_BATCH, args.max_seq or MAX_SEQ
    try:
        prefill_batch(config, args.max_batch, args.max_seq)
    except ValueError as e:
        raise _Failure(str(e)) from None


def _build_engines(config, manifest: dict, out: str, args, progress) -> tuple[dict, list[str]]:
    from .tensorrt_engine import build_engines

    progress(f"TensorRT: building engines for batch <= {args.max_batch}, prompts <= {args.max_seq} tokens")
    try:
        return build_engines(out, manifest, config, args.max_batch, args.max_seq, progress=progress)
    except Exception as e:  # a parser or builder failure: name the flag, keep one line
        if os.environ.get("MOM_EXPORT_DEBUG") or caused_by_interrupt(e):
            raise
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise _Failure(f"--tensorrt: engine build failed: {type(e).__name__}: {first_line}") from None


def _build_aoti(programs, out_dir: str, progress) -> dict[str, str]:
    from .aoti import build_packages

    progress("AOTInductor: compiling C++ kernels (the slowest step)")
    try:
        return build_packages(programs, out_dir, progress=progress)
    except Exception as e:  # a compiler or Inductor failure: name the flag, keep one line
        if os.environ.get("MOM_EXPORT_DEBUG") or caused_by_interrupt(e):
            raise
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise _Failure(f"--aoti: AOTInductor build failed: {type(e).__name__}: {first_line}") from None


def _verify(model, paths, packages, args) -> int:
    from .verify import VERIFY_BATCH, VERIFY_PADDING, VERIFY_SEQ, tolerance, verify

    start = time.perf_counter()
    seed = (args.seed + 1) % 2**64  # other inputs than the export's, for any --seed torch takes
    sections = [("onnxruntime CPU", verify(model, paths, use_plugin=args.plugin, seed=seed))]
    if packages:
        from .aoti import verify_packages

        sections.append(("AOTInductor CPU", verify_packages(model, packages, seed=seed)))
    limit = tolerance(model.dtype)
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
        with sigterm_as_interrupt():  # a terminated export cleans up like an interrupted one
            code = run(args)
    except _Failure as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except (KeyboardInterrupt, Exception) as e:
        if caused_by_interrupt(e):  # Ctrl-C or SIGTERM, maybe inside a compiler's error
            print("error: interrupted", file=sys.stderr)
            return EXIT_FAILURE
        if os.environ.get("MOM_EXPORT_DEBUG"):  # an unexpected failure: one line, or the traceback
            raise
        first_line = (str(e).strip().splitlines() or [""])[0]
        print(f"error: export failed: {type(e).__name__}: {first_line} "
              "(set MOM_EXPORT_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILURE
    _progress(f"done in {time.perf_counter() - start:.1f}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
