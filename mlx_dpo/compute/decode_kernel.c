/* Few rows times a packed float32 weight matrix: the linear layers of a decode step on a CPU.

   A decode step multiplies a handful of rows (one token per sequence) by every weight matrix, so
   its cost is reading the weights. The weights are packed once per rollout, TILE outputs side by
   side for each input index k ([tiles][K][TILE]), so that a tile streams through memory in one
   sequential read and every weight loaded is used for up to ROWS rows held in registers. Each
   output is summed over k in order, whatever the thread count. Built by mlx_dpo/_platform/cc.py
   for the machine it runs on; used by mlx_dpo/compute/decode.py. */

#include <stddef.h>

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
