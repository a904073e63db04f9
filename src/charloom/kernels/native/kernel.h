/* charloom's native kernels, shared declarations: the constants Python reads back (charloom_constant in
 * abi.c), the generation network (Net), and the functions one file calls in another.
 *
 * The sources, joined by one compiler call (charloom/kernels/native/build.py):
 *   kernel.h    this header              fastmath.h  vector types, exp, tanh, sigmoid, LSTM cells
 *   tiles.h     register-tiled products  rnn.c       generation: steps and temperature draws
 *   team.h/.c   threads and barriers     lstm.c      training: an LSTM layer over one-hot input
 *   mogrifier.c training: a Mogrifier LSTM layer       abi.c       the ABI version, constants, sizes
 */
#ifndef CHARLOOM_KERNEL_H
#define CHARLOOM_KERNEL_H

#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Raise it whenever an exported function, Net or a constant's meaning changes: Python refuses a library
 * that reports another version (kernels/native/build.py holds the version it speaks). */
#define ABI_VERSION 15

#define MAX_LAYERS 8
#define MAX_THREADS 8
#define MIN_ROWS_PER_THREAD 8 /* below this a thread costs more than it saves */
#define DRAW_ROWS 4           /* rows drawn together (see sample_part) */
#define HEAD_ALIGN 8          /* the head's columns are padded to a multiple of this: whole 8-float tiles */
#define TILE_ROWS 6           /* rows of y one register tile of tiles.h holds (its sums stay in registers) */
#define LSTM_CHUNK 4          /* training: steps per weight-gradient product (see lstm_backward_member) */
#define LSTM_PAD 8            /* training: floats added to the row stride of the gate gradients (see matmul_strided) */
#define LSTM_BLOCK 16         /* training: hidden units per block of gate columns, a panel of pack_panels */
#define LSTM_ROWS_MAX_H 128   /* the largest hidden size whose training splits rows among threads (lstm_by_rows) */
#define LSTM_ROWS_MAX_V 1024  /* ... and the largest vocabulary (each thread keeps a (V, 4H) gradient) */
#define MOG_MAX_ROUNDS 8      /* training: the most Mogrifier rounds the kernel keeps records for */

/* What the entry points return (Python reads them through charloom_constant and names each). */
#define STATUS_OK 0
#define STATUS_NO_MEMORY 1  /* no memory for packed weights: nothing is written */
#define STATUS_BAD_SHAPE 2  /* a dimension out of range (negative, or Mogrifier rounds outside 1..MOG_MAX_ROUNDS) */
#define STATUS_SHORT 3      /* a buffer holds fewer elements than the dimensions need: nothing is read or written */
#define STATUS_BAD_ID 4     /* a token id outside [0, V): nothing is written */

/* A function one source file defines for another: not exported from the library. */
#define INTERNAL __attribute__((visibility("hidden")))

/* Every entry point takes, last, `have`: the element count of each buffer it was given, in the order of
 * its pointer arguments (`n` of them), and checks them against what its dimensions need before it
 * touches any: a crafted shape (a resumed state of another batch, a hostile checkpoint) must never
 * reach memory the caller does not own. STATUS_SHORT when one is short (or have is NULL), else 0. */
INTERNAL int buffers_short(const size_t *need, const size_t *have, int n);
/* STATUS_BAD_ID when one of the n ids lies outside [0, V), else 0. */
INTERNAL int ids_outside(const int64_t *ids, size_t n, int V);

/* a * b and a + b, or SIZE_MAX where they overflow: a need that overflows exceeds any buffer. */
static inline size_t sat_mul(size_t a, size_t b) {
    size_t r;
    return __builtin_mul_overflow(a, b, &r) ? SIZE_MAX : r;
}
static inline size_t sat_add(size_t a, size_t b) {
    size_t r;
    return __builtin_add_overflow(a, b, &r) ? SIZE_MAX : r;
}

typedef struct {
    int32_t lstm;      /* 1 = LSTM (4 gates), 0 = GRU (3 gates) */
    int32_t layers, hidden, vocab;
    int32_t vocab_padded;               /* columns of head_w_t and head_b: charloom_rnn_vocab_padded(vocab) */
    const float *table;                 /* (vocab, G*H) */
    const float *w_ih_t[MAX_LAYERS];    /* layer >= 1: (H, G*H) */
    const float *b_in[MAX_LAYERS];      /* layer >= 1: (G*H) */
    const float *w_hh_t[MAX_LAYERS];    /* (H, G*H) */
    const float *b_hh[MAX_LAYERS];      /* GRU: (G*H) */
    const float *head_w_t;              /* (H, Vp), zero beyond column V: every column block a full tile */
    const float *head_b;                /* (Vp) */
    float *work;                        /* scratch: charloom_rnn_scratch_floats(lstm, hidden, vocab, rows) floats */
    /* Mogrifier layers (LSTM only; see mogrifier.c): rounds before the step, 0 for none.
     * Layer 0 with rounds reads embed (V, E) rows and w_ih_t[0] (E, 4H), b_in[0], not the table. */
    int32_t mog_rounds[MAX_LAYERS];
    int32_t mog_in;                     /* E: layer 0's input width, at most H (its scratch fits in the gates block) */
    const float *embed;                 /* (V, E) */
    const float *mog_t[MAX_LAYERS];     /* the rounds' matrices transposed, in a row: Q_k^T (H, E_l), R_k^T (E_l, H) */
    size_t work_floats;                 /* floats at work: the most rows a call may step is what they hold */
    /* The same matrices in pack_panels' layout (tiles.h), or NULL: products of more than TILE_ROWS rows
     * read these (see rnn.c's product), smaller ones the row-major matrices above. */
    const float *w_ih_p[MAX_LAYERS];    /* layer >= 1: w_ih_t as panels */
    const float *w_hh_p[MAX_LAYERS];    /* w_hh_t as panels */
    const float *head_w_p;              /* head_w_t as panels */
} Net;

/* The scratch sizes, in floats, that Python allocates: each defined beside the layout it sizes. */
int charloom_rnn_vocab_padded(int vocab);
size_t charloom_rnn_scratch_floats(int lstm, int hidden, int vocab, int rows);
size_t charloom_lstm_scratch_floats(int B, int H);
size_t charloom_mog_scratch_floats(int B, int H, int D);
size_t charloom_mog_record_floats(int H, int D, int R);


#endif
