"""The draw in NumPy, without torch: what :func:`charloom.generation.noise.draw` does, for the loops
that run outside torch (the engine's NumPy loop and ``charloom generate``'s torch-free path)."""

from __future__ import annotations

import numpy as np


def draw_numpy(logits: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """:func:`draw` in numpy for ``logits`` (B, V) float32 and ``uniforms`` (B,) float64 -> ids (B,) int64.

    The same rule (float64 CDF, first entry above ``u * total``, so a removed token is never drawn);
    the CDF is left unnormalised, which changes nothing but rounding.
    """
    e = np.exp(logits - logits.max(axis=1, keepdims=True))  # (B, V); -inf -> 0
    cdf = e.astype(np.float64).cumsum(axis=1)  # the method: np.cumsum(dtype=) is several times slower here
    target = uniforms * cdf[:, -1]  # (B,)
    return (cdf <= target[:, None]).sum(axis=1)  # entries <= target == searchsorted(side="right")
