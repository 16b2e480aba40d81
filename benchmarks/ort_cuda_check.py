"""Where do two onnxruntime providers (CPU and CUDA by default) part ways on the exported graphs?

    python benchmarks/ort_cuda_check.py [FOLDER] [--checkpoint DIR]
        [--graphs prefill decode_step] [--levels disabled basic all] [--generate] [--opset 18]
        [--dtype float32] [--batch 2] [--seq 11] [--log ort_cuda_check.log]

Without FOLDER the tiny model (seed 0) is saved as a checkpoint and exported (--opset, --dtype) into a
temporary folder. For each graph and each graph-optimisation level (disabled, basic, all), both
providers run the same inputs (a left-padded prefill batch; a decode step from random states):
  1. the graph as it is: does either provider fail, and how far apart are the outputs?
  2. the graph with every top-level node output made a graph output: the first node, in
     topological order, whose output differs (name, op type, shapes, max error, and the PyTorch
     op it was exported from). A provider that fails at a node is rerun on the graph cut before
     that node, which compares everything the failing node was fed. (Nodes whose outputs are graph
     outputs are not fused away, so step 2 at level `all` sees less of the fusions than step 1.)
With --generate, OnnxGenerator's tokens on each provider against MomForCausalLM.generate (the
model of --checkpoint, or the exported tiny one), or against each other without a model.
The last lines printed are a compact table; --log gets every compared value.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]  # the checkout's mom_compile; tree_commit beside this
from tree_commit import tree_commit  # noqa: E402

from mom_compile.export.manifest import read_manifest  # noqa: E402

LEVELS = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
          "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
# Relative error (to the largest magnitude of the first side's value) above which two float values
# differ; the CUDA provider may use TF32 in MatMul, and fp16 rounds at every op.
RTOL = {"float32": 1e-2, "float16": 5e-2}
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"


@dataclass
class Difference:
    name: str        # the value
    node: str        # the node that makes it
    op_type: str
    origin: str      # the exporter's note of the PyTorch op, if any
    shape_a: tuple
    shape_b: tuple
    max_abs: float
    max_rel: float

    def brief(self) -> str:
        shapes = f"{list(self.shape_a)}" if self.shape_a == self.shape_b else \
            f"{list(self.shape_a)} vs {list(self.shape_b)}"
        return f"{self.node} ({self.op_type}) -> {self.name} {shapes}: max rel {self.max_rel:.2e}"


@dataclass
class Finding:
    """Step 2's result: the first differing node, and where a provider failed (side, node, error)."""

    first: Difference | None = None
    failure: tuple[str, str, str] | None = None
    fed: list[str] = field(default_factory=list)  # the failing node's inputs, shapes on both sides


