"""Warnings attributed to the user's line: the first frame outside mom_compile, torch and code
that torch.compile generated. A fixed stacklevel points into torch's module-call machinery, whose
depth varies with hooks and versions."""
from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _not_the_users(filename: str, skip: tuple[str, ...]) -> bool:
    # FX's generated code, runpy's (python -m), Inductor's generated modules
    return filename.startswith(("<eval_with_key>", "<frozen ")) or "torchinductor" in filename or \
        os.path.abspath(filename).startswith(skip)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn(message, category), reported at the caller's code (at warn's caller where no
    frame is the user's: a command line of this package). No torch import: the torch-free runtime
    warns through it too."""
    torch = sys.modules.get("torch")
    skip = (_PACKAGE,) if torch is None or not getattr(torch, "__file__", None) else \
        (_PACKAGE, os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
    depth, frame = 1, sys._getframe(1)  # sys._getframe(depth) is warnings' stacklevel depth + 1
    while frame is not None and _not_the_users(frame.f_code.co_filename, skip):
        depth, frame = depth + 1, frame.f_back
    warnings.warn(message, category, stacklevel=depth + 1 if frame is not None else 2)
