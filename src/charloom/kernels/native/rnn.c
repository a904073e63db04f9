/* charloom's native generation kernel: LSTM/GRU steps and temperature sampling for batches of rows.
 *
 * Built on first use by charloom/native/__init__.py with the system C compiler (cc -O3 -march=native)
 * and loaded with ctypes; without a compiler charloom uses its numpy and torch paths instead.
 * The maths is exactly RecurrentStepper.step (charloom/models/stepper.py) and sampling.draw:
 *
 *   layer 0:  proj = table[id]                       (V, G*H): W_ih x + b_ih (+ b_hh for an LSTM)
 *   layer l:  proj = b_in + x @ w_ih_t               (H, G*H)
 *   LSTM:     gates = proj + h @ w_hh_t, order (i, f, o, g); c = f*c + i*g; h = o*tanh(c)
 *   GRU:      gh = b_hh + h @ w_hh_t, order (r, z, n); n = tanh(proj_n + r*gh_n); h = n + z*(h - n)
 *   logits = b + h @ head_w_t                         (H, V)
 *   draw:     e = exp((logits - max) / T); first id whose float64 running sum exceeds u * sum(e)
 *
 * All matrices are float32, row-major, contiguous. State is (slots, rows, H): for an LSTM the
 * slots are h of every layer then c of every layer, for a GRU h of every layer.
 */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LAYERS 8
#define MAX_THREADS 8
#define MIN_ROWS_PER_THREAD 8 /* below this a thread costs more than it saves */
#define DRAW_ROWS 4           /* rows drawn together (see sample_part) */
#define LSTM_CHUNK 4          /* training: steps per weight-gradient product (see lstm_backward_member) */
#define LSTM_PAD 8            /* training: floats added to the row stride of the gate gradients (see matmul_strided) */

typedef struct {
    int32_t lstm;      /* 1 = LSTM (4 gates), 0 = GRU (3 gates) */
    int32_t layers, hidden, vocab;
    int32_t vocab_padded;               /* columns of head_w_t and head_b: vocab rounded up to 8 */
    const float *table;                 /* (vocab, G*H) */
    const float *w_ih_t[MAX_LAYERS];    /* layer >= 1: (H, G*H) */
    const float *b_in[MAX_LAYERS];      /* layer >= 1: (G*H) */
    const float *w_hh_t[MAX_LAYERS];    /* (H, G*H) */
    const float *b_hh[MAX_LAYERS];      /* GRU: (G*H) */
    const float *head_w_t;              /* (H, Vp), zero beyond column V: every column block a full tile */
    const float *head_b;                /* (Vp) */
    float *work;                        /* scratch: rows * (2 * G*H + Vp + 2) + MAX_THREADS * (3 * DRAW_ROWS * V + 36) floats */
    /* Mogrifier layers (LSTM only; see the training kernel below): rounds before the step, 0 for none.
     * Layer 0 with rounds reads embed (V, E) rows and w_ih_t[0] (E, 4H), b_in[0], not the table. */
    int32_t mog_rounds[MAX_LAYERS];
    int32_t mog_in;                     /* E: layer 0's input width, at most H (its scratch fits in the gates block) */
    const float *embed;                 /* (V, E) */
    const float *mog_t[MAX_LAYERS];     /* the rounds' matrices transposed, in a row: Q_k^T (H, E_l), R_k^T (E_l, H) */
} Net;



typedef float v8 __attribute__((vector_size(32))); /* GCC/Clang vector extension: one AVX register */
static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }
#if defined(__AVX512F__)
#include <immintrin.h>
typedef float v16 __attribute__((vector_size(64))); /* one AVX-512 register (the type of __m512) */
static inline v16 load16(const float *p) { v16 v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, v16 v) { memcpy(p, &v, sizeof v); }
#endif

/* y[rows, j : j + 8C] += x[rows, :] @ w[:, j : j + 8C] for R consecutive rows; x (rows, k) has element
 * (r, p) at x[r * xr + p * xc] (xc = 1 for rows in memory, xr = 1 for a transposed x), w (k, n) and
 * y (rows, n) have rows ldw and ldy floats apart. The R x 8C tile of y stays in
 * 2..12 vector registers while k runs, so each w vector loaded feeds R multiply-adds. R and C are
 * constants at every call site: always_inline lets the compiler unroll both loops and keep `acc` in
 * registers. */
static inline __attribute__((always_inline)) void tile(const int R, const int C, int k, const float *restrict x, size_t xr,
                                                       size_t xc, const float *restrict w, size_t ldw,
                                                       float *restrict y, size_t ldy) {
    v8 acc[6][4];
    for (int a = 0; a < R; a++)
        for (int c = 0; c < C; c++)
            acc[a][c] = load8(y + a * ldy + 8 * c);
    for (int p = 0; p < k; p++, x += xc, w += ldw) {
        v8 b[4];
        for (int c = 0; c < C; c++)
            b[c] = load8(w + 8 * c);
        for (int a = 0; a < R; a++) {
            const float xa = x[a * xr];
            for (int c = 0; c < C; c++)
                acc[a][c] += xa * b[c];
        }
    }
    for (int a = 0; a < R; a++)
        for (int c = 0; c < C; c++)
            store8(y + a * ldy + 8 * c, acc[a][c]);
}

/* Columns [j, j + 8C) of y for every row: 6-row tiles, then one tile for the 1-5 rows left over.
 * The k x 8C panel of w is read from memory once and then from cache by every row tile. */
static inline __attribute__((always_inline)) void column_block(const int C, int rows, int k, const float *x,
                                                               size_t xr, size_t xc, const float *w, size_t ldw,
                                                               float *y, size_t ldy) {
    int r = 0;
    for (; r + 6 <= rows; r += 6)
        tile(6, C, k, x + r * xr, xr, xc, w, ldw, y + r * ldy, ldy);
    x += r * xr;
    y += r * ldy;
    switch (rows - r) {
    case 5: tile(5, C, k, x, xr, xc, w, ldw, y, ldy); break;
    case 4: tile(4, C, k, x, xr, xc, w, ldw, y, ldy); break;
    case 3: tile(3, C, k, x, xr, xc, w, ldw, y, ldy); break;
    case 2: tile(2, C, k, x, xr, xc, w, ldw, y, ldy); break;
    case 1: tile(1, C, k, x, xr, xc, w, ldw, y, ldy); break;
    default: break;
    }
}

/* y[r, :] += x[r, :] @ w for r < rows; x (rows, k) with element (r, p) at x[r * xr + p * xc], w (k, n)
 * and y (rows, n) with rows ldw and ldy floats apart. A w stride of whole 4 KB pages (512 floats, or a
 * multiple) puts every row of a column block in the same few L1 cache sets, too few to hold the block
 * (64 x 128 x 512 in a C harness: 31G multiply-adds/s, 35G with the stride padded by 8 floats). Training
 * copies its w into panels instead (pack_panels); its gate gradients, read as x, keep rows LSTM_PAD
 * floats longer than 4H.
 * Column blocks of 16 outside, row tiles inside (see column_block), so each part of w is read from
 * memory once per call (with rows outside, a 2x512 LSTM's 4 MB matrices were streamed once per 6
 * rows, and 64 rows ran at 0.6x torch's speed; now 1.5x). Blocks of 8, then single columns, finish n. A
 * single row (the one-stream case) is a matrix-vector product bound by reading w: it streams w
 * front to back, four k at a time. */
static void matmul_strided(int rows, int k, int n, const float *restrict x, size_t xr, size_t xc,
                           const float *restrict w, size_t ldw, float *restrict y, size_t ldy) {
    if (rows == 1) {
        int p = 0;
        for (; p + 4 <= k; p += 4) {
            const float *w0 = w + p * ldw, *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
            const float a0 = x[p * xc], a1 = x[(p + 1) * xc], a2 = x[(p + 2) * xc], a3 = x[(p + 3) * xc];
            for (int j = 0; j < n; j++)
                y[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j];
        }
        for (; p < k; p++) {
            const float *w0 = w + p * ldw;
            for (int j = 0; j < n; j++)
                y[j] += x[p * xc] * w0[j];
        }
        return;
    }
    int j = 0;
    for (; j + 16 <= n; j += 16)
        column_block(2, rows, k, x, xr, xc, w + j, ldw, y + j, ldy);
    for (; j + 8 <= n; j += 8)
        column_block(1, rows, k, x, xr, xc, w + j, ldw, y + j, ldy);
    for (; j < n; j++)
        for (int r = 0; r < rows; r++)
            for (int p = 0; p < k; p++)
                y[r * ldy + j] += x[r * xr + p * xc] * w[p * ldw + j];
}

