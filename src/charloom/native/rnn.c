/* charloom's native generation kernel: LSTM/GRU steps and temperature sampling for a few rows.
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
#include <stdint.h>
#include <string.h>

#define MAX_LAYERS 8
#define MAX_THREADS 8
#define MIN_ROWS_PER_THREAD 8 /* below this a thread costs more than it saves */

typedef struct {
    int32_t lstm;      /* 1 = LSTM (4 gates), 0 = GRU (3 gates) */
    int32_t layers, hidden, vocab;
    const float *table;                 /* (vocab, G*H) */
    const float *w_ih_t[MAX_LAYERS];    /* layer >= 1: (H, G*H) */
    const float *b_in[MAX_LAYERS];      /* layer >= 1: (G*H) */
    const float *w_hh_t[MAX_LAYERS];    /* (H, G*H) */
    const float *b_hh[MAX_LAYERS];      /* GRU: (G*H) */
    const float *head_w_t;              /* (H, V) */
    const float *head_b;                /* (V) */
    float *work;                        /* scratch: rows * (2 * G*H + 2) + MAX_THREADS * (V + 34) floats */
} Net;

typedef float v8 __attribute__((vector_size(32))); /* GCC/Clang vector extension: one AVX register */
static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

/* y[r, :] += x[r, :] @ w for r < rows; x (rows, k), w (k, n), y (rows, n).
 * Six rows at a time keep a 6 x 16 tile of y in twelve vector registers while k runs: each pair of
 * w vectors loaded feeds twelve multiply-adds (32 GMAC/s on our 2-core EPYC, twice a row-by-row loop).
 * Leftover rows (and a single row, the one-stream case) stream w front to back, four k at a time:
 * that is a matrix-vector product, bound by reading w. */
static void matmul_acc(int rows, int k, int n, const float *restrict x, const float *restrict w, float *restrict y) {
    const int n16 = n & ~15;
    int r = 0;
    for (; r + 6 <= rows; r += 6) {
        const float *x0 = x + (size_t)r * k, *x1 = x0 + k, *x2 = x1 + k, *x3 = x2 + k, *x4 = x3 + k, *x5 = x4 + k;
        float *y0 = y + (size_t)r * n, *y1 = y0 + n, *y2 = y1 + n, *y3 = y2 + n, *y4 = y3 + n, *y5 = y4 + n;
        for (int j = 0; j < n16; j += 16) {
            v8 c00 = load8(y0 + j), c01 = load8(y0 + j + 8), c10 = load8(y1 + j), c11 = load8(y1 + j + 8);
            v8 c20 = load8(y2 + j), c21 = load8(y2 + j + 8), c30 = load8(y3 + j), c31 = load8(y3 + j + 8);
            v8 c40 = load8(y4 + j), c41 = load8(y4 + j + 8), c50 = load8(y5 + j), c51 = load8(y5 + j + 8);
            const float *wp = w + j;
            for (int p = 0; p < k; p++, wp += n) {
                const v8 b0 = load8(wp), b1 = load8(wp + 8);
                float a;
                a = x0[p]; c00 += a * b0; c01 += a * b1;
                a = x1[p]; c10 += a * b0; c11 += a * b1;
                a = x2[p]; c20 += a * b0; c21 += a * b1;
                a = x3[p]; c30 += a * b0; c31 += a * b1;
                a = x4[p]; c40 += a * b0; c41 += a * b1;
                a = x5[p]; c50 += a * b0; c51 += a * b1;
            }
            store8(y0 + j, c00); store8(y0 + j + 8, c01); store8(y1 + j, c10); store8(y1 + j + 8, c11);
            store8(y2 + j, c20); store8(y2 + j + 8, c21); store8(y3 + j, c30); store8(y3 + j + 8, c31);
            store8(y4 + j, c40); store8(y4 + j + 8, c41); store8(y5 + j, c50); store8(y5 + j + 8, c51);
        }
        int j = n16;
        if (j + 8 <= n) { /* eight more columns as one vector (a 57-letter head: 48 + 8 + 1) */
            v8 c0 = load8(y0 + j), c1 = load8(y1 + j), c2 = load8(y2 + j), c3 = load8(y3 + j), c4 = load8(y4 + j),
               c5 = load8(y5 + j);
            const float *wp = w + j;
            for (int p = 0; p < k; p++, wp += n) {
                const v8 b = load8(wp);
                c0 += x0[p] * b; c1 += x1[p] * b; c2 += x2[p] * b; c3 += x3[p] * b; c4 += x4[p] * b; c5 += x5[p] * b;
            }
            store8(y0 + j, c0); store8(y1 + j, c1); store8(y2 + j, c2); store8(y3 + j, c3); store8(y4 + j, c4);
            store8(y5 + j, c5);
            j += 8;
        }
        for (; j < n; j++) /* the last n % 8 columns */
            for (int p = 0; p < k; p++) {
                const float b = w[(size_t)p * n + j];
                y0[j] += x0[p] * b; y1[j] += x1[p] * b; y2[j] += x2[p] * b;
                y3[j] += x3[p] * b; y4[j] += x4[p] * b; y5[j] += x5[p] * b;
            }
    }
    for (; r < rows; r++) {
        const float *x0 = x + (size_t)r * k;
        float *restrict y0 = y + (size_t)r * n;
        int p = 0;
        for (; p + 4 <= k; p += 4) {
            const float *w0 = w + (size_t)p * n, *w1 = w0 + n, *w2 = w1 + n, *w3 = w2 + n;
            const float a0 = x0[p], a1 = x0[p + 1], a2 = x0[p + 2], a3 = x0[p + 3];
            for (int j = 0; j < n; j++)
                y0[j] += a0 * w0[j] + a1 * w1[j] + a2 * w2[j] + a3 * w3[j];
        }
        for (; p < k; p++) {
            const float *w0 = w + (size_t)p * n;
            const float a0 = x0[p];
            for (int j = 0; j < n; j++)
                y0[j] += a0 * w0[j];
        }
    }
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

static inline float fast_sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }

