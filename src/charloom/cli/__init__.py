"""The command line: ``charloom train | generate | evaluate | serve | ...`` (commands) and its options (parser)."""

from .commands import main

__all__ = ["main"]