/* matmul_strided for packed rows: x (rows, k), w (k, n), y (rows, n). */
static void matmul_acc(int rows, int k, int n, const float *restrict x, const float *restrict w, float *restrict y) {
    matmul_strided(rows, k, n, x, (size_t)k, 1, w, (size_t)n, y, (size_t)n);
}

/* w (k, n), rows ldw floats apart, copied into wp (k * n floats) in panels for matmul_panels: each
 * whole block of 16 columns as a contiguous (k, 16) panel, then the last n mod 16 columns as one
 * (k, n mod 16) block. A panel is read front to back, from few pages, where a block of a wide w has
 * its k rows on k pages: for 16 x 512 x 2048 (the default recipe's recurrent product) a C harness
 * ran 16 -> 22G multiply-adds/s, and the book's 64 x 128 x 512 23 -> 30G. */
static void pack_panels(int k, int n, const float *w, size_t ldw, float *wp) {
    int j = 0;
    for (; j + 16 <= n; j += 16)
        for (int p = 0; p < k; p++, wp += 16)
            memcpy(wp, w + p * ldw + j, 16 * sizeof(float));
    const int rest = n - j;
    for (int p = 0; rest && p < k; p++, wp += rest)
        memcpy(wp, w + p * ldw + j, (size_t)rest * sizeof(float));
}

/* pack_panels of w = src^T, for src (n, k) with rows lds floats apart: a panel gathers 16 rows of src,
 * each read front to back. */
static void pack_panels_t(int k, int n, const float *src, size_t lds, float *wp) {
    int j = 0;
    for (; j + 16 <= n; j += 16)
        for (int p = 0; p < k; p++, wp += 16)
            for (int c = 0; c < 16; c++)
                wp[c] = src[(j + c) * lds + p];
    const int rest = n - j;
    for (int p = 0; rest && p < k; p++, wp += rest)
        for (int c = 0; c < rest; c++)
            wp[c] = src[(j + c) * lds + p];
}

#if defined(__AVX512F__)
/* With 512-bit registers a panel's row is one register: a tile of R rows x C whole panels (C <= 4, so
 * 6 x 4 = 24 accumulators, plus 4 for w, of the 32 registers) reads each panel row once for R
 * multiply-adds. Panel c of the tile starts ps floats after panel c - 1 (ps = 16 k in
 * pack_panels' layout). With 256-bit vectors (column_block) the book's 128 x 128 x 512 step
 * product used half of each multiply-add unit's width. */
static inline __attribute__((always_inline)) void panel_tile(const int R, const int C, int k, const float *restrict x,
                                                             size_t xr, size_t xc, const float *restrict wp, size_t ps,
                                                             float *restrict y, size_t ldy) {
    v16 acc[6][4];
    for (int a = 0; a < R; a++)
        for (int c = 0; c < C; c++)
            acc[a][c] = load16(y + a * ldy + 16 * c);
    for (int p = 0; p < k; p++, x += xc, wp += 16) {
        v16 b[4];
        for (int c = 0; c < C; c++)
            b[c] = load16(wp + c * ps);
        for (int a = 0; a < R; a++) {
            const float xa = x[a * xr];
            for (int c = 0; c < C; c++)
                acc[a][c] += xa * b[c];
        }
    }
    for (int a = 0; a < R; a++)
        for (int c = 0; c < C; c++)
            store16(y + a * ldy + 16 * c, acc[a][c]);
}

/* C panels' columns for every row: 6-row tiles, then one for the rows left over (as column_block). */
static inline __attribute__((always_inline)) void panel_block(const int C, int rows, int k, const float *x, size_t xr,
                                                              size_t xc, const float *wp, float *y, size_t ldy) {
    const size_t ps = (size_t)16 * k;
    int r = 0;
    for (; r + 6 <= rows; r += 6)
        panel_tile(6, C, k, x + r * xr, xr, xc, wp, ps, y + r * ldy, ldy);
    x += r * xr;
    y += r * ldy;
    switch (rows - r) {
    case 5: panel_tile(5, C, k, x, xr, xc, wp, ps, y, ldy); break;
    case 4: panel_tile(4, C, k, x, xr, xc, wp, ps, y, ldy); break;
    case 3: panel_tile(3, C, k, x, xr, xc, wp, ps, y, ldy); break;
    case 2: panel_tile(2, C, k, x, xr, xc, wp, ps, y, ldy); break;
    case 1: panel_tile(1, C, k, x, xr, xc, wp, ps, y, ldy); break;
    default: break;
    }
}
#endif

/* y[r, :] += x[r, :] @ w for r < rows, with w (k, n) in pack_panels' layout wp; x and y as in
 * matmul_strided. */
static void matmul_panels(int rows, int k, int n, const float *x, size_t xr, size_t xc, const float *wp,
                          float *y, size_t ldy) {
    int j = 0;
#if defined(__AVX512F__)
    for (; j + 64 <= n; j += 64, wp += (size_t)64 * k)
        panel_block(4, rows, k, x, xr, xc, wp, y + j, ldy);
    const int left = (n - j) / 16;
    if (left == 3)
        panel_block(3, rows, k, x, xr, xc, wp, y + j, ldy);
    else if (left == 2)
        panel_block(2, rows, k, x, xr, xc, wp, y + j, ldy);
    else if (left == 1)
        panel_block(1, rows, k, x, xr, xc, wp, y + j, ldy);
    j += 16 * left;
    wp += (size_t)16 * left * k;
#endif
    for (; j + 16 <= n; j += 16, wp += (size_t)16 * k)
        column_block(2, rows, k, x, xr, xc, wp, 16, y + j, ldy);
    if (j < n)
        matmul_strided(rows, k, n - j, x, xr, xc, wp, (size_t)(n - j), y + j, ldy);
}

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

/* A Mogrifier layer's rounds for `rows` rows: x (rows, E) and h (rows, H) gated in place, each round
 * from the other; s (rows, max(E, H)) is scratch (see the training kernel for the maths). */
static void mog_rounds(const float *w, int R, int rows, int E, int H, float *x, float *h, float *s) {
    for (int k = 0; k < R; k++) {
        const int xr = k % 2 == 0, n = xr ? E : H;
        memset(s, 0, sizeof(float) * (size_t)rows * n);
        matmul_acc(rows, xr ? H : E, n, xr ? h : x, w, s);
        float *v = xr ? x : h;
        for (size_t j = 0; j < (size_t)rows * n; j++)
            v[j] *= 2.0f * fast_sigmoid(s[j]);
        w += (size_t)H * E;
    }
}

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

/* Advance `rows` rows by ids[r]; leaves the last layer's output (rows, H) in *out_h. `state` points
 * at the first of these rows in slot 0; a slot holds `stride` rows (so a thread can own a range of
 * rows). `work` holds 2 * rows * G*H floats. */
