/* Weight quantization on CPU, bit-exact with the pure-torch reference in formats.py.
 *
 * 4-bit (NF4/FP4, = bitsandbytes' quantize_4bit): float32 absmax per block, full blocks scaled by
 * the reciprocal of the absmax, the last partial block divided by it, clamp to [-1, 1], code =
 * number of rounding bounds strictly below the value (torch.bucketize), then the
 * sorted-position-to-code map.
 * int8 rows (LLM.int8 weights): absmax per row, q = rint(w * (1 / absmax * 127)).
 *
 * Blocks and rows are independent and split across plain pthreads that are joined before
 * returning: an OpenMP pool would keep spinning after the call and starve PyTorch's own pool.
 * Built without -ffast-math on purpose: the rounding must match IEEE float32 exactly.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define MAX_THREADS 64

typedef void (*range_fn)(const void *args, int64_t begin, int64_t end);

typedef struct {
    range_fn fn;
    const void *args;
    int64_t begin, end;
} range_task;

static void *run_range(void *p) {
    range_task *t = (range_task *)p;
    t->fn(t->args, t->begin, t->end);
    return NULL;
}

/* Run fn over [0, n) in up to n_threads contiguous ranges, the calling thread taking the first. */
static void parallel_for(range_fn fn, const void *args, int64_t n, int n_threads) {
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (n_threads < 1 || n < 2 * n_threads) n_threads = 1;
    range_task tasks[MAX_THREADS];
    pthread_t threads[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    int64_t chunk = (n + n_threads - 1) / n_threads;
    for (int i = 0; i < n_threads; i++) {
        int64_t begin = i * chunk, end = begin + chunk < n ? begin + chunk : n;
        tasks[i] = (range_task){fn, args, begin, end};
        if (i > 0 && begin < end) started[i] = pthread_create(&threads[i], NULL, run_range, &tasks[i]) == 0;
    }
    for (int i = 1; i < n_threads; i++)
        if (!started[i] && tasks[i].begin < tasks[i].end) run_range(&tasks[i]); /* could not start: run here */
    run_range(&tasks[0]);
    for (int i = 1; i < n_threads; i++)
        if (started[i]) pthread_join(threads[i], NULL);
}

#define MAX_BLOCK 4096
#define N_BOUNDS 15

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Quantize `len` float32 values of one block into packed bytes at `out` (len rounded up to even). */
static void quantize_block(const float *v, int64_t len, int is_tail, const float *bounds,
                           const uint8_t *order, uint8_t *out, float *absmax_out) {
    float s[MAX_BLOCK + 1];
    uint8_t cnt[MAX_BLOCK + 1];
    float amax = 0.0f;
    for (int64_t i = 0; i < len; i++) amax = fmaxf(amax, fabsf(v[i]));
    float am = amax < 1e-38f ? 1e-38f : amax;
    if (is_tail) {
        for (int64_t i = 0; i < len; i++) s[i] = v[i] / am;
    } else {
        float inv = 1.0f / am;
        for (int64_t i = 0; i < len; i++) s[i] = v[i] * inv;
    }
    int64_t even = len + (len & 1);
    if (len & 1) s[len] = 0.0f; /* bitsandbytes pads an odd count with one zero */
    for (int64_t i = 0; i < even; i++) {
        float x = s[i];
        s[i] = x < -1.0f ? -1.0f : (x > 1.0f ? 1.0f : x);
        cnt[i] = 0;
    }
    for (int j = 0; j < N_BOUNDS; j++) {
        float b = bounds[j];
        for (int64_t i = 0; i < even; i++) cnt[i] += (uint8_t)(b < s[i]);
    }
    for (int64_t i = 0; i < even; i += 2) out[i / 2] = (uint8_t)((order[cnt[i]] << 4) | order[cnt[i + 1]]);
    *absmax_out = is_tail ? am : amax;
}

typedef struct {
    const void *x;
    int is_bf16;
    int64_t n, block;
    const float *bounds;
    const uint8_t *order;
    uint8_t *out;
    float *absmax;
} q4_args;

static inline float load_value(const void *x, int is_bf16, int64_t i) {
    return is_bf16 ? bf16_to_float(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

static void quantize_4bit_range(const void *p, int64_t first, int64_t last) {
    const q4_args *a = (const q4_args *)p;
    float buf[MAX_BLOCK];
    for (int64_t b = first; b < last; b++) {
        int64_t start = b * a->block;
        int64_t len = a->n - start < a->block ? a->n - start : a->block;
        for (int64_t i = 0; i < len; i++) buf[i] = load_value(a->x, a->is_bf16, start + i);
        quantize_block(buf, len, len < a->block, a->bounds, a->order, a->out + start / 2, a->absmax + b);
    }
}

/* x: n values (float32, or bfloat16 when is_bf16); out: ceil(n/2) bytes; absmax: ceil(n/block). */
int llmslim_quantize_4bit(const void *x, int is_bf16, int64_t n, int64_t block, const float *bounds,
                          const uint8_t *order, uint8_t *out, float *absmax, int n_threads) {
    if (block <= 0 || block > MAX_BLOCK || (block & 1)) return -1;
    q4_args args = {x, is_bf16, n, block, bounds, order, out, absmax};
    parallel_for(quantize_4bit_range, &args, (n + block - 1) / block, n_threads);
    return 0;
}

typedef struct {
    const void *x;
    int is_bf16;
    int64_t cols;
    int8_t *out;
    float *absmax;
} q8_args;

static void quantize_int8_range(const void *p, int64_t first, int64_t last) {
    const q8_args *a = (const q8_args *)p;
    for (int64_t r = first; r < last; r++) {
        int64_t base = r * a->cols;
        float amax = 0.0f;
        for (int64_t i = 0; i < a->cols; i++) amax = fmaxf(amax, fabsf(load_value(a->x, a->is_bf16, base + i)));
        float scale = (1.0f / (amax < 1e-38f ? 1e-38f : amax)) * 127.0f; /* torch: 127 / t == reciprocal(t) * 127 */
        for (int64_t i = 0; i < a->cols; i++) a->out[base + i] = (int8_t)rintf(load_value(a->x, a->is_bf16, base + i) * scale);
        a->absmax[r] = amax;
    }
}

/* x: rows * cols values, row-major; out: int8 rows * cols; absmax: rows. */
int llmslim_quantize_int8_rows(const void *x, int is_bf16, int64_t rows, int64_t cols, int8_t *out, float *absmax,
                               int n_threads) {
    if (rows < 0 || cols <= 0) return -1;
    q8_args args = {x, is_bf16, cols, out, absmax};
    parallel_for(quantize_int8_range, &args, rows, n_threads);
    return 0;
}
