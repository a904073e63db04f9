/* Training: an LSTM layer over one-hot input, forward and backward.
 *
 * The input part of the gates is column ids[b, t] of W_ih (the one-hot product), read as row
 * ids[b, t] of w_ih_t (V, 4H), plus bias = b_ih + b_hh:
 *   gates = w_ih_t[id] + bias + h @ w_hh_t, then lstm_cell
 * (an embedding E before the layer is the one-hot table W_ih E^T; the caller builds it). The backward
 * pass produces every gradient (W_ih, W_hh, the bias, the initial state), so a training step runs no
 * large torch op whose worker threads would then spin on the cores these threads use.
 *
 * Gate columns come in blocks of LSTM_BLOCK hidden units, each block's gates in the order (i, f, o, g)
 * (the caller reorders torch's rows: kernel_order in kernels/native/lstm.py): block b holds columns
 * [4 LSTM_BLOCK b, 4 LSTM_BLOCK (b + 1)), and only the last block may be narrower. For a large H the
 * threads split the hidden units, whole blocks each: a thread computes its units' gates for every row,
 * so it reads only its share of the recurrent weights at every step (split by rows, every thread read
 * all of them, and at H = 512 the 4 MB per step per thread made two threads barely faster than one),
 * and its share of every weight gradient is its own (no partial sums to add up). Steps meet at a
 * barrier, since step t + 1 needs all of h_t. For a small H they split the rows (see lstm_by_rows).
 * out, acts, cs and dout are time-major, (T, B, .): a step's rows lie together, so its products read
 * and write whole blocks, not rows a sequence's length apart (with (B, T, .) rows, the default
 * recipe's 4H-wide gates were 512 KB apart: a product into them ran ~20% slower). */

#include "team.h"
#include "tiles.h"

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
 * their columns in blocks (see above), w_hh (4H, H) its rows; `have` counts the elements of the 9 buffers
 * (see buffers_short). Returns 0 or a STATUS_* (nothing is written then). */
int charloom_lstm_forward(int B, int T, int H, int V, const int64_t *ids, const float *w_ih_t, const float *bias,
                          const float *w_hh, float *h, float *c, float *out, float *acts, float *cs, int threads,
                          const size_t *have) {
    if (B < 1 || T < 0 || H < 1 || V < 1)
        return STATUS_BAD_SHAPE;
    const size_t G = sat_mul(4, (size_t)H), BH = sat_mul((size_t)B, (size_t)H), TBH = sat_mul((size_t)T, BH);
    const size_t need[] = {sat_mul((size_t)B, (size_t)T), sat_mul((size_t)V, G), G, sat_mul(G, (size_t)H), BH, BH, TBH,
                           sat_mul(TBH, 4), TBH}; /* ids, w_ih_t, bias, w_hh, h, c, out, acts, cs */
    int bad = buffers_short(need, have, 9);
    if (bad || (bad = ids_outside(ids, need[0], V)))
        return bad;
    LstmJob job = {B, T, H, V, ids, w_ih_t, bias, w_hh, NULL, h, c, out, acts, cs, NULL, NULL, NULL, NULL, NULL, 0, 0,
                   {0, 0, 0}, lstm_by_rows(B, H, V, threads), NULL};
    const int copies = job.by_rows ? team_limit(&job, threads) : 1; /* of the packed w_hh^T */
    job.packed = malloc(sizeof(float) * (size_t)H * 4 * H * copies);
    if (!job.packed)
        return STATUS_NO_MEMORY;
    run_team(lstm_forward_member, &job, threads);
    free(job.packed);
    return 0;
}

/* Backward over T steps from the forward's out, acts and cs: dh, dc (B, H) hold the gradients of the
 * last state and receive those of the initial one; dout is the gradient of out, row r of step t at
 * dout + t * dout_ts + r * dout_rs (so (T, B, H) or (B, T, H) alike), or NULL where nothing read
 * out (the book's objective reads only the last state: no (B, T, H) of zeros to write and read); grads
 * receives dW_ih^T (V, 4H), dW_hh^T (H, 4H) and db (4H), in that order, columns in blocks; w_hh is
 * (4H, H), rows in blocks; work holds charloom_lstm_scratch_floats(B, H) floats; `have` counts the
 * elements of the 12 buffers, dout's from its first. Returns 0 or a STATUS_* (nothing is written then). */
int charloom_lstm_backward(int B, int T, int H, int V, const int64_t *ids, const float *w_hh, const float *out,
                           const float *acts, const float *cs, const float *h0, const float *c0, const float *dout,
                           size_t dout_ts, size_t dout_rs, float *dh, float *dc, float *grads, float *work, int threads,
                           const size_t *have) {
    if (B < 1 || T < 0 || H < 1 || V < 1)
        return STATUS_BAD_SHAPE;
    const size_t G4 = sat_mul(4, (size_t)H), BH = sat_mul((size_t)B, (size_t)H), TBH = sat_mul((size_t)T, BH);
    /* dout's last element: row B - 1 of step T - 1, H wide (none without dout or steps) */
    const size_t dout_end = !dout || !T ? 0 : sat_add(sat_add(sat_mul((size_t)T - 1, dout_ts),
                                                              sat_mul((size_t)B - 1, dout_rs)), (size_t)H);
    const size_t need[] = {sat_mul((size_t)B, (size_t)T), sat_mul(G4, (size_t)H), TBH, sat_mul(TBH, 4), TBH, BH, BH,
                           dout_end, BH, BH, sat_mul(sat_add(sat_add((size_t)V, (size_t)H), 1), G4),
                           charloom_lstm_scratch_floats(B, H)}; /* ids ... work, in the order of the arguments */
    int bad = buffers_short(need, have, 12);
    if (bad || (bad = ids_outside(ids, need[0], V)))
        return bad;
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
        return STATUS_NO_MEMORY;
    }
    job.dout = dout ? dout : zeros;
    job.dout_ts = dout ? dout_ts : 0;
    job.dout_rs = dout ? dout_rs : 0;
    const size_t K = (size_t)LSTM_CHUNK * B;
    float *hp = work + K * (4 * (size_t)H + LSTM_PAD); /* after the chunk's gate gradients; see charloom_lstm_scratch_floats */
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

/* Floats of charloom_lstm_backward's work: a chunk's gate gradients (LSTM_CHUNK B, 4H + LSTM_PAD), then
 * the h_{t-1} that fed them, each followed by a 1 (LSTM_CHUNK B, H + 1). */
size_t charloom_lstm_scratch_floats(int B, int H) {
    const size_t K = (size_t)LSTM_CHUNK * B;
    return K * (4 * (size_t)H + LSTM_PAD) + K * ((size_t)H + 1);
}
