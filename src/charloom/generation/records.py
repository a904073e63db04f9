"""Whole records from a model trained on records: ``n`` of them, optionally only new ones, with the copy rate.

A record ends when the model draws the end-of-text token (finish reason ``end``) or at the length cap.
The copy rate (drawn records that are verbatim training records) says how much a model memorised;
``novel`` draws again, in rounds, until ``n`` records are new or MAX_ROUNDS rounds have been drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import CharloomError
from .completion import Completion
from .light import resolve_seed

MAX_ROUNDS = 10  # rounds of n draws that --novel may take before it gives what it has


@dataclass
class RecordBatch:
    """Records drawn from a model, and how many of all drawn were copies of training records."""

    records: list[Completion]
    drawn: int = 0  # records drawn in all (more than len(records) when novel ones were asked for)
    copies: int = 0  # drawn records found verbatim among the training records
    checked: bool = True  # False when the training records were not at hand to compare with
    notes: list[str] = field(default_factory=list)

    @property
    def copy_rate(self) -> float:
        """The share of drawn records that were training records (0 when nothing was drawn)."""
        return self.copies / self.drawn if self.drawn else 0.0

    def summary(self) -> str:
        """One line for stderr: the copy rate, or why it could not be measured."""
        if not self.checked:
            return "copy rate not measured: the run's training data is not at hand (give the run directory)"
        return (f"{self.copies} of {self.drawn} drawn records ({self.copy_rate:.0%}) were copies of training records"
                + (f"; kept {len(self.records)}" if self.drawn != len(self.records) else ""))


def draw_records(model: Any, n: int, prompt: str = "", *, novel: bool = False, temperature: float = 1.0,
                 seed: int | None = None, **options: Any) -> RecordBatch:
    """``n`` records from ``model`` (a :class:`charloom.Model` trained on records) starting with ``prompt``.

    ``options`` are :meth:`charloom.Model.generate` keywords (``length`` caps a record, ``label``...);
    each round draws ``n`` records side by side with seeds ``seed + k*n ...``.
    """
    if model.records is None:
        raise CharloomError("records", "this model was not trained on records", "train with --records line (or csv, ...)")
    if n < 1:
        raise CharloomError("-n", f"must be at least 1, got {n}", "ask for 1 or more records")
    try:
        known = model.training_records()
    except CharloomError:
        if novel:
            raise CharloomError("--novel", "needs the run's training records", "give the run directory, not a checkpoint copy") from None
        known = None
    seed = resolve_seed(seed)
    batch = RecordBatch([], checked=known is not None)
    for round_ in range(MAX_ROUNDS if novel else 1):
        drawn = model.generate(prompt, temperature=temperature, num_samples=n, seed=seed + round_ * n, **options)
        drawn = drawn if isinstance(drawn, list) else [drawn]
        for record in drawn:
            batch.drawn += 1
            copied = known is not None and record.text in known
            batch.copies += copied
            if not (novel and copied) and len(batch.records) < n:
                batch.records.append(record)
        if len(batch.records) >= n:
            break
    if novel and len(batch.records) < n:
        batch.notes.append(f"only {len(batch.records)} of {n} records were new after {batch.drawn} draws; "
                           "raise the temperature for more new ones")
    return batch
