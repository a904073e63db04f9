"""Import torch with Ctrl-C held back until the import is done.

A KeyboardInterrupt raised inside torch's import lands in its C extensions' start-up code: seen here as a
caught interrupt that still ends the process by SIGINT afterwards (CPython records an interrupt that escapes
code run through ``PyRun_String`` and re-raises the signal at exit), an abort, or a traceback printed from a
callback. Held back, Ctrl-C during the 1-3 s of loading arrives as one KeyboardInterrupt right after it.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, ModuleType


def import_torch() -> ModuleType:
    """``import torch``; a SIGINT that arrives meanwhile is raised as KeyboardInterrupt once torch is loaded."""
    import sys

    if "torch" in sys.modules:
        return sys.modules["torch"]
    # Only Python's own Ctrl-C handler is replaced, and only where signals are delivered (the main thread).
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        import torch

        return torch
    held: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        held.append(signum)

    signal.signal(signal.SIGINT, hold)
    try:
        import torch
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt
    return torch
