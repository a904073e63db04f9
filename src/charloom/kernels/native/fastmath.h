/* Vector types and the activations every kernel shares: fast_exp, the fitted rational tanh, sigmoid,
 * and the LSTM cell forward and backward (scalar, and 16 units at once in 512-bit registers).
 * static inline in a header: each kernel file inlines them into its own loops, as one file did. */
#ifndef CHARLOOM_FASTMATH_H
#define CHARLOOM_FASTMATH_H

#include "kernel.h"

typedef float v8 __attribute__((vector_size(32))); /* GCC/Clang vector extension: one AVX register */
static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }
#if defined(__AVX512F__)
#include <immintrin.h>
typedef float v16 __attribute__((vector_size(64))); /* one AVX-512 register (the type of __m512) */
static inline v16 load16(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, v16 v) { memcpy(p, &v, sizeof v); }
#endif

/* exp(x) for float32 without libm, written so the compiler vectorises the loops that call it:
 * x = n ln2 + f with |f| <= ln2 / 2, exp(f) by a degree-6 polynomial (relative error ~2e-7),
 * 2^n put straight into the exponent bits. Below -87 the result is 0 (as float32 exp underflows,
 * so a token numpy would never draw is never drawn here either); above 88 it saturates at exp(88). */
static inline float fast_exp(float x0) {
    const float x = x0 < -87.0f ? -87.0f : (x0 > 88.0f ? 88.0f : x0);
    const float t = x * 1.44269504088896341f;
    const float n = __builtin_floorf(t + 0.5f);
    const float f = x - n * 0.693145751953125f - n * 1.42860682030941723e-6f;
    float p = 1.0f / 720.0f;
    p = p * f + 1.0f / 120.0f;
    p = p * f + 1.0f / 24.0f;
    p = p * f + 1.0f / 6.0f;
    p = p * f + 0.5f;
    p = p * f + 1.0f;
    p = p * f + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x0 < -87.0f ? 0.0f : p * scale;
}

/* tanh(x) as x P(x^2) / Q(x^2), degrees 9 over 8, fitted for charloom by tools/fit_tanh.py (weighted
 * least squares with Lawson reweighting toward the least maximum relative error, on 200,000 points of
 * [0, 9]): float32 error below 5e-7 on [-9, 9]. Beyond 9, tanh is 1 to float32 precision, so the input is clamped.
 * No exp and one division: less work than 1 - 2 / (exp(2x) + 1), and accurate near 0 without a
 * second formula (a step of 32 rows of a book-size LSTM measured 3-8% faster than with it). P and Q
 * (Horner's rule in s = x^2) are macros, so the scalar fast_tanh and the 512-bit tanh16 share them. */
#define TANH_P(s) ((((1.3353275707395085e-08f * (s) + 2.0607927902633813e-05f) * (s) + 0.003495513532472286f) * (s) \
                    + 0.13380964467163212f) * (s) + 0.9999999806158856f)
#define TANH_Q(s) ((((7.775947151802964e-07f * (s) + 0.0003285514697542978f) * (s) + 0.02587670098076655f) * (s) \
                    + 0.4671428067061719f) * (s) + 1.0f)

static inline float fast_tanh(float x0) {
    const float x = x0 < -9.0f ? -9.0f : (x0 > 9.0f ? 9.0f : x0);
    const float s = x * x;
    return x * TANH_P(s) / TANH_Q(s); /* may exceed 1 by its error, 5e-7 at most: harmless, and cheaper than a clamp */
}

/* sigmoid(x) = (1 + tanh(x / 2)) / 2. */
static inline float fast_sigmoid(float x) { return 0.5f + 0.5f * fast_tanh(0.5f * x); }

/* One LSTM cell for one row: gates g (4H) in the order (i, f, o, g) before activation, in place
 * after it; c = f*c_in + i*g written to c (which may be c_in), h = o*tanh(c) (H each). */
static inline void lstm_cell(float *restrict g, const float *c_in, float *c, float *restrict h, int H) {
    for (int j = 0; j < 3 * H; j++)
        g[j] = fast_sigmoid(g[j]);
    for (int j = 3 * H; j < 4 * H; j++)
        g[j] = fast_tanh(g[j]);
    for (int j = 0; j < H; j++)
        c[j] = g[H + j] * c_in[j] + g[j] * g[3 * H + j];
    for (int j = 0; j < H; j++)
        h[j] = g[2 * H + j] * fast_tanh(c[j]);
}

