"""The TensorBoard bridge (``--log tensorboard``): a run's evaluations and samples as TensorBoard events.

What goes in is what the run directory records, through the same listener hooks: every column of a
``metrics.csv`` row but ``step`` is a scalar of the same name at that row's step, and every per-epoch
sample of ``samples.jsonl`` a text at its step. The events go to ``RUN/tensorboard/``
(``RunDir.tensorboard_dir``), so ``tensorboard --logdir runs`` shows every run. Nothing here needs the
network. TensorBoard is imported only when a run asks for it (:func:`check_log` and
:class:`TensorBoardLog`), so runs that do not pay nothing for it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ..errors import CharloomError
from .trainer import Listener, Trainer

INSTALL = "pip install 'charloom[tensorboard]'"


def check_log(log: str) -> None:
    """Refuse ``--log tensorboard`` at once, before the corpus is read, when TensorBoard cannot be imported."""
    if log != "tensorboard":
        return
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (torch's writer needs the tensorboard package)
    except ImportError:
        raise CharloomError("--log tensorboard", "the tensorboard package is not installed", INSTALL) from None


def code_block(text: str) -> str:
    """``text`` as TensorBoard's text view (Markdown) shows it as written: a code block, four spaces before
    each line, so a sample's line breaks, ``*`` and ``#`` stay as they are."""
    return "\n".join("    " + line for line in text.split("\n"))


def _after_earlier_files(path: Path) -> None:
    """Wait, if need be, until a new events file sorts after those already in ``path``.

    TensorBoard reads a run's events files in name order, and a name starts with the second its file
    was opened (``events.out.tfevents.<seconds>.<host>.<pid>...``): a run resumed within the second
    its last file was opened could sort before it, and its purge would then come before what it purges.
    """
    opened = [int(p.name.split(".")[3]) for p in path.glob("events.out.tfevents.*") if p.name.split(".")[3].isdigit()]
    wait = max(opened, default=0) + 1 - time.time()
    if 0 < wait <= 2:  # a clock set back by more is not worth waiting for
        time.sleep(wait)


class TensorBoardLog(Listener):
    """Writes one run's evaluations (:meth:`on_eval`) and samples (:meth:`on_sample`) into ``path``.

    A resumed run continues its curves: the writer is opened with ``purge_step`` one past the step the
    run resumes from, so whatever an earlier process wrote after its last checkpoint (it died before
    the checkpoint at that step was saved) is hidden and written again, not shown twice.
    """

    def __init__(self, path: Path, start_step: int, config: dict[str, Any] | None = None) -> None:
        check_log("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        _after_earlier_files(path)
        self.writer = SummaryWriter(str(path), purge_step=start_step + 1 if start_step else None)
        if config is not None:
            self.writer.add_text("config", code_block(json.dumps(config, indent=2)), start_step)
            self.writer.flush()

    def on_eval(self, trainer: Trainer | None, row: dict[str, float], improved: bool = False) -> None:
        """The columns of one ``metrics.csv`` row, as scalars at its step; flushed, so a live TensorBoard sees it."""
        step = int(row["step"])
        for name, value in row.items():
            if name != "step":
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def on_sample(self, trainer: Trainer | None, record: dict[str, Any]) -> None:
        """One ``samples.jsonl`` record as a text, tagged by its temperature (``samples/temperature=0.5``)."""
        self.writer.add_text(f"samples/temperature={record['temperature']:g}",
                             code_block(record["seed_text"] + record["text"]), int(record["step"]))
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the events file."""
        self.writer.close()
