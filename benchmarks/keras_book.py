"""The book's recipe in Keras (Deep Learning with Python, section 8.1), timed and scored as charloom's is.

charloom does not depend on TensorFlow: run this with a Python that has it (Keras 3 + TensorFlow),

    python -m venv /tmp/tf && /tmp/tf/bin/pip install tensorflow-cpu
    CHARLOOM_DATA=../shared/corpora /tmp/tf/bin/python benchmarks/keras_book.py --budget 300

or let ``benchmarks/training.py --keras-python /tmp/tf/bin/python`` run it beside charloom's cases.
The recipe is the book's: lowercased Nietzsche, 60-character windows every 3 characters as one-hot
boolean arrays, LSTM(128), a softmax Dense, RMSprop(lr=0.01), batches of 128; trained on the first
90% for ``--budget`` seconds. The score is charloom's book-recipe score: every character of the last
10% predicted from the 60 before it. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

WINDOW, STEP, BATCH, LR = 60, 3, 128, 0.01


def corpus_path(given: str | None) -> Path:
    """The corpus file: ``--corpus``, else nietzsche.txt in ``$CHARLOOM_DATA`` (no download here)."""
    if given:
        return Path(given)
    folder = os.environ.get("CHARLOOM_DATA")
    if not folder:
        sys.exit("keras_book.py: no corpus; pass --corpus PATH or set CHARLOOM_DATA to the folder holding nietzsche.txt")
    return Path(folder) / "nietzsche.txt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=300.0, help="seconds of training (default 300)")
    parser.add_argument("--corpus", help="text file (default: $CHARLOOM_DATA/nietzsche.txt)")
    parser.add_argument("--val-chars", type=int, default=0, help="score only the first N validation characters (0 = all)")
    args = parser.parse_args(argv)
    try:
        import keras
        import numpy as np
        import tensorflow as tf
    except ImportError as exc:
        sys.exit(f"keras_book.py needs Keras 3 and TensorFlow ({exc}); install tensorflow-cpu in another "
                 "environment and run this script with its Python")
    path = corpus_path(args.corpus)
    if not path.is_file():
        sys.exit(f"keras_book.py: {path} does not exist; pass --corpus PATH or set CHARLOOM_DATA")

    text = path.read_text(encoding="utf-8").lower()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))
    split = len(ids) - int(round(len(ids) * 0.1))  # charloom's cut (Corpus.split)
    v = len(chars)

    def onehot(starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # The book's arrays: x (N, 60, V) and y (N, V), booleans; windows start at `starts`.
        x = np.zeros((len(starts), WINDOW, v), dtype=bool)
        y = np.zeros((len(starts), v), dtype=bool)
        rows = np.arange(len(starts))
        for t in range(WINDOW):
            x[rows, t, ids[starts + t]] = True
        y[rows, ids[starts + WINDOW]] = True
        return x, y

    x, y = onehot(np.arange(0, split - WINDOW, STEP))
    model = keras.Sequential([keras.Input((WINDOW, v)), keras.layers.LSTM(128),
                              keras.layers.Dense(v, activation="softmax")])
    model.compile(loss="categorical_crossentropy", optimizer=keras.optimizers.RMSprop(learning_rate=LR))

    class Budget(keras.callbacks.Callback):
        """Stops fit() once ``args.budget`` seconds have passed; counts batches."""

        def on_train_begin(self, logs: dict | None = None) -> None:
            self.start, self.batches = time.perf_counter(), 0

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.batches += 1
            if time.perf_counter() - self.start >= args.budget:
                self.model.stop_training = True

    budget = Budget()
    model.fit(x, y, batch_size=BATCH, epochs=10 ** 6, callbacks=[budget], verbose=0)
    train_s = time.perf_counter() - budget.start
    windows = len(x)
    del x, y
    # Every validation character t, predicted from ids[t - 60:t] (the first 60 reach back into training).
    end = len(ids) if not args.val_chars else min(len(ids), split + args.val_chars)
    total, t0 = 0.0, time.perf_counter()
    for a in range(split, end, 16384):
        vx, vy = onehot(np.arange(a, min(a + 16384, end)) - WINDOW)
        p = model.predict(vx, batch_size=1024, verbose=0)  # (N, V)
        total += float(-np.log(np.maximum(p[vy], 1e-30)).astype(np.float64).sum())
    nats = total / max(1, end - split)
    print(json.dumps({
        "recipe": "book, in Keras", "keras": keras.__version__, "tensorflow": tf.__version__,
        "budget_s": args.budget, "train_s": round(train_s, 1), "steps": budget.batches,
        "epochs": round(budget.batches * BATCH / windows, 2),
        "supervised_chars_per_s": round(budget.batches * BATCH / train_s),
        "val_loss_nats": round(nats, 4), "val_bpc": round(nats / math.log(2), 4), "val_chars": end - split,
        "eval_s": round(time.perf_counter() - t0, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
