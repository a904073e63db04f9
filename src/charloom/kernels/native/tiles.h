/* Matrix products in register tiles: y += x @ w with x read through strides (rows or a transpose),
 * w row-major (matmul_strided) or packed into 16-column panels (pack_panels, matmul_panels).
 * Defined static in a header so each kernel file gets its own copies, specialised for its call
 * sites (GCC clones them for an x column stride of 1) as when they shared one file. */
#ifndef CHARLOOM_TILES_H
#define CHARLOOM_TILES_H

#include "fastmath.h"

/* y[rows, j : j + 8C] += x[rows, :] @ w[:, j : j + 8C] for R consecutive rows; x (rows, k) has element
 * (r, p) at x[r * xr + p * xc] (xc = 1 for rows in memory, xr = 1 for a transposed x), w (k, n) and
 * y (rows, n) have rows ldw and ldy floats apart. The R x 8C tile of y stays in
 * 2..12 vector registers while k runs, so each w vector loaded feeds R multiply-adds. R and C are
 * constants at every call site: always_inline lets the compiler unroll both loops and keep `acc` in
 * registers. */
static inline __attribute__((always_inline)) void tile(const int R, const int C, int k, const float *restrict x, size_t xr,
                                                       size_t xc, const float *restrict w, size_t ldw,
                                                       float *restrict y, size_t ldy) {
    v8 acc[TILE_ROWS][4];
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
    for (; r + TILE_ROWS <= rows; r += TILE_ROWS)
        tile(TILE_ROWS, C, k, x + r * xr, xr, xc, w, ldw, y + r * ldy, ldy);
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
    v16 acc[TILE_ROWS][4];
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
    for (; r + TILE_ROWS <= rows; r += TILE_ROWS)
        panel_tile(TILE_ROWS, C, k, x + r * xr, xr, xc, wp, ps, y + r * ldy, ldy);
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

#endif
