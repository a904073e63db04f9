"""Fit the rational tanh in src/charloom/kernels/native/fastmath.h: tanh(x) ~ x P(x^2) / Q(x^2), P and Q of degree 4.

Weighted linear least squares on 200,000 points of [1e-4, 9], reweighted (Lawson's iteration) toward
the least maximum relative error; then the float32 error of the Horner evaluation fastmath.h does. Prints
the coefficients (constant term first) and the errors. Run: python tools/fit_tanh.py
"""

import numpy as np


def fit(p_terms: int = 5, q_terms: int = 5, iterations: int = 60) -> tuple[np.ndarray, np.ndarray, float]:
    x = np.linspace(1e-4, 9.0, 200_000)
    t, s = np.tanh(x), x * x
    weight, q_prev = 1 / t, np.ones_like(x)
    for _ in range(iterations):
        # Unknowns p_0..p_{P-1}, q_1..q_{Q-1} (q_0 = 1): x P(s) - t (Q(s) - 1) = t, linear in them.
        a = np.concatenate([np.stack([x * s ** i for i in range(p_terms)], 1),
                            np.stack([-t * s ** i for i in range(1, q_terms)], 1)], 1)
        w = (weight / q_prev)[:, None]
        coef = np.linalg.lstsq(a * w, t * w[:, 0], rcond=None)[0]
        p, q = coef[:p_terms], np.concatenate([[1.0], coef[p_terms:]])
        q_prev = sum(q[i] * s ** i for i in range(q_terms))
        err = np.abs(x * sum(p[i] * s ** i for i in range(p_terms)) / q_prev / t - 1)
        weight = weight * np.sqrt(err / err.max()) + 1e-300
    return p, q, float(err.max())


def float32_error(p: np.ndarray, q: np.ndarray) -> float:
    x = np.linspace(-9, 9, 2_000_001).astype(np.float32)
    s = x * x
    num, den = np.float32(p[-1]), np.float32(q[-1])
    for c in p[-2::-1]:
        num = num * s + np.float32(c)
    for c in q[-2::-1]:
        den = den * s + np.float32(c)
    return float(np.abs(x * num / den - np.tanh(x.astype(np.float64))).max())


if __name__ == "__main__":
    p, q, rel = fit()
    print("P:", [float(c) for c in p])
    print("Q:", [float(c) for c in q])
    print(f"max relative error (float64): {rel:.3g}; max error of the float32 evaluation on [-9, 9]: {float32_error(p, q):.3g}")
