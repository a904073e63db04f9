"""The one exception type users see: every bad input becomes a one-line message and an exit code."""

from __future__ import annotations


class CharloomError(Exception):
    """A user-facing error: ``charloom: <what>: <why>; <fix>`` and an exit code (2 = bad input)."""

    def __init__(self, what: str, why: str, fix: str = "", *, exit_code: int = 2) -> None:
        self.what, self.why, self.fix, self.exit_code = what, why, fix, exit_code
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """The message without the ``charloom:`` prefix, on one line."""
        text = f"{self.what}: {self.why}" + (f"; {self.fix}" if self.fix else "")
        return " ".join(text.split("\n"))


class CheckpointError(CharloomError):
    """A checkpoint that is missing, damaged or hostile (exit code 3)."""

    def __init__(self, what: str, why: str, fix: str = "") -> None:
        super().__init__(what, why, fix, exit_code=3)
