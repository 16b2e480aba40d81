"""`--aoti`: AOTInductor packages of the export graphs, compiled ahead of time for this CPU.

Each ExportedProgram of the `--pt2` path becomes `OUT/<graph>.aoti.pt2`
(`torch._inductor.aoti_compile_and_package`): a shared library of Inductor's C++ kernels with the
weights inside. The `mom` custom ops are not compiled into it; the package calls them through
the dispatcher (their registered CPU kernels), so the loading process must `import mom_compile`
first, which `Package` does. Loading without it fails with "Could not find schema for
mom::...".

The packages take what the ExportedPrograms take: prefill (input_ids, attention_mask) with
seq >= 2, decode_step (input_ids, [past states]), and return (logits, *present states). The
kernels are specialised to contiguous inputs (the strides of the export example), so inputs
are made contiguous before every call.
"""
from __future__ import annotations

import os
import shutil
import time

import torch

SUFFIX = ".aoti.pt2"  # the loader requires the .pt2 ending


def compiler() -> str | None:
    """The C++ compiler Inductor will call ($CXX, else g++), or None if it is not on PATH."""
    return shutil.which(os.environ.get("CXX") or "g++")


def build_packages(programs: dict[str, torch.export.ExportedProgram], out_dir: str,
                   progress=print) -> dict[str, str]:
    """Compile every program to OUT/<name>.aoti.pt2. Returns {graph name: path}."""
    paths = {}
    for name, program in programs.items():
        start = time.perf_counter()
        path = os.path.join(out_dir, name + SUFFIX)
        paths[name] = torch._inductor.aoti_compile_and_package(program, package_path=path)
        progress(f"wrote {path}: {time.perf_counter() - start:.1f}s")
    return paths


class Package:
    """A loaded AOTInductor package, called like the graph it was built from."""

    def __init__(self, path: str | os.PathLike) -> None:
        import mom_compile  # noqa: F401  (registers the mom ops the package calls)

        self.runner = torch._inductor.aoti_load_package(os.fspath(path))

    def __call__(self, *inputs) -> tuple[torch.Tensor, ...]:
        dense = [[t.contiguous() for t in x] if isinstance(x, (list, tuple)) else x.contiguous()
                 for x in inputs]
        return tuple(self.runner(*dense))


def verify_packages(model, paths: dict[str, str], seed: int = 0):
    """The packages' errors against PyTorch eager on --verify's inputs (verify.compare_all)."""
    from .verify import compare_all

    packages = {name: Package(path) for name, path in paths.items()}
    return compare_all(model, lambda name, inputs: packages[name](*inputs), seed)
