/* Few rows times a packed float32 weight matrix: the linear layers of a decode step on a CPU.

   A decode step multiplies a handful of rows (one token per sequence) by every weight matrix, so
   its cost is reading the weights. The weights are packed once per rollout, TILE outputs side by
   side for each input index k ([tiles][K][TILE]), so that a tile streams through memory in one
   sequential read and every weight loaded is used for up to ROWS rows held in registers. Each
   output is summed over k in order, whatever the thread count. Built by mlx_dpo/_platform/cc.py
   for the machine it runs on; called through mlx_dpo/compute/kernel.py. */

#include <math.h>
#include <stddef.h>
#include <stdlib.h>

typedef float vf __attribute__((vector_size(32), aligned(4))); /* 8 floats, unaligned loads */

#ifdef __AVX512F__
#define VECS 3 /* 8 rows x 3 vectors: 24 accumulators of AVX-512's 32 registers */
#else
#define VECS 1 /* 8 accumulators: room in AVX2's or NEON's 16 */
#endif
#define TILE (8 * VECS)
#define ROWS 8

int tile_width(void) { return TILE; }

static void tile(const float *restrict x, int rows, int K, const float *restrict wp, float *restrict y, int n_out, int width) {
    vf acc[ROWS][VECS];
    for (int r = 0; r < ROWS; r++)
        for (int v = 0; v < VECS; v++) acc[r][v] = (vf){0};
    for (int k = 0; k < K; k++) {
        vf w[VECS];
        for (int v = 0; v < VECS; v++) w[v] = *(const vf *)(wp + (size_t)k * TILE + 8 * v);
        for (int r = 0; r < ROWS; r++) {
            float xr = r < rows ? x[(size_t)r * K + k] : 0.0f;
            for (int v = 0; v < VECS; v++) acc[r][v] += xr * w[v];
        }
    }
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < width; j++) y[(size_t)r * n_out + j] = acc[r][j / 8][j % 8];
}

/* y (rows, n_out) = x (rows, K) times the packed weight's transpose. */
void rows_matmul(const float *x, const float *wp, float *y, int rows, int K, int n_out, int threads) {
    int tiles = (n_out + TILE - 1) / TILE;
    (void)threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < tiles; t++) {
        int width = n_out - t * TILE < TILE ? n_out - t * TILE : TILE;
        for (int r = 0; r < rows; r += ROWS)
            tile(x + (size_t)r * K, rows - r < ROWS ? rows - r : ROWS, K, wp + (size_t)t * K * TILE,
                 y + (size_t)r * n_out + (size_t)t * TILE, n_out, width);
    }
}

/* out = pack(w + scale * (a b)^T): w (n_out, K); a (K, rank) and b (rank, n_out) are a LoRA
   adapter's lora_a and lora_b (rank 0: w alone). Outputs past n_out in the last tile are zero. */
void pack(const float *restrict w, const float *restrict a, const float *restrict b, float scale, int rank, int n_out,
          int K, float *restrict out, int threads) {
    int tiles = (n_out + TILE - 1) / TILE;
    (void)threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < tiles; t++) {
        int width = n_out - t * TILE < TILE ? n_out - t * TILE : TILE;
        float *dst = out + (size_t)t * K * TILE;
        const float *wt = w + (size_t)t * TILE * K;
        for (int k0 = 0; k0 < K; k0 += 16) { /* 16 k at a time: one cache line of each weight row */
            int k1 = k0 + 16 < K ? k0 + 16 : K;
            for (int j = 0; j < width; j++)
                for (int k = k0; k < k1; k++) dst[(size_t)k * TILE + j] = wt[(size_t)j * K + k];
            for (int j = width; j < TILE; j++)
                for (int k = k0; k < k1; k++) dst[(size_t)k * TILE + j] = 0.0f;
        }
        if (rank == 0 || width < TILE) {
            for (int k = 0; k < K && rank > 0; k++) /* the last, narrower tile: plainly */
                for (int r = 0; r < rank; r++)
                    for (int j = 0; j < width; j++) dst[(size_t)k * TILE + j] += scale * a[(size_t)k * rank + r] * b[(size_t)r * n_out + (size_t)t * TILE + j];
            continue;
        }
        for (int k = 0; k < K; k++) { /* the adapter's row k, accumulated in registers */
            vf acc[VECS];
            for (int v = 0; v < VECS; v++) acc[v] = *(vf *)(dst + (size_t)k * TILE + 8 * v);
            for (int r = 0; r < rank; r++) {
                float ar = scale * a[(size_t)k * rank + r];
                for (int v = 0; v < VECS; v++) acc[v] += ar * *(const vf *)(b + (size_t)r * n_out + (size_t)t * TILE + 8 * v);
            }
            for (int v = 0; v < VECS; v++) *(vf *)(dst + (size_t)k * TILE + 8 * v) = acc[v];
        }
    }
}

