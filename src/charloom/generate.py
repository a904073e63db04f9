"""The generation loop: prefill the prompt once, then one model step per token, yielding as it goes.

Several rows (temperatures x samples) run in one batch. Each row draws its randomness from a
lane of :class:`~charloom.sampling.Noise`, so row results do not depend on what else is batched.
A model trained on fixed windows (the book's recipe) is instead re-run on its last ``window``
tokens for every new token, as it was trained.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from .models import LanguageModel
from .sampling import Noise, Processor, draw, process


@torch.inference_mode()
def generate_ids(model: LanguageModel, prompt_ids: Sequence[int], *, rows: int, max_new_tokens: int,
                 pipeline: Sequence[Processor], noise: Noise, lanes: Sequence[int] | None = None,
                 window: int = 0) -> Iterator[torch.Tensor]:
    """Yield the next id of every row, shape (rows,), ``max_new_tokens`` times.

    ``prompt_ids`` (non-empty) is shared by all rows; ``lanes[r]`` is the noise lane of row ``r``
    (default: row r uses lane r).
    """
    if not prompt_ids:
        raise ValueError("generation needs at least one prompt token")
    was_training = model.training
    model.eval()
    try:
        lane_index = torch.as_tensor(list(lanes) if lanes is not None else range(rows), dtype=torch.long)
        p = len(prompt_ids)
        # history holds prompt + generated ids for every row: (rows, P + N).
        device = next(model.parameters(), torch.empty(0)).device  # generate where the model is (CPU or GPU)
        history = torch.empty(rows, p + max_new_tokens, dtype=torch.long, device=device)
        history[:, :p] = torch.as_tensor(list(prompt_ids), dtype=torch.long)
        if window:
            logits, _ = model(history[:1, max(0, p - window):p])  # (1, <=W, V)
            state = None
        else:
            # Prefill once for one row, then copy the state to every row.
            logits, state = model(history[:1, :p])
            state = model.select_state(state, torch.zeros(rows, dtype=torch.long, device=device))
        next_logits = logits[:, -1].expand(rows, -1)  # (rows, V)
        for i in range(max_new_tokens):
            t = p + i
            scores = process(pipeline, history[:, :t], next_logits.float())
            ids = draw(scores, noise.next()[lane_index].to(device))  # (rows,)
            history[:, t] = ids
            yield ids
            if i + 1 == max_new_tokens:
                break
            if window:
                logits, _ = model(history[:, max(0, t + 1 - window):t + 1])
            else:
                logits, state = model(ids.unsqueeze(1), state)  # (rows, 1, V)
            next_logits = logits[:, -1]
    finally:
        model.train(was_training)
