"""SIGTERM (a scheduler's stop, `kill`, `timeout`) handled like Ctrl-C by the command-line tools,
so that the cleanup their KeyboardInterrupt paths do (a checkpoint to resume from, no half-written
export) also runs when they are terminated."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt (only the main thread may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
