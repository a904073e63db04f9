/* Teams of threads for the training kernels (lstm.c, mogrifier.c): a job split among members that
 * meet at barriers between steps, and run_parts for independent ranges of rows (rnn.c). */
#ifndef CHARLOOM_TEAM_H
#define CHARLOOM_TEAM_H

#include "kernel.h"

/* A barrier for the threads of one call: spins, then yields (a step is ~0.1-1 ms, and on a loaded
 * machine a thread may wait for one that lost its core). */
typedef struct {
    int count, arrived, sense;
} Barrier;

static inline void barrier_wait(Barrier *b, int *local_sense) {
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
    float *work;                 /* backward: charloom_lstm_scratch_floats(B, H) floats */
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

/* fn(args[0]), ..., fn(args[n - 1]), each args[k] `size` bytes apart: the first on the caller's
 * thread, the others on new threads, all joined before returning (a part with no thread to be had
 * runs on the caller's). */
INTERNAL void run_parts(void *(*fn)(void *), char *args, size_t size, int n);

/* Waits until the team is complete; returns the member's job and sets its hidden units [u0, u1):
 * a share of the LSTM_BLOCK-unit blocks. */
INTERNAL LstmJob *member_start(void *arg, int *m, int *u0, int *u1);

/* The most members a team for job can have with `threads` threads: no more than there are blocks of
 * units, or (by rows) than there are rows for MIN_ROWS_PER_THREAD each. */
INTERNAL int team_limit(const LstmJob *job, int threads);

/* Run fn for a team of up to team_limit members (the caller's thread and new ones): the team's size
 * is fixed once its threads have started, so a thread that cannot be created only makes the team
 * smaller. */
INTERNAL void run_team(void *(*fn)(void *), LstmJob *job, int threads);

#endif