/* ---- The rest of a decode step (compute/host_decode.py): a few rows, so plain loops. ---- */

static float dot(const float *restrict a, const float *restrict b, int n) {
    vf acc = {0};
    int i = 0;
    for (; i + 8 <= n; i += 8) acc += *(const vf *)(a + i) * *(const vf *)(b + i);
    float s = 0.0f;
    for (int j = 0; j < 8; j++) s += acc[j];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* out (rows, n) = x / sqrt(mean(x^2) + eps) * w, row by row (RMSNorm; also per head). */
void rms_norm(const float *x, const float *w, float eps, int rows, int n, float *out) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * n;
        float inv = 1.0f / sqrtf(dot(xr, xr, n) / n + eps);
        for (int i = 0; i < n; i++) out[(size_t)r * n + i] = xr[i] * inv * w[i];
    }
}

/* out = silu(gate) * up = gate / (1 + exp(-gate)) * up (SwiGLU). */
void silu_mul(const float *gate, const float *up, long n, float *out) {
    for (long i = 0; i < n; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* x (dim) rotated by angles with cosines c and sines s (dim / 2 each): the pairs are (i, i + dim/2),
   or (2i, 2i + 1) where traditional. */
static void rotate(const float *x, const float *c, const float *s, int dim, int traditional, float scale, float *out) {
    int half = dim / 2;
    for (int i = 0; i < half; i++) {
        int ia = traditional ? 2 * i : i, ib = traditional ? 2 * i + 1 : i + half;
        float a = x[ia], b = x[ib];
        out[ia] = (a * c[i] - b * s[i]) * scale;
        out[ib] = (a * s[i] + b * c[i]) * scale;
    }
}

/* One new token per row. q (rows, heads, dim), k and v (rows, kv_heads, dim): q and k are rotated
   to each row's position, k and v written to slot `slot` of the cache (rows, kv_heads, capacity,
   dim), and each query head attends over its kv head's slots [start[r], slot] (earlier slots are
   the row's padding). out (rows, heads * dim). */
int attend(const float *q, const float *k, const float *v, float *keys, float *values, int rows, int heads, int kv_heads,
           int dim, int capacity, int slot, const long long *start, const long long *position, const float *cos,
           const float *sin, int traditional, float scale, float *out, int threads) {
    int group = heads / kv_heads, half = dim / 2, failed = 0;
    (void)threads;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int r = 0; r < rows; r++) {
        const float *c = cos + (size_t)position[r] * half, *s = sin + (size_t)position[r] * half;
        float *scores = malloc(sizeof(float) * (size_t)(slot + 1));
        float *qr = malloc(sizeof(float) * (size_t)dim);
        if (!scores || !qr) { /* out of memory: reported, never written through */
            free(scores);
            free(qr);
#pragma omp atomic write
            failed = 1;
            continue;
        }
        for (int h = 0; h < kv_heads; h++) {
            size_t at = (((size_t)r * kv_heads + h) * capacity + slot) * dim;
            rotate(k + ((size_t)r * kv_heads + h) * dim, c, s, dim, traditional, 1.0f, keys + at);
            for (int i = 0; i < dim; i++) values[at + i] = v[((size_t)r * kv_heads + h) * dim + i];
        }
        for (int h = 0; h < heads; h++) {
            const float *kh = keys + ((size_t)r * kv_heads + h / group) * capacity * dim;
            const float *vh = values + ((size_t)r * kv_heads + h / group) * capacity * dim;
            float *o = out + ((size_t)r * heads + h) * dim;
            rotate(q + ((size_t)r * heads + h) * dim, c, s, dim, traditional, scale, qr);
            float top = -INFINITY, total = 0.0f;
            for (int j = (int)start[r]; j <= slot; j++) {
                scores[j] = dot(qr, kh + (size_t)j * dim, dim);
                top = scores[j] > top ? scores[j] : top;
            }
            for (int i = 0; i < dim; i++) o[i] = 0.0f;
            for (int j = (int)start[r]; j <= slot; j++) {
                float w = expf(scores[j] - top);
                total += w;
                for (int i = 0; i < dim; i++) o[i] += w * vh[(size_t)j * dim + i];
            }
            for (int i = 0; i < dim; i++) o[i] /= total;
        }
        free(scores);
        free(qr);
    }
    return failed;
}

/* ---- Every decoder layer of a step in one call (compute/host_decode.py builds the records). ---- */

typedef struct {
    int layers, hidden, heads, kv_heads, dim, inter, traditional, threads;
    float eps, scale;
    /* per layer: the packed weights q, k, v, o, gate, up, down (7 per layer, in that order), their
       biases (NULL: none), and the norms: input, post-attention, q and k per head (NULL: none) */
    const float *const *weights;
    const float *const *biases;
    const float *const *norms;
} Layers;

typedef struct {
    int rows, capacity, slot;
    float *const *keys; /* per layer, rows x kv_heads x capacity x dim */
    float *const *values;
    const long long *start, *position;
    const float *cos, *sin;
} Cache;

static void project(const Layers *m, int layer, int which, const float *x, int rows, int K, int n_out, float *y) {
    rows_matmul(x, m->weights[7 * layer + which], y, rows, K, n_out, m->threads);
    const float *b = m->biases[7 * layer + which];
    if (b)
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < n_out; j++) y[(size_t)r * n_out + j] += b[j];
}

