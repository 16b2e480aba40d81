"""Warnings attributed to the user's line: the first frame outside mom_compile and torch. A fixed
stacklevel points into torch's module-call machinery, whose depth varies with hooks and versions."""
from __future__ import annotations

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn(message, category), reported at the caller's code. No torch import: the
    torch-free runtime warns through it too."""
    skip = [_PACKAGE]
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "__file__", None):
        skip.append(os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)
    skip = tuple(skip)
    depth, frame = 1, sys._getframe(1)  # sys._getframe(depth) is warnings' stacklevel depth + 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(skip):
        depth, frame = depth + 1, frame.f_back
    warnings.warn(message, category, stacklevel=depth + 1)
