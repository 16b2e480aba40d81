"""The host CPU a benchmark ran on: host-time numbers (launch overhead, eager decoding) depend on
it as GPU numbers depend on the card, so their headers name it."""
from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    """The CPU's model name and logical core count, e.g. "Intel(R) Xeon(R) ... (2 logical cores)"."""
    name = platform.processor() or "unknown"
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name} ({os.cpu_count()} logical cores)"