/* x (rows, hidden): the residual stream, updated in place through every layer. 0, or 1 where
   memory ran out (x is then not to be used). */
int decode_layers(const Layers *m, const Cache *c, float *x) {
    int rows = c->rows, H = m->hidden, nq = m->heads * m->dim, nkv = m->kv_heads * m->dim, failed = 0;
    size_t width = (size_t)(H > m->inter ? H : m->inter);
    float *h = malloc(sizeof(float) * rows * width), *q = malloc(sizeof(float) * rows * (size_t)nq);
    float *k = malloc(sizeof(float) * rows * (size_t)nkv), *v = malloc(sizeof(float) * rows * (size_t)nkv);
    float *att = malloc(sizeof(float) * rows * (size_t)nq), *out = malloc(sizeof(float) * rows * width);
    float *gate = malloc(sizeof(float) * rows * (size_t)m->inter), *up = malloc(sizeof(float) * rows * (size_t)m->inter);
    failed = !h || !q || !k || !v || !att || !out || !gate || !up;
    for (int l = 0; l < m->layers && !failed; l++) {
        const float *const *norm = m->norms + 4 * l;
        rms_norm(x, norm[0], m->eps, rows, H, h);
        project(m, l, 0, h, rows, H, nq, q);
        project(m, l, 1, h, rows, H, nkv, k);
        project(m, l, 2, h, rows, H, nkv, v);
        if (norm[2]) rms_norm(q, norm[2], m->eps, rows * m->heads, m->dim, q);
        if (norm[3]) rms_norm(k, norm[3], m->eps, rows * m->kv_heads, m->dim, k);
        if (attend(q, k, v, c->keys[l], c->values[l], rows, m->heads, m->kv_heads, m->dim, c->capacity, c->slot, c->start,
                   c->position, c->cos, c->sin, m->traditional, m->scale, att, m->threads)) {
            failed = 1;
            break;
        }
        project(m, l, 3, att, rows, nq, H, out);
        for (size_t i = 0; i < (size_t)rows * H; i++) x[i] += out[i];
        rms_norm(x, norm[1], m->eps, rows, H, h);
        project(m, l, 4, h, rows, H, m->inter, gate);
        project(m, l, 5, h, rows, H, m->inter, up);
        silu_mul(gate, up, (long)rows * m->inter, gate);
        project(m, l, 6, gate, rows, m->inter, H, out);
        for (size_t i = 0; i < (size_t)rows * H; i++) x[i] += out[i];
    }
    free(h); free(q); free(k); free(v); free(att); free(out); free(gate); free(up);
    return failed;
}
