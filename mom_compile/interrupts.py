"""How the command-line tools take interruptions: SIGTERM (a scheduler's stop, `kill`, `timeout`)
like Ctrl-C, so that the cleanup their KeyboardInterrupt paths do (a checkpoint to resume from, no
half-written export) also runs when they are terminated; and both held back during steps that must
not stop halfway."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

_received: list[int] = []  # the signals _interrupt turned into KeyboardInterrupt in this block


def _interrupt(signum, frame):
    _received.append(signum)
    raise KeyboardInterrupt


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if a signal arrived within `sigterm_as_interrupt` whose
    KeyboardInterrupt was lost: raised inside a callback (a weakref's, an import lock's), it is
    printed as "Exception ignored" and the program carries on. Call it before a step that must not
    follow an interruption (publishing an export)."""
    if _received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def interrupts_held() -> Iterator[None]:
    """Within the block, Ctrl-C and SIGTERM are only noted; KeyboardInterrupt is raised after it.
    (Python runs signal handlers in the main thread, whichever thread the signal reached, so the
    handlers are swapped rather than the signals masked.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: noted.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if noted:
        raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (and Ctrl-C) raise KeyboardInterrupt, noted for `check_interrupted`;
    one lost on the way is raised when the block ends (only the main thread may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received.clear()
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
        check_interrupted()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _received.clear()


def replace_files(writers: dict[str, Callable[[str], None]]) -> None:
    """Each writer writes its file under a temporary name; once all are written they are moved into
    place with interrupts held, so a failed or interrupted write leaves the earlier files, never a
    truncated one or a mix. The temporary files are removed whatever happens."""
    try:
        for file, write in writers.items():
            write(file + ".tmp")
        with interrupts_held():
            for file in writers:
                os.replace(file + ".tmp", file)
    finally:
        for file in writers:
            if os.path.exists(file + ".tmp"):
                os.remove(file + ".tmp")


def caused_by_interrupt(error: BaseException) -> bool:
    """Whether `error` is a KeyboardInterrupt or was raised from or while handling one: compilers
    (Inductor's, AOTInductor's builds) can wrap an interruption in an error of their own."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False