/* tanh(x) = 1 - 2 / (exp(2x) + 1); near 0 that loses digits, so there use x - x^3/3 + 2x^5/15 - 17x^7/315. */
static inline float fast_tanh(float x) {
    const float big = 1.0f - 2.0f / (fast_exp(2.0f * x) + 1.0f);
    const float x2 = x * x;
    const float small = x * (1.0f + x2 * (-1.0f / 3.0f + x2 * (2.0f / 15.0f + x2 * (-17.0f / 315.0f))));
    return (x2 < 0.0025f) ? small : big;
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
            for (int r = 0; r < rows; r++) {
                float *g = proj + (size_t)r * GH, *hr = h + (size_t)r * H, *cr = c + (size_t)r * H;
                for (int j = 0; j < 3 * H; j++)
                    g[j] = fast_sigmoid(g[j]);
                for (int j = 3 * H; j < GH; j++)
                    g[j] = fast_tanh(g[j]);
                for (int j = 0; j < H; j++)
                    cr[j] = g[H + j] * cr[j] + g[j] * g[3 * H + j];
                for (int j = 0; j < H; j++)
                    hr[j] = g[2 * H + j] * fast_tanh(cr[j]);
            }
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

static void head(const Net *net, int rows, const float *h, float *logits) {
    const int V = net->vocab;
    for (int r = 0; r < rows; r++)
        memcpy(logits + (size_t)r * V, net->head_b, sizeof(float) * V);
    matmul_acc(rows, net->hidden, V, h, net->head_w_t, logits);
}

/* One step for `rows` rows: feed ids (rows,), write logits (rows, V). Returns 0, or -1 (and changes
 * nothing) when an id is outside [0, vocab). */
int charloom_rnn_step(const Net *net, int rows, const int64_t *ids, float *state, float *logits) {
    for (int r = 0; r < rows; r++)
        if (ids[r] < 0 || ids[r] >= net->vocab)
            return -1;
    const float *h;
    advance(net, rows, rows, ids, state, net->work, &h);
    head(net, rows, h, logits);
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
    const int V = net->vocab, GH = (net->lstm ? 4 : 3) * net->hidden, rows = p->rows;
    float *e = p->work + (size_t)rows * 2 * GH; /* (V) scratch after advance's two (rows, G*H) blocks */
    int64_t *ids = (int64_t *)(e + ((V + 17) & ~1)); /* (rows,), at an even float offset: 8-byte aligned */
    for (int i = 0; i < p->n; i++) {
        for (int r = 0; r < rows; r++) {
            const float *lg = p->logits + (size_t)r * V;
            float top = lg[0];
            for (int v = 1; v < V; v++)
                top = lg[v] > top ? lg[v] : top;
            const float t = p->temp[r];
            for (int v = 0; v < V; v++)
                e[v] = fast_exp((lg[v] - top) / t);
            double total = 0.0;
            for (int v = 0; v < V; v++)
                total += e[v];
            const double target = p->uniforms[(size_t)i * p->stride + r] * total;
            double run = 0.0;
            int64_t id = V - 1;
            for (int v = 0; v < V; v++) {
                run += e[v];
                if (run > target) {
                    id = v;
                    break;
                }
            }
            ids[r] = id;
            p->ids_out[(size_t)i * p->stride + r] = id;
        }
        if (i + 1 < p->n || p->feed_last) {
            const float *h;
            advance(net, rows, p->stride, ids, p->state, p->work, &h);
            head(net, rows, h, p->logits);
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
 * synchronisation between steps. Each range has its own slice of net->work (see WORK_FLOATS). */
void charloom_rnn_sample(const Net *net, int rows, float *state, float *logits, int n, const double *uniforms,
                         const float *temp, int feed_last, int64_t *ids_out, int threads) {
    const int V = net->vocab, GH = (net->lstm ? 4 : 3) * net->hidden, H = net->hidden;
    const size_t extra = (size_t)((V + 33) & ~1); /* per range: e (V) and alignment; even keeps ids 8-byte aligned */
    int parts = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    if (rows / parts < MIN_ROWS_PER_THREAD)
        parts = rows / MIN_ROWS_PER_THREAD > 0 ? rows / MIN_ROWS_PER_THREAD : 1;
    Part part[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int k = 0, r0 = 0; k < parts; k++) {
        const int r1 = rows * (k + 1) / parts;
        float *work = net->work + (size_t)r0 * (2 * GH + 2) + (size_t)k * extra;
        part[k] = (Part){net, r1 - r0, rows, n, feed_last, state + (size_t)r0 * H, logits + (size_t)r0 * V, work,
                         uniforms + r0, temp + r0, ids_out + r0};
        r0 = r1;
    }
    for (int k = 1; k < parts; k++)
        started[k] = pthread_create(&tid[k], NULL, sample_part, &part[k]) == 0;
    sample_part(&part[0]);
    for (int k = 1; k < parts; k++) {
        if (started[k])
            pthread_join(tid[k], NULL);
        else
            sample_part(&part[k]); /* no thread to be had: run it here */
    }
}

int charloom_abi_version(void) { return 3; }
