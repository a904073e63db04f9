"""Recipes and the default recipe's size preset: the settings a run starts from before the user's own.

A recipe fills defaults (the book's section 8.1, or ours); the size preset then picks the network, batch
and dropout for the corpus size and time budget; anything the user sets explicitly wins. The figures
behind each choice are in docs/experiments.md.
"""

from __future__ import annotations

from typing import Any

# Recipes: a recipe fills defaults; anything the user sets explicitly wins.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    # Deep Learning with Python, section 8.1: 60-char windows every 3 chars, one-hot input, LSTM(128),
    # softmax over the char after each window, RMSprop(lr=0.01), batch 128, 60 epochs.
    "book": {
        "model": {"model": "lstm", "layers": 1, "hidden": 128, "input": "onehot", "dropout": 0.0, "init": "keras"},
        "train": {
            "objective": "last", "batching": "windows", "seq_len": 60, "window_step": 3, "batch_size": 128,
            "optimizer": "rmsprop", "lr": 0.01, "weight_decay": 0.0, "warmup_steps": 0, "schedule": "constant",
            "clip": 0.0, "ema": 0.0, "epochs": 60, "patience": 0, "generation_window": 60, "lowercase": True,
        },
    },
    # Ours: every position is a target, state carried across contiguous batches, AdamW + cosine.
    "default": {"model": {}, "train": {}},
}


# Sizes the default recipe chooses from: (layers, hidden, parameters for a ~60-char alphabet, training
# throughput in supervised chars/s on 2 cores). Throughput: whole training steps at B=32, T=64 (the
# small-corpus batch) on Nietzsche, 2 threads, on a 2-core AMD EPYC (AVX2), 2026-11-29 at commit
# a9ad05b: one-layer sizes on the native kernel (charloom.kernels.native.lstm), 2x512 on nn.LSTM.
# Re-measure with benchmarks/training.py.
PRESET_SIZES: list[tuple[int, int, int, int]] = [
    (1, 256, 350_000, 41_000),
    (1, 384, 720_000, 23_000),
    (1, 512, 1_220_000, 14_000),
    (2, 512, 3_320_000, 5_000),
]
# A model is worth its size only if the run can show it about this many characters per parameter.
# Below 5M characters the data, not the compute, runs out first: a small network overfits a small
# corpus within the budget, and a larger one with more dropout, seeing every character fewer times,
# ends lower (measured: docs/experiments.md, "Model size and dropout for small corpora").
SMALL_CORPUS_CHARS_PER_PARAMETER = 2.5
# Above 5M characters a run sees most characters only a few times; there we keep the compute-optimal
# ratio of Hoffmann et al. 2022 (~20 tokens per parameter), not measured here.
CHARS_PER_PARAMETER = 20
SMALL_CORPUS = 5_000_000  # characters; below this, small batches, short sequences and more dropout
SMALL_CORPUS_BATCH = (32, 64)  # (batch_size, seq_len) of the default recipe below SMALL_CORPUS
# Dropout of each size below SMALL_CORPUS (docs/experiments.md; 0.2 for 1x256 under 200k characters).
SMALL_CORPUS_DROPOUT = {256: 0.1, 384: 0.25, 512: 0.3}
# AdamW weight decay where it was measured to beat the default 0.01 (1x512 with weight averaging, three
# seeds; docs/experiments.md, "Weight averaging and weight decay").
SMALL_CORPUS_WEIGHT_DECAY = {512: 0.1}


def preset_for(n_chars: int, max_time: float = 0.0, recurrent: bool = True) -> dict[str, Any]:
    """Model size and schedule for the default recipe, from the training-corpus size and the time budget.

    Without a budget the corpus size decides: small corpora overfit a big network within a few
    epochs, large ones want capacity. With ``max_time`` the largest size that can still see enough
    characters per parameter in that time wins (2.5 below SMALL_CORPUS, where a larger network with
    more dropout beats more epochs of a small one; 20 above), but never one larger than the corpus
    size allows. ``recurrent=False`` (the conv and transformer presets, sized from this one) keeps 20
    at every corpus size and dropout 0.2 / 0.1 below SMALL_CORPUS: the small-corpus rule was measured
    on LSTMs, and a transformer sized by it did far worse (see SMALL_CORPUS_CHARS_PER_PARAMETER).
    """
    if n_chars < 200_000:
        by_size = 0
    elif n_chars < SMALL_CORPUS:
        by_size = 2
    else:
        by_size = 3
    pick = by_size
    if max_time and max_time > 0:
        ratio = SMALL_CORPUS_CHARS_PER_PARAMETER if recurrent and n_chars < SMALL_CORPUS else CHARS_PER_PARAMETER
        fits = [i for i, (_, _, params, rate) in enumerate(PRESET_SIZES) if rate * max_time >= ratio * params]
        pick = min(by_size, max(fits, default=0))
    layers, hidden, _, _ = PRESET_SIZES[pick]
    if n_chars < SMALL_CORPUS:
        dropout = 0.2 if n_chars < 200_000 else (SMALL_CORPUS_DROPOUT[hidden] if recurrent else 0.1)
    else:
        dropout = 0.0
    epochs = 30 if n_chars < 200_000 else (20 if n_chars < SMALL_CORPUS else 3)
    train: dict[str, Any] = {"epochs": epochs}
    if n_chars < SMALL_CORPUS:
        # Small batches of short sequences at a higher peak lr: at an equal CPU budget many more updates
        # beat larger batches (docs/experiments.md).
        train.update(batch_size=SMALL_CORPUS_BATCH[0], seq_len=SMALL_CORPUS_BATCH[1], lr=6e-3)
        if recurrent and hidden in SMALL_CORPUS_WEIGHT_DECAY:
            train["weight_decay"] = SMALL_CORPUS_WEIGHT_DECAY[hidden]
    model: dict[str, Any] = {"layers": layers, "hidden": hidden, "dropout": dropout}
    return {"model": model, "train": train}