static void advance(const Net *net, int rows, int stride, const int64_t *ids, float *state, float *work,
                    const float **out_h) {
    const int H = net->hidden, G = net->lstm ? 4 : 3, GH = G * H, L = net->layers;
    float *proj = work;                      /* (rows, G*H) */
    float *gates = proj + (size_t)rows * GH; /* (rows, G*H) */
    const float *x = NULL;
    for (int l = 0; l < L; l++) {
        float *h = state + (size_t)l * stride * H;
        if (net->mog_rounds[l]) {
            /* In the gates block (an LSTM does not use it): x and h copies, gated, then the sigmoid scratch. */
            const int E = l ? H : net->mog_in;
            float *xm = gates, *hm = xm + (size_t)rows * E, *s = hm + (size_t)rows * H;
            for (int r = 0; r < rows; r++)
                memcpy(xm + (size_t)r * E, l ? x + (size_t)r * H : net->embed + (size_t)ids[r] * E, sizeof(float) * E);
            memcpy(hm, h, sizeof(float) * (size_t)rows * H);
            mog_rounds(net->mog_t[l], net->mog_rounds[l], rows, E, H, xm, hm, s);
            for (int r = 0; r < rows; r++)
                memcpy(proj + (size_t)r * GH, net->b_in[l], sizeof(float) * GH);
            matmul_acc(rows, E, GH, xm, net->w_ih_t[l], proj);
            float *c = state + (size_t)(L + l) * stride * H;
            matmul_acc(rows, H, GH, hm, net->w_hh_t[l], proj);
            for (int r = 0; r < rows; r++)
                lstm_cell(proj + (size_t)r * GH, c + (size_t)r * H, c + (size_t)r * H, h + (size_t)r * H, H);
            x = h;
            continue;
        }
        if (l == 0) {
            for (int r = 0; r < rows; r++)
                memcpy(proj + (size_t)r * GH, net->table + (size_t)ids[r] * GH, sizeof(float) * GH);
        } else {
            for (int r = 0; r < rows; r++)
                memcpy(proj + (size_t)r * GH, net->b_in[l], sizeof(float) * GH);
            matmul_acc(rows, H, GH, x, net->w_ih_t[l], proj);
        }
        if (net->lstm) {
            float *c = state + (size_t)(L + l) * stride * H;
            matmul_acc(rows, H, GH, h, net->w_hh_t[l], proj); /* proj now holds the gates */
            for (int r = 0; r < rows; r++)
                lstm_cell(proj + (size_t)r * GH, c + (size_t)r * H, c + (size_t)r * H, h + (size_t)r * H, H);
        } else {
            for (int r = 0; r < rows; r++)
                memcpy(gates + (size_t)r * GH, net->b_hh[l], sizeof(float) * GH);
            matmul_acc(rows, H, GH, h, net->w_hh_t[l], gates);
            for (int r = 0; r < rows; r++) {
                float *p = proj + (size_t)r * GH, *g = gates + (size_t)r * GH, *hr = h + (size_t)r * H;
                for (int j = 0; j < 2 * H; j++)
                    p[j] = fast_sigmoid(p[j] + g[j]);
                for (int j = 0; j < H; j++) {
                    const float n = fast_tanh(p[2 * H + j] + p[j] * g[2 * H + j]);
                    hr[j] = n + p[H + j] * (hr[j] - n);
                }
            }
        }
        x = h;
    }
    *out_h = x;
}

/* logits (rows, V) = head_b + h @ head_w_t, computed Vp wide in `wide` (rows, Vp) then copied. */
static void head(const Net *net, int rows, const float *h, float *wide, float *logits) {
    const int V = net->vocab, Vp = net->vocab_padded;
    for (int r = 0; r < rows; r++)
        memcpy(wide + (size_t)r * Vp, net->head_b, sizeof(float) * Vp);
    matmul_acc(rows, net->hidden, Vp, h, net->head_w_t, wide);
    for (int r = 0; r < rows; r++)
        memcpy(logits + (size_t)r * V, wide + (size_t)r * Vp, sizeof(float) * V);
}

/* Scratch layout of one range of `rows` rows (see Net.work): advance's two (rows, G*H) blocks, the
 * head's (rows, Vp), then per range the draw's exponentials (DRAW_ROWS, V) floats, CDFs (DRAW_ROWS, V)
 * doubles and ids (rows int64). */
static float *head_scratch(const Net *net, float *work, int rows) {
    return work + (size_t)rows * 2 * (net->lstm ? 4 : 3) * net->hidden;
}

/* One step for `rows` rows: feed ids (rows,), write logits (rows, V). Returns 0, or -1 (and changes
 * nothing) when an id is outside [0, vocab). */
int charloom_rnn_step(const Net *net, int rows, const int64_t *ids, float *state, float *logits) {
    for (int r = 0; r < rows; r++)
        if (ids[r] < 0 || ids[r] >= net->vocab)
            return -1;
    const float *h;
    advance(net, rows, rows, ids, state, net->work, &h);
    head(net, rows, h, head_scratch(net, net->work, rows), logits);
    return 0;
}

/* fn(args[0]), ..., fn(args[n - 1]), each args[k] `size` bytes apart: the first on the caller's
 * thread, the others on new threads, all joined before returning (a part with no thread to be had
 * runs on the caller's). */
static void run_parts(void *(*fn)(void *), char *args, size_t size, int n) {
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int k = 1; k < n; k++)
        started[k] = pthread_create(&tid[k], NULL, fn, args + k * size) == 0;
    fn(args);
    for (int k = 1; k < n; k++) {
        if (started[k])
            pthread_join(tid[k], NULL);
        else
            fn(args + k * size);
    }
}

typedef struct {
    const Net *net;
    int rows, stride, n, feed_last; /* this part's rows; rows per step in the arrays below */
    float *state, *logits, *work;   /* state at this part's first row of slot 0; logits (rows, V) */
    const double *uniforms;         /* (n, stride), at this part's first row */
    const float *temp;              /* (rows,) */
    int64_t *ids_out;               /* (n, stride), at this part's first row */
} Part;

/* The draws and steps of one range of rows: rows never interact, so ranges run in parallel. */
static void *sample_part(void *arg) {
    const Part *p = arg;
    const Net *net = p->net;
    const int V = net->vocab, rows = p->rows;
    float *wide = head_scratch(net, p->work, rows);
    float *e = wide + (size_t)rows * net->vocab_padded;          /* (DRAW_ROWS, V) */
    double *cdf = (double *)(e + ((DRAW_ROWS * V + 1) & ~1));    /* (DRAW_ROWS, V), 8-byte aligned */
    int64_t *ids = (int64_t *)(cdf + DRAW_ROWS * V);             /* (rows,) */
    for (int i = 0; i < p->n; i++) {
        for (int r0 = 0; r0 < rows; r0 += DRAW_ROWS) {
            const int m = rows - r0 < DRAW_ROWS ? rows - r0 : DRAW_ROWS;
            for (int a = 0; a < m; a++) {
                const float *lg = p->logits + (size_t)(r0 + a) * V;
                float *ea = e + (size_t)a * V;
                float top = lg[0];
                for (int v = 1; v < V; v++)
                    top = lg[v] > top ? lg[v] : top;
                const float t = p->temp[r0 + a];
                for (int v = 0; v < V; v++)
                    ea[v] = fast_exp((lg[v] - top) / t);
            }
            /* The CDFs in float64, each one serial pass as numpy's cumsum (the same sums bit for bit);
             * the rows' passes interleaved, so their chains of dependent adds overlap. */
            double run[DRAW_ROWS] = {0.0};
            for (int v = 0; v < V; v++)
                for (int a = 0; a < m; a++)
                    cdf[(size_t)a * V + v] = run[a] += e[(size_t)a * V + v];
            for (int a = 0; a < m; a++) {
                const double *ca = cdf + (size_t)a * V;
                const double target = p->uniforms[(size_t)i * p->stride + r0 + a] * run[a];
                int64_t id = V - 1;
                for (int v = 0; v < V; v++)
                    if (ca[v] > target) {
                        id = v;
                        break;
                    }
                ids[r0 + a] = id;
                p->ids_out[(size_t)i * p->stride + r0 + a] = id;
            }
        }
        if (i + 1 < p->n || p->feed_last) {
            const float *h;
            advance(net, rows, p->stride, ids, p->state, p->work, &h);
            head(net, rows, h, wide, p->logits);
        }
    }
    return NULL;
}

/* n tokens per row with a plain temperature: draw from `logits` (rows, V), feed the drawn token,
 * repeat. ids_out is (n, rows). temp (rows,) is T > 0 (divided by, not multiplied by 1/T: a tiny
 * T such as 1e-40 has no float32 inverse); uniforms (n, rows) in [0, 1).
 * The last drawn token is fed too when feed_last is set (more tokens will follow), so `logits`
 * and `state` always describe what comes after the last token fed.
 * With threads > 1 and enough rows, the rows are split into ranges run by that many threads (the
 * caller's and threads - 1 new ones, joined before returning): whole runs of steps per thread, no
 * synchronisation between steps. Each range has its own slice of net->work (see head_scratch). */
