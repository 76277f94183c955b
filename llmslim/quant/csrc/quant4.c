/* Blockwise 4-bit (NF4/FP4) quantization on CPU, bit-exact with bitsandbytes' quantize_4bit.
 *
 * Same arithmetic as the pure-torch reference in formats.py: float32 absmax per block, full
 * blocks scaled by the reciprocal of the absmax, the last partial block divided by it, clamp to
 * [-1, 1], code = number of rounding bounds strictly below the value (torch.bucketize), then the
 * sorted-position-to-code map. Blocks are independent, so OpenMP splits them across cores.
 * Built without -ffast-math on purpose: the rounding must match IEEE float32 exactly.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

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

#define DEFINE_QUANTIZE(NAME, T, LOAD)                                                              \
    int NAME(const T *x, int64_t n, int64_t block, const float *bounds, const uint8_t *order,      \
             uint8_t *out, float *absmax) {                                                        \
        if (block <= 0 || block > MAX_BLOCK || (block & 1)) return -1;                             \
        int64_t n_blocks = (n + block - 1) / block;                                                \
        _Pragma("omp parallel for schedule(static)")                                               \
        for (int64_t b = 0; b < n_blocks; b++) {                                                   \
            float buf[MAX_BLOCK];                                                                  \
            int64_t start = b * block;                                                             \
            int64_t len = n - start < block ? n - start : block;                                   \
            for (int64_t i = 0; i < len; i++) buf[i] = LOAD(x[start + i]);                         \
            quantize_block(buf, len, len < block, bounds, order, out + start / 2, absmax + b);     \
        }                                                                                          \
        return 0;                                                                                  \
    }

#define LOAD_F32(v) (v)
#define LOAD_BF16(v) bf16_to_float(v)

DEFINE_QUANTIZE(llmslim_quantize_4bit_f32, float, LOAD_F32)
DEFINE_QUANTIZE(llmslim_quantize_4bit_bf16, uint16_t, LOAD_BF16)