#if defined(__AVX512F__)
/* fast_tanh of 16 floats. The quotient is a reciprocal estimate (relative error < 2^-14) refined by
 * one Newton step (~2^-28, below float32 rounding): a 512-bit division issues once per ~16 cycles,
 * and with five per hidden unit the training kernel's cells took as long as its products. */
static inline v16 tanh16(v16 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-9.0f)), _mm512_set1_ps(9.0f));
    const v16 s = x * x, q = TANH_Q(s);
    v16 r = _mm512_rcp14_ps(q);
    r = r * (2.0f - q * r);
    return x * TANH_P(s) * r;
}

static inline v16 sigmoid16(v16 x) { return 0.5f + 0.5f * tanh16(0.5f * x); }
#endif

/* lstm_cell for the training kernels' blocks of n <= LSTM_BLOCK units (gates (i, f, o, g), n each):
 * a whole block of 16 in one 512-bit register per gate where the CPU has them. */
static inline void block_cell(float *restrict g, const float *c_in, float *c, float *restrict h, int n) {
#if defined(__AVX512F__)
    if (n == 16) {
        const v16 i = sigmoid16(load16(g)), f = sigmoid16(load16(g + 16)), o = sigmoid16(load16(g + 32));
        const v16 gg = tanh16(load16(g + 48)), cn = f * load16(c_in) + i * gg;
        store16(g, i);
        store16(g + 16, f);
        store16(g + 32, o);
        store16(g + 48, gg);
        store16(c, cn);
        store16(h, o * tanh16(cn));
        return;
    }
#endif
    lstm_cell(g, c_in, c, h, n);
}

/* One row's step backward: d (4H), the gradients of the gates before activation, from a (4H) the
 * gates after it (i, f, o, g), c and c_prev (H), dh (H, from the step after) plus dout (H, from the
 * output); dc (H) holds the cell's gradient from the step after and receives the one for the step
 * before. restrict lets the compiler vectorise the loop (it did not with the pointers unqualified). */
static inline void lstm_cell_backward(const float *restrict a, const float *restrict c, const float *restrict c_prev,
                                      const float *restrict dh, const float *restrict dout, float *restrict dc,
                                      float *restrict d, int H) {
    for (int j = 0; j < H; j++) {
        const float i = a[j], f = a[H + j], o = a[2 * H + j], g = a[3 * H + j];
        const float tc = fast_tanh(c[j]), dht = dh[j] + dout[j];
        const float dct = dc[j] + dht * o * (1.0f - tc * tc);
        d[j] = dct * g * i * (1.0f - i);
        d[H + j] = dct * c_prev[j] * f * (1.0f - f);
        d[2 * H + j] = dht * tc * o * (1.0f - o);
        d[3 * H + j] = dct * i * (1.0f - g * g);
        dc[j] = dct * f;
    }
}

/* lstm_cell_backward for a block of n <= LSTM_BLOCK units, as block_cell. */
static inline void block_cell_backward(const float *restrict a, const float *restrict c, const float *restrict c_prev,
                                       const float *restrict dh, const float *restrict dout, float *restrict dc,
                                       float *restrict d, int n) {
#if defined(__AVX512F__)
    if (n == 16) {
        const v16 i = load16(a), f = load16(a + 16), o = load16(a + 32), g = load16(a + 48);
        const v16 tc = tanh16(load16(c)), dht = load16(dh) + load16(dout);
        const v16 dct = load16(dc) + dht * o * (1.0f - tc * tc);
        store16(d, dct * g * i * (1.0f - i));
        store16(d + 16, dct * load16(c_prev) * f * (1.0f - f));
        store16(d + 32, dht * tc * o * (1.0f - o));
        store16(d + 48, dct * i * (1.0f - g * g));
        store16(dc, dct * f);
        return;
    }
#endif
    lstm_cell_backward(a, c, c_prev, dh, dout, dc, d, n);
}

#endif
