/* Generation: LSTM/GRU (and Mogrifier) steps and temperature sampling for batches of rows.
 *
 * Built with the other kernel files on first use (charloom/kernels/native/build.py) and loaded with
 * ctypes; without a compiler charloom uses its numpy and torch paths instead.
 * The maths is exactly RecurrentStepper.step (charloom/generation/steppers.py) and noise.draw:
 *
 *   layer 0:  proj = table[id]                       (V, G*H): W_ih x + b_ih (+ b_hh for an LSTM)
 *   layer l:  proj = b_in + x @ w_ih_t               (H, G*H)
 *   LSTM:     gates = proj + h @ w_hh_t, order (i, f, o, g); c = f*c + i*g; h = o*tanh(c)
 *   GRU:      gh = b_hh + h @ w_hh_t, order (r, z, n); n = tanh(proj_n + r*gh_n); h = n + z*(h - n)
 *   logits = b + h @ head_w_t                         (H, V)
 *   draw:     e = exp((logits - max) / T); first id whose float64 running sum exceeds u * sum(e)
 *
 * All matrices are float32, row-major, contiguous. State is (slots, rows, H): for an LSTM the
 * slots are h of every layer then c of every layer, for a GRU h of every layer. */
#include "team.h"
#include "tiles.h"

/* y (rows, n) += x (rows, k) @ w (k, n): from the panels wp where there are several rows and wp is set
 * (NativeStepper packs them for steppers of more than TILE_ROWS rows).
 * Panels keep each 16-column block's k rows on consecutive cache lines: read from a row-major w whose rows
 * are 2 KB apart (an LSTM(128)'s 4H = 512 floats), a block's rows share two L1 sets and are fetched
 * from L2 again by every 6-row tile. The order of the sums is the same either way. */
static void product(int rows, int k, int n, const float *x, const float *w, const float *wp, float *y) {
    if (wp && rows > 1)
        matmul_panels(rows, k, n, x, (size_t)k, 1, wp, y, (size_t)n);
    else
        matmul_acc(rows, k, n, x, w, y);
}

/* A Mogrifier layer's rounds for `rows` rows: x (rows, E) and h (rows, H) gated in place, each round
 * from the other; s (rows, max(E, H)) is scratch (see mogrifier.c for the maths). */
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
            product(rows, H, GH, hm, net->w_hh_t[l], net->w_hh_p[l], proj);
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
            product(rows, H, GH, x, net->w_ih_t[l], net->w_ih_p[l], proj);
        }
        if (net->lstm) {
            float *c = state + (size_t)(L + l) * stride * H;
            product(rows, H, GH, h, net->w_hh_t[l], net->w_hh_p[l], proj); /* proj now holds the gates */
            for (int r = 0; r < rows; r++)
                lstm_cell(proj + (size_t)r * GH, c + (size_t)r * H, c + (size_t)r * H, h + (size_t)r * H, H);
        } else {
            for (int r = 0; r < rows; r++)
                memcpy(gates + (size_t)r * GH, net->b_hh[l], sizeof(float) * GH);
            product(rows, H, GH, h, net->w_hh_t[l], net->w_hh_p[l], gates);
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
    product(rows, net->hidden, Vp, h, net->head_w_t, net->head_w_p, wide);
    for (int r = 0; r < rows; r++)
        memcpy(logits + (size_t)r * V, wide + (size_t)r * Vp, sizeof(float) * V);
}

/* Scratch layout of one range of `rows` rows (see Net.work): advance's two (rows, G*H) blocks, the
 * head's (rows, Vp), then per range the draw's exponentials (DRAW_ROWS, V) floats, CDFs (DRAW_ROWS, V)
 * doubles and ids (rows int64). */
static float *head_scratch(const Net *net, float *work, int rows) {
    return work + (size_t)rows * 2 * (net->lstm ? 4 : 3) * net->hidden;
}

/* Per range of rows, beyond advance's and the head's blocks: the draw's exponentials (DRAW_ROWS, V)
 * floats and CDFs (DRAW_ROWS, V) doubles, and the ids (rows int64, within the 2 floats a row the
 * blocks leave); even, so the doubles stay aligned. */