def compare(a: np.ndarray, b: np.ndarray, rtol: float) -> tuple[bool, float, float]:
    """(differ, max abs, max rel) of two values: shape, dtype, exact for non-floats, rtol for floats."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return True, float("inf"), float("inf")
    if not np.issubdtype(a.dtype, np.floating):
        diff = float((a != b).sum())
        return diff > 0, diff, diff / max(a.size, 1)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if not np.array_equal(np.isnan(a64), np.isnan(b64)):
        return True, float("nan"), float("inf")
    a64, b64 = np.nan_to_num(a64), np.nan_to_num(b64)
    max_abs = float(np.abs(a64 - b64).max()) if a.size else 0.0
    max_rel = max_abs / max(float(np.abs(a64).max()) if a.size else 0.0, 1e-30)
    return max_rel > rtol, max_abs, max_rel


def origin(node: onnx.NodeProto) -> str:
    """The PyTorch op a node was exported from (torch.onnx's metadata), or its function's name."""
    meta = {p.key: p.value for p in node.metadata_props}
    fx = meta.get("pkg.torch.onnx.fx_node", "")
    target = re.search(r"target=([\w.]+)", fx)
    if target:
        return target.group(1) + " in " + meta.get("namespace", "").rsplit("/", 1)[0].rsplit(": ", 1)[-1]
    return "a helper function's body" if re.fullmatch(r"n\d+(_\d+)?", node.name) else ""


def expose(model: onnx.ModelProto, cut: int | None = None) -> tuple[onnx.ModelProto, list]:
    """A copy of model whose graph outputs are every output of its top-level nodes (those before
    node `cut` only, when given), and [(value name, node)] in topological order."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    nodes = list(exposed.graph.node)[:cut]
    if cut is not None:
        del exposed.graph.node[cut:]
    order = [(name, node) for node in nodes for name in node.output if name]
    known = {o.name: o for o in exposed.graph.output}
    del exposed.graph.output[:]
    exposed.graph.output.extend(known.get(name) or onnx.ValueInfoProto(name=name) for name, _ in order)
    return exposed, order


@contextlib.contextmanager
def beside(model: onnx.ModelProto, original: str):
    """model saved next to `original` (so its external data resolves), removed afterwards."""
    fd, path = tempfile.mkstemp(suffix=".onnx", prefix=".check_", dir=os.path.dirname(original))
    os.close(fd)
    try:
        onnx.save(model, path)
        yield path
    finally:
        os.remove(path)


def run(path: str, feed: dict, providers: list[str], level: str) -> tuple[dict | None, str | None]:
    """(outputs by name, None), or (None, onnxruntime's error) if the session fails to load or run."""
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(path, options, providers=providers)
        if providers[0] not in session.get_providers():  # onnxruntime fell back to another provider
            return None, f"{providers[0]} did not start (the session got {session.get_providers()})"
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feed))), None
    except Exception as e:  # noqa: BLE001 (onnxruntime's errors share no public type)
        return None, f"{type(e).__name__}: {e}"


def failing_node(error: str) -> str | None:
    """The node name in an onnxruntime error ("... running MatMul node. Name:'n6_2' ...")."""
    found = re.search(r"node\. Name:'([^']*)'", error)
    return found.group(1) if found else None


def localise(path_a: str, path_b: str, feed: dict, side_a: list[str], side_b: list[str], level: str,
             rtol: float, log) -> Finding:
    """Step 2 (see the module doc) for two graphs with the same node names (the same file, or a
    planted copy), run on side_a and side_b."""
    models = [onnx.load(p, load_external_data=False) for p in (path_a, path_b)]
    index = {node.name: i for i, node in enumerate(models[0].graph.node)}
    finding, cut = Finding(), None
    while True:
        outputs, errors = [], []
        order = expose(models[0], cut)[1]
        for model, path, side in zip(models, (path_a, path_b), (side_a, side_b)):
            with beside(expose(model, cut)[0], path) as exposed_path:
                out, error = run(exposed_path, feed, side, level)
            outputs.append(out)
            errors.append(error)
        failed = [(side, e) for side, e in zip(("A", "B"), errors) if e]
        if not failed:
            break
        side, error = failed[0]
        node = failing_node(error)
        log(f"  side {side} fails ({'whole graph' if cut is None else f'cut before node {cut}'}): {error}")
        if cut is not None or node not in index:
            finding.failure = (side, node or "?", error.splitlines()[0][:300])
            return finding
        finding.failure, cut = (side, node, error.splitlines()[0][:300]), index[node]
    out_a, out_b = outputs
    for name, node in order:
        differ, max_abs, max_rel = compare(out_a[name], out_b[name], rtol)
        log(f"  {node.name:<28} {node.op_type:<16} {name:<32} {list(out_a[name].shape)!s:<22} "
            f"max abs {max_abs:.3e} max rel {max_rel:.3e}{'   <-- differs' if differ else ''}")
        if differ and finding.first is None:
            finding.first = Difference(name, node.name, node.op_type, origin(node), out_a[name].shape,
                                       out_b[name].shape, max_abs, max_rel)
    if cut is not None:
        failing = models[0].graph.node[cut]
        finding.fed = [f"{name} {list(out_a[name].shape)} vs {list(out_b[name].shape)}"
                       for name in failing.input if name in out_a and name in out_b]
    return finding


