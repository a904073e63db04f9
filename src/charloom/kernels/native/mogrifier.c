/* Training: a Mogrifier LSTM layer over an embedding, forward and backward.
 *
 * Melis, Kočiský & Blunsom (2019, "Mogrifier LSTM"): before the LSTM step, R rounds let the input
 * x (D, from the embedding) and the previous output h (H) gate each other, round k = 0, 1, ...:
 *   k even: s_k = sigmoid(Q_k h), x = 2 s_k * x     Q_k (D, H)
 *   k odd:  s_k = sigmoid(R_k x), h = 2 s_k * h     R_k (H, D)
 *   gates = bias + W_ih x + W_hh h (both the last versions), then lstm_cell.
 * The threads split the work as the LSTM kernel (lstm.c) does: hidden units (whole blocks, with their
 * gate columns), and here also the D input features, in even shares. Each round's outputs are a
 * member's own; the next round reads all of them, so the rounds meet at a barrier each.
 * Every round's vector and sigmoid are kept, per step and row, in a record of S floats:
 *   x0 (D), then for each round k: v_k (dim_k), s_k (dim_k), dim_k = D for even k, H for odd.
 * The backward pass runs the rounds in reverse; sums over the other vector's features (dh += dpre Q_k,
 * dx += dpre R_k) read every member's dpre, after a barrier. */

#include "team.h"
#include "tiles.h"


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

/* Sets a job's record layout and round offsets, allocates its members' workspace; STATUS_NO_MEMORY when out of memory. */
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
            return STATUS_NO_MEMORY;
    return 0;
}

/* Sets up the job, runs fn over its team and frees its workspace: 0, or STATUS_NO_MEMORY. */
static int mog_run(MogJob *p, void *(*fn)(void *), int threads) {
    const int failed = mog_setup(p, threads);
    if (!failed)
        run_team(fn, &p->team, threads);
    for (int m = 0; m < MAX_THREADS; m++)
        free(p->work[m]);
    return failed;
}

/* Floats of the rounds' matrices, R of H * D each. */
static size_t mog_floats(int H, int D, int R) { return sat_mul(sat_mul((size_t)R, (size_t)H), (size_t)D); }

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
 * (T, B, 4H), cs (T, B, H) and rec (T, B, S) are kept for the backward pass; `have` counts the elements of
 * the 12 buffers (see buffers_short). Returns 0 or a STATUS_* (nothing is written then). */
int charloom_mog_forward(int B, int T, int H, int D, int V, int R, const int64_t *ids, const float *emb, const float *mog,
                         const float *w_ih, const float *w_hh, const float *bias, float *h, float *c, float *out,
                         float *acts, float *cs, float *rec, int threads, const size_t *have) {
    if (B < 1 || T < 0 || H < 1 || D < 1 || V < 1 || R < 1 || R > MOG_MAX_ROUNDS)
        return STATUS_BAD_SHAPE;
    const size_t G = sat_mul(4, (size_t)H), BH = sat_mul((size_t)B, (size_t)H), TBH = sat_mul((size_t)T, BH);
    const size_t need[] = {sat_mul((size_t)B, (size_t)T), sat_mul((size_t)V, (size_t)D), mog_floats(H, D, R),
                           sat_mul(G, (size_t)D), sat_mul(G, (size_t)H), G, BH, BH, TBH, sat_mul(TBH, 4), TBH,
                           sat_mul(sat_mul((size_t)T, (size_t)B), charloom_mog_record_floats(H, D, R))};
    int bad = buffers_short(need, have, 12); /* ids, emb, mog, w_ih, w_hh, bias, h, c, out, acts, cs, rec */
    if (bad || (bad = ids_outside(ids, need[0], V)))
        return bad;
    MogJob job;
    memset(&job, 0, sizeof job);
    job.team = (LstmJob){B, T, H, V, ids, NULL, NULL, NULL, NULL, h, c, out, acts, cs, NULL, NULL, NULL, NULL, NULL, 0, 0, {0, 0, 0}};
    job.D = D, job.R = R, job.emb = emb, job.mog = mog, job.w_ih = w_ih, job.w_hh = w_hh, job.bias = bias, job.rec = rec;
    return mog_run(&job, mog_forward_member, threads);
}

/* Backward from the forward's out, acts, cs and rec: dh, dc (B, H) hold the gradients of the last
 * state and receive those of the initial one; dout (T, B, H); g_w receives (H + D + 1, 4H): dW_hh^T,
 * dW_ih^T and db, columns in kernel order; g_mog the rounds' gradients laid out as mog; g_emb (V, D).
 * work holds charloom_mog_scratch_floats(B, H, D) floats; `have` counts the 17 buffers'. Returns as the forward. */
int charloom_mog_backward(int B, int T, int H, int D, int V, int R, const int64_t *ids, const float *mog,
                          const float *w_ih, const float *w_hh, const float *out, const float *acts, const float *cs,
                          const float *rec, const float *h0, const float *c0, const float *dout, float *dh, float *dc,
                          float *g_w, float *g_mog, float *g_emb, float *work, int threads, const size_t *have) {
    if (B < 1 || T < 0 || H < 1 || D < 1 || V < 1 || R < 1 || R > MOG_MAX_ROUNDS)
        return STATUS_BAD_SHAPE;
    const size_t G = sat_mul(4, (size_t)H), BH = sat_mul((size_t)B, (size_t)H), TBH = sat_mul((size_t)T, BH);
    const size_t need[] = {sat_mul((size_t)B, (size_t)T), mog_floats(H, D, R), sat_mul(G, (size_t)D),
                           sat_mul(G, (size_t)H), TBH, sat_mul(TBH, 4), TBH,
                           sat_mul(sat_mul((size_t)T, (size_t)B), charloom_mog_record_floats(H, D, R)), BH, BH, TBH, BH,
                           BH, sat_mul((size_t)H + D + 1, G), mog_floats(H, D, R), sat_mul((size_t)V, (size_t)D),
                           charloom_mog_scratch_floats(B, H, D)};
    /* ids, mog, w_ih, w_hh, out, acts, cs, rec, h0, c0, dout, dh, dc, g_w, g_mog, g_emb, work */
    int bad = buffers_short(need, have, 17);
    if (bad || (bad = ids_outside(ids, need[0], V)))
        return bad;
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

/* Floats of charloom_mog_backward's work, in its order: the chunk's gate gradients (LSTM_CHUNK B,
 * 4H + LSTM_PAD), the [h, x, 1] that fed them (LSTM_CHUNK B, H + D + 1), two rounds' pre-activation
 * gradients (2, B, max(H, D)) and dx (B, D). */
size_t charloom_mog_scratch_floats(int B, int H, int D) {
    const size_t KC = (size_t)LSTM_CHUNK * B, P = H > D ? H : D;
    return KC * (4 * (size_t)H + LSTM_PAD) + KC * ((size_t)H + D + 1) + 2 * (size_t)B * P + (size_t)B * D;
}