static size_t draw_scratch_floats(int vocab) { return (size_t)((3 * DRAW_ROWS * vocab + 35) & ~1); }

int charloom_rnn_vocab_padded(int vocab) { return (vocab + HEAD_ALIGN - 1) / HEAD_ALIGN * HEAD_ALIGN; }

/* Floats of Net.work for `rows` rows: each range's advance, head and ids ((rows, 2 G*H + Vp + 2) in
 * all), and the draws' scratch of up to MAX_THREADS ranges (see charloom_rnn_sample). */
size_t charloom_rnn_scratch_floats(int lstm, int hidden, int vocab, int rows) {
    const size_t gh = (size_t)(lstm ? 4 : 3) * hidden;
    return (size_t)rows * (2 * gh + (size_t)charloom_rnn_vocab_padded(vocab) + 2) + MAX_THREADS * draw_scratch_floats(vocab);
}

/* STATUS_BAD_SHAPE unless net's dimensions are ones its arrays were laid out for (the Python side
 * checks each array against them: NativeStepper) and its work holds `rows` rows; else 0. */
static int net_unfit(const Net *net, int rows) {
    if (rows < 1 || net->layers < 1 || net->layers > MAX_LAYERS || net->hidden < 1 || net->vocab < 1
        || net->vocab_padded != charloom_rnn_vocab_padded(net->vocab) || net->mog_in > net->hidden || net->mog_in < 0)
        return STATUS_BAD_SHAPE;
    for (int l = 0; l < net->layers; l++)
        if (net->mog_rounds[l] < 0 || (net->mog_rounds[l] && !net->lstm))
            return STATUS_BAD_SHAPE;
    return charloom_rnn_scratch_floats(net->lstm, net->hidden, net->vocab, rows) > net->work_floats ? STATUS_SHORT : 0;
}

/* The elements a state of `rows` rows holds: (slots, rows, H), slots = layers (GRU) or 2 layers (LSTM). */
static size_t state_floats(const Net *net, int rows) {
    return sat_mul(sat_mul((size_t)net->layers * (net->lstm ? 2 : 1), (size_t)rows), (size_t)net->hidden);
}

/* One step for `rows` rows: feed ids (rows,), write logits (rows, V); `have` counts ids, state and
 * logits. Returns 0 or a STATUS_* (and changes nothing). */
int charloom_rnn_step(const Net *net, int rows, const int64_t *ids, float *state, float *logits, const size_t *have) {
    int bad = net_unfit(net, rows);
    if (bad)
        return bad;
    const size_t need[] = {(size_t)rows, state_floats(net, rows), sat_mul((size_t)rows, (size_t)net->vocab)};
    if ((bad = buffers_short(need, have, 3)) || (bad = ids_outside(ids, (size_t)rows, net->vocab)))
        return bad;
    const float *h;
    advance(net, rows, rows, ids, state, net->work, &h);
    head(net, rows, h, head_scratch(net, net->work, rows), logits);
    return 0;
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
 * synchronisation between steps. Each range has its own slice of net->work (see head_scratch). `have`
 * counts state, logits, uniforms, temp and ids_out. Returns 0 or a STATUS_* (and changes nothing). */
int charloom_rnn_sample(const Net *net, int rows, float *state, float *logits, int n, const double *uniforms,
                        const float *temp, int feed_last, int64_t *ids_out, int threads, const size_t *have) {
    int bad = net_unfit(net, rows);
    if (bad || n < 0)
        return bad ? bad : STATUS_BAD_SHAPE;
    const size_t drawn = sat_mul((size_t)n, (size_t)rows);
    const size_t need[] = {state_floats(net, rows), sat_mul((size_t)rows, (size_t)net->vocab), drawn, (size_t)rows, drawn};
    if ((bad = buffers_short(need, have, 5))) /* state, logits, uniforms, temp, ids_out */
        return bad;
    const int V = net->vocab, GH = (net->lstm ? 4 : 3) * net->hidden, H = net->hidden, Vp = net->vocab_padded;
    const size_t extra = draw_scratch_floats(V);
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
    return 0;
}
