"""`--pt2`: the two export graphs as torch.export ExportedPrograms (`torch.export.save`).

They contain the `mom` custom ops, so a process that loads them must `import mom_compile` first
(importing it registers the ops). The prefill program accepts seq >= 2: torch.export
specialises the model's one-token step path away; for one-token prompts run decode_step on zero
state, which is the same function (docs/math.md#correctness).
"""
from __future__ import annotations

import os

import torch


def save_programs(programs: dict[str, torch.export.ExportedProgram], out_dir: str) -> dict[str, str]:
    paths = {}
    for name, program in programs.items():
        paths[name] = os.path.join(out_dir, f"{name}.pt2")
        torch.export.save(program, paths[name])
    return paths