def make_feeds(manifest: dict, batch: int, seq: int, seed: int = 0) -> dict[str, dict]:
    """The inputs of both graphs: a prefill batch whose row 0 has seq // 3 tokens of left padding,
    and a decode step from random states."""
    rng = np.random.default_rng(seed)
    vocab = manifest["vocab_size"]
    ids = rng.integers(0, vocab, (batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[0, :seq // 3] = 0
    states = {s["past"]: (rng.standard_normal([batch if d == "batch" else d for d in s["shape"]]) * 0.1)
              .astype(s["dtype"]) for s in manifest["state"]}
    step = rng.integers(0, vocab, (batch, 1), dtype=np.int64)
    return {"prefill": {"input_ids": ids, "attention_mask": mask},
            "decode_step": {"input_ids": step, **states}}


def export_tiny(folder: str, opset: int, dtype: str):
    """The tiny model (seed 0), saved as a checkpoint and exported with the CLI into folder/onnx."""
    import torch

    from mom_compile import MomConfig, MomForCausalLM
    from mom_compile.export.__main__ import main as export_main

    torch.manual_seed(0)
    model = MomForCausalLM(MomConfig.preset("tiny")).eval()
    model.save_pretrained(os.path.join(folder, "checkpoint"))
    out = os.path.join(folder, "onnx")
    code = export_main(["--onnx", out, "--checkpoint", os.path.join(folder, "checkpoint"),
                        "--opset", str(opset), "--dtype", dtype])
    if code:
        raise SystemExit(f"the export failed (exit status {code})")
    return out, model.to(getattr(torch, dtype))


def check_generation(folder: str, model, sides: dict[str, list[str]], feed: dict, new: int, log) -> list[str]:
    """Table rows: each side's OnnxGenerator tokens against generate (or against side A)."""
    from mom_compile.export.runtime import OnnxGenerator

    ids, mask = feed["input_ids"], feed["attention_mask"]
    tokens, rows = {}, []
    for label, providers in sides.items():
        try:
            tokens[label] = OnnxGenerator(folder, providers=providers).generate(ids, mask, max_new_tokens=new)
        except Exception as e:  # noqa: BLE001
            tokens[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        log(f"generate on {label} {providers}: {tokens[label]}")
    if model is not None:
        import torch

        with torch.no_grad():
            reference = model.generate(torch.from_numpy(ids), torch.from_numpy(mask), max_new_tokens=new)
        reference = reference.numpy()
        what = "generate (PyTorch)"
    else:
        reference, what = tokens["A"], "side A"
    log(f"reference ({what}): {reference}")
    for label, got in tokens.items():
        if isinstance(got, str):
            rows.append(f"generate  side {label}: FAILS {got}")
            continue
        same = got.shape == reference.shape and bool((got == reference).all())
        first = "" if same else f", first different new token at step " \
            f"{int(np.argmax((got[:, ids.shape[1]:] != reference[:, ids.shape[1]:]).any(0)))}"
        rows.append(f"generate  side {label}: {new} tokens x {ids.shape[0]} rows "
                    f"{'equal' if same else 'DIFFER'} to {what}{first}")
    return rows


def gpu_name() -> str:
    """The first GPU's name as nvidia-smi reports it (without creating a CUDA context here)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.split("\n")[0].strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or "no GPU found by nvidia-smi"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", help="an export folder (default: export the tiny model)")
    p.add_argument("--checkpoint", help="the model of FOLDER, for --generate's reference")
    p.add_argument("--providers", nargs=2, default=[CPU, CUDA], metavar=("A", "B"),
                   help="the two providers compared (default CPU and CUDA)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--dtype", choices=tuple(RTOL), default="float32")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=11)
    p.add_argument("--graphs", nargs="+", choices=("prefill", "decode_step"),
                   default=["prefill", "decode_step"])
    p.add_argument("--levels", nargs="+", choices=tuple(LEVELS), default=list(LEVELS))
    p.add_argument("--generate", action="store_true")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--log", default="ort_cuda_check.log")
    args = p.parse_args(argv)

    missing = sorted(set(args.providers) - set(ort.get_available_providers()))
    if missing:
        print(f"error: onnxruntime {ort.__version__} at {os.path.dirname(ort.__file__)} lacks {missing}; "
              f"it has {ort.get_available_providers()} (for CUDA: onnxruntime-gpu on PYTHONPATH)")
        return 2
    if CUDA in args.providers and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # the CUDA/cuDNN libraries of the pip wheels, before the first CUDA session
    sides = {"A": _providers(args.providers[0]), "B": _providers(args.providers[1])}
    rows = [f"{gpu_name()}; commit {tree_commit()}; onnxruntime {ort.__version__}: side A = "
            f"{args.providers[0]}, side B = {args.providers[1]}"]
    with open(args.log, "w") as log_file, tempfile.TemporaryDirectory() as tmp:
        def log(line: str) -> None:
            log_file.write(line + "\n")
            log_file.flush()

        model = None
        if args.folder is None:
            folder, model = export_tiny(tmp, args.opset, args.dtype)
        else:
            folder = args.folder
            if args.checkpoint and args.generate:
                from mom_compile import MomForCausalLM

                model = MomForCausalLM.from_pretrained(args.checkpoint)
        manifest = read_manifest(folder)
        if manifest["plugin"]:
            print("error: plugin graphs do not run in onnxruntime")
            return 2
        rtol = RTOL.get(manifest["dtype"], 1e-2)
        feeds = make_feeds(manifest, args.batch, args.seq)
        rows.append(f"{folder}: opset {manifest['opset']}, {manifest['dtype']}, batch {args.batch}, "
                    f"prefill seq {args.seq}; values differ above max rel {rtol:g}")
        rows.append(f"{'graph':<12} {'level':<9} {'run A':<6} {'run B':<6} {'outputs max rel':<16} "
                    "first difference")
        for graph in args.graphs:
            path = os.path.join(folder, manifest["graphs"][graph]["file"])
            for level in args.levels:
                log(f"== {graph}, optimisation level {level}")
                plain = [run(path, feeds[graph], sides[s], level) for s in ("A", "B")]
                for side, (_, error) in zip("AB", plain):
                    if error:
                        log(f"  the graph on side {side}: {error}")
                worst = "-"
                if not plain[0][1] and not plain[1][1]:
                    rels = [compare(plain[0][0][n], plain[1][0][n], rtol)[2] for n in plain[0][0]]
                    worst = f"{max(rels):.2e}"
                    log("  graph outputs max rel: " + ", ".join(f"{n} {r:.2e}"
                                                                for n, r in zip(plain[0][0], rels)))
                finding = localise(path, path, feeds[graph], sides["A"], sides["B"], level, rtol, log)
                rows.append(f"{graph:<12} {level:<9} {'FAIL' if plain[0][1] else 'ok':<6} "
                            f"{'FAIL' if plain[1][1] else 'ok':<6} {worst:<16} {_describe(finding)}")
        if args.generate:
            rows += check_generation(folder, model, sides, feeds["prefill"], args.new_tokens, log)
        for row in rows:
            log(row)
    print("\n".join(rows))
    print(f"(full log: {args.log})")
    return 0


def _providers(name: str) -> list[str]:
    return [name] if name == CPU else [name, CPU]


def _describe(finding: Finding) -> str:
    parts = []
    if finding.first:
        where = f" [{finding.first.origin}]" if finding.first.origin else ""
        parts.append(finding.first.brief() + where)
    elif finding.failure:
        parts.append("none before the failing node")
    else:
        parts.append("none")
    if finding.failure:
        side, node, error = finding.failure
        parts.append(f"side {side} fails at {node}: {error}")
        if finding.fed:
            parts.append("its inputs: " + "; ".join(finding.fed))
    return " | ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