void charloom_rnn_sample(const Net *net, int rows, float *state, float *logits, int n, const double *uniforms,
                         const float *temp, int feed_last, int64_t *ids_out, int threads) {
    const int V = net->vocab, GH = (net->lstm ? 4 : 3) * net->hidden, H = net->hidden, Vp = net->vocab_padded;
    const size_t extra = (size_t)((3 * DRAW_ROWS * V + 35) & ~1); /* per range: e and cdf (DRAW_ROWS, V); even, so aligned */
    int parts = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    if (rows / parts < MIN_ROWS_PER_THREAD)
        parts = rows / MIN_ROWS_PER_THREAD > 0 ? rows / MIN_ROWS_PER_THREAD : 1;
    Part part[MAX_THREADS];
    for (int k = 0, r0 = 0; k < parts; k++) {
        const int r1 = rows * (k + 1) / parts;
        float *work = net->work + (size_t)r0 * (2 * GH + Vp + 2) + (size_t)k * extra;
        part[k] = (Part){net, r1 - r0, rows, n, feed_last, state + (size_t)r0 * H, logits + (size_t)r0 * V, work,
                         uniforms + r0, temp + r0, ids_out + r0};
        r0 = r1;
    }
    run_parts(sample_part, (char *)part, sizeof part[0], parts);
}

/* ---- Training: an LSTM layer over one-hot input, forward and backward ---------------------------
 *
 * The input part of the gates is column ids[b, t] of W_ih (the one-hot product), read as row
 * ids[b, t] of w_ih_t (V, 4H), plus bias = b_ih + b_hh:
 *   gates = w_ih_t[id] + bias + h @ w_hh_t, then lstm_cell
 * (an embedding E before the layer is the one-hot table W_ih E^T; the caller builds it). The backward
 * pass produces every gradient (W_ih, W_hh, the bias, the initial state), so a training step runs no
 * large torch op whose worker threads would then spin on the cores these threads use.
 *
 * Gate columns come in blocks of LSTM_BLOCK hidden units, each block's gates in the order (i, f, o, g)
 * (the caller reorders torch's rows: kernel_order in native/lstm.py): block b holds columns
 * [4 LSTM_BLOCK b, 4 LSTM_BLOCK (b + 1)), and only the last block may be narrower. For a large H the
 * threads split the hidden units, whole blocks each: a thread computes its units' gates for every row,
 * so it reads only its share of the recurrent weights at every step (split by rows, every thread read
 * all of them, and at H = 512 the 4 MB per step per thread made two threads barely faster than one),
 * and its share of every weight gradient is its own (no partial sums to add up). Steps meet at a
 * barrier, since step t + 1 needs all of h_t. For a small H they split the rows (see lstm_by_rows).
 * out, acts, cs and dout are time-major, (T, B, .): a step's rows lie together, so its products read
 * and write whole blocks, not rows a sequence's length apart (with (B, T, .) rows, the default
 * recipe's 4H-wide gates were 512 KB apart: a product into them ran ~20% slower). */

#define LSTM_BLOCK 16 /* hidden units per block of gate columns: a panel of pack_panels */
#define LSTM_ROWS_MAX_H 128 /* the largest hidden size whose training splits rows among threads (lstm_by_rows) */
#define LSTM_ROWS_MAX_V 1024 /* ... and the largest vocabulary (each thread keeps a (V, 4H) gradient) */

/* A barrier for the threads of one call: spins, then yields (a step is ~0.1-1 ms, and on a loaded
 * machine a thread may wait for one that lost its core). */
typedef struct {
    int count, arrived, sense;
} Barrier;

static void barrier_wait(Barrier *b, int *local_sense) {
    const int sense = !*local_sense;
    *local_sense = sense;
    if (__atomic_add_fetch(&b->arrived, 1, __ATOMIC_ACQ_REL) == b->count) {
        __atomic_store_n(&b->arrived, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&b->sense, sense, __ATOMIC_RELEASE);
        return;
    }
    for (int spins = 0; __atomic_load_n(&b->sense, __ATOMIC_ACQUIRE) != sense; spins++)
        if (spins > 4000)
            sched_yield();
}

typedef struct {
    int B, T, H, V;
    const int64_t *ids;          /* (B, T) */
    const float *w_ih_t, *bias;  /* (V, 4H), (4H) */
    const float *w;              /* w_hh (4H, H) */
    float *packed;               /* each member's share of w in pack_panels' layout (H * 4H floats; by rows, a whole copy each); backward: then the chunk's dg */
    float *h, *c;                /* forward: state in, state out (B, H); backward: dh, dc in (dhT, dcT), out (dh0, dc0) */
    float *out, *acts, *cs;      /* out (T, B, H) h_t; acts (T, B, 4H) gates after activation; cs (T, B, H) c_t */
    const float *h0, *c0, *dout; /* backward: initial state (B, H) each; dout, the gradient of out (see dout_ts) */
    float *grads;                /* backward: dW_ih^T (V, 4H), dW_hh^T (H, 4H), db (4H), in a row */
    float *work;                 /* backward: B * LSTM_CHUNK * (5H + 1 + LSTM_PAD) floats */
    int size, go;                /* threads in the team; set (go = 1) once they are all started */
    Barrier barrier;
    int by_rows;                 /* LSTM: the members split the rows, not the hidden units (see lstm_by_rows) */
    float *part;                 /* backward by rows: members 1.. size-1's gradients, (V + H + 1) * 4H floats each */
    size_t dout_ts, dout_rs;     /* LSTM backward: floats between dout's steps and between its rows (each row's H contiguous) */
} LstmJob;

typedef struct {
    LstmJob *job;
    int member;
} LstmMember;

/* Member m's hidden units [u0, u1) of H: a share of the LSTM_BLOCK-unit blocks. */
static void member_units(const LstmJob *job, int m, int *u0, int *u1) {
    const int blocks = (job->H + LSTM_BLOCK - 1) / LSTM_BLOCK;
    const int b0 = blocks * m / job->size, b1 = blocks * (m + 1) / job->size;
    *u0 = b0 * LSTM_BLOCK;
    *u1 = b1 * LSTM_BLOCK < job->H ? b1 * LSTM_BLOCK : job->H;
}

/* Waits until the team is complete; returns the member's job and sets its units. */
static LstmJob *member_start(void *arg, int *m, int *u0, int *u1) {
    const LstmMember *me = arg;
    LstmJob *job = me->job;
    while (!__atomic_load_n(&job->go, __ATOMIC_ACQUIRE))
        sched_yield();
    *m = me->member;
    member_units(job, *m, u0, u1);
    return job;
}

/* The most members a team for job can have with `threads` threads: no more than there are blocks of
 * units, or (by rows) than there are rows for MIN_ROWS_PER_THREAD each. */
static int team_limit(const LstmJob *job, int threads) {
    const int parts = job->by_rows ? job->B / MIN_ROWS_PER_THREAD : (job->H + LSTM_BLOCK - 1) / LSTM_BLOCK;
    const int want = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    return want < parts ? want : (parts > 0 ? parts : 1);
}

/* Whether an LSTM training call splits its rows among the threads rather than its hidden units.
 * By units (the default), each thread reads only its share of W_hh at every step, but the steps meet
 * at barriers and each thread reads the other threads' halves of h_t (forward) and of the gate
 * gradients (backward) from their cores' caches. By rows, each thread runs its own sequences through
 * every step alone, with a whole copy of W_hh (4H * H floats), and adds its weight gradients at the
 * end. That pays while the copy fits well inside a core's cache and the gradients are small: on 2
 * cores of a Xeon (2 MB L2 each) the book's step (128 x 60 steps of a 1x128 LSTM, W_hh 256 KB) ran
 * forward and backward in 17-23 ms by rows, 24-31 ms by units; at H = 256 by rows was ahead by less
 * and not always, at H = 512 behind. LSTM_ROWS_MAX_H keeps the copy at 256 KB, within any recent
 * core's L2. */
static int lstm_by_rows(int B, int H, int V, int threads) {
    return threads > 1 && H <= LSTM_ROWS_MAX_H && V <= LSTM_ROWS_MAX_V && B / MIN_ROWS_PER_THREAD > 1;
}

/* Run fn for a team of up to team_limit members (the caller's thread and new ones): the team's size
 * is fixed once its threads have started, so a thread that cannot be created only makes the team
 * smaller. */
static void run_team(void *(*fn)(void *), LstmJob *job, int threads) {
    const int want = team_limit(job, threads);
    pthread_t tid[MAX_THREADS];
    LstmMember members[MAX_THREADS];
    int n = 1;
    job->go = 0;
    for (; n < want; n++) {
        members[n] = (LstmMember){job, n};
        if (pthread_create(&tid[n], NULL, fn, &members[n]) != 0)
            break;
    }
    job->size = n;
    job->barrier = (Barrier){n, 0, 0};
    __atomic_store_n(&job->go, 1, __ATOMIC_RELEASE);
    members[0] = (LstmMember){job, 0};
    fn(&members[0]);
    for (int k = 1; k < n; k++)
        pthread_join(tid[k], NULL);
}

/* member_start for the LSTM kernel: also the member's rows [r0, r1), all of them unless by rows (then
 * all the units are the member's). */
static LstmJob *lstm_member_start(void *arg, int *m, int *r0, int *r1, int *u0, int *u1) {
    LstmJob *job = member_start(arg, m, u0, u1);
    *r0 = 0;
    *r1 = job->B;
    if (job->by_rows) {
        *u0 = 0;
        *u1 = job->H;
        *r0 = job->B * *m / job->size;
        *r1 = job->B * (*m + 1) / job->size;
    }
    return job;
}

static void *lstm_forward_member(void *arg) {
    int m, r0, r1, u0, u1, sense = 0;
    LstmJob *p = lstm_member_start(arg, &m, &r0, &r1, &u0, &u1);
    const int B = p->B, T = p->T, H = p->H, G = 4 * H, nu = u1 - u0;
    /* This member's gate columns [4 u0, 4 u1) of w_hh^T, packed (by rows: a whole copy each). */
    float *w = p->packed + (size_t)H * 4 * (p->by_rows ? (size_t)m * H : (size_t)u0);
    pack_panels_t(H, 4 * nu, p->w + 4 * (size_t)u0 * H, (size_t)H, w);
    /* The gates are built in acts, where the backward pass reads them, and h_{t-1} and c_{t-1} are read
     * from out and cs, where step t - 1 wrote them: no copies. */
    for (int t = 0; t < T; t++) {
        const size_t at = (size_t)t * B; /* the step's first row */
        float *g = p->acts + at * G;     /* (B, 4H) */
        for (int r = r0; r < r1; r++) {
            const float *col = p->w_ih_t + (size_t)p->ids[(size_t)r * T + t] * G;
            float *gr = g + (size_t)r * G;
            for (int j = 4 * u0; j < 4 * u1; j++)
                gr[j] = col[j] + p->bias[j];
        }
        const float *hprev = t ? p->out + (at - B) * H : p->h, *cprev = t ? p->cs + (at - B) * H : p->c; /* (B, H) */
        matmul_panels(r1 - r0, H, 4 * nu, hprev + (size_t)r0 * H, (size_t)H, 1, w, g + (size_t)r0 * G + 4 * (size_t)u0,
                      (size_t)G);
        for (int r = r0; r < r1; r++)
            for (int u = u0; u < u1; u += LSTM_BLOCK) {
                const size_t row = (at + r) * H + u;
                block_cell(g + (size_t)r * G + 4 * u, cprev + (size_t)r * H + u, p->cs + row, p->out + row,
                          u1 - u < LSTM_BLOCK ? u1 - u : LSTM_BLOCK);
            }
        if (!p->by_rows) /* by rows, step t + 1 reads only this member's rows of h_t */
            barrier_wait(&p->barrier, &sense); /* step t + 1 reads all of h_t */
    }
    for (int r = r0; T > 0 && r < r1; r++) { /* the last state; every member has read h and c (step 0) */
        const size_t last = ((size_t)(T - 1) * B + r) * H + u0;
        memcpy(p->h + (size_t)r * H + u0, p->out + last, sizeof(float) * nu);
        memcpy(p->c + (size_t)r * H + u0, p->cs + last, sizeof(float) * nu);
    }
    return NULL;
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

/* The weight gradient dW_hh^T += h_{t-1}^T dg_t is taken over LSTM_CHUNK steps at once: one product
 * with LSTM_CHUNK * B inner terms reads and writes the member's columns of dW_hh^T a quarter as often
 * as one per step. Its left factor h^T is read transposed from the chunk's h_{t-1} rows, each with a 1
 * after it, so the same product adds the bias gradient (g_b follows g_hh). */
static void *lstm_backward_member(void *arg) {
    int m, r0, r1, u0, u1, sense = 0;
    LstmJob *p = lstm_member_start(arg, &m, &r0, &r1, &u0, &u1);
    const int B = p->B, T = p->T, H = p->H, V = p->V, G = 4 * H, nu = u1 - u0, c0 = 4 * u0, nc = 4 * nu, nr = r1 - r0;
    const size_t ld = (size_t)G + LSTM_PAD;   /* the row stride of dgs */
    /* The member's rows of the shared scratch (all of it, unless by rows): */
    float *dgs = p->work + (size_t)LSTM_CHUNK * r0 * ld; /* (LSTM_CHUNK * nr, 4H): gate gradients before activation */
    float *hp = p->work + (size_t)LSTM_CHUNK * (B * ld + (size_t)r0 * (H + 1)); /* (LSTM_CHUNK * nr, H + 1): h_{t-1}, each followed by a 1 */
    float *grads = p->by_rows && m ? p->part + (size_t)(m - 1) * (V + H + 1) * G : p->grads;
    float *g_ih = grads, *g_hh = grads + (size_t)V * G;
    /* This member's units' columns of w_hh (4H, H), packed: dh_{t-1}[:, u0:u1] = dg @ w_hh[:, u0:u1]. */
    float *w = p->packed + (size_t)G * (p->by_rows ? (size_t)m * H : (size_t)u0);
    pack_panels(G, nu, p->w + u0, (size_t)H, w);
    /* the chunk's dg, this member's rows and columns, packed */
    float *dgp = p->packed + (size_t)G * H * (p->by_rows ? p->size : 1) + (size_t)LSTM_CHUNK * ((size_t)r0 * G + (size_t)B * c0);
    for (int i = 0; i < V + H + 1; i++) /* g_ih, g_hh and g_b lie in a row */
        memset(grads + (size_t)i * G + c0, 0, sizeof(float) * nc);
    int filled = 0; /* steps of the chunk done */
    for (int t = T - 1; t >= 0; t--) {
        float *dg = dgs + (size_t)filled * nr * ld;
        for (int r = r0; r < r1; r++) {
            const size_t at = (size_t)t * B + r;
            const float *a = p->acts + at * G, *cr = p->cs + at * H, *dout = p->dout + t * p->dout_ts + r * p->dout_rs;
            const float *cprev = t ? p->cs + (at - B) * H : p->c0 + (size_t)r * H;
            const float *hprev = t ? p->out + (at - B) * H : p->h0 + (size_t)r * H;
            float *d = dg + (size_t)(r - r0) * ld, *dh = p->h + (size_t)r * H, *dc = p->c + (size_t)r * H;
            for (int u = u0; u < u1; u += LSTM_BLOCK)
                block_cell_backward(a + 4 * u, cr + u, cprev + u, dh + u, dout + u, dc + u, d + 4 * u,
                                   u1 - u < LSTM_BLOCK ? u1 - u : LSTM_BLOCK);
            float *gi = g_ih + (size_t)p->ids[(size_t)r * T + t] * G; /* the one-hot product's gradient: row id of dW_ih^T */
            for (int j = c0; j < c0 + nc; j++)
                gi[j] += d[j];
            memcpy(hp + ((size_t)filled * nr + r - r0) * (H + 1) + u0, hprev + u0, sizeof(float) * nu);
        }
        if (!p->by_rows) /* by rows, a member reads only what it wrote */
            barrier_wait(&p->barrier, &sense); /* every unit's dg_t and h_{t-1} are in */
        for (int r = r0; r < r1; r++) /* this step's dh was read above */
            memset(p->h + (size_t)r * H + u0, 0, sizeof(float) * nu);
        matmul_panels(nr, G, nu, dg, ld, 1, w, p->h + (size_t)r0 * H + u0, (size_t)H); /* dh_{t-1} = dg @ w_hh */
        if (++filled == LSTM_CHUNK || t == 0) {
            pack_panels(filled * nr, nc, dgs + c0, ld, dgp);
            matmul_panels(H + 1, filled * nr, nc, hp, 1, (size_t)H + 1, dgp, g_hh + c0, (size_t)G);
            filled = 0;
            if (!p->by_rows)
                barrier_wait(&p->barrier, &sense); /* all have read hp before the next chunk refills it */
        }
    }
    return NULL;
}

/* Forward over T steps: h, c (B, H) hold the initial state and receive the last; out (T, B, H);
 * acts (T, B, 4H) and cs (T, B, H) are kept for the backward pass; w_ih_t (V, 4H) and bias (4H) have
 * their columns in blocks (see above), w_hh (4H, H) its rows. Returns 0, or 1 when there is no memory
 * for the packed weights (nothing is written then). */
int charloom_lstm_forward(int B, int T, int H, int V, const int64_t *ids, const float *w_ih_t, const float *bias,
                          const float *w_hh, float *h, float *c, float *out, float *acts, float *cs, int threads) {
    LstmJob job = {B, T, H, V, ids, w_ih_t, bias, w_hh, NULL, h, c, out, acts, cs, NULL, NULL, NULL, NULL, NULL, 0, 0,
                   {0, 0, 0}, lstm_by_rows(B, H, V, threads), NULL};
    const int copies = job.by_rows ? team_limit(&job, threads) : 1; /* of the packed w_hh^T */
    job.packed = malloc(sizeof(float) * (size_t)H * 4 * H * copies);
    if (!job.packed)
        return 1;
    run_team(lstm_forward_member, &job, threads);
    free(job.packed);
    return 0;
}

/* Backward over T steps from the forward's out, acts and cs: dh, dc (B, H) hold the gradients of the
 * last state and receive those of the initial one; dout is the gradient of out, row r of step t at
 * dout + t * dout_ts + r * dout_rs (so (T, B, H) or (B, T, H) alike), or NULL where nothing read
 * out (the book's objective reads only the last state: no (B, T, H) of zeros to write and read); grads
 * receives dW_ih^T (V, 4H), dW_hh^T (H, 4H) and db (4H), in that order, columns in blocks; w_hh is
 * (4H, H), rows in blocks; work holds B * LSTM_CHUNK * (5H + 1 + LSTM_PAD) floats. Returns 0, or 1
 * when there is no memory for the packed weights (nothing is written then). */
int charloom_lstm_backward(int B, int T, int H, int V, const int64_t *ids, const float *w_hh, const float *out,
                           const float *acts, const float *cs, const float *h0, const float *c0, const float *dout,
                           size_t dout_ts, size_t dout_rs, float *dh, float *dc, float *grads, float *work, int threads) {
    LstmJob job = {B, T, H, V, ids, NULL, NULL, w_hh, NULL, dh, dc, (float *)out, (float *)acts, (float *)cs, h0, c0,
                   dout, grads, work, 0, 0, {0, 0, 0}, lstm_by_rows(B, H, V, threads), NULL};
    const int copies = job.by_rows ? team_limit(&job, threads) : 1; /* of the packed w_hh */
    const size_t G = 4 * (size_t)H, per = ((size_t)V + H + 1) * G; /* floats of one member's gradients */
    job.packed = malloc(sizeof(float) * ((size_t)H * copies + LSTM_CHUNK * (size_t)B) * G);
    job.part = copies > 1 ? malloc(sizeof(float) * per * (copies - 1)) : NULL;
    float *zeros = dout ? NULL : calloc((size_t)H, sizeof(float)); /* every row's dout, when there is none */
    if (!job.packed || (copies > 1 && !job.part) || (!dout && !zeros)) {
        free(job.packed);
        free(job.part);
        free(zeros);
        return 1;
    }
    job.dout = dout ? dout : zeros;
    job.dout_ts = dout ? dout_ts : 0;
    job.dout_rs = dout ? dout_rs : 0;
    const size_t K = (size_t)LSTM_CHUNK * B;
    float *hp = work + K * (4 * (size_t)H + LSTM_PAD);
    for (size_t k = 0; k < K; k++)
        hp[k * (H + 1) + H] = 1.0f;
    run_team(lstm_backward_member, &job, threads);
    for (int m = 1; job.by_rows && m < job.size; m++) /* the other members' gradients, in member order */
        for (size_t i = 0; i < per; i++)
            grads[i] += job.part[(size_t)(m - 1) * per + i];
    free(job.packed);
    free(job.part);
    free(zeros);
    return 0;
}

/* ---- Training: a Mogrifier LSTM layer over an embedding ------------------------------------------
 *
 * Melis, Kočiský & Blunsom (2019, "Mogrifier LSTM"): before the LSTM step, R rounds let the input
 * x (D, from the embedding) and the previous output h (H) gate each other, round k = 0, 1, ...:
 *   k even: s_k = sigmoid(Q_k h), x = 2 s_k * x     Q_k (D, H)
 *   k odd:  s_k = sigmoid(R_k x), h = 2 s_k * h     R_k (H, D)
 *   gates = bias + W_ih x + W_hh h (both the last versions), then lstm_cell.
 * The threads split the work as the LSTM kernel above does: hidden units (whole blocks, with their
 * gate columns), and here also the D input features, in even shares. Each round's outputs are a
 * member's own; the next round reads all of them, so the rounds meet at a barrier each.
 * Every round's vector and sigmoid are kept, per step and row, in a record of S floats:
 *   x0 (D), then for each round k: v_k (dim_k), s_k (dim_k), dim_k = D for even k, H for odd.
 * The backward pass runs the rounds in reverse; sums over the other vector's features (dh += dpre Q_k,
 * dx += dpre R_k) read every member's dpre, after a barrier. */

#define MOG_MAX_ROUNDS 8

typedef struct {
    LstmJob team;                 /* first, so the team's pointer is the job's: B, T, H, V, ids, out, acts, cs, h, c, dout, h0, c0 as above */
    int D, R;
    size_t S;                     /* floats per record */
    size_t off_v[MOG_MAX_ROUNDS], off_s[MOG_MAX_ROUNDS], off_w[MOG_MAX_ROUNDS]; /* in a record; in mog */
    const float *emb;             /* (V, D) */
    const float *mog;             /* round k's weights at off_w[k]: Q_k (D, H) or R_k (H, D), row-major */
    const float *w_ih, *w_hh;     /* (4H, D), (4H, H), rows in kernel order */
    const float *bias;            /* (4H), kernel order */
    float *rec;                   /* (T, B, S) */
    float *g_w;                   /* backward: (H + D + 1, 4H): dW_hh^T, dW_ih^T, db, columns in kernel order */
    float *g_mog, *g_emb;         /* backward: like mog; (V, D) */
    float *dgs, *hp, *dpre, *dx;  /* backward, shared: (LSTM_CHUNK B, 4H + PAD); (LSTM_CHUNK B, H + D + 1); 2 x (B, max(H, D)); (B, D) */
    float *work[MAX_THREADS];     /* each member's packed weights */
} MogJob;

/* Member m's share [d0, d1) of the D input features. */
static void mog_features(const MogJob *p, int m, int *d0, int *d1) {
    *d0 = p->D * m / p->team.size;
    *d1 = p->D * (m + 1) / p->team.size;
}

/* The latest x (parity 0) or h (parity 1) before round k of a step: a round's v, or x0 / h_{t-1}.
 * Sets *ld to its row stride. */
static const float *mog_latest(const MogJob *p, const float *rec, const float *hprev, int k, int parity, size_t *ld) {
    for (int j = k - 1; j >= 0; j--)
        if (j % 2 == parity) {
            *ld = p->S;
            return rec + p->off_v[j];
        }
    *ld = parity ? (size_t)p->team.H : p->S;
    return parity ? hprev : rec;
}

/* Floats of a member's workspace for its packed shares of W_hh, W_ih and every round's matrix (at most
 * the whole of each), forward or backward. */
static size_t mog_work_floats(int H, int D, int R) {
    return (size_t)(H + D) * 4 * H + (size_t)R * H * D;
}

static void *mog_forward_member(void *arg) {
    int m, u0, u1, d0, d1, sense = 0;
    MogJob *p = (MogJob *)member_start(arg, &m, &u0, &u1);
    mog_features(p, m, &d0, &d1);
    const int B = p->team.B, T = p->team.T, H = p->team.H, D = p->D, R = p->R, G = 4 * H, nu = u1 - u0, nd = d1 - d0;
    const size_t S = p->S;
    float *wp = p->work[m], *wr[MOG_MAX_ROUNDS];
    float *whh = wp, *wih = whh + (size_t)H * 4 * nu;
    pack_panels_t(H, 4 * nu, p->w_hh + 4 * (size_t)u0 * H, (size_t)H, whh); /* (H, 4 nu): this member's gate columns */
    pack_panels_t(D, 4 * nu, p->w_ih + 4 * (size_t)u0 * D, (size_t)D, wih);
    wp = wih + (size_t)D * 4 * nu;
    for (int k = 0; k < R; k++) {
        const float *w = p->mog + p->off_w[k];
        wr[k] = wp;
        if (k % 2 == 0) { /* Q_k^T's columns [d0, d1): (H, nd) */
            pack_panels_t(H, nd, w + (size_t)d0 * H, (size_t)H, wp);
            wp += (size_t)H * nd;
        } else { /* R_k^T's columns [u0, u1): (D, nu) */
            pack_panels_t(D, nu, w + (size_t)u0 * D, (size_t)D, wp);
            wp += (size_t)D * nu;
        }
    }
    for (int t = 0; t < T; t++) {
        const size_t at = (size_t)t * B;
        float *rec = p->rec + at * S; /* (B, S) */
        const float *hprev = t ? p->team.out + (at - B) * H : p->team.h, *cprev = t ? p->team.cs + (at - B) * H : p->team.c;
        for (int r = 0; r < B; r++)
            memcpy(rec + r * S + d0, p->emb + (size_t)p->team.ids[(size_t)r * T + t] * D + d0, sizeof(float) * nd);
        for (int k = 0; k < R; k++) {
            if (k)
                barrier_wait(&p->team.barrier, &sense); /* round k reads all of round k - 1's vector */
            size_t ldi, ldo;
            const int xr = k % 2 == 0, j0 = xr ? d0 : u0, n = xr ? nd : nu;
            const float *in = mog_latest(p, rec, hprev, k, xr, &ldi);   /* the gating vector: h for an x round */
            const float *old = mog_latest(p, rec, hprev, k, !xr, &ldo); /* the vector gated */
            float *v = rec + p->off_v[k], *s = rec + p->off_s[k];
            for (int r = 0; r < B; r++)
                memset(s + r * S + j0, 0, sizeof(float) * n);
            matmul_panels(B, xr ? H : D, n, in, ldi, 1, wr[k], s + j0, S);
            for (int r = 0; r < B; r++)
                for (int j = j0; j < j0 + n; j++) {
                    const float g = fast_sigmoid(s[r * S + j]);
                    s[r * S + j] = g;
                    v[r * S + j] = 2.0f * g * old[r * ldo + j];
                }
        }
        barrier_wait(&p->team.barrier, &sense); /* the gates read all of the last x and h */
        size_t ldx, ldh;
        const float *x = mog_latest(p, rec, hprev, R, 0, &ldx), *h = mog_latest(p, rec, hprev, R, 1, &ldh);
        float *g = p->team.acts + at * G; /* (B, 4H) */
        for (int r = 0; r < B; r++)
            memcpy(g + (size_t)r * G + 4 * u0, p->bias + 4 * u0, sizeof(float) * 4 * nu);
        matmul_panels(B, H, 4 * nu, h, ldh, 1, whh, g + 4 * (size_t)u0, (size_t)G);
        matmul_panels(B, D, 4 * nu, x, ldx, 1, wih, g + 4 * (size_t)u0, (size_t)G);
        for (int r = 0; r < B; r++)
            for (int u = u0; u < u1; u += LSTM_BLOCK) {
                const size_t row = (at + r) * H + u;
                block_cell(g + (size_t)r * G + 4 * u, cprev + (size_t)r * H + u, p->team.cs + row, p->team.out + row,
                          u1 - u < LSTM_BLOCK ? u1 - u : LSTM_BLOCK);
            }
        barrier_wait(&p->team.barrier, &sense); /* step t + 1 reads all of h_t */
    }
    for (int r = 0; T > 0 && r < B; r++) {
        const size_t last = ((size_t)(T - 1) * B + r) * H + u0;
        memcpy(p->team.h + (size_t)r * H + u0, p->team.out + last, sizeof(float) * nu);
        memcpy(p->team.c + (size_t)r * H + u0, p->team.cs + last, sizeof(float) * nu);
    }
    return NULL;
}

static void *mog_backward_member(void *arg) {
    int m, u0, u1, d0, d1, sense = 0;
    MogJob *p = (MogJob *)member_start(arg, &m, &u0, &u1);
    mog_features(p, m, &d0, &d1);
    const int B = p->team.B, T = p->team.T, H = p->team.H, D = p->D, R = p->R, V = p->team.V, G = 4 * H;
    const int nu = u1 - u0, nd = d1 - d0, c0 = 4 * u0, nc = 4 * nu, K = H + D + 1, P = H > D ? H : D;
    const size_t S = p->S, ld = (size_t)G + LSTM_PAD;
    float *wp = p->work[m], *wr[MOG_MAX_ROUNDS];
    float *whh = wp, *wih = whh + (size_t)G * nu; /* W_hh's columns [u0, u1) (4H, nu); W_ih's [d0, d1) (4H, nd) */
    pack_panels(G, nu, p->w_hh + u0, (size_t)H, whh);
    pack_panels(G, nd, p->w_ih + d0, (size_t)D, wih);
    wp = wih + (size_t)G * nd;
    for (int k = 0; k < R; k++) {
        const float *w = p->mog + p->off_w[k];
        wr[k] = wp;
        if (k % 2 == 0) { /* Q_k's columns [u0, u1): (D, nu) */
            pack_panels(D, nu, w + u0, (size_t)H, wp);
            wp += (size_t)D * nu;
        } else { /* R_k's columns [d0, d1): (H, nd) */
            pack_panels(H, nd, w + d0, (size_t)D, wp);
            wp += (size_t)H * nd;
        }
    }
    float *dgp = wp; /* the chunk's dg, this member's columns, packed: (LSTM_CHUNK B, nc) */
    for (int i = 0; i < K; i++)
        memset(p->g_w + (size_t)i * G + c0, 0, sizeof(float) * nc);
    for (int k = 0; k < R; k++) {
        if (k % 2 == 0)
            memset(p->g_mog + p->off_w[k] + (size_t)d0 * H, 0, sizeof(float) * nd * H);
        else
            memset(p->g_mog + p->off_w[k] + (size_t)u0 * D, 0, sizeof(float) * nu * D);
    }
    for (int v = 0; v < V; v++)
        memset(p->g_emb + (size_t)v * D + d0, 0, sizeof(float) * nd);
    float *dh = p->team.h, *dc = p->team.c, *dx = p->dx; /* (B, H), (B, H), (B, D) */
    int filled = 0;
    for (int t = T - 1; t >= 0; t--) {
        const size_t at = (size_t)t * B;
        const float *rec = p->rec + at * S;
        const float *hprev = t ? p->team.out + (at - B) * H : p->team.h0;
        float *dg = p->dgs + (size_t)filled * B * ld;
        size_t ldx, ldh;
        const float *xf = mog_latest(p, rec, hprev, R, 0, &ldx), *hf = mog_latest(p, rec, hprev, R, 1, &ldh);
        for (int r = 0; r < B; r++) {
            const size_t row = at + r;
            const float *a = p->team.acts + row * G, *cr = p->team.cs + row * H, *dout = p->team.dout + row * H;
            const float *cprev = t ? p->team.cs + (row - B) * H : p->team.c0 + (size_t)r * H;
            for (int u = u0; u < u1; u += LSTM_BLOCK)
                block_cell_backward(a + 4 * u, cr + u, cprev + u, dh + (size_t)r * H + u, dout + u, dc + (size_t)r * H + u,
                                   dg + r * ld + 4 * u, u1 - u < LSTM_BLOCK ? u1 - u : LSTM_BLOCK);
            float *z = p->hp + ((size_t)filled * B + r) * K; /* [h, x, 1] that fed the gates */
            memcpy(z + u0, hf + r * ldh + u0, sizeof(float) * nu);
            memcpy(z + H + d0, xf + r * ldx + d0, sizeof(float) * nd);
        }
        barrier_wait(&p->team.barrier, &sense); /* every gate's dg and all of z are in */
        for (int r = 0; r < B; r++) {
            memset(dh + (size_t)r * H + u0, 0, sizeof(float) * nu);
            memset(dx + (size_t)r * D + d0, 0, sizeof(float) * nd);
        }
        matmul_panels(B, G, nu, dg, ld, 1, whh, dh + u0, (size_t)H); /* dh = dg @ W_hh, this member's units */
        matmul_panels(B, G, nd, dg, ld, 1, wih, dx + d0, (size_t)D); /* dx = dg @ W_ih, its features */
        if (++filled == LSTM_CHUNK || t == 0) {
            pack_panels(filled * B, nc, p->dgs + c0, ld, dgp);
            matmul_panels(K, filled * B, nc, p->hp, 1, (size_t)K, dgp, p->g_w + c0, (size_t)G);
            filled = 0;
        }
        for (int k = R - 1; k >= 0; k--) {
            const int xr = k % 2 == 0, j0 = xr ? d0 : u0, n = xr ? nd : nu, ldd = xr ? D : H;
            size_t ldi, ldo;
            const float *in = mog_latest(p, rec, hprev, k, xr, &ldi), *old = mog_latest(p, rec, hprev, k, !xr, &ldo);
            const float *s = rec + p->off_s[k];
            float *dv = xr ? dx : dh, *dp = p->dpre + (size_t)(k % 2) * B * P;
            for (int r = 0; r < B; r++)
                for (int j = j0; j < j0 + n; j++) {
                    const float g = s[r * S + j], d = dv[(size_t)r * ldd + j];
                    dv[(size_t)r * ldd + j] = 2.0f * g * d;
                    dp[(size_t)r * P + j] = 2.0f * d * old[r * ldo + j] * g * (1.0f - g);
                }
            /* The round's weight gradient, this member's rows: dW_k[j0 : j0 + n] += dp[:, j0 : j0 + n]^T in. */
            float *gw = p->g_mog + p->off_w[k] + (size_t)j0 * (xr ? H : D);
            matmul_strided(n, B, xr ? H : D, dp + j0, 1, (size_t)P, in, ldi, gw, (size_t)(xr ? H : D));
            barrier_wait(&p->team.barrier, &sense); /* every feature's dp is in */
            if (xr) /* dh (the gating h) += dp @ Q_k, this member's units */
                matmul_panels(B, D, nu, dp, (size_t)P, 1, wr[k], dh + u0, (size_t)H);
            else /* dx (the gating x) += dp @ R_k, its features */
                matmul_panels(B, H, nd, dp, (size_t)P, 1, wr[k], dx + d0, (size_t)D);
        }
        /* dx is now the embedding row's gradient, dh h_{t-1}'s (read by step t - 1's cell, this member's units). */
        for (int r = 0; r < B; r++) {
            float *ge = p->g_emb + (size_t)p->team.ids[(size_t)r * T + t] * D;
            for (int j = d0; j < d1; j++)
                ge[j] += dx[(size_t)r * D + j];
        }
        if (!filled) /* the chunk's product has read hp and dgs: all must be done before they are refilled */
            barrier_wait(&p->team.barrier, &sense);
    }
    return NULL;
}

/* Sets a job's record layout and round offsets, allocates its members' workspace; 1 when out of memory. */
static int mog_setup(MogJob *p, int threads) {
    const int H = p->team.H, D = p->D;
    size_t off = (size_t)D, w = 0;
    for (int k = 0; k < p->R; k++) {
        const size_t dim = k % 2 == 0 ? (size_t)D : (size_t)H;
        p->off_v[k] = off;
        p->off_s[k] = off + dim;
        p->off_w[k] = w;
        off += 2 * dim;
        w += (size_t)H * D;
    }
    p->S = off;
    const int blocks = (H + LSTM_BLOCK - 1) / LSTM_BLOCK;
    int want = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    want = want < blocks ? want : (blocks > 0 ? blocks : 1);
    /* Backward also packs a chunk's gate gradients: LSTM_CHUNK B rows of a member's (at most 4H) columns. */
    const size_t floats = mog_work_floats(H, D, p->R) + (size_t)LSTM_CHUNK * p->team.B * 4 * H;
    for (int m = 0; m < MAX_THREADS; m++)
        p->work[m] = NULL;
    for (int m = 0; m < want; m++)
        if (!(p->work[m] = malloc(sizeof(float) * floats)))
            return 1;
    return 0;
}

/* Sets up the job, runs fn over its team and frees its workspace: 0, or 1 when out of memory. */
static int mog_run(MogJob *p, void *(*fn)(void *), int threads) {
    const int failed = mog_setup(p, threads);
    if (!failed)
        run_team(fn, &p->team, threads);
    for (int m = 0; m < MAX_THREADS; m++)
        free(p->work[m]);
    return failed;
}

/* Records of S floats per step and row (see above): the caller allocates T * B * S for rec. */
size_t charloom_mog_record_floats(int H, int D, int R) {
    size_t s = (size_t)D;
    for (int k = 0; k < R; k++)
        s += 2 * (size_t)(k % 2 == 0 ? D : H);
    return s;
}

/* Forward over T steps of a Mogrifier LSTM with R (1..MOG_MAX_ROUNDS) rounds: ids (B, T), emb (V, D),
 * mog (round k's Q_k (D, H) or R_k (H, D) in a row), w_ih (4H, D), w_hh (4H, H) and bias (4H) with
 * rows in kernel order; h, c (B, H) hold the initial state and receive the last; out (T, B, H), acts
 * (T, B, 4H), cs (T, B, H) and rec (T, B, S) are kept for the backward pass. Returns 0, 1 when out of
 * memory, 2 for a round count out of range. */
int charloom_mog_forward(int B, int T, int H, int D, int V, int R, const int64_t *ids, const float *emb, const float *mog,
                         const float *w_ih, const float *w_hh, const float *bias, float *h, float *c, float *out,
                         float *acts, float *cs, float *rec, int threads) {
    if (R < 1 || R > MOG_MAX_ROUNDS)
        return 2;
    MogJob job;
    memset(&job, 0, sizeof job);
    job.team = (LstmJob){B, T, H, V, ids, NULL, NULL, NULL, NULL, h, c, out, acts, cs, NULL, NULL, NULL, NULL, NULL, 0, 0, {0, 0, 0}};
    job.D = D, job.R = R, job.emb = emb, job.mog = mog, job.w_ih = w_ih, job.w_hh = w_hh, job.bias = bias, job.rec = rec;
    return mog_run(&job, mog_forward_member, threads);
}

/* Backward from the forward's out, acts, cs and rec: dh, dc (B, H) hold the gradients of the last
 * state and receive those of the initial one; dout (T, B, H); g_w receives (H + D + 1, 4H): dW_hh^T,
 * dW_ih^T and db, columns in kernel order; g_mog the rounds' gradients laid out as mog; g_emb (V, D).
 * work holds LSTM_CHUNK B (4H + LSTM_PAD + H + D + 1) + 2 B max(H, D) + B D floats. Returns as the forward. */
int charloom_mog_backward(int B, int T, int H, int D, int V, int R, const int64_t *ids, const float *mog,
                          const float *w_ih, const float *w_hh, const float *out, const float *acts, const float *cs,
                          const float *rec, const float *h0, const float *c0, const float *dout, float *dh, float *dc,
                          float *g_w, float *g_mog, float *g_emb, float *work, int threads) {
    if (R < 1 || R > MOG_MAX_ROUNDS)
        return 2;
    MogJob job;
    memset(&job, 0, sizeof job);
    job.team = (LstmJob){B, T, H, V, ids, NULL, NULL, NULL, NULL, dh, dc, (float *)out, (float *)acts, (float *)cs,
                         h0, c0, dout, NULL, NULL, 0, 0, {0, 0, 0}};
    job.D = D, job.R = R, job.mog = mog, job.w_ih = w_ih, job.w_hh = w_hh, job.rec = (float *)rec;
    job.g_w = g_w, job.g_mog = g_mog, job.g_emb = g_emb;
    const size_t KC = (size_t)LSTM_CHUNK * B, P = H > D ? H : D;
    job.dgs = work;
    job.hp = job.dgs + KC * (4 * (size_t)H + LSTM_PAD);
    job.dpre = job.hp + KC * (H + D + 1);
    job.dx = job.dpre + 2 * B * P;
    for (size_t k = 0; k < KC; k++)
        job.hp[k * (H + D + 1) + H + D] = 1.0f;
    return mog_run(&job, mog_backward_member, threads);
}

int charloom_abi_version(void) { return 12; }

/* The widest vector instructions this build was compiled for, in bits: what `charloom.native.describe` reports. */
int charloom_vector_bits(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX2__) || defined(__AVX__)
    return 256;
#elif defined(__SSE2__) || defined(__ARM_NEON)
    return 128;
#else
    return 0;
#endif
}
