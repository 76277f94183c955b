// llmslim's CPU matmul kernels for 4-bit weights, registered as torch operators (torch.ops.llmslim.*)
// so that they run on torch's own intra-op thread pool and torch.compile can trace through them.
//
// One weight layout serves NF4, FP4 (bitsandbytes' layout, read as stored) and llmslim's int4:
//   codes:  the flattened (N, K) weight, two 4-bit codes per byte, element 2i in the high nibble;
//   value:  w[n, k] = lut[code] * scale[g] (+ zero[g] for int4), g = (n * row_stride + k) / group,
//           row_stride = K for bitsandbytes' flat blocks, ceil(K / group) * group for per-row groups;
//   scale:  float32 absmax, or uint8 double-quantized absmax (nested_code[q] * nested_absmax[g / 256]
//           + nested_offset, bitsandbytes' double quantization), or float16 (int4);
//   zero:   float16 per group (int4) or absent.
//
// mm_4bit never materialises a dequantized weight: with AVX-512 BF16 it decodes 64 codes at a time
// through a 16-entry bf16 table held in a register (vpermw) and multiplies with vdpbf16ps, which
// forms exact products of bf16 values and accumulates in float32. Float32 activations are split
// into a bf16 high and low part (and the table likewise), which keeps ~16 more bits of precision.
// Without AVX-512 BF16 but with AVX2 and FMA (most desktop CPUs: AMD Zen, Intel client cores), 32 codes at
// a time become bf16 through the table's low and high bytes (two vpshufb), widen to float32 and are
// multiplied with fused multiply-adds in float32 per group, then scaled; float32 activations with a table
// that bf16 does not hold exactly take the table in float32 through vpermps instead. When K is not a multiple of 64, or without AVX2, a scalar
// loop computes the same sums.
//
// Decode (a few tokens, bf16): gemv_4bit_cpu_layout (NF4/FP4 in bitsandbytes' 32-row CPU layout)
// and gemv_int8_rows (row-wise int8) below. Every kernel splits its rows over torch's OpenMP
// threads with at::parallel_for, which is serial unless this file is compiled with -fopenmp
// (native.py passes it).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512BF16__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define LLMSLIM_AVX512_BF16 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LLMSLIM_AVX2 1
#endif

namespace {

#if defined(LLMSLIM_AVX512_BF16) || defined(LLMSLIM_AVX2)
inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// the largest of 8 lanes
inline float hmax_avx2(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
#endif

constexpr int64_t kNestedBlock = 256;  // bitsandbytes' block size for double quantization

struct Scales {
  int mode;  // 0: float32, 1: uint8 double-quantized, 2: float16
  const float* f32 = nullptr;
  const uint8_t* u8 = nullptr;
  const at::Half* f16 = nullptr;
  const float* nested_absmax = nullptr;
  const float* nested_code = nullptr;
  float nested_offset = 0.f;
  const at::Half* zeros = nullptr;

  inline float scale(int64_t g) const {
    switch (mode) {
      case 0: return f32[g];
      case 1: return nested_code[u8[g]] * nested_absmax[g / kNestedBlock] + nested_offset;
      default: return static_cast<float>(f16[g]);
    }
  }
  inline float zero(int64_t g) const { return zeros ? static_cast<float>(zeros[g]) : 0.f; }
};

Scales make_scales(const at::Tensor& scales, const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& nested_absmax,
                   const c10::optional<at::Tensor>& nested_code, double nested_offset, int64_t n_groups) {
  TORCH_CHECK(scales.is_contiguous() && scales.numel() >= n_groups, "llmslim: scales must be contiguous with ", n_groups, " entries, got ",
              scales.numel());
  Scales s;
  if (scales.scalar_type() == at::kFloat) {
    s.mode = 0;
    s.f32 = scales.data_ptr<float>();
  } else if (scales.scalar_type() == at::kByte) {
    TORCH_CHECK(nested_absmax.has_value() && nested_code.has_value(), "llmslim: uint8 scales need nested_absmax and nested_code");
    TORCH_CHECK(nested_absmax->scalar_type() == at::kFloat && nested_code->scalar_type() == at::kFloat && nested_code->numel() == 256,
                "llmslim: nested_absmax and nested_code must be float32 (code: 256 entries)");
    TORCH_CHECK(nested_absmax->numel() * kNestedBlock >= n_groups, "llmslim: too few nested_absmax entries");
    s.mode = 1;
    s.u8 = scales.data_ptr<uint8_t>();
    s.nested_absmax = nested_absmax->data_ptr<float>();
    s.nested_code = nested_code->data_ptr<float>();
    s.nested_offset = static_cast<float>(nested_offset);
  } else {
    TORCH_CHECK(scales.scalar_type() == at::kHalf, "llmslim: scales must be float32, uint8 or float16, got ", scales.scalar_type());
    s.mode = 2;
    s.f16 = scales.data_ptr<at::Half>();
  }
  if (zeros.has_value()) {
    TORCH_CHECK(zeros->scalar_type() == at::kHalf && zeros->is_contiguous() && zeros->numel() >= n_groups,
                "llmslim: zeros must be contiguous float16 with one entry per group");
    s.zeros = zeros->data_ptr<at::Half>();
  }
  return s;
}

void check_common(const at::Tensor& codes, const at::Tensor& lut, int64_t n, int64_t k, int64_t group, int64_t row_stride) {
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.is_contiguous(), "llmslim: codes must be contiguous CPU uint8");
  TORCH_CHECK(codes.numel() * 2 >= n * k, "llmslim: ", codes.numel(), " code bytes cannot hold a ", n, "x", k, " weight");
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.numel() == 16, "llmslim: lut must hold 16 float32 values");
  TORCH_CHECK(group >= 32 && (group & (group - 1)) == 0, "llmslim: group must be a power of two >= 32, got ", group);
  TORCH_CHECK(row_stride >= k, "llmslim: row_stride must be >= K");
}

int64_t n_groups_for(int64_t n, int64_t k, int64_t group, int64_t row_stride) { return ((n - 1) * row_stride + k + group - 1) / group; }

inline int code_at(const uint8_t* codes, int64_t e) {
  uint8_t byte = codes[e >> 1];
  return (e & 1) ? (byte & 0x0F) : (byte >> 4);
}

// ---- dequantize -------------------------------------------------------------------------------

template <typename T>
void dequantize_rows(const uint8_t* codes, const float* lut, const Scales& s, int64_t n, int64_t k, int64_t group, int64_t row_stride,
                     T* out) {
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; row++) {
      const int64_t first = row * k;  // flat index of the row's first element
      T* dst = out + first;
      for (int64_t col = 0; col < k;) {
        // one group (or the part of it in this row) at a time: no division per element
        const int64_t g = (row * row_stride + col) / group;
        const int64_t stop = std::min<int64_t>(k, (g + 1) * group - row * row_stride);
        const float scale = s.scale(g), zero = s.zero(g);
        float table[16];
        for (int i = 0; i < 16; i++) table[i] = lut[i] * scale + zero;
        if ((first + col) & 1) {  // odd flat index: the low nibble of a byte
          dst[col] = static_cast<T>(table[code_at(codes, first + col)]);
          col++;
        }
        const uint8_t* bytes = codes + (first + col) / 2;
        const int64_t pairs = (stop - col) / 2;
        for (int64_t i = 0; i < pairs; i++) {
          dst[col + 2 * i] = static_cast<T>(table[bytes[i] >> 4]);
          dst[col + 2 * i + 1] = static_cast<T>(table[bytes[i] & 0x0F]);
        }
        col += 2 * pairs;
        if (col < stop) {
          dst[col] = static_cast<T>(table[code_at(codes, first + col)]);
          col++;
        }
      }
    }
  });
}

#ifdef LLMSLIM_AVX512_BF16
// Row-major codes to bf16 when groups lie inside rows and hold whole 32-column chunks (row_stride == K, group % 32 == 0,
// K % group == 0: int4's per-row groups, NF4/FP4 blocks of a weight whose K the block divides). 16 bytes hold 32
// codes; each byte widened to a dword (high nibble in its low word, low nibble in its high word) gives the 32 codes in
// column order as words, and one vpermw through the group's 16 values (lut * scale + zero, rounded to bf16 as the
// scalar loop rounds) writes them. ~6 instructions per 32 values.
void dequantize_rows_bf16_avx512(const uint8_t* codes, const float* lut, const Scales& s, int64_t n, int64_t k, int64_t group,
                                 at::BFloat16* out) {
  const __m512 values = _mm512_loadu_ps(lut);
  const __m512i low4 = _mm512_set1_epi32(0x0F);
  const int64_t groups_per_row = k / group;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; row++) {
      for (int64_t g = row * groups_per_row; g < (row + 1) * groups_per_row; g++) {
        const __m512 v = _mm512_add_ps(_mm512_mul_ps(values, _mm512_set1_ps(s.scale(g))), _mm512_set1_ps(s.zero(g)));  // two roundings, as torch
        const __m512i table = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(v));  // indices 0..15: the low half
        const uint8_t* src = codes + g * group / 2;
        at::BFloat16* dst = out + g * group;
        for (int64_t c = 0; c < group; c += 32) {
          const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c / 2)));
          const __m512i idx = _mm512_or_si512(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(_mm512_and_si512(d, low4), 16));
          _mm512_storeu_si512(dst + c, _mm512_permutexvar_epi16(idx, table));
        }
      }
    }
  });
}
#endif

at::Tensor dequantize_4bit(const at::Tensor& codes, const at::Tensor& lut, const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                           const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code, double nested_offset,
                           int64_t n, int64_t k, int64_t group, int64_t row_stride, at::ScalarType dtype) {
  check_common(codes, lut, n, k, group, row_stride);
  Scales s = make_scales(scales, zeros, nested_absmax, nested_code, nested_offset, n_groups_for(n, k, group, row_stride));
  at::Tensor out = at::empty({n, k}, at::TensorOptions().dtype(dtype));
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const float* l = lut.data_ptr<float>();
  switch (dtype) {
    case at::kFloat: dequantize_rows(c, l, s, n, k, group, row_stride, out.data_ptr<float>()); break;
    case at::kBFloat16:
#ifdef LLMSLIM_AVX512_BF16
      if (row_stride == k && k % group == 0 && group % 32 == 0) {
        dequantize_rows_bf16_avx512(c, l, s, n, k, group, out.data_ptr<at::BFloat16>());
        break;
      }
#endif
      dequantize_rows(c, l, s, n, k, group, row_stride, out.data_ptr<at::BFloat16>());
      break;
    case at::kHalf: dequantize_rows(c, l, s, n, k, group, row_stride, out.data_ptr<at::Half>()); break;
    default: TORCH_CHECK(false, "llmslim: dequantize_4bit supports float32, bfloat16 and float16, got ", dtype);
  }
  return out;
}

// ---- dequantize from bitsandbytes' CPU layout (for prompts; decode runs bitsandbytes' kernel) -----
//
// packed: (n / 32, k / 2, 32) bytes: byte i of step j holds column 2j + i % 2 of rows i / 2 (low
// nibble) and 16 + i / 2 (high nibble) of its 32-row tile; absmax: bfloat16 (n / 32, k / block, 32), tile by tile (a
// tile's block scales follow one another, read in the order of its codes; bitsandbytes keeps (k / block, n), whose
// 32 scales of a block sit a row of n apart: kernels.pack_4bit_for_cpu, kernels.bnb_cpu_absmax).
// Each output row is written in order; its codes are read at a 32-byte stride from the tile's
// k * 16 bytes, which stay in cache while the tile's 32 rows are written.

#ifdef LLMSLIM_AVX512_BF16
// One 32-row tile of the CPU layout (see gemv_tile_4bit) to row-major bf16, for a block a multiple of 32. A gather of
// 16 dwords at a stride of one step (32 bytes) collects, for rows r and r + 1 (r even), the bytes of 16 consecutive
// steps: their low words are row r's 32 codes (columns 2j, 2j + 1 per step, in column order), their high words row
// r + 1's; each byte's low nibble is that row's, its high nibble row 16 + r's. Each code becomes its block's value by
// one vpermw through a table of the 16 values times the block's absmax, rounded to bf16 as the scalar loop rounds.
void dequantize_tile_cpu_layout(const uint8_t* tile, const at::BFloat16* am, const float* lut, int64_t k, int64_t block, at::BFloat16* out) {
  const __m512i stride = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(32));
  const __m512 values = _mm512_loadu_ps(lut);
  const int64_t groups = k / block, chunks = block / 32;
  for (int r = 0; r < 16; r += 2) {
    const int rows[4] = {r, r + 1, r + 16, r + 17};  // the dword's low word (low, high nibble), its high word (low, high)
    for (int64_t g = 0; g < groups; g++) {
      __m512i table[4];
      for (int i = 0; i < 4; i++) {
        const __m256i t = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(values, _mm512_set1_ps(static_cast<float>(am[g * 32 + rows[i]]))));
        table[i] = _mm512_inserti64x4(_mm512_castsi256_si512(t), t, 1);  // stored twice: vpermw reads an index's low 5 bits
      }
      for (int64_t c = 0; c < chunks; c++) {
        const int64_t col = g * block + c * 32, step = col / 2;
        const __m512i d = _mm512_i32gather_epi32(stride, tile + step * 32 + 2 * r, 1);
        const __m512i low = _mm512_cvtepu8_epi16(_mm512_cvtepi32_epi16(d));  // rows r, r + 16: 32 codes
        const __m512i high = _mm512_cvtepu8_epi16(_mm512_cvtepi32_epi16(_mm512_srli_epi32(d, 16)));  // rows r + 1, r + 17
        _mm512_storeu_si512(out + rows[0] * k + col, _mm512_permutexvar_epi16(low, table[0]));
        _mm512_storeu_si512(out + rows[2] * k + col, _mm512_permutexvar_epi16(_mm512_srli_epi16(low, 4), table[2]));
        _mm512_storeu_si512(out + rows[1] * k + col, _mm512_permutexvar_epi16(high, table[1]));
        _mm512_storeu_si512(out + rows[3] * k + col, _mm512_permutexvar_epi16(_mm512_srli_epi16(high, 4), table[3]));
      }
    }
  }
}
#endif

#ifdef LLMSLIM_AVX512_BF16
// A row-wise int8 weight as bf16, formats.dequantize_int8_rows' bits: (q.float() * (absmax / 127)).to(bf16), each
// element rounded to nearest even once, 16 at a time (an int8 prompt's weight before its bf16 GEMM, which then needs
// no pass over its output to scale it)
at::Tensor dequantize_int8_rows_bf16(const at::Tensor& q, const at::Tensor& absmax) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous(), "llmslim: dequantize_int8_rows_bf16 takes a contiguous int8 (N, K) weight, got ",
              q.scalar_type(), " ", q.sizes());
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous() && absmax.numel() == q.size(0),
              "llmslim: dequantize_int8_rows_bf16 takes one float32 absmax per row (", q.size(0), "), got ", absmax.scalar_type(), " ", absmax.sizes());
  const int64_t n = q.size(0), k = q.size(1);
  at::Tensor out = at::empty({n, k}, q.options().dtype(at::kBFloat16));
  const int8_t* pq = q.data_ptr<int8_t>();
  const float* pa = absmax.data_ptr<float>();
  at::BFloat16* po = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const float s = pa[r] / 127.f;
      const __m512 vs = _mm512_set1_ps(s);
      const int8_t* qr = pq + r * k;
      at::BFloat16* orow = po + r * k;
      int64_t c = 0;
      for (; c + 16 <= k; c += 16) {
        const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qr + c)))), vs);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(orow + c), (__m256i)_mm512_cvtneps_pbh(v));
      }
      for (; c < k; c++) orow[c] = c10::BFloat16(static_cast<float>(qr[c]) * s);
    }
  });
  return out;
}
#endif

// the CPU layout's absmax copy: bfloat16 (n / 32, k / block, 32), each 32-row tile's block scales in a row
void check_tile_absmax(const at::Tensor& absmax, int64_t n, int64_t k, int64_t block) {
  TORCH_CHECK(absmax.scalar_type() == at::kBFloat16 && absmax.is_contiguous() && absmax.dim() == 3 && absmax.size(0) == n / 32 &&
                  absmax.size(1) == k / block && absmax.size(2) == 32,
              "llmslim: the CPU layout's absmax must be bfloat16 (N / 32, K / block, 32) = (", n / 32, ", ", k / block, ", 32), tile by tile ",
              "(kernels.pack_4bit_for_cpu), got ", absmax.scalar_type(), " ", absmax.sizes());
}

at::Tensor dequantize_4bit_cpu_layout(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& lut, int64_t n, int64_t k,
                                      int64_t block) {
  TORCH_CHECK(n % 32 == 0 && k % 2 == 0 && block > 0 && k % block == 0 && block % 2 == 0,
              "llmslim: the CPU layout needs N % 32 == 0 and K a multiple of an even block, got N=", n, " K=", k, " block=", block);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() * 2 == n * k, "llmslim: bad packed codes");
  check_tile_absmax(absmax, n, k, block);
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.numel() == 16, "llmslim: lut must hold 16 float32 values");
  at::Tensor out = at::empty({n, k}, at::TensorOptions().dtype(at::kBFloat16));
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const at::BFloat16* am = absmax.data_ptr<at::BFloat16>();
  const float* l = lut.data_ptr<float>();
  at::BFloat16* o = out.data_ptr<at::BFloat16>();
  const int64_t steps = k / 2, groups = k / block, pairs = block / 2;
#ifdef LLMSLIM_AVX512_BF16
  if (block % 32 == 0) {  // 16 steps (32 columns) at a time; ~4x the scalar loop's speed (a prompt's weights each call)
    at::parallel_for(0, n / 32, 1, [&](int64_t begin, int64_t end) {
      for (int64_t tile = begin; tile < end; tile++) dequantize_tile_cpu_layout(p + tile * steps * 32, am + tile * groups * 32, l, k, block, o + tile * 32 * k);
    });
    return out;
  }
#endif
  at::parallel_for(0, n / 32, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; tile++) {
      for (int r = 0; r < 32; r++) {
        const int64_t row = tile * 32 + r;
        const int shift = r < 16 ? 0 : 4;
        const uint8_t* src = p + tile * steps * 32 + 2 * (r & 15);
        at::BFloat16* dst = o + row * k;
        for (int64_t g = 0; g < groups; g++) {
          const float scale = static_cast<float>(am[(tile * groups + g) * 32 + r]);
          uint16_t table[16];  // the 16 values of this block, already rounded to bfloat16: the loop only copies
          for (int i = 0; i < 16; i++) table[i] = c10::BFloat16(l[i] * scale).x;
          uint16_t* out16 = reinterpret_cast<uint16_t*>(dst);
          for (int64_t j = g * pairs; j < (g + 1) * pairs; j++) {
            out16[2 * j] = table[(src[j * 32] >> shift) & 0x0F];
            out16[2 * j + 1] = table[(src[j * 32 + 1] >> shift) & 0x0F];
          }
        }
      }
    }
  });
  return out;
}

// ---- matmul: out[m, n] = sum_k x[m, k] * w[n, k] ------------------------------------------------

// Scalar path: any K, any machine.
void mm_scalar(const float* x, int64_t m, const uint8_t* codes, const float* lut, const Scales& s, int64_t n, int64_t k, int64_t group,
               int64_t row_stride, float* out) {
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> w(k);
    for (int64_t row = begin; row < end; row++) {
      int64_t g_prev = -1;
      float scale = 0.f, zero = 0.f;
      for (int64_t col = 0; col < k; col++) {
        int64_t g = (row * row_stride + col) / group;
        if (g != g_prev) {
          scale = s.scale(g);
          zero = s.zero(g);
          g_prev = g;
        }
        w[col] = lut[code_at(codes, row * k + col)] * scale + zero;
      }
      for (int64_t i = 0; i < m; i++) {
        double acc = 0.0;
        for (int64_t col = 0; col < k; col++) acc += static_cast<double>(x[i * k + col]) * w[col];
        out[i * n + row] = static_cast<float>(acc);
      }
    }
  });
}

// ---- int4 x int8 activations (AVX-512 VNNI, or AVX2) --------------------------------------------
//
// For llmslim's int4 (w = (q - 8) * scale + zero), decode can skip the table entirely: the codes
// are unsigned bytes once unpacked, and an integer dot product multiplies them by int8 activations
// (vpdpbusd: 64 per instruction; on AVX2, vpmaddubsw then vpmaddwd: 32, as llama.cpp's Q4_0 x Q8_0).
// Activations are quantized per 32 elements (absmax / 127, as llama.cpp's Q8_0), and so is what
// that rounding left over (x - scale * q, at most scale / 2 per element): each input is two int8
// rows, and each output the sum of their two dot products. One row alone (llama.cpp's choice) cost
// SmolLM2 +0.40% perplexity with int4 weights; with the remainder the activations are held to
// about 1/64,000 of their block's absmax (a 16-bit integer's precision), for twice the integer
// dot products over the same unpacked codes. Everything else is exact.

struct QuantizedX {
  std::vector<int8_t> even, odd;  // per 128-chunk (or 64-tail): x[0], x[2], ... and x[1], x[3], ...
  std::vector<float> lane_scale;  // per chunk, 16 lanes: the scale of the 32-block each lane covers
  std::vector<int32_t> lane_bias; // per chunk, 16 lanes: -8 * sum of the 8 quantized x of that lane
  std::vector<float> group_sum;   // per group of the weight: sum of x (float), for the zero term
};

// x as int8 per 32 into q; with `rest`, the remainder x - q's value as int8 per 32 into *rest (its group sums zero:
// the zero term takes x's float sums once, in q).
void quantize_x(const float* x, int64_t k, int64_t group, int64_t groups_per_row, QuantizedX& q, QuantizedX* rest = nullptr) {
  const int64_t chunks = (k + 127) / 128;
  q.even.assign(k / 2, 0);
  q.odd.assign(k / 2, 0);
  q.lane_scale.assign(chunks * 16, 0.f);
  q.lane_bias.assign(chunks * 16, 0);
  q.group_sum.assign(groups_per_row, 0.f);
  for (int64_t col = 0; col < k; col++) q.group_sum[col / group] += x[col];
  for (int64_t c = 0; c < chunks; c++) {
    const int64_t base = c * 128, len = std::min<int64_t>(128, k - base);
    for (int64_t b = 0; b < len / 32; b++) {
      float amax = 0.f;
      for (int j = 0; j < 32; j++) amax = std::max(amax, std::fabs(x[base + b * 32 + j]));
      const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      for (int lane = 0; lane < 4; lane++) {
        int32_t sum = 0;
        for (int j = 0; j < 8; j++) {
          const int64_t e = b * 32 + lane * 8 + j;  // element within the chunk
          const int v = static_cast<int>(std::nearbyint(x[base + e] * inv));
          sum += v;
          (e & 1 ? q.odd : q.even)[base / 2 + e / 2] = static_cast<int8_t>(v);
        }
        // for a 64-tail the 256-bit lanes cover 8 elements each as well: lanes 0-7 only
        q.lane_scale[c * 16 + b * 4 + lane] = scale;
        q.lane_bias[c * 16 + b * 4 + lane] = -8 * sum;
      }
    }
  }
  if (rest == nullptr) return;
  std::vector<float> remainder(k);
  for (int64_t col = 0; col < k; col++) {
    const int64_t c = col / 128, e = col % 128;
    const int v = (e & 1 ? q.odd : q.even)[c * 64 + e / 2];
    remainder[col] = x[col] - q.lane_scale[c * 16 + e / 8] * static_cast<float>(v);
  }
  quantize_x(remainder.data(), k, group, groups_per_row, *rest);
  std::fill(rest->group_sum.begin(), rest->group_sum.end(), 0.f);
}

Scales check_int4_q8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros, int64_t n,
                     int64_t group) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "llmslim: mm_int4_q8 takes a 2-D CPU input, got ", x.sizes());
  const int64_t k = x.size(1);
  TORCH_CHECK(k % 64 == 0, "llmslim: mm_int4_q8 needs K % 64 == 0, got ", k);
  TORCH_CHECK(group >= 32 && (group & (group - 1)) == 0, "llmslim: group must be a power of two >= 32, got ", group);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.numel() * 2 >= n * k, "llmslim: bad int4 codes");
  const int64_t groups_per_row = (k + group - 1) / group;
  Scales s = make_scales(scales, zeros, c10::nullopt, c10::nullopt, 0.0, n * groups_per_row);
  TORCH_CHECK(s.mode == 2 && s.zeros, "llmslim: int4 scales and zeros must be float16");
  return s;
}

#ifdef LLMSLIM_AVX512_BF16

inline uint16_t bf16_bits(float v) { return c10::BFloat16(v).x; }  // round to nearest even

inline float bf16_value(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float v;
  std::memcpy(&v, &wide, 4);
  return v;
}

// One weight row's scales (and zeros) in float32, converted once per row: the inner loops then read
// plain floats instead of decoding float16 or double-quantized absmax per chunk (at group 32-64 that
// decoding cost more than the matmul itself).
struct RowScales {
  std::vector<float> scale_buf, zero_buf;
  int64_t first = 0;  // the group of buf[0]

  void load(const Scales& s, int64_t row_pos, int64_t k, int shift) {
    first = row_pos >> shift;
    const int64_t count = ((row_pos + k - 1) >> shift) - first + 1;
    scale_buf.resize(count);
    if (s.mode == 2) {
      halves_to_floats(s.f16 + first, count, scale_buf.data());
    } else {
      for (int64_t i = 0; i < count; i++) scale_buf[i] = s.scale(first + i);
    }
    zero_buf.clear();
    if (s.zeros) {
      zero_buf.resize(count);
      halves_to_floats(s.zeros + first, count, zero_buf.data());
    }
  }
  inline float scale(int64_t g) const { return scale_buf[g - first]; }

  // sum over the row's groups of zero[g] * group_sums[g - first] (the zero-point term of int4)
  float zero_dot(const float* group_sums) const {
    const int64_t count = static_cast<int64_t>(zero_buf.size());
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= count; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(zero_buf.data() + i), _mm512_loadu_ps(group_sums + i), acc);
    float total = _mm512_reduce_add_ps(acc);
    for (; i < count; i++) total += zero_buf[i] * group_sums[i];
    return total;
  }

  static void halves_to_floats(const at::Half* src, int64_t count, float* dst) {
    int64_t i = 0;
    for (; i + 16 <= count; i += 16) _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
    for (; i < count; i++) dst[i] = static_cast<float>(src[i]);
  }
};

// Read as 16-bit words, 2 bytes of codes hold elements 4j..4j+3 in nibbles (low to high) 4j+1, 4j,
// 4j+3, 4j+2. vpermw looks up each word's low 5 bits in a 32-entry table (the 16 values twice),
// so `word >> 4s` needs no mask. Each chunk of x is re-ordered to match: part s holds x[4j + kOff[s]].
constexpr int kOff[4] = {1, 0, 3, 2};

// x rows (float32) -> bf16 high and (for float32 input) low parts in the order the codes decode to.
void prepare_x(const float* x, int64_t m, int64_t k, bool split, std::vector<uint16_t>& hi, std::vector<uint16_t>& lo) {
  hi.resize(m * k);
  if (split) lo.resize(m * k);
  for (int64_t i = 0; i < m; i++) {
    for (int64_t c = 0; c < k; c += 128) {
      const int64_t len = std::min<int64_t>(128, k - c);  // 128, or a 64-element tail
      const int64_t words = len / 4;
      for (int s = 0; s < 4; s++) {
        for (int64_t j = 0; j < words; j++) {
          const float v = x[i * k + c + 4 * j + kOff[s]];
          const int64_t dst = i * k + c + s * words + j;
          hi[dst] = bf16_bits(v);
          if (split) lo[dst] = bf16_bits(v - bf16_value(hi[dst]));
        }
      }
    }
  }
}

// dpbf16 lane i (of 16) sums elements 8i..8i+7 of a 128-element chunk starting at flat position
// `pos` (a multiple of 64), so a chunk needs one scale per 32 elements, each spread over 4 lanes.
// Group boundaries fall on multiples of 32, so fewer distinct scales are usually enough.
inline __m512 chunk_scales(const RowScales& s, int64_t pos, int shift, bool whole_chunk) {
  if (whole_chunk) return _mm512_set1_ps(s.scale(pos >> shift));
  if (shift >= 6) return _mm512_insertf32x8(_mm512_set1_ps(s.scale(pos >> shift)), _mm256_set1_ps(s.scale((pos + 64) >> shift)), 1);
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m128 four = _mm_set_ps(s.scale((pos + 96) >> shift), s.scale((pos + 64) >> shift), s.scale((pos + 32) >> shift), s.scale(pos >> shift));
  return _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(four));
}

template <int TM, int NX, int NW>
inline void mm_row_tile(const uint16_t* const* xs, int64_t k, const uint8_t* row_codes, const RowScales& scales, int64_t row_pos, int shift,
                        bool whole_chunk, const __m512i* tables, float* totals) {
  __m512 acc[TM];
  for (int t = 0; t < TM; t++) acc[t] = _mm512_setzero_ps();
  const int64_t full = k / 128;
  for (int64_t c = 0; c < full; c++) {
    const __m512i words = _mm512_loadu_si512(row_codes + c * 64);
    __m512bh w[NW][4];
    for (int pw = 0; pw < NW; pw++) {
      w[pw][0] = (__m512bh)_mm512_permutexvar_epi16(words, tables[pw]);
      w[pw][1] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(words, 4), tables[pw]);
      w[pw][2] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(words, 8), tables[pw]);
      w[pw][3] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(words, 12), tables[pw]);
    }
    const __m512 scale = chunk_scales(scales, row_pos + c * 128, shift, whole_chunk);
    for (int t = 0; t < TM; t++) {
      // two independent chains: a chain of dependent dpbf16 would be bound by their latency
      __m512 dot[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int px = 0; px < NX; px++) {
        const uint16_t* xr = xs[px] + t * k + c * 128;
        for (int pw = 0; pw < NW; pw++) {
          if (px == 1 && pw == 1) continue;  // low x low: below float32 precision
          for (int s = 0; s < 4; s++) dot[s & 1] = _mm512_dpbf16_ps(dot[s & 1], w[pw][s], (__m512bh)_mm512_loadu_si512(xr + s * 32));
        }
      }
      acc[t] = _mm512_fmadd_ps(_mm512_add_ps(dot[0], dot[1]), scale, acc[t]);
    }
  }
  __m256 tail[TM];
  for (int t = 0; t < TM; t++) tail[t] = _mm256_setzero_ps();
  if (k % 128) {  // a 64-element tail: the same with 256-bit vectors (16-entry table, 4-bit indices)
    const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row_codes + full * 64));
    __m256bh w[NW][4];
    for (int pw = 0; pw < NW; pw++) {
      const __m256i table = _mm512_castsi512_si256(tables[pw]);
      for (int s = 0; s < 4; s++) w[pw][s] = (__m256bh)_mm256_permutexvar_epi16(_mm256_srli_epi16(words, 4 * s), table);
    }
    const int64_t pos = row_pos + full * 128;
    const __m256 scale = _mm256_insertf128_ps(_mm256_set1_ps(scales.scale(pos >> shift)), _mm_set1_ps(scales.scale((pos + 32) >> shift)), 1);
    for (int t = 0; t < TM; t++) {
      __m256 dot = _mm256_setzero_ps();
      for (int px = 0; px < NX; px++) {
        const uint16_t* xr = xs[px] + t * k + full * 128;
        for (int pw = 0; pw < NW; pw++) {
          if (px == 1 && pw == 1) continue;
          for (int s = 0; s < 4; s++)
            dot = _mm256_dpbf16_ps(dot, w[pw][s], (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + s * 16)));
        }
      }
      tail[t] = _mm256_mul_ps(dot, scale);
    }
  }
  for (int t = 0; t < TM; t++) totals[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t], _mm512_zextps256_ps512(tail[t])));
}

constexpr int kTileM = 4;

// SIMD path: K % 64 == 0; output rows are split across torch's threads.
template <int NX, int NW>
void mm_avx512(const std::vector<uint16_t>* xs, int64_t m, const float* xsum, const uint8_t* codes, const float* lut, const Scales& s, int64_t n,
               int64_t k, int64_t group, int64_t row_stride, float* out) {
  alignas(64) uint16_t table_bits[2][32];
  for (int i = 0; i < 32; i++) {
    table_bits[0][i] = bf16_bits(lut[i & 15]);
    table_bits[1][i] = bf16_bits(lut[i & 15] - bf16_value(table_bits[0][i]));
  }
  const __m512i tables[2] = {_mm512_load_si512(table_bits[0]), _mm512_load_si512(table_bits[1])};
  const int64_t groups_per_row = (row_stride + group - 1) / group;
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(group));

  const bool whole_chunk = shift >= 7 && row_stride % 128 == 0;
  at::parallel_for(0, n, 4, [&](int64_t begin, int64_t end) {
    RowScales rs;
    for (int64_t row = begin; row < end; row++) {
      const uint8_t* row_codes = codes + row * k / 2;
      rs.load(s, row * row_stride, k, shift);
      for (int64_t m0 = 0; m0 < m; m0 += kTileM) {
        const uint16_t* xp[2] = {xs[0].data() + m0 * k, NX == 2 ? xs[1].data() + m0 * k : nullptr};
        float totals[kTileM];
        switch (std::min<int64_t>(kTileM, m - m0)) {
          case 1: mm_row_tile<1, NX, NW>(xp, k, row_codes, rs, row * row_stride, shift, whole_chunk, tables, totals); break;
          case 2: mm_row_tile<2, NX, NW>(xp, k, row_codes, rs, row * row_stride, shift, whole_chunk, tables, totals); break;
          case 3: mm_row_tile<3, NX, NW>(xp, k, row_codes, rs, row * row_stride, shift, whole_chunk, tables, totals); break;
          default: mm_row_tile<4, NX, NW>(xp, k, row_codes, rs, row * row_stride, shift, whole_chunk, tables, totals); break;
        }
        for (int t = 0; t < kTileM && m0 + t < m; t++) {
          float total = totals[t];
          if (s.zeros) total += rs.zero_dot(xsum + (m0 + t) * groups_per_row);
          out[(m0 + t) * n + row] = total;
        }
      }
    }
  });
}

at::Tensor mm_int4_q8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros, int64_t n,
                      int64_t group) {
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t groups_per_row = (k + group - 1) / group, row_stride = groups_per_row * group;
  const Scales s = check_int4_q8(x, codes, scales, zeros, n, group);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({m, n}, at::TensorOptions().dtype(at::kFloat));
  float* po = out.data_ptr<float>();
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(group));
  const bool whole_chunk = shift >= 7;
  const int64_t full = k / 128;
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  for (int64_t i = 0; i < m; i++) {
    QuantizedX q[2];  // the activations, and what their rounding left over
    quantize_x(xf.data_ptr<float>() + i * k, k, group, groups_per_row, q[0], &q[1]);
    at::parallel_for(0, n, 4, [&](int64_t begin, int64_t end) {
      RowScales rs;
      for (int64_t row = begin; row < end; row++) {
        const uint8_t* rc = c + row * k / 2;
        const int64_t row_pos = row * row_stride;
        rs.load(s, row_pos, k, shift);
        __m512 acc = _mm512_setzero_ps();
        for (int64_t ch = 0; ch < full; ch++) {
          const __m512i v = _mm512_loadu_si512(rc + ch * 64);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low_nibbles);
          const __m512i lo = _mm512_and_si512(v, low_nibbles);
          const __m512 wscale = chunk_scales(rs, row_pos + ch * 128, shift, whole_chunk);
          for (const QuantizedX& part : q) {
            __m512i dot = _mm512_loadu_si512(part.lane_bias.data() + ch * 16);
            dot = _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512(part.even.data() + ch * 64));
            dot = _mm512_dpbusd_epi32(dot, lo, _mm512_loadu_si512(part.odd.data() + ch * 64));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wscale, _mm512_loadu_ps(part.lane_scale.data() + ch * 16)), acc);
          }
        }
        float total = _mm512_reduce_add_ps(acc);
        if (k % 128) {
          const __m256i low4 = _mm256_set1_epi8(0x0F);
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rc + full * 64));
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4), lo = _mm256_and_si256(v, low4);
          const int64_t pos = row_pos + full * 128;
          const __m256 wscale = _mm256_insertf128_ps(_mm256_set1_ps(rs.scale(pos >> shift)), _mm_set1_ps(rs.scale((pos + 32) >> shift)), 1);
          __m256 prod = _mm256_setzero_ps();
          for (const QuantizedX& part : q) {
            __m256i dot = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(part.lane_bias.data() + full * 16));
            dot = _mm256_dpbusd_epi32(dot, hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(part.even.data() + full * 64)));
            dot = _mm256_dpbusd_epi32(dot, lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(part.odd.data() + full * 64)));
            prod = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot), wscale), _mm256_loadu_ps(part.lane_scale.data() + full * 16), prod);
          }
          __m128 r = _mm_add_ps(_mm256_castps256_ps128(prod), _mm256_extractf128_ps(prod, 1));
          r = _mm_hadd_ps(r, r);
          r = _mm_hadd_ps(r, r);
          total += _mm_cvtss_f32(r);
        }
        total += rs.zero_dot(q[0].group_sum.data());
        po[i * n + row] = total;
      }
    });
  }
  return out.to(x.scalar_type());
}

// ---- decode kernels that stream at the memory's speed -------------------------------------------
//
// Decode reads every weight once per token, so these kernels spend as few vector instructions per
// byte as they can (on this project's 2-core machine a core retires about one 512-bit instruction
// per 1.5 cycles, so instruction count, not the memory, bounded the earlier kernels), keep every
// multiply-add chain independent (a chain of dependent vdpbf16ps is bound by their latency), and
// prefetch ahead of the stream. 4-bit: 32 bytes of codes become 32 bf16 words with one
// zero-extension (vpmovzxbw) and one table lookup (vpermw reads an index's low 5 bits, so a
// 16-entry table stored twice needs no mask); products are exact (bf16 x bf16, float32 sums).

// NF4/FP4 in bitsandbytes' CPU layout (see dequantize_4bit_cpu_layout): step j of a 32-row tile is
// 32 bytes, byte 2r + c holding column 2j + c of row r (low nibble) and of row 16 + r (high
// nibble). Zero-extended, word 2r + c is that byte, so dword lane r holds (w[r, 2j], w[r, 2j + 1])
// and one vdpbf16ps with the broadcast pair (x[2j], x[2j + 1]) adds both products to row r's lane.
// A block's 32 scales are one 64-byte line of the tile's absmax (n / 32, k / block, 32): the tile's scales follow one
// another, a second sequential stream beside its codes. In bitsandbytes' (k / block, n) they sit a row of n apart,
// one line per block and tile, k / block streams the prefetchers do not follow: a token's 4-bit layers of the 1.1B
// shape in a standalone loop on a Zen 5 EPYC (2 threads) read 36-43 GB/s that way and 47-54 GB/s tile by tile, where a
// plain read of the same bytes ran at 49-64 GB/s (interleaved runs).
// bytes ahead in the tile stream (1.1B decode sweep on an AMX Xeon: 512-4096 tried, 2048 kept; on a Zen 5 EPYC, a
// token's 4-bit layers in a standalone loop, 2 threads, five interleaved pairs: 2048 10.2-12.9 ms, 4096 9.4-12.4, each
// pair in 4096's favour by 5-20%)
constexpr int kPrefetch4bit = 4096;
template <int TM>
inline void gemv_tile_4bit(const uint32_t* const* xs, const uint8_t* tile, const at::BFloat16* absmax, int64_t steps, int64_t block_steps,
                           __m512i table, at::BFloat16* const* out) {
  __m512 acc_lo[TM], acc_hi[TM];
  for (int t = 0; t < TM; t++) acc_lo[t] = acc_hi[t] = _mm512_setzero_ps();
  for (int64_t s0 = 0, g = 0; s0 < steps; s0 += block_steps, g++) {
    __m512 lo[TM][2], hi[TM][2];  // this block's sums, two chains each
    for (int t = 0; t < TM; t++) lo[t][0] = lo[t][1] = hi[t][0] = hi[t][1] = _mm512_setzero_ps();
    for (int64_t j = s0; j < s0 + block_steps; j += 2) {
      const uint8_t* p = tile + j * 32;
      _mm_prefetch(reinterpret_cast<const char*>(p) + kPrefetch4bit, _MM_HINT_T0);
      const __m512i w0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      const __m512i w1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
      const __m512bh lo0 = (__m512bh)_mm512_permutexvar_epi16(w0, table), hi0 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w0, 4), table);
      const __m512bh lo1 = (__m512bh)_mm512_permutexvar_epi16(w1, table), hi1 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w1, 4), table);
      for (int t = 0; t < TM; t++) {
        const __m512bh x0 = (__m512bh)_mm512_set1_epi32(static_cast<int>(xs[t][j])), x1 = (__m512bh)_mm512_set1_epi32(static_cast<int>(xs[t][j + 1]));
        lo[t][0] = _mm512_dpbf16_ps(lo[t][0], lo0, x0);
        hi[t][0] = _mm512_dpbf16_ps(hi[t][0], hi0, x0);
        lo[t][1] = _mm512_dpbf16_ps(lo[t][1], lo1, x1);
        hi[t][1] = _mm512_dpbf16_ps(hi[t][1], hi1, x1);
      }
    }
    // the block's absmax of rows 0-15 and 16-31, bf16 -> float32
    const __m512i am = _mm512_loadu_si512(absmax + g * 32);
    const __m512 scale_lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(am)), 16));
    const __m512 scale_hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(am, 1)), 16));
    for (int t = 0; t < TM; t++) {
      acc_lo[t] = _mm512_fmadd_ps(_mm512_add_ps(lo[t][0], lo[t][1]), scale_lo, acc_lo[t]);
      acc_hi[t] = _mm512_fmadd_ps(_mm512_add_ps(hi[t][0], hi[t][1]), scale_hi, acc_hi[t]);
    }
  }
  for (int t = 0; t < TM; t++) {  // rounded to bf16 to nearest even, as Tensor.to(bfloat16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[t]), (__m256i)_mm512_cvtneps_pbh(acc_lo[t]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[t] + 16), (__m256i)_mm512_cvtneps_pbh(acc_hi[t]));
  }
}

void check_cpu_layout(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& lut, int64_t n, int64_t k, int64_t block) {
  TORCH_CHECK(n % 32 == 0 && block % 4 == 0 && k % block == 0, "llmslim: the CPU layout needs N % 32 == 0 and K a multiple of the block (a multiple of 4), got N=",
              n, " K=", k, " block=", block);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() * 2 == n * k, "llmslim: bad packed codes");
  check_tile_absmax(absmax, n, k, block);
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.numel() == 16, "llmslim: lut must hold 16 float32 values");
}

__m512i bf16_table(const at::Tensor& lut) {  // the 16 values as bf16, stored twice (vpermw reads an index's low 5 bits)
  alignas(64) uint16_t table_bits[32];
  for (int i = 0; i < 32; i++) table_bits[i] = c10::BFloat16(lut.data_ptr<float>()[i & 15]).x;
  return _mm512_load_si512(table_bits);
}

// One 32-row tile of the weight for all m rows of x (up to 4 tokens share each decoded step).
inline void gemv_rows_tile_4bit(const uint32_t* px, int64_t m, const uint8_t* codes, const at::BFloat16* am, int64_t n, int64_t k,
                                int64_t block, __m512i table, at::BFloat16* po, int64_t tile) {
  const int64_t steps = k / 2, block_steps = block / 2;
  const uint8_t* tc = codes + tile * steps * 32;
  for (int64_t m0 = 0; m0 < m; m0 += 4) {
    const uint32_t* xs[4];
    at::BFloat16* os[4];
    const int tm = static_cast<int>(std::min<int64_t>(4, m - m0));
    for (int t = 0; t < tm; t++) {
      xs[t] = px + (m0 + t) * steps;
      os[t] = po + (m0 + t) * n + tile * 32;
    }
    switch (tm) {
      case 1: gemv_tile_4bit<1>(xs, tc, am + tile * (k / block) * 32, steps, block_steps, table, os); break;
      case 2: gemv_tile_4bit<2>(xs, tc, am + tile * (k / block) * 32, steps, block_steps, table, os); break;
      case 3: gemv_tile_4bit<3>(xs, tc, am + tile * (k / block) * 32, steps, block_steps, table, os); break;
      default: gemv_tile_4bit<4>(xs, tc, am + tile * (k / block) * 32, steps, block_steps, table, os); break;
    }
  }
}

at::Tensor gemv_4bit_cpu_layout(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& lut, int64_t n,
                                int64_t k, int64_t block) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.size(1) == k && x.scalar_type() == at::kBFloat16,
              "llmslim: gemv_4bit_cpu_layout takes a 2-D bfloat16 CPU input of ", k, " columns, got ", x.sizes(), " ", x.scalar_type());
  check_cpu_layout(packed, absmax, lut, n, k, block);
  const int64_t m = x.size(0);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({m, n}, at::TensorOptions().dtype(at::kBFloat16));
  const __m512i table = bf16_table(lut);
  const uint32_t* px = reinterpret_cast<const uint32_t*>(xc.data_ptr<at::BFloat16>());
  const uint8_t* codes = packed.data_ptr<uint8_t>();
  const at::BFloat16* am = absmax.data_ptr<at::BFloat16>();
  at::BFloat16* po = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, n / 32, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; tile++) gemv_rows_tile_4bit(px, m, codes, am, n, k, block, table, po, tile);
  });
  return out;
}

// A few weights that read the same rows (q/k/v, gate/up) in one parallel region: their 32-row tiles are shared out
// together, so the threads meet once, not once per weight, and the rows are read once. Each output as
// gemv_4bit_cpu_layout's, bit for bit.
std::vector<at::Tensor> gemv_4bit_multi(const at::Tensor& x, at::TensorList packed, at::TensorList absmax, const at::Tensor& lut,
                                        at::IntArrayRef ns, int64_t block) {
  const int64_t w = static_cast<int64_t>(packed.size());
  TORCH_CHECK(w > 0 && static_cast<int64_t>(absmax.size()) == w && static_cast<int64_t>(ns.size()) == w,
              "llmslim: gemv_4bit_multi needs as many packed weights, absmax and sizes, got ", w, ", ", absmax.size(), ", ", ns.size());
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == at::kBFloat16, "llmslim: gemv_4bit_multi takes 2-D bfloat16 CPU rows, got ",
              x.sizes(), " ", x.scalar_type());
  const int64_t m = x.size(0), k = x.size(1);
  std::vector<int64_t> first_tile(w + 1, 0);
  std::vector<at::Tensor> outs;
  for (int64_t j = 0; j < w; j++) {
    check_cpu_layout(packed[j], absmax[j], lut, ns[j], k, block);
    outs.push_back(at::empty({m, ns[j]}, at::TensorOptions().dtype(at::kBFloat16)));
    first_tile[j + 1] = first_tile[j] + ns[j] / 32;
  }
  const at::Tensor xc = x.contiguous();
  const __m512i table = bf16_table(lut);
  const uint32_t* px = reinterpret_cast<const uint32_t*>(xc.data_ptr<at::BFloat16>());
  at::parallel_for(0, first_tile[w], 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; t++) {
      const int64_t j = std::upper_bound(first_tile.begin(), first_tile.end(), t) - first_tile.begin() - 1;
      gemv_rows_tile_4bit(px, m, packed[j].data_ptr<uint8_t>(), absmax[j].data_ptr<at::BFloat16>(), ns[j], k, block, table,
                          outs[j].data_ptr<at::BFloat16>(), t - first_tile[j]);
    }
  });
  return outs;
}

#endif  // LLMSLIM_AVX512_BF16

#if defined(LLMSLIM_AVX512_BF16) || defined(LLMSLIM_AVX2)

// Row-wise int8 (row-major (N, K), scale absmax / 127 per row). The weight needs no table: one
// sign extension (vpmovsxbw) makes 32 int16 values, and vpdpwssd multiplies them with int16
// activations, 32 exact products per instruction summed in int32, so the loop is two instructions
// per 32 bytes and runs at the memory's speed. On AVX2 (no VNNI) vpmaddwd forms the same exact
// products, 16 per instruction, summed in pairs into int32 lanes that a vpaddd accumulates: three
// instructions per 16 bytes, every sum bit-identical to the AVX-512 kernel's. The activations are quantized per block of 128
// columns to int16 (scale absmax / 32767): a relative error of at most 1.5e-5 of the block's
// largest |x| per element, far below the bf16 rounding they already carry. Int32 sums stay exact:
// a lane adds at most 8 products of |x| <= 32767 and |w| <= 128 per block.
// The weight's absmax is one per row (N,) (LLM.int8's format) or one per row and block of kInt8XBlock columns
// (N, ceil(K / kInt8XBlock)) (the int8 decode head's copy): a block's int32 sum is scaled by both blocks' scales.
constexpr int64_t kInt8XBlock = 128;

struct QuantizedX16 {
  std::vector<int16_t> q;     // (m, k)
  std::vector<float> scale;   // (m, blocks)
  int64_t blocks = 0;
};

inline __m256 bf16x8_to_float(const at::BFloat16* p);  // below, with the decode step's row operators

void quantize_x16(const at::BFloat16* x, int64_t m, int64_t k, QuantizedX16& out) {
  out.blocks = (k + kInt8XBlock - 1) / kInt8XBlock;
  out.q.resize(m * k);
  out.scale.resize(m * out.blocks);
  for (int64_t i = 0; i < m; i++) {
    for (int64_t b = 0; b < out.blocks; b++) {
      const int64_t c0 = b * kInt8XBlock, c1 = std::min(k, c0 + kInt8XBlock);
      const at::BFloat16* xr = x + i * k;
      // 8 at a time where whole (K % 32 == 0: always): the same maximum (a NaN leaves it as std::max does), products
      // and rounding (to nearest even, std::nearbyint's default), then the scalar tail
      int64_t c = c0;
      __m256 top = _mm256_setzero_ps();
      for (; c + 8 <= c1; c += 8) top = _mm256_max_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.f), bf16x8_to_float(xr + c)), top);
      float amax = hmax_avx2(top);
      for (; c < c1; c++) amax = std::max(amax, std::fabs(static_cast<float>(xr[c])));
      const float inv = amax > 0.f ? 32767.f / amax : 0.f;
      out.scale[i * out.blocks + b] = amax / 32767.f;
      int16_t* q = out.q.data() + i * k;
      const __m256 vinv = _mm256_set1_ps(inv);
      for (c = c0; c + 8 <= c1; c += 8) {
        alignas(32) int32_t r[8];  // then each to int16 as the scalar loop casts it (not saturated: a NaN's 0 stays 0)
        _mm256_store_si256(reinterpret_cast<__m256i*>(r), _mm256_cvttps_epi32(_mm256_round_ps(_mm256_mul_ps(bf16x8_to_float(xr + c), vinv),
                                                                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
        for (int j = 0; j < 8; j++) q[c + j] = static_cast<int16_t>(r[j]);
      }
      for (; c < c1; c++) q[c] = static_cast<int16_t>(std::nearbyint(static_cast<float>(xr[c]) * inv));
    }
  }
}

#ifdef LLMSLIM_AVX512_BF16
// `wscale`: nullptr (one absmax per row, applied by the caller), or the R rows' block absmaxes, `wstride` apart
template <int TM, int R>
inline void gemv_rows_int8(const int16_t* const* xq, const float* const* xscale, const int8_t* rows, int64_t k, const float* wscale,
                           int64_t wstride, float* totals) {
  __m512 acc[TM][R];
  for (int t = 0; t < TM; t++)
    for (int r = 0; r < R; r++) acc[t][r] = _mm512_setzero_ps();
  for (int64_t c0 = 0, b = 0; c0 < k; c0 += kInt8XBlock, b++) {
    const int64_t c1 = std::min(k, c0 + kInt8XBlock);
    __m512i dot[TM][R][2];  // two chains per row: vpdpwssd's latency is several cycles
    for (int t = 0; t < TM; t++)
      for (int r = 0; r < R; r++) dot[t][r][0] = dot[t][r][1] = _mm512_setzero_si512();
    // 64 columns a step, one chain each half: picked by a runtime index ((c >> 5) & 1), as before, the chains were
    // kept in memory, and the loop was bound by that (a 2048 x 2048 weight from cache, one Zen 5 thread: 125-135 us,
    // now 89; the same integer sums)
    int64_t c = c0;
    for (; c + 64 <= c1; c += 64) {
      __m512i w[R][2];
      for (int r = 0; r < R; r++)
        for (int h = 0; h < 2; h++)
          w[r][h] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + r * k + c + 32 * h)));
      for (int t = 0; t < TM; t++)
        for (int h = 0; h < 2; h++) {
          const __m512i xv = _mm512_loadu_si512(xq[t] + c + 32 * h);
          for (int r = 0; r < R; r++) dot[t][r][h] = _mm512_dpwssd_epi32(dot[t][r][h], w[r][h], xv);
        }
    }
    if (c < c1) {  // a block of an odd number of 32 columns (K's last)
      __m512i w[R];
      for (int r = 0; r < R; r++) w[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + r * k + c)));
      for (int t = 0; t < TM; t++) {
        const __m512i xv = _mm512_loadu_si512(xq[t] + c);
        for (int r = 0; r < R; r++) dot[t][r][0] = _mm512_dpwssd_epi32(dot[t][r][0], w[r], xv);
      }
    }
    for (int t = 0; t < TM; t++)
      for (int r = 0; r < R; r++) {
        const __m512 s = _mm512_set1_ps(wscale == nullptr ? xscale[t][b] : xscale[t][b] * wscale[r * wstride + b]);
        acc[t][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(dot[t][r][0], dot[t][r][1])), s, acc[t][r]);
      }
  }
  for (int t = 0; t < TM; t++)
    for (int r = 0; r < R; r++) totals[t * R + r] = _mm512_reduce_add_ps(acc[t][r]);
}
#else
// bytes ahead in each row on AVX2: EPYC, one thread pinned, the 1.1B shape's int8 head (49152 x 2048), best of 5, two
// sweeps: none 9.64 / 8.97 ms, T0 512 9.58 / 9.44, 1024 8.92 / 9.00, 2048 8.13 / 8.07; T1 1024-8192 8.37-8.98
constexpr int kPrefetchInt8Avx2 = 2048;

// As the AVX-512 kernel above, 16 columns per vpmaddwd. One int32 accumulator per token and row: the chain through
// it is a vpaddd (one cycle), and the R rows' chains are independent. A lane adds 16 products per block of 128
// columns (at most 16 x 32767 x 128 < 2^31).
template <int TM, int R>
inline void gemv_rows_int8(const int16_t* const* xq, const float* const* xscale, const int8_t* rows, int64_t k, const float* wscale,
                           int64_t wstride, float* totals) {
  __m256 acc[TM][R];
  for (int t = 0; t < TM; t++)
    for (int r = 0; r < R; r++) acc[t][r] = _mm256_setzero_ps();
  for (int64_t c0 = 0, b = 0; c0 < k; c0 += kInt8XBlock, b++) {
    const int64_t c1 = std::min(k, c0 + kInt8XBlock);
    __m256i dot[TM][R];
    for (int t = 0; t < TM; t++)
      for (int r = 0; r < R; r++) dot[t][r] = _mm256_setzero_si256();
    for (int64_t c = c0; c < c1; c += 32) {
      for (int half = 0; half < 2; half++) {
        __m256i w[R];
        for (int r = 0; r < R; r++) {
          if (half == 0) _mm_prefetch(reinterpret_cast<const char*>(rows + r * k + c) + kPrefetchInt8Avx2, _MM_HINT_T0);
          w[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + r * k + c + 16 * half)));
        }
        for (int t = 0; t < TM; t++) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[t] + c + 16 * half));
          for (int r = 0; r < R; r++) dot[t][r] = _mm256_add_epi32(dot[t][r], _mm256_madd_epi16(w[r], xv));
        }
      }
    }
    for (int t = 0; t < TM; t++)
      for (int r = 0; r < R; r++) {
        const __m256 s = _mm256_set1_ps(wscale == nullptr ? xscale[t][b] : xscale[t][b] * wscale[r * wstride + b]);
        acc[t][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[t][r]), s, acc[t][r]);
      }
  }
  for (int t = 0; t < TM; t++)
    for (int r = 0; r < R; r++) totals[t * R + r] = hsum_avx2(acc[t][r]);
}
#endif

// One int8 weight's operands, checked against rows of `k` columns
struct Int8Weight {
  const int8_t* w;
  const float* am;
  int64_t n;
  bool per_block;
};

Int8Weight int8_weight(const at::Tensor& weight, const at::Tensor& row_absmax, int64_t k, const char* op) {
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == k, "llmslim: ", op,
              " needs a contiguous int8 (N, K) weight with K = ", k, ", got ", weight.sizes());
  const int64_t n = weight.size(0), blocks = (k + kInt8XBlock - 1) / kInt8XBlock;
  const bool per_block = row_absmax.dim() == 2;
  TORCH_CHECK(row_absmax.scalar_type() == at::kFloat && row_absmax.is_contiguous() &&
                  (per_block ? row_absmax.size(0) == n && row_absmax.size(1) == blocks : row_absmax.numel() == n),
              "llmslim: ", op, " takes a contiguous float32 absmax of shape (", n, ",) or (", n, ", ", blocks, ") (one per row, or per row and block of ",
              kInt8XBlock, " columns), got ", row_absmax.sizes(), " ", row_absmax.scalar_type());
  return {weight.data_ptr<int8_t>(), row_absmax.data_ptr<float>(), n, per_block};
}

QuantizedX16 int8_rows_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.scalar_type() == at::kBFloat16, "llmslim: ", op, " takes a 2-D bfloat16 CPU input, got ",
              x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(x.size(1) % 32 == 0, "llmslim: ", op, " needs K % 32 == 0, got ", x.size(1));
  const at::Tensor xc = x.contiguous();
  QuantizedX16 xq;
  quantize_x16(xc.data_ptr<at::BFloat16>(), x.size(0), x.size(1), xq);
  return xq;
}

// Weight rows read together. AVX-512: one, and no software prefetch: a single stream per thread is what the hardware
// prefetcher follows best (AMD EPYC Zen 5, 2 threads, one decoded token's int8 matmuls of the 1.1B shape in a
// standalone loop: 4 rows with prefetch 512 bytes ahead 32.5 ms = 32.9 GB/s, without it 36.0; 2 rows 38.3; one row
// 25.2 with prefetch, 23.4 without = 45.7 GB/s, the machine's read rate; one thread 17.7 -> 32.2 GB/s). AVX2: four,
// prefetched (tuned on a Zen 3 EPYC, which this was not re-measured on).
#ifdef LLMSLIM_AVX512_BF16
constexpr int kInt8Rows = 1;
#else
constexpr int kInt8Rows = 4;
#endif

// Groups [begin, end) of kInt8Rows weight rows for all m input rows into po (m, n)
void run_int8_groups(const QuantizedX16& xq, int64_t m, int64_t k, const Int8Weight& wt, int64_t begin, int64_t end, at::BFloat16* po) {
  constexpr int R = kInt8Rows;
  const int64_t n = wt.n, blocks = xq.blocks;
  for (int64_t group = begin; group < end; group++) {
    const int64_t row0 = group * R;
    const int rows = static_cast<int>(std::min<int64_t>(R, n - row0));
    for (int64_t m0 = 0; m0 < m; m0 += 2) {  // two tokens share each loaded row chunk
      const int tm = static_cast<int>(std::min<int64_t>(2, m - m0));
      const int16_t* xs[2] = {xq.q.data() + m0 * k, xq.q.data() + (m0 + tm - 1) * k};
      const float* ss[2] = {xq.scale.data() + m0 * blocks, xq.scale.data() + (m0 + tm - 1) * blocks};
      float totals[2 * R];
      for (int r0 = 0; r0 < rows;) {  // kInt8Rows rows at a time; the last rows of N % kInt8Rows one by one
        const int8_t* wr = wt.w + (row0 + r0) * k;
        const float* ws = wt.per_block ? wt.am + (row0 + r0) * blocks : nullptr;
        const int step = rows - r0 >= R ? R : 1;
        if (step == R) {
          if (tm == 2) gemv_rows_int8<2, R>(xs, ss, wr, k, ws, blocks, totals);
          else gemv_rows_int8<1, R>(xs, ss, wr, k, ws, blocks, totals);
        } else {
          if (tm == 2) gemv_rows_int8<2, 1>(xs, ss, wr, k, ws, blocks, totals);
          else gemv_rows_int8<1, 1>(xs, ss, wr, k, ws, blocks, totals);
        }
        for (int t = 0; t < tm; t++)  // rounded to nearest even, as Tensor.to(bfloat16)
          for (int r = 0; r < step; r++)
            po[(m0 + t) * n + row0 + r0 + r] = totals[t * step + r] * ((wt.per_block ? 1.f : wt.am[row0 + r0 + r]) / 127.f);
        r0 += step;
      }
    }
  }
}

at::Tensor gemv_int8_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& row_absmax) {
  const QuantizedX16 xq = int8_rows_input(x, "gemv_int8_rows");
  const int64_t m = x.size(0), k = x.size(1);
  const Int8Weight wt = int8_weight(weight, row_absmax, k, "gemv_int8_rows");
  at::Tensor out = at::empty({m, wt.n}, at::TensorOptions().dtype(at::kBFloat16));
  at::BFloat16* po = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, (wt.n + kInt8Rows - 1) / kInt8Rows, 8, [&](int64_t begin, int64_t end) { run_int8_groups(xq, m, k, wt, begin, end, po); });
  return out;
}

// A few int8 weights that read the same rows (q/k/v, gate/up) in one call: the rows quantized once, the weights' row
// groups shared out together in one parallel region. Each output as gemv_int8_rows', bit for bit.
std::vector<at::Tensor> gemv_int8_rows_multi(const at::Tensor& x, at::TensorList weights, at::TensorList row_absmax) {
  TORCH_CHECK(!weights.empty() && weights.size() == row_absmax.size(), "llmslim: gemv_int8_rows_multi takes as many weights as absmax, got ",
              weights.size(), ", ", row_absmax.size());
  const QuantizedX16 xq = int8_rows_input(x, "gemv_int8_rows_multi");
  const int64_t m = x.size(0), k = x.size(1);
  std::vector<Int8Weight> wts;
  std::vector<at::Tensor> outs;
  std::vector<int64_t> first{0};  // each weight's first row group in the groups shared out
  for (size_t j = 0; j < weights.size(); j++) {
    wts.push_back(int8_weight(weights[j], row_absmax[j], k, "gemv_int8_rows_multi"));
    outs.push_back(at::empty({m, wts[j].n}, at::TensorOptions().dtype(at::kBFloat16)));
    first.push_back(first.back() + (wts[j].n + kInt8Rows - 1) / kInt8Rows);
  }
  at::parallel_for(0, first.back(), 8, [&](int64_t begin, int64_t end) {
    for (size_t j = 0; j < wts.size(); j++) {
      const int64_t lo = std::max(begin, first[j]), hi = std::min(end, first[j + 1]);
      if (lo < hi) run_int8_groups(xq, m, k, wts[j], lo - first[j], hi - first[j], outs[j].data_ptr<at::BFloat16>());
    }
  });
  return outs;
}

#endif  // LLMSLIM_AVX512_BF16 || LLMSLIM_AVX2

#ifdef LLMSLIM_AVX2

// AVX2 path. A step decodes 32 codes (16 bytes; element 2i in the high nibble) into four vectors of 8 floats.

// Float32 table (exact; float32 inputs with a table bf16 cannot hold): 8 codes per lookup through the table in two
// registers (vpermps, entries 8..15 blended in by bit 3), in the elements' own order.
struct FloatTable {
  __m256 lo, hi;
  explicit FloatTable(const float* lut) : lo(_mm256_loadu_ps(lut)), hi(_mm256_loadu_ps(lut + 8)) {}
  static constexpr bool permutes_x = false;

  inline __m256 eight(const uint8_t* p) const {
    uint32_t word;
    std::memcpy(&word, p, 4);
    const __m128i pairs = _mm_shuffle_epi8(_mm_cvtsi32_si128(static_cast<int>(word)), _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, -1, -1, -1, -1, -1, -1, -1, -1));
    const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(pairs), _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0)),
                                         _mm256_set1_epi32(0x0F));
    const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // bit 3 in the sign bit: entries 8..15
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), upper);
  }
  inline void decode(const uint8_t* p, __m256 w[4]) const {
    for (int j = 0; j < 4; j++) w[j] = eight(p + 4 * j);
  }
};

// Bfloat16 table (bf16/fp16 inputs, or a table bf16 holds exactly: as the AVX-512 path): the high and low bytes of
// the 16 bf16 entries looked up for 32 codes at once (two vpshufb), widened to float32 by placing them in the upper
// half of each lane. The values come out in a fixed order: within each 8 elements, the 4 even ones then the 4 odd
// ones; the input rows are permuted to match once per call (`permute_x`).
struct Bf16Table {
  __m256i lo_bytes, hi_bytes;
  explicit Bf16Table(const float* lut) {
    alignas(16) uint8_t lo[16], hi[16];
    for (int i = 0; i < 16; i++) {
      const uint16_t bits = c10::BFloat16(lut[i]).x;  // round to nearest even
      lo[i] = static_cast<uint8_t>(bits & 0xFF);
      hi[i] = static_cast<uint8_t>(bits >> 8);
    }
    lo_bytes = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(lo)));
    hi_bytes = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(hi)));
  }
  static constexpr bool permutes_x = true;

  inline void decode(const uint8_t* p, __m256 w[4]) const {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    // lane 0: the high nibbles (elements 0, 2, .., 30), lane 1: the low ones (1, 3, .., 31)
    const __m256i idx = _mm256_and_si256(_mm256_set_m128i(bytes, _mm_srli_epi16(bytes, 4)), _mm256_set1_epi8(0x0F));
    const __m256i lo = _mm256_shuffle_epi8(lo_bytes, idx), hi = _mm256_shuffle_epi8(hi_bytes, idx);
    const __m256i first = _mm256_unpacklo_epi8(lo, hi), second = _mm256_unpackhi_epi8(lo, hi);  // bf16 words
    const __m256i zero = _mm256_setzero_si256();
    w[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, first));   // elements 0 2 4 6 | 1 3 5 7
    w[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, first));   // 8 .. 14 | 9 .. 15
    w[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, second));  // 16 .. 22 | 17 .. 23
    w[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, second));  // 24 .. 30 | 25 .. 31
  }
};

// x in Bf16Table's order: within each 8 elements, the even ones then the odd ones.
std::vector<float> permute_x(const float* x, int64_t m, int64_t k) {
  std::vector<float> out(m * k);
  for (int64_t i = 0; i < m * k; i += 8)
    for (int t = 0; t < 4; t++) {
      out[i + t] = x[i + 2 * t];
      out[i + 4 + t] = x[i + 2 * t + 1];
    }
  return out;
}

// MI input rows against one weight row: per group (a run of whole 32-element steps, as group >= 32 and K % 64 == 0),
// the table values times x summed in float32 (four accumulators per row, for the FMA latency), then times the group's
// scale; int4's zero times the group's x sum. `shift` = log2(group): no division in the loop. STEPS > 0: every group
// is STEPS whole steps inside one row (K a multiple of the group), unrolled.
template <int MI, int STEPS, typename Table>
void row_avx2(const Table& table, const float* x, int64_t k, const float* xsum, int64_t gpr, const uint8_t* codes, const Scales& s,
              int64_t row, int shift, int64_t row_stride, float* out, int64_t n) {
  __m256 total[MI];
  float zero_part[MI];
  for (int i = 0; i < MI; i++) {
    total[i] = _mm256_setzero_ps();
    zero_part[i] = 0.f;
  }
  for (int64_t col = 0; col < k;) {
    const int64_t e = row * row_stride + col, g = e >> shift;
    const int64_t end = STEPS ? col + 32 * STEPS : std::min(k, col + ((g + 1) << shift) - e);
    __m256 acc[MI][4];
    for (int i = 0; i < MI; i++)
      for (int j = 0; j < 4; j++) acc[i][j] = _mm256_setzero_ps();
    const uint8_t* p = codes + (row * k + col) / 2;
#pragma GCC unroll 4
    for (int64_t c = col; c < end; c += 32, p += 16) {
      __m256 w[4];
      table.decode(p, w);
      for (int i = 0; i < MI; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(x + i * k + c + 8 * j), acc[i][j]);
    }
    const __m256 scale = _mm256_set1_ps(s.scale(g));
    for (int i = 0; i < MI; i++) {
      const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[i][0], acc[i][1]), _mm256_add_ps(acc[i][2], acc[i][3]));
      total[i] = _mm256_fmadd_ps(scale, sum, total[i]);
      if (s.zeros) zero_part[i] += s.zero(g) * xsum[i * gpr + (col >> shift)];
    }
    col = end;
  }
  for (int i = 0; i < MI; i++) out[i * n + row] = hsum_avx2(total[i]) + zero_part[i];
}

template <int STEPS, typename Table>
inline void row_avx2_any(int64_t mi, const Table& table, const float* x, int64_t k, const float* xsum, int64_t gpr, const uint8_t* codes,
                         const Scales& s, int64_t row, int shift, int64_t row_stride, float* out, int64_t n) {
  switch (mi) {
    case 1: row_avx2<1, STEPS>(table, x, k, xsum, gpr, codes, s, row, shift, row_stride, out, n); break;
    case 2: row_avx2<2, STEPS>(table, x, k, xsum, gpr, codes, s, row, shift, row_stride, out, n); break;
    case 3: row_avx2<3, STEPS>(table, x, k, xsum, gpr, codes, s, row, shift, row_stride, out, n); break;
    default: row_avx2<4, STEPS>(table, x, k, xsum, gpr, codes, s, row, shift, row_stride, out, n); break;
  }
}

template <typename Table>
void mm_avx2(const Table& table, const float* x, int64_t m, const float* xsum, int64_t gpr, const uint8_t* codes, const Scales& s, int64_t n,
             int64_t k, int64_t group, int64_t row_stride, float* out) {
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(group));  // group: a power of two (check_common)
  // groups of 64 or 128 that never straddle rows: their step loops unrolled
  const int64_t steps = (k % group == 0 && row_stride % group == 0 && (group == 64 || group == 128)) ? group / 32 : 0;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; row++) {
      for (int64_t i0 = 0; i0 < m; i0 += 4) {  // up to 4 input rows share each decoded step of the weight row
        const float* xi = x + i0 * k;
        const float* si = xsum ? xsum + i0 * gpr : nullptr;
        float* oi = out + i0 * n;
        const int64_t mi = std::min<int64_t>(4, m - i0);
        if (steps == 2) {
          row_avx2_any<2>(mi, table, xi, k, si, gpr, codes, s, row, shift, row_stride, oi, n);
        } else if (steps == 4) {
          row_avx2_any<4>(mi, table, xi, k, si, gpr, codes, s, row, shift, row_stride, oi, n);
        } else {
          row_avx2_any<0>(mi, table, xi, k, si, gpr, codes, s, row, shift, row_stride, oi, n);
        }
      }
    }
  });
}

inline void halves_to_floats(const at::Half* src, int64_t count, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < count; i++) dst[i] = static_cast<float>(src[i]);
}

// 4-bit codes x int8 activations on AVX2 (see mm_int4_q8 above): 32 bytes of codes (64 weights) per step, their high
// and low nibbles against the even and odd quantized activations (quantize_x's layout), summed to int32 per 4 bytes of
// codes (one lane of 8 weights), then times the weight's and the activations' scales in float32. The levels:
//  - int4: the codes themselves (0..15, unsigned) through vpmaddubsw (pairs summed to int16: at most 2 x 15 x 127 per
//    product pair, twice, so no saturation), the -8 in the lane bias;
//  - a 16-entry int8 table (NF4's values x 127, rounded) looked up with vpshufb, signed: vpmaddubsw takes |level| and
//    the activation with the level's sign (vpsignb, as llama.cpp multiplies two signed blocks), each product pair up to
//    2 x 127 x 127, so the two nibbles' pairs are widened to int32 separately.
struct Int4Levels {
  static constexpr bool biased = true;
  inline __m256i dot(__m256i hi, __m256i lo, __m256i xe, __m256i xo, __m256i ones) const {
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(hi, xe), _mm256_maddubs_epi16(lo, xo)), ones);
  }
};

struct TableLevels {
  static constexpr bool biased = false;
  __m256i table;  // the 16 int8 levels in both 128-bit lanes
  explicit TableLevels(const int8_t* levels) {
    const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(levels));
    table = _mm256_set_m128i(t, t);
  }
  inline __m256i dot(__m256i hi, __m256i lo, __m256i xe, __m256i xo, __m256i ones) const {
    const __m256i wh = _mm256_shuffle_epi8(table, hi), wl = _mm256_shuffle_epi8(table, lo);
    const __m256i ph = _mm256_maddubs_epi16(_mm256_sign_epi8(wh, wh), _mm256_sign_epi8(xe, wh));
    const __m256i pl = _mm256_maddubs_epi16(_mm256_sign_epi8(wl, wl), _mm256_sign_epi8(xo, wl));
    return _mm256_add_epi32(_mm256_madd_epi16(ph, ones), _mm256_madd_epi16(pl, ones));
  }
};

// MI input rows (quantized) x every weight row: each step of codes is unpacked once for all MI rows. `row_setup(row,
// scales, extra, MI)` fills the weight row's per-group scales (group = 1 << shift, whole groups per row) and adds what
// each input row gets besides (int4's zero term) to extra[0..MI).
template <int MI, typename Levels, typename RowSetup>
void rows_q8(const Levels& levels, const QuantizedX* q, const uint8_t* c, int64_t k, int64_t n, int shift, int64_t groups_per_row,
             const RowSetup& row_setup, float* out) {
  const int64_t halves = k / 64;  // steps of 64 weights (32 bytes)
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    std::vector<float> row_scale(groups_per_row);
    for (int64_t row = begin; row < end; row++) {
      const uint8_t* rc = c + row * k / 2;
      float extra[4] = {0.f, 0.f, 0.f, 0.f};
      row_setup(row, row_scale.data(), extra, MI);
      __m256 acc[MI];
      for (int t = 0; t < MI; t++) acc[t] = _mm256_setzero_ps();
      for (int64_t h = 0; h < halves; h++) {
        // half h covers bytes 32h.. of the row's codes: chunk h / 2, lanes 8 (h % 2).. of its 16
        const int64_t chunk = h >> 1, lane = chunk * 16 + (h & 1) * 8, byte = chunk * 64 + (h & 1) * 32;
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rc + h * 32));
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4), lo = _mm256_and_si256(v, low4);
        const int64_t col = h * 64;
        const __m256 wscale = _mm256_insertf128_ps(_mm256_set1_ps(row_scale[col >> shift]), _mm_set1_ps(row_scale[(col + 32) >> shift]), 1);
        for (int t = 0; t < MI; t++) {
          __m256i dot = levels.dot(hi, lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[t].even.data() + byte)),
                                   _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[t].odd.data() + byte)), ones);
          if (Levels::biased) dot = _mm256_add_epi32(dot, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q[t].lane_bias.data() + lane)));
          acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(wscale, _mm256_loadu_ps(q[t].lane_scale.data() + lane)), acc[t]);
        }
      }
      for (int t = 0; t < MI; t++) out[t * n + row] = hsum_avx2(acc[t]) + extra[t];
    }
  });
}

// every input row of x (m of them, quantized here) in tiles of up to 4 through rows_q8
template <typename Levels, typename RowSetup>
void mm_q8(const Levels& levels, const float* x, int64_t m, int64_t k, int64_t n, int64_t group, const uint8_t* c, const RowSetup& row_setup,
           float* out) {
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(group));
  const int64_t groups_per_row = (k + group - 1) / group;
  // input row i is two quantized rows (2i: x, 2i + 1: its rounding's remainder), their products summed below
  const int64_t parts = 2 * m;
  std::vector<QuantizedX> q(parts);
  for (int64_t i = 0; i < m; i++) quantize_x(x + i * k, k, group, groups_per_row, q[2 * i], &q[2 * i + 1]);
  std::vector<float> partial(parts * n);
  for (int64_t i0 = 0; i0 < parts; i0 += 4) {
    const QuantizedX* qi = q.data() + i0;
    const auto setup = [&](int64_t row, float* row_scale, float* extra, int count) { row_setup(row, row_scale, qi, extra, count); };
    float* oi = partial.data() + i0 * n;
    switch (std::min<int64_t>(4, parts - i0)) {
      case 2: rows_q8<2>(levels, qi, c, k, n, shift, groups_per_row, setup, oi); break;
      default: rows_q8<4>(levels, qi, c, k, n, shift, groups_per_row, setup, oi); break;
    }
  }
  for (int64_t i = 0; i < m; i++)
    for (int64_t j = 0; j < n; j++) out[i * n + j] = partial[2 * i * n + j] + partial[(2 * i + 1) * n + j];
}

at::Tensor mm_int4_q8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& zeros, int64_t n,
                      int64_t group) {
  const int64_t m = x.size(0), k = x.size(1);
  const int64_t groups_per_row = (k + group - 1) / group;
  const Scales s = check_int4_q8(x, codes, scales, zeros, n, group);
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({m, n}, at::TensorOptions().dtype(at::kFloat));
  const auto setup = [&](int64_t row, float* row_scale, const QuantizedX* q, float* extra, int count) {
    halves_to_floats(s.f16 + row * groups_per_row, groups_per_row, row_scale);
    for (int64_t g = 0; g < groups_per_row; g++) {  // the zero term: zero x sum(x) over the row's groups
      const float zero = static_cast<float>(s.zeros[row * groups_per_row + g]);
      for (int t = 0; t < count; t++) extra[t] += zero * q[t].group_sum[g];
    }
  };
  mm_q8(Int4Levels(), xf.data_ptr<float>(), m, k, n, group, codes.data_ptr<uint8_t>(), setup, out.data_ptr<float>());
  return out.to(x.scalar_type());
}

// NF4 (any 16-entry table whose levels x 127 are near integers) x int8 activations, on bitsandbytes' stored layout:
// blocks over the flattened weight, whole blocks per row (K % block == 0), absmax float32 or double-quantized.
at::Tensor mm_4bit_q8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& levels, const at::Tensor& scales,
                      const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                      const c10::optional<at::Tensor>& nested_offset, int64_t n, int64_t block) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "llmslim: mm_4bit_q8 takes a 2-D CPU input, got ", x.sizes());
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(k % 64 == 0 && k % block == 0, "llmslim: mm_4bit_q8 needs K % 64 == 0 and whole blocks per row, got K ", k, ", block ", block);
  TORCH_CHECK(block >= 32 && (block & (block - 1)) == 0, "llmslim: block must be a power of two >= 32, got ", block);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.numel() * 2 >= n * k, "llmslim: bad 4-bit codes");
  TORCH_CHECK(levels.scalar_type() == at::kChar && levels.numel() == 16 && levels.is_contiguous(), "llmslim: levels must be 16 int8");
  const double offset = nested_offset.has_value() ? nested_offset->item<double>() : 0.0;
  const int64_t blocks_per_row = k / block;
  const Scales s = make_scales(scales, c10::nullopt, nested_absmax, nested_code, offset, n * blocks_per_row);
  TORCH_CHECK(s.mode != 2, "llmslim: mm_4bit_q8 takes float32 or double-quantized absmax");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({m, n}, at::TensorOptions().dtype(at::kFloat));
  const auto setup = [&](int64_t row, float* row_scale, const QuantizedX*, float*, int) {
    for (int64_t b = 0; b < blocks_per_row; b++) row_scale[b] = s.scale(row * blocks_per_row + b) * (1.f / 127.f);
  };
  mm_q8(TableLevels(levels.data_ptr<int8_t>()), xf.data_ptr<float>(), m, k, n, block, codes.data_ptr<uint8_t>(), setup, out.data_ptr<float>());
  return out.to(x.scalar_type());
}

// ---- NF4/FP4 x int16 activations (AVX2): the table kernel's arithmetic in integers ------------------------------------
//
// mm_4bit's AVX2 path spends most of its instructions turning codes into float32 (two byte lookups, then six
// unpacks per 32 codes, all on the two shuffle ports of a Zen core). Here each code becomes a 16-bit integer level
// instead (its value x 8191, rounded: at most 6.1e-5 of the block's absmax off, where a bf16 table is off by up to
// 2^-9 of the value) with the same two lookups and one unpack per 16, and vpmaddwd multiplies 16 of them by the
// activations held as int16 per 64 columns (x 32767 / their absmax, as gemv_int8_rows'): exact products, summed
// in int32 per 64 columns (8 products per lane, at most 8 x 32767 x 8191 < 2^31), then in float32 times the
// activations' and the block's scales. Per 64 weights: 8 shuffles instead of 18.
constexpr int kLevels16 = 8191;

// A 32-byte step of codes (64 weights; byte j holds element 2j in its high nibble, 2j + 1 in its low one) becomes four
// vectors of 16 levels: the high nibbles' bytes 0-7 | 16-23, 8-15 | 24-31, then the low nibbles' likewise. kStepOrder
// gives, for each of the 64 words in that order, the element it holds; the activations are stored in that order.
struct StepOrder {
  int element[64];
  StepOrder() {
    for (int t = 0; t < 4; t++)
      for (int w = 0; w < 16; w++) element[t * 16 + w] = 2 * ((w / 8) * 16 + (t % 2) * 8 + w % 8) + (t >= 2 ? 1 : 0);
  }
};
const StepOrder kStepOrder;

inline __m256 bf16x8_to_float(const at::BFloat16* p);  // below, with the decode step's row operators

// x rows (float32, bf16 or fp16) as int16 per 64 columns in kStepOrder, and each 64 columns' scale (absmax / 32767)
template <typename T>
void quantize_x_steps(const T* x, int64_t m, int64_t k, int16_t* q, float* scale) {
  const int64_t steps = k / 64;
  float v[64];
  for (int64_t i = 0; i < m; i++)
    for (int64_t st = 0; st < steps; st++) {
      const T* xs = x + i * k + st * 64;
      int16_t* qs = q + i * k + st * 64;
      if constexpr (std::is_same_v<T, at::BFloat16>) {  // 8 at a time: the same maximum, products and rounding
        __m256 top = _mm256_setzero_ps();
        const __m256 sign = _mm256_set1_ps(-0.f);
        for (int j = 0; j < 64; j += 8) {
          const __m256 e = bf16x8_to_float(xs + j);
          _mm256_storeu_ps(v + j, e);
          top = _mm256_max_ps(_mm256_andnot_ps(sign, e), top);  // a NaN element leaves the maximum as it was, as std::max
        }
        const float amax = hmax_avx2(top);
        const float inv = amax > 0.f ? 32767.f / amax : 0.f;
        scale[i * steps + st] = amax / 32767.f;
        alignas(32) int32_t rounded[64];
        const __m256 vinv = _mm256_set1_ps(inv);
        for (int j = 0; j < 64; j += 8)  // to nearest even (std::nearbyint's default), then exact to int32
          _mm256_store_si256(reinterpret_cast<__m256i*>(rounded + j),
                             _mm256_cvttps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(v + j), vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
        for (int j = 0; j < 64; j++) qs[j] = static_cast<int16_t>(rounded[kStepOrder.element[j]]);
        continue;
      }
      float amax = 0.f;
      for (int j = 0; j < 64; j++) {
        v[j] = static_cast<float>(xs[j]);
        amax = std::max(amax, std::fabs(v[j]));
      }
      const float inv = amax > 0.f ? 32767.f / amax : 0.f;
      scale[i * steps + st] = amax / 32767.f;
      for (int j = 0; j < 64; j++) qs[j] = static_cast<int16_t>(std::nearbyint(v[kStepOrder.element[j]] * inv));
    }
}

// The scales of blocks [g0, g0 + count) times `mul` into out: float32 as stored, or double-quantized (8 at a time
// through two gathers: the 8-bit code's value and its 256-block's absmax)
inline void block_scales(const Scales& s, int64_t g0, int64_t count, float mul, float* out) {
  int64_t j = 0;
  const __m256 vmul = _mm256_set1_ps(mul);
  if (s.mode == 1 && g0 + count < (int64_t{1} << 31)) {
    const __m256 offset = _mm256_set1_ps(s.nested_offset);
    for (; j + 8 <= count; j += 8) {
      const int64_t g = g0 + j;
      const __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s.u8 + g)));
      const __m256i nest = _mm256_srli_epi32(_mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(g)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), 8);
      const __m256 value = _mm256_fmadd_ps(_mm256_i32gather_ps(s.nested_code, q, 4), _mm256_i32gather_ps(s.nested_absmax, nest, 4), offset);
      _mm256_storeu_ps(out + j, _mm256_mul_ps(value, vmul));
    }
  } else if (s.mode == 0) {
    for (; j + 8 <= count; j += 8) _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_loadu_ps(s.f32 + g0 + j), vmul));
  }
  for (; j < count; j++) out[j] = s.scale(g0 + j) * mul;
}

// bytes ahead in a row's codes. EPYC (Zen 3), one thread pinned, a 1.1B token's 4-bit matmuls (0.49 GB), best of 5,
// two sweeps: none 57.0 / 52.2 ms, T0 256 61-69, 512 45.3 / 44.0, 1024 41.8 / 42.4, 2048 40.9 / 41.4; T1 1024-8192
// 43.5-46.6 (256 had come out best in an earlier sweep at 2 threads, whose runs varied 11-17 GB/s)
constexpr int kPrefetch4bitI16 = 2048;

// Four vectors of 16 levels from a 32-byte step of codes (see StepOrder)
inline void levels_i16(const __m256i tables[2], const uint8_t* p, __m256i w[4]) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4), lo = _mm256_and_si256(v, low4);
  const __m256i hl = _mm256_shuffle_epi8(tables[0], hi), hh = _mm256_shuffle_epi8(tables[1], hi);
  const __m256i ll = _mm256_shuffle_epi8(tables[0], lo), lh = _mm256_shuffle_epi8(tables[1], lo);
  w[0] = _mm256_unpacklo_epi8(hl, hh);
  w[1] = _mm256_unpackhi_epi8(hl, hh);
  w[2] = _mm256_unpacklo_epi8(ll, lh);
  w[3] = _mm256_unpackhi_epi8(ll, lh);
}

// The int32 sums of one step's 64 products, 8 lanes
inline __m256i dot_i16(const __m256i w[4], const int16_t* x) {
  const __m256i* xv = reinterpret_cast<const __m256i*>(x);
  return _mm256_add_epi32(_mm256_add_epi32(_mm256_madd_epi16(w[0], _mm256_loadu_si256(xv)), _mm256_madd_epi16(w[1], _mm256_loadu_si256(xv + 1))),
                          _mm256_add_epi32(_mm256_madd_epi16(w[2], _mm256_loadu_si256(xv + 2)), _mm256_madd_epi16(w[3], _mm256_loadu_si256(xv + 3))));
}

// MI input rows x weight rows [begin, end): per row, each step's int32 sums times its scale (the activations' scale
// of those 64 columns times the weight block's, / 8191; `scale`, filled per row) summed in float32, two steps at a
// time into two accumulators per input row.
// Each step's scale of one weight row for MI input rows: the block's scale / kLevels16 times the activations' scale
template <int MI>
inline void row_scales_i16(const Scales& s, const float* const* xscale, int64_t row, int64_t steps, int64_t blocks, int shift, float* ws,
                           float* scale) {
  block_scales(s, row * blocks, blocks, 1.f / kLevels16, ws);
  for (int t = 0; t < MI; t++) {
    int64_t st = 0;
    if (shift == 0)  // blocks of 64 (the default): one block per step, 8 steps at a time (the same products)
      for (; st + 8 <= steps; st += 8)
        _mm256_storeu_ps(&scale[t * steps + st], _mm256_mul_ps(_mm256_loadu_ps(xscale[t] + st), _mm256_loadu_ps(&ws[st])));
    for (; st < steps; st++) scale[t * steps + st] = xscale[t][st] * ws[st >> shift];
  }
}

// One input row against two weight rows at a time (decode): each row's sums formed as rows_i16 forms them (the same
// steps into the same two accumulators, the same bits), interleaved so that the core has two rows' independent work in
// flight. A short row's work ends in a dependent chain (the accumulators, then the horizontal sum) that one row at a
// time left exposed: on a Zen 3 core, K = 576 cost ~14 cycles per 64 weights against ~8 for K = 2048.
// Rows up to this long take row_pair_i16 (measured on SmolLM2's K = 576; longer rows, where the one-row loop is already
// near its steady rate, were not shown to gain and keep it: 2-thread timings of the 1.1B shape swung too much to tell)
constexpr int64_t kPairRowsMaxK = 1024;

inline void row_pair_i16(const __m256i tables[2], const int16_t* xq, const float* sc0, const float* sc1, const uint8_t* r0, const uint8_t* r1,
                         int64_t steps, float* o0, float* o1) {
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00;
  __m256i w[4];
  int64_t st = 0;
  for (; st + 2 <= steps; st += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(r0 + st * 32) + kPrefetch4bitI16, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(r1 + st * 32) + kPrefetch4bitI16, _MM_HINT_T0);
    levels_i16(tables, r0 + st * 32, w);
    a00 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i16(w, xq + st * 64)), _mm256_broadcast_ss(sc0 + st), a00);
    levels_i16(tables, r1 + st * 32, w);
    a10 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i16(w, xq + st * 64)), _mm256_broadcast_ss(sc1 + st), a10);
    levels_i16(tables, r0 + st * 32 + 32, w);
    a01 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i16(w, xq + st * 64 + 64)), _mm256_broadcast_ss(sc0 + st + 1), a01);
    levels_i16(tables, r1 + st * 32 + 32, w);
    a11 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i16(w, xq + st * 64 + 64)), _mm256_broadcast_ss(sc1 + st + 1), a11);
  }
  if (st < steps) {  // an odd step count
    levels_i16(tables, r0 + st * 32, w);
    a00 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i16(w, xq + st * 64)), _mm256_broadcast_ss(sc0 + st), a00);
    levels_i16(tables, r1 + st * 32, w);
    a10 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i16(w, xq + st * 64)), _mm256_broadcast_ss(sc1 + st), a10);
  }
  *o0 = hsum_avx2(_mm256_add_ps(a00, a01));
  *o1 = hsum_avx2(_mm256_add_ps(a10, a11));
}

template <int MI>
void rows_i16(const __m256i tables[2], const int16_t* const* xq, const float* const* xscale, const uint8_t* codes, const Scales& s,
              int64_t k, int64_t n, int64_t block, int64_t begin, int64_t end, float* out) {
  const int64_t steps = k / 64, blocks = k / block;
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(block / 64));  // steps per block: a power of two
  std::vector<float> scale(MI * steps), ws(blocks);
  if (MI == 1 && k <= kPairRowsMaxK) {
    std::vector<float> scale1(steps);
    for (; begin + 2 <= end; begin += 2) {
      row_scales_i16<1>(s, xscale, begin, steps, blocks, shift, ws.data(), scale.data());
      row_scales_i16<1>(s, xscale, begin + 1, steps, blocks, shift, ws.data(), scale1.data());
      row_pair_i16(tables, xq[0], scale.data(), scale1.data(), codes + begin * k / 2, codes + (begin + 1) * k / 2, steps, out + begin,
                   out + begin + 1);
    }
  }
  for (int64_t row = begin; row < end; row++) {
    row_scales_i16<MI>(s, xscale, row, steps, blocks, shift, ws.data(), scale.data());
    const uint8_t* rc = codes + row * k / 2;
    __m256 acc[MI][2];
    for (int t = 0; t < MI; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    int64_t st = 0;
    for (; st + 2 <= steps; st += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(rc + st * 32) + kPrefetch4bitI16, _MM_HINT_T0);
      __m256i w0[4], w1[4];
      levels_i16(tables, rc + st * 32, w0);
      levels_i16(tables, rc + st * 32 + 32, w1);
      for (int t = 0; t < MI; t++) {
        acc[t][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i16(w0, xq[t] + st * 64)), _mm256_broadcast_ss(&scale[t * steps + st]), acc[t][0]);
        acc[t][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i16(w1, xq[t] + st * 64 + 64)), _mm256_broadcast_ss(&scale[t * steps + st + 1]), acc[t][1]);
      }
    }
    if (st < steps) {  // an odd step count
      __m256i w0[4];
      levels_i16(tables, rc + st * 32, w0);
      for (int t = 0; t < MI; t++)
        acc[t][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_i16(w0, xq[t] + st * 64)), _mm256_broadcast_ss(&scale[t * steps + st]), acc[t][0]);
    }
    for (int t = 0; t < MI; t++) out[t * n + row] = hsum_avx2(_mm256_add_ps(acc[t][0], acc[t][1]));
  }
}

// float32 sums into the output's dtype (bf16 and fp16 rounded to nearest even, as Tensor.to)
template <typename T>
void store_rows(const float* sums, int64_t count, T* out) {
  for (int64_t i = 0; i < count; i++) out[i] = static_cast<T>(sums[i]);
}

// The operands mm_4bit_i16 and mm_4bit_i16_multi share: the table's levels, the rows quantized once
struct I16Rows {
  __m256i tables[2];
  int64_t m = 0, k = 0, steps = 0;
  at::ScalarType dtype;
  std::vector<int16_t> q;
  std::vector<float> scale;
};

I16Rows prepare_i16(const at::Tensor& x, const at::Tensor& lut, int64_t block, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "llmslim: ", op, " takes a 2-D CPU input, got ", x.sizes());
  I16Rows r;
  r.m = x.size(0);
  r.k = x.size(1);
  r.steps = r.k / 64;
  r.dtype = x.scalar_type();
  TORCH_CHECK(block >= 64 && (block & (block - 1)) == 0 && r.k % block == 0, "llmslim: ", op,
              " needs a power-of-two block >= 64 that divides K, got K ", r.k, ", block ", block);
  TORCH_CHECK(r.dtype == at::kFloat || r.dtype == at::kBFloat16 || r.dtype == at::kHalf, "llmslim: ", op,
              " takes float32, bfloat16 or float16 rows, got ", r.dtype);
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.numel() == 16 && lut.is_contiguous(), "llmslim: the table must be 16 float32 values");
  const float* l = lut.data_ptr<float>();
  alignas(16) uint8_t lo[16], hi[16];
  for (int i = 0; i < 16; i++) {
    TORCH_CHECK(std::fabs(l[i]) <= 1.f, "llmslim: ", op, " takes a table within [-1, 1], got ", l[i]);
    const auto level = static_cast<uint16_t>(static_cast<int16_t>(std::nearbyint(l[i] * kLevels16)));
    lo[i] = static_cast<uint8_t>(level & 0xFF);
    hi[i] = static_cast<uint8_t>(level >> 8);
  }
  r.tables[0] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(lo)));
  r.tables[1] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(hi)));
  const at::Tensor xc = x.contiguous();
  r.q.resize(r.m * r.k);
  r.scale.resize(r.m * r.steps);
  if (r.dtype == at::kBFloat16) quantize_x_steps(xc.data_ptr<at::BFloat16>(), r.m, r.k, r.q.data(), r.scale.data());
  else if (r.dtype == at::kHalf) quantize_x_steps(xc.data_ptr<at::Half>(), r.m, r.k, r.q.data(), r.scale.data());
  else quantize_x_steps(xc.data_ptr<float>(), r.m, r.k, r.q.data(), r.scale.data());
  return r;
}

// One weight's scales (float32 or double-quantized absmax); the offset read in place (a 0-dim float32 tensor: .item()
// costs a dispatch, several us of a ~20 us call)
Scales i16_scales(const at::Tensor& codes, const at::Tensor& scales, const c10::optional<at::Tensor>& nested_absmax,
                  const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& nested_offset, int64_t n, int64_t k,
                  int64_t block) {
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous() && codes.numel() * 2 >= n * k, "llmslim: bad 4-bit codes");
  TORCH_CHECK(!nested_offset.has_value() || (nested_offset->scalar_type() == at::kFloat && nested_offset->numel() == 1),
              "llmslim: nested_offset must be one float32 value");
  const double offset = nested_offset.has_value() ? *nested_offset->data_ptr<float>() : 0.0;
  const Scales s = make_scales(scales, c10::nullopt, nested_absmax, nested_code, offset, n * (k / block));
  TORCH_CHECK(s.mode != 2, "llmslim: the 4-bit i16 kernel takes float32 or double-quantized absmax");
  return s;
}

// A double-quantized absmax decoded to float32 once, row by row as rows_i16 decodes it (the same vector and scalar
// steps), so that mm_4bit_i16 given it computes the same bits as given the uint8 absmax: decoding in the kernel costs
// ~0.7 ns a block (a 256-entry lookup per 64 weights, ~25% of the kernel's time on a Zen 3 core); kept, 4 bytes a block.
at::Tensor block_scales_f32(const at::Tensor& scales, const at::Tensor& nested_absmax, const at::Tensor& nested_code,
                            const at::Tensor& nested_offset, int64_t blocks_per_row) {
  TORCH_CHECK(scales.scalar_type() == at::kByte && scales.is_contiguous(), "llmslim: block_scales_f32 decodes a contiguous uint8 absmax, got ",
              scales.scalar_type());
  TORCH_CHECK(nested_offset.scalar_type() == at::kFloat && nested_offset.numel() == 1, "llmslim: nested_offset must be one float32 value");
  const int64_t n = scales.numel();
  TORCH_CHECK(blocks_per_row > 0 && n % blocks_per_row == 0, "llmslim: block_scales_f32 needs whole rows of ", blocks_per_row,
              " blocks, got ", n, " blocks");
  const Scales s = make_scales(scales, c10::nullopt, nested_absmax, nested_code, *nested_offset.data_ptr<float>(), n);
  at::Tensor out = at::empty({n}, scales.options().dtype(at::kFloat));
  float* po = out.data_ptr<float>();
  for (int64_t g = 0; g < n; g += blocks_per_row) block_scales(s, g, blocks_per_row, 1.f, po + g);
  return out;
}

// Weight rows [begin, end) for every input row into out (m, n) in the rows' dtype; `sums`: float32 scratch of m x n
void run_i16(const I16Rows& r, const uint8_t* codes, const Scales& s, int64_t n, int64_t block, int64_t begin, int64_t end,
             const at::Tensor& out, float* sums) {
  float* po = r.dtype == at::kFloat ? out.data_ptr<float>() : sums;
  for (int64_t i0 = 0; i0 < r.m; i0 += 4) {  // up to 4 input rows share each decoded step
    const int16_t* xs[4];
    const float* ss[4];
    const int64_t mi = std::min<int64_t>(4, r.m - i0);
    for (int t = 0; t < mi; t++) {
      xs[t] = r.q.data() + (i0 + t) * r.k;
      ss[t] = r.scale.data() + (i0 + t) * r.steps;
    }
    float* oi = po + i0 * n;
    switch (mi) {
      case 1: rows_i16<1>(r.tables, xs, ss, codes, s, r.k, n, block, begin, end, oi); break;
      case 2: rows_i16<2>(r.tables, xs, ss, codes, s, r.k, n, block, begin, end, oi); break;
      case 3: rows_i16<3>(r.tables, xs, ss, codes, s, r.k, n, block, begin, end, oi); break;
      default: rows_i16<4>(r.tables, xs, ss, codes, s, r.k, n, block, begin, end, oi); break;
    }
    if (r.dtype == at::kFloat) continue;
    for (int64_t t = i0; t < i0 + mi; t++) {
      if (r.dtype == at::kBFloat16) store_rows(po + t * n + begin, end - begin, out.data_ptr<at::BFloat16>() + t * n + begin);
      else store_rows(po + t * n + begin, end - begin, out.data_ptr<at::Half>() + t * n + begin);
    }
  }
}

// rows per thread: at least ~64 KiB of codes each, so that a small weight does not pay the threads' fork and join
int64_t i16_grain(int64_t k) { return std::max<int64_t>(16, (int64_t{1} << 17) / k); }

// NF4/FP4 (any 16-entry table within [-1, 1]) in bitsandbytes' stored layout, whole blocks of a multiple of 64 per row
at::Tensor mm_4bit_i16(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& lut, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                       const c10::optional<at::Tensor>& nested_offset, int64_t n, int64_t block) {
  const I16Rows r = prepare_i16(x, lut, block, "mm_4bit_i16");
  const Scales s = i16_scales(codes, scales, nested_absmax, nested_code, nested_offset, n, r.k, block);
  at::Tensor out = at::empty({r.m, n}, x.options());
  std::vector<float> sums(r.dtype == at::kFloat ? 0 : r.m * n);
  const uint8_t* c = codes.data_ptr<uint8_t>();
  at::parallel_for(0, n, i16_grain(r.k), [&](int64_t begin, int64_t end) { run_i16(r, c, s, n, block, begin, end, out, sums.data()); });
  return out;
}

// A few weights that read the same rows (q/k/v, gate/up; one table and block) in one call and one parallel region:
// their rows are shared out together, so the threads meet once, and the rows are quantized once. Each output as
// mm_4bit_i16's, bit for bit. Double-quantized weights pass one nested absmax and offset each (both lists empty
// otherwise) and one nested code.
std::vector<at::Tensor> mm_4bit_i16_multi(const at::Tensor& x, at::TensorList codes, const at::Tensor& lut, at::TensorList scales,
                                          at::TensorList nested_absmax, const c10::optional<at::Tensor>& nested_code,
                                          at::TensorList nested_offset, at::IntArrayRef ns, int64_t block) {
  const size_t count = codes.size();
  TORCH_CHECK(count > 0 && scales.size() == count && ns.size() == count, "llmslim: mm_4bit_i16_multi takes as many codes, scales and ns, got ",
              count, ", ", scales.size(), ", ", ns.size());
  const bool nested = !nested_absmax.empty();
  TORCH_CHECK(nested ? nested_absmax.size() == count && nested_offset.size() == count && nested_code.has_value() : nested_offset.empty(),
              "llmslim: mm_4bit_i16_multi takes one nested absmax and offset per weight (and the nested code), or none");
  const I16Rows r = prepare_i16(x, lut, block, "mm_4bit_i16_multi");
  std::vector<Scales> s;
  std::vector<at::Tensor> outs;
  std::vector<std::vector<float>> sums(count);
  std::vector<int64_t> first{0};  // each weight's first row in the rows shared out
  for (size_t j = 0; j < count; j++) {
    s.push_back(i16_scales(codes[j], scales[j], nested ? c10::optional<at::Tensor>(nested_absmax[j]) : c10::nullopt, nested_code,
                           nested ? c10::optional<at::Tensor>(nested_offset[j]) : c10::nullopt, ns[j], r.k, block));
    outs.push_back(at::empty({r.m, ns[j]}, x.options()));
    sums[j].resize(r.dtype == at::kFloat ? 0 : r.m * ns[j]);
    first.push_back(first.back() + ns[j]);
  }
  at::parallel_for(0, first.back(), i16_grain(r.k), [&](int64_t begin, int64_t end) {
    for (size_t j = 0; j < count; j++) {
      const int64_t lo = std::max(begin, first[j]), hi = std::min(end, first[j + 1]);
      if (lo < hi) run_i16(r, codes[j].data_ptr<uint8_t>(), s[j], ns[j], block, lo - first[j], hi - first[j], outs[j], sums[j].data());
    }
  });
  return outs;
}

#endif  // LLMSLIM_AVX2

at::Tensor mm_4bit(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& lut, const at::Tensor& scales,
                   const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& nested_absmax,
                   const c10::optional<at::Tensor>& nested_code, const c10::optional<at::Tensor>& nested_offset, int64_t n, int64_t group,
                   int64_t row_stride) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "llmslim: mm_4bit takes a 2-D CPU input, got ", x.sizes());
  const int64_t m = x.size(0), k = x.size(1);
  check_common(codes, lut, n, k, group, row_stride);
  // the offset as a tensor (read here): a compiled step passes the layer's buffer without a graph break
  const double offset = nested_offset.has_value() ? nested_offset->item<double>() : 0.0;
  Scales s = make_scales(scales, zeros, nested_absmax, nested_code, offset, n_groups_for(n, k, group, row_stride));
  TORCH_CHECK(!zeros.has_value() || row_stride % group == 0, "llmslim: zeros need per-row groups (row_stride a multiple of group)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "llmslim: mm_4bit supports float32, bfloat16 and float16 inputs, got ", x.scalar_type());
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({m, n}, at::TensorOptions().dtype(at::kFloat));
  const float* px = xf.data_ptr<float>();
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const float* l = lut.data_ptr<float>();
  if (m == 0 || n == 0) return out.to(x.scalar_type());
#ifdef LLMSLIM_AVX512_BF16
  if (k % 64 == 0) {
    const bool exact = x.scalar_type() == at::kFloat;  // bf16/fp16 inputs: one bf16 part (fp16 is rounded to bf16)
    std::vector<uint16_t> xs[2];
    prepare_x(px, m, k, exact, xs[0], xs[1]);
    std::vector<float> xsum;
    if (s.zeros) {
      const int64_t gpr = (row_stride + group - 1) / group;
      xsum.assign(m * gpr, 0.f);
      for (int64_t i = 0; i < m; i++)
        for (int64_t col = 0; col < k; col++) xsum[i * gpr + col / group] += px[i * k + col];
    }
    bool lut_exact = true;
    for (int i = 0; i < 16; i++) lut_exact = lut_exact && static_cast<float>(c10::BFloat16(l[i])) == l[i];
    if (exact && !lut_exact)
      mm_avx512<2, 2>(xs, m, xsum.data(), c, l, s, n, k, group, row_stride, out.data_ptr<float>());
    else if (exact)
      mm_avx512<2, 1>(xs, m, xsum.data(), c, l, s, n, k, group, row_stride, out.data_ptr<float>());
    else
      mm_avx512<1, 1>(xs, m, xsum.data(), c, l, s, n, k, group, row_stride, out.data_ptr<float>());
    return out.to(x.scalar_type());
  }
#endif
#ifdef LLMSLIM_AVX2
  if (k % 64 == 0) {
    const int64_t gpr = (row_stride + group - 1) / group;
    std::vector<float> xsum;
    if (s.zeros) {  // zeros come with per-row groups (checked above)
      xsum.assign(m * gpr, 0.f);
      for (int64_t i = 0; i < m; i++)
        for (int64_t col = 0; col < k; col++) xsum[i * gpr + col / group] += px[i * k + col];
    }
    bool lut_exact = true;
    for (int i = 0; i < 16; i++) lut_exact = lut_exact && static_cast<float>(c10::BFloat16(l[i])) == l[i];
    const float* zs = s.zeros ? xsum.data() : nullptr;
    if (x.scalar_type() == at::kFloat && !lut_exact) {
      mm_avx2(FloatTable(l), px, m, zs, gpr, c, s, n, k, group, row_stride, out.data_ptr<float>());
    } else {
      const std::vector<float> xp = permute_x(px, m, k);
      mm_avx2(Bf16Table(l), xp.data(), m, zs, gpr, c, s, n, k, group, row_stride, out.data_ptr<float>());
    }
    return out.to(x.scalar_type());
  }
#endif
  mm_scalar(px, m, c, l, s, n, k, group, row_stride, out.data_ptr<float>());
  return out.to(x.scalar_type());
}

bool has_simd() {
#ifdef LLMSLIM_AVX512_BF16
  return true;
#else
  return false;
#endif
}

at::Tensor simd_available() { return at::scalar_tensor(has_simd() ? 1 : 0, at::kInt); }

// Whether mm_4bit_q8 is built (AVX2; AVX-512 BF16 machines decode NF4 in bitsandbytes' CPU layout instead)
at::Tensor nf4_q8_available() {
#ifdef LLMSLIM_AVX2
  return at::scalar_tensor(1, at::kInt);
#else
  return at::scalar_tensor(0, at::kInt);
#endif
}

// Whether mm_4bit_i16 is built (AVX2; AVX-512 BF16 machines decode NF4/FP4 in bitsandbytes' CPU layout instead)
at::Tensor i16_4bit_available() {
#ifdef LLMSLIM_AVX2
  return at::scalar_tensor(1, at::kInt);
#else
  return at::scalar_tensor(0, at::kInt);
#endif
}

// Whether gemv_int8_rows is built (AVX-512 VNNI or AVX2)
at::Tensor int8_rows_available() {
#if defined(LLMSLIM_AVX512_BF16) || defined(LLMSLIM_AVX2)
  return at::scalar_tensor(1, at::kInt);
#else
  return at::scalar_tensor(0, at::kInt);
#endif
}

// Whether mm_int4_q8 is built (AVX-512 VNNI or AVX2)
at::Tensor int4_q8_available() {
#if defined(LLMSLIM_AVX512_BF16) || defined(LLMSLIM_AVX2)
  return at::scalar_tensor(1, at::kInt);
#else
  return at::scalar_tensor(0, at::kInt);
#endif
}

// ---- the small operators of a decode step (bf16 rows), fused so that a token pays a few calls per layer --------------
//
// Each reproduces the bf16 arithmetic of the torch expression it replaces, rounding where torch rounds (to nearest
// even, as Tensor.to(bfloat16)): products and sums of bf16 tensors are computed in float32 and rounded once. Only two
// steps can differ from torch in the last bit of a float32: the sum of squares of an RMS norm (here summed in double;
// torch's vectorized float32 sum adds in another order) and exp in SiLU (the C library's, not torch's vectorized one),
// which after rounding to bf16 changes an element rarely (tests/quant/test_decode_ops.py counts it).

inline float bf(float v) { return static_cast<float>(c10::BFloat16(v)); }  // round to bf16, back to float32

#ifdef LLMSLIM_AVX512_BF16
inline __m512 bf16x16_to_float(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}

inline __m512 round_bf16(__m512 v) {  // to bf16 (nearest even, vcvtneps2bf16) and back
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

// exp(x) for 16 floats: x = n ln2 + r (|r| <= ln2 / 2, ln2 split in two for an exact r), e^r by its degree-6 Taylor
// polynomial (relative error < 3e-7, two float32 steps), scaled by 2^n; saturates to 0 and inf outside float's range
inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#endif
#if defined(LLMSLIM_AVX512_BF16) || defined(LLMSLIM_AVX2)  // 8 lanes: AVX2 (AVX-512 CPUs have it too)
inline __m256 bf16x8_to_float(const at::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// 8 floats to bf16 bits (nearest even, as c10::BFloat16; a NaN stays a NaN) in the low half of each lane
inline __m256i bf16_bits8(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

inline __m256 round_bf16(__m256 v) { return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(v), 16)); }

inline void store_bf16x8(at::BFloat16* p, __m256 v) {
  const __m256i bits = bf16_bits8(v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1)));
}

// exp16 below for 8 floats; 2^n built in the exponent bits (n <= 127: the upper clamp is 88.3, not 88.7)
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}
#endif

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.is_contiguous(), "llmslim: ", name,
              " must be a contiguous bfloat16 CPU tensor, got ", t.scalar_type(), " ", t.sizes());
}

// weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(bf16), per row (LlamaRMSNorm)
void rms_norm_row(const at::BFloat16* x, const at::BFloat16* w, int64_t k, float eps, at::BFloat16* out) {
  double ss = 0.0;
  for (int64_t i = 0; i < k; i++) {
    const float v = static_cast<float>(x[i]);
    ss += static_cast<double>(v * v);
  }
  const float variance = static_cast<float>(ss / static_cast<double>(k));
  const float r = 1.0f / std::sqrt(variance + eps);
  for (int64_t i = 0; i < k; i++) out[i] = c10::BFloat16(static_cast<float>(w[i]) * bf(static_cast<float>(x[i]) * r));
}

at::Tensor rms_norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm_rows' x");
  check_rows(weight, "rms_norm_rows' weight");
  const int64_t k = x.size(-1), m = x.numel() / std::max<int64_t>(k, 1);
  TORCH_CHECK(weight.numel() == k, "llmslim: rms_norm_rows' weight has ", weight.numel(), " values for rows of ", k);
  at::Tensor out = at::empty_like(x);
  for (int64_t r = 0; r < m; r++) rms_norm_row(x.data_ptr<at::BFloat16>() + r * k, weight.data_ptr<at::BFloat16>(), k, static_cast<float>(eps),
                                               out.data_ptr<at::BFloat16>() + r * k);
  return out;
}

// (x + y, rms_norm(x + y)): a residual add and the next norm
std::tuple<at::Tensor, at::Tensor> add_rms_norm_rows(const at::Tensor& x, const at::Tensor& y, const at::Tensor& weight, double eps) {
  check_rows(x, "add_rms_norm_rows' x");
  check_rows(y, "add_rms_norm_rows' y");
  TORCH_CHECK(x.numel() == y.numel(), "llmslim: add_rms_norm_rows adds ", x.sizes(), " and ", y.sizes());
  at::Tensor sum = at::empty_like(x);
  const at::BFloat16 *px = x.data_ptr<at::BFloat16>(), *py = y.data_ptr<at::BFloat16>();
  at::BFloat16* ps = sum.data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < x.numel(); i++) ps[i] = c10::BFloat16(static_cast<float>(px[i]) + static_cast<float>(py[i]));
  return {sum, rms_norm_rows(sum, weight, eps)};
}

// x * cos + rotate_half(x) * sin for x (..., heads, 1, d) and cos, sin (d) broadcast (one token's rotary embedding)
at::Tensor rotary_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_rows(x, "rotary_rows' x");
  check_rows(cos, "rotary_rows' cos");
  check_rows(sin, "rotary_rows' sin");
  const int64_t d = x.size(-1), half = d / 2, rows = x.numel() / std::max<int64_t>(d, 1);
  TORCH_CHECK(d % 2 == 0 && cos.numel() == d && sin.numel() == d, "llmslim: rotary_rows takes an even head size and one position's cos and sin of ",
              d, " values, got ", cos.sizes());
  at::Tensor out = at::empty_like(x);
  const at::BFloat16 *px = x.data_ptr<at::BFloat16>(), *pc = cos.data_ptr<at::BFloat16>(), *ps = sin.data_ptr<at::BFloat16>();
  at::BFloat16* po = out.data_ptr<at::BFloat16>();
  for (int64_t r = 0; r < rows; r++) {
    const at::BFloat16* xr = px + r * d;
    for (int64_t i = 0; i < d; i++) {
      const float rotated = i < half ? -static_cast<float>(xr[i + half]) : static_cast<float>(xr[i - half]);
      const float a = bf(static_cast<float>(xr[i]) * static_cast<float>(pc[i])), b = bf(rotated * static_cast<float>(ps[i]));
      po[r * d + i] = c10::BFloat16(a + b);
    }
  }
  return out;
}

// silu(g) * u (the gated MLP's activation)
at::Tensor silu_mul_rows(const at::Tensor& g, const at::Tensor& u) {
  check_rows(g, "silu_mul_rows' gate");
  check_rows(u, "silu_mul_rows' up");
  TORCH_CHECK(g.numel() == u.numel(), "llmslim: silu_mul_rows multiplies ", g.sizes(), " and ", u.sizes());
  at::Tensor out = at::empty_like(g);
  const at::BFloat16 *pg = g.data_ptr<at::BFloat16>(), *pu = u.data_ptr<at::BFloat16>();
  at::BFloat16* po = out.data_ptr<at::BFloat16>();
  int64_t i = 0;
#ifdef LLMSLIM_AVX512_BF16
  for (; i + 16 <= g.numel(); i += 16) {  // 16 at a time, exp as exp16 below (the scalar loop's std::exp is ~8x slower)
    const __m512 v = bf16x16_to_float(pg + i), up = bf16x16_to_float(pu + i);
    const __m512 silu = round_bf16(_mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), v)))));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(po + i), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(silu, up)));
  }
#elif defined(LLMSLIM_AVX2)
  for (; i + 8 <= g.numel(); i += 8) {  // as above, 8 at a time
    const __m256 v = bf16x8_to_float(pg + i), up = bf16x8_to_float(pu + i);
    const __m256 silu = round_bf16(_mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), v)))));
    store_bf16x8(po + i, _mm256_mul_ps(silu, up));
  }
#endif
  for (; i < g.numel(); i++) {
    const float v = static_cast<float>(pg[i]);
    po[i] = c10::BFloat16(bf(v / (1.0f + std::exp(-v))) * static_cast<float>(pu[i]));
  }
  return out;
}


// ---- one query token's attention over a KV cache (bf16), as F.scaled_dot_product_attention computes it ---------------
//
// q (1, H, 1, d), k and v (1, KV, S, d) (any strides but the last), H a multiple of KV: query head h reads key/value
// head h / (H / KV) (transformers' repeat_kv, SDPA's enable_gqa). No mask, no dropout, not causal (one query token sees
// every cached position). The arithmetic of torch's CPU flash-attention kernel for bf16, which SDPA takes for this call:
// scores q.k in float32 times `scale`, softmax in float32 (exp(score - max), summed unrounded), the probabilities
// rounded to bf16 before they weight v (float32 sums), the sum divided out (times its reciprocal) and rounded to bf16
// once. Sums run in another order than torch's GEMMs, and exp is exp8 (relative error < 3e-7), so an output differs
// from SDPA's by at most a bf16 step on a few elements (tests/quant/test_decode_ops.py). Returns (1, H * d).

// the attention of the G query heads q[g * d ..] that share one key/value head, into out[g * d ..] (float32 scratch:
// scores G x S, acc d)
void attend_group(const float* q, int64_t groups, const at::BFloat16* k, const at::BFloat16* v, int64_t seen, int64_t d, int64_t k_step,
                  int64_t v_step, float scale, float* scores, float* acc, at::BFloat16* out) {
  for (int64_t s = 0; s < seen; s++) {
    const at::BFloat16* kr = k + s * k_step;
    for (int64_t g = 0; g < groups; g++) {
      const float* qg = q + g * d;
      int64_t i = 0;
      float dot = 0.f;
#if defined(LLMSLIM_AVX512_BF16) || defined(LLMSLIM_AVX2)
      __m256 a = _mm256_setzero_ps();
      for (; i + 8 <= d; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qg + i), bf16x8_to_float(kr + i), a);
      dot = hsum_avx2(a);
#endif
      for (; i < d; i++) dot += qg[i] * static_cast<float>(kr[i]);
      scores[g * seen + s] = dot * scale;
    }
  }
  for (int64_t g = 0; g < groups; g++) {
    float* sg = scores + g * seen;
    float top = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < seen; s++) top = std::max(top, sg[s]);
    float total = 0.f;
    int64_t s = 0;
#if defined(LLMSLIM_AVX512_BF16) || defined(LLMSLIM_AVX2)
    for (; s + 8 <= seen; s += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + s), _mm256_set1_ps(top)));
      total += hsum_avx2(e);
      _mm256_storeu_ps(sg + s, round_bf16(e));
    }
#endif
    for (; s < seen; s++) {
      const float e = std::exp(sg[s] - top);
      total += e;
      sg[s] = bf(e);
    }
    std::fill(acc, acc + d, 0.f);
    for (int64_t t = 0; t < seen; t++) {
      const at::BFloat16* vr = v + t * v_step;
      const float p = sg[t];
      int64_t i = 0;
#if defined(LLMSLIM_AVX512_BF16) || defined(LLMSLIM_AVX2)
      const __m256 pv = _mm256_set1_ps(p);
      for (; i + 8 <= d; i += 8) _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(pv, bf16x8_to_float(vr + i), _mm256_loadu_ps(acc + i)));
#endif
      for (; i < d; i++) acc[i] += p * static_cast<float>(vr[i]);
    }
    const float inv = 1.f / total;
    for (int64_t i = 0; i < d; i++) out[g * d + i] = c10::BFloat16(acc[i] * inv);
  }
}

at::Tensor attend_one_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  check_rows(q, "attend_one_rows' q");
  for (const at::Tensor* t : {&k, &v})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kBFloat16 && t->dim() == 4 && t->size(0) == 1 && t->stride(3) == 1,
                "llmslim: attend_one_rows takes k and v as bfloat16 CPU tensors (1, kv_heads, seen, d) with d contiguous, got ",
                t->scalar_type(), " ", t->sizes());
  TORCH_CHECK(q.dim() == 4 && q.size(0) == 1 && q.size(2) == 1, "llmslim: attend_one_rows takes one query token q (1, heads, 1, d), got ",
              q.sizes());
  const int64_t heads = q.size(1), d = q.size(3), kv_heads = k.size(1), seen = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(3) == d && seen > 0, "llmslim: attend_one_rows' k ", k.sizes(), " and v ", v.sizes(),
              " must be alike, with head size ", d, " and at least one position");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "llmslim: attend_one_rows needs query heads (", heads,
              ") a multiple of key/value heads (", kv_heads, ")");
  const int64_t groups = heads / kv_heads;
  at::Tensor out = at::empty({1, heads * d}, q.options());
  const at::BFloat16 *pq = q.data_ptr<at::BFloat16>(), *pk = k.data_ptr<at::BFloat16>(), *pv = v.data_ptr<at::BFloat16>();
  at::BFloat16* po = out.data_ptr<at::BFloat16>();
  const int64_t work = std::max<int64_t>(1, seen * d * (groups + 1));  // multiply-adds per key/value head
  at::parallel_for(0, kv_heads, std::max<int64_t>(1, (int64_t{1} << 16) / work), [&](int64_t begin, int64_t end) {
    std::vector<float> qf(groups * d), scores(groups * seen), acc(d);
    for (int64_t j = begin; j < end; j++) {
      for (int64_t i = 0; i < groups * d; i++) qf[i] = static_cast<float>(pq[j * groups * d + i]);
      attend_group(qf.data(), groups, pk + j * k.stride(1), pv + j * v.stride(1), seen, d, k.stride(2), v.stride(2), static_cast<float>(scale),
                   scores.data(), acc.data(), po + j * groups * d);
    }
  });
  return out;
}

// One token's keys and values (1, KV, 1, d) written into spare room at position `seen` of a key and a value buffer
// (1, KV, capacity, d); returns the buffers' first seen + 1 positions (views): what torch.cat of the cached keys and
// the new ones gives, without copying the cache every token (hf/decode.py keeps the buffers).
std::tuple<at::Tensor, at::Tensor> kv_append(const at::Tensor& key_room, const at::Tensor& value_room, const at::Tensor& k, const at::Tensor& v,
                                             int64_t seen) {
  TORCH_CHECK(k.dim() == 4 && k.size(2) == 1 && k.sizes() == v.sizes(), "llmslim: kv_append takes one token's keys and values (b, kv_heads, 1, d), got ",
              k.sizes(), " and ", v.sizes());
  for (const at::Tensor* t : {&key_room, &value_room})
    TORCH_CHECK(t->dim() == 4 && t->size(0) == k.size(0) && t->size(1) == k.size(1) && t->size(3) == k.size(3) && seen >= 0 && seen < t->size(2),
                "llmslim: kv_append has no room at position ", seen, " of a buffer ", t->sizes(), " for keys ", k.sizes());
  // one dtype, contiguous room and token (what the lean step passes): each head's d values copied directly; else
  // copy_ (through TensorIterator: ~5 us a call, two a layer and token)
  const auto put = [seen](const at::Tensor& room, const at::Tensor& t) {
    if (!(room.is_contiguous() && t.is_contiguous() && room.scalar_type() == t.scalar_type())) {
      room.narrow(2, seen, 1).copy_(t);
      return;
    }
    const int64_t heads = t.size(0) * t.size(1), capacity = room.size(2), bytes = t.size(3) * t.element_size();
    char* dst = static_cast<char*>(room.data_ptr());
    const char* src = static_cast<const char*>(t.data_ptr());
    for (int64_t h = 0; h < heads; h++) std::memcpy(dst + (h * capacity + seen) * bytes, src + h * bytes, bytes);
  };
  put(key_room, k);
  put(value_room, v);
  return {key_room.narrow(2, 0, seen + 1), value_room.narrow(2, 0, seen + 1)};
}

#ifdef LLMSLIM_AVX512_BF16
// ---- a prompt's causal attention (AVX-512 BF16) ---------------------------------------------------------------------
//
// q (1, H, T, d), k and v (1, KV, S, d), S >= T, any strides but the last, d a multiple of 16 up to 256, H a multiple
// of KV as in attend_one_rows. Query t is position S - T + t and sees keys 0 .. S - T + t: causal aligned to the end
// (SDPA's is_causal when S == T; a prompt after S - T cached positions otherwise). The arithmetic of attend_one_rows
// (torch's CPU flash-attention kernel for bf16): scores q.k in float32 (vdpbf16ps: exact products, float32 sums) times
// `scale`, softmax in float32, probabilities rounded to bf16 before they weight v, the sum divided out, bf16 once.
// Each row's scores are held whole (no running max as in the flash kernel, which streams key blocks through a float32
// buffer per block and pays a GEMM call per block: 13 ms a layer for 512 tokens of TinyLlama's shape on a 2-core
// Zen 5, where this takes a quarter of that). Returns (1, T, H * d): transformers' attention output (b, T, H, d).
constexpr int64_t kPromptRows = 32;  // query positions of one head per task

// one key/value head packed for the two products: keys in tiles of 16 positions, each tile d / 2 vectors of the 16
// positions' element pairs (k[s][2i], k[s][2i + 1]); values in pairs of positions, d element pairs (v[2p][c], v[2p + 1][c])
// each. Positions past `seen` (the tiles are read two at a time, the pairs whole) are zeros.
void pack_prompt_head(const at::BFloat16* k, int64_t k_step, const at::BFloat16* v, int64_t v_step, int64_t seen, int64_t d,
                      int64_t tiles, uint32_t* kp, uint16_t* vp) {
  const int64_t pairs = d / 2;
  for (int64_t t = 0; t < tiles; t++)
    for (int64_t c = 0; c < 16; c++) {
      const int64_t s = t * 16 + c;
      for (int64_t i = 0; i < pairs; i++) {
        uint32_t bits = 0;
        if (s < seen) std::memcpy(&bits, k + s * k_step + 2 * i, 4);
        kp[(t * pairs + i) * 16 + c] = bits;
      }
    }
  const int64_t position_pairs = tiles * 8;
  for (int64_t p = 0; p < position_pairs; p++)
    for (int64_t half = 0; half < 2; half++) {
      const int64_t s = 2 * p + half;
      uint16_t* row = vp + p * d * 2 + half;
      if (s < seen) {
        const at::BFloat16* src = v + s * v_step;
        for (int64_t c = 0; c < d; c++) row[2 * c] = src[c].x;
      } else {
        for (int64_t c = 0; c < d; c++) row[2 * c] = 0;
      }
    }
}

// scores of 4 query rows (element pairs) against 2 key tiles (32 positions), times `scale`, into out rows (stride ld)
inline void prompt_scores(const uint32_t* const q[4], const uint32_t* kt, int64_t pairs, float scale, float* out, int64_t ld) {
  __m512 acc[4][2];
  for (int r = 0; r < 4; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const uint32_t* k1 = kt + pairs * 16;
  for (int64_t i = 0; i < pairs; i++) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(kt + i * 16), b1 = (__m512bh)_mm512_loadu_si512(k1 + i * 16);
    for (int r = 0; r < 4; r++) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[r][i]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    }
  }
  const __m512 s = _mm512_set1_ps(scale);
  for (int r = 0; r < 4; r++) {
    _mm512_storeu_ps(out + r * ld, _mm512_mul_ps(acc[r][0], s));
    _mm512_storeu_ps(out + r * ld + 16, _mm512_mul_ps(acc[r][1], s));
  }
}

// the softmax of a row's first `seen` scores as bf16 bits into p (zeros after them up to `width`); returns the sum of
// the unrounded exponentials
inline float prompt_softmax(const float* scores, int64_t seen, int64_t width, uint16_t* p) {
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t s = 0; s < seen; s += 16) {
    const __mmask16 m = seen - s >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (seen - s)) - 1);
    top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, m, scores + s));
  }
  const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 total = _mm512_setzero_ps();
  for (int64_t s = 0; s < width; s += 16) {
    const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, seen - s));
    const __mmask16 m = left == 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + s), max)));
    total = _mm512_add_ps(total, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + s), (__m256i)_mm512_cvtneps_pbh(e));
  }
  return _mm512_reduce_add_ps(total);
}

// 4 rows of probabilities (position pairs) times the packed values, columns col .. col + 16 NV, over `pairs` position
// pairs; each row divided by its sum (inv) and rounded to bf16 into out rows (stride ld)
template <int NV>
inline void prompt_values(const uint32_t* const p[4], const uint16_t* vp, int64_t d, int64_t col, int64_t pairs, const float inv[4],
                          at::BFloat16* const out[4]) {
  __m512 acc[4][NV];
  for (int r = 0; r < 4; r++)
    for (int j = 0; j < NV; j++) acc[r][j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < pairs; i++) {
    __m512bh b[NV];
    for (int j = 0; j < NV; j++) b[j] = (__m512bh)_mm512_loadu_si512(vp + (i * d + col + 16 * j) * 2);
    for (int r = 0; r < 4; r++) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(p[r][i]));
      for (int j = 0; j < NV; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], a, b[j]);
    }
  }
  for (int r = 0; r < 4; r++)
    for (int j = 0; j < NV; j++)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[r] + col + 16 * j),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][j], _mm512_set1_ps(inv[r]))));
}

at::Tensor attend_prompt_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kBFloat16 && t->dim() == 4 && t->size(0) == 1 && t->stride(3) == 1,
                "llmslim: attend_prompt_rows takes q, k and v as bfloat16 CPU tensors (1, heads, positions, d) with d contiguous, got ",
                t->scalar_type(), " ", t->sizes());
  const int64_t heads = q.size(1), rows = q.size(2), d = q.size(3), kv_heads = k.size(1), seen = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(3) == d && d % 16 == 0 && d <= 256 && rows >= 1 && seen >= rows, "llmslim: attend_prompt_rows' k ",
              k.sizes(), " and v ", v.sizes(), " must be alike, with the head size of q ", q.sizes(),
              " (a multiple of 16, at most 256) and at least its positions");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "llmslim: attend_prompt_rows needs query heads (", heads,
              ") a multiple of key/value heads (", kv_heads, ")");
  const int64_t groups = heads / kv_heads, pairs = d / 2, offset = seen - rows;
  const int64_t tiles = (seen + 31) / 32 * 2, width_max = tiles * 16;  // key tiles (an even count), scores per row at most
  std::vector<uint32_t> kp(kv_heads * tiles * pairs * 16);
  std::vector<uint16_t> vp(kv_heads * tiles * 8 * d * 2);
  const at::BFloat16 *pq = q.data_ptr<at::BFloat16>(), *pk = k.data_ptr<at::BFloat16>(), *pv = v.data_ptr<at::BFloat16>();
  at::parallel_for(0, kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; j++)
      pack_prompt_head(pk + j * k.stride(1), k.stride(2), pv + j * v.stride(1), v.stride(2), seen, d, tiles, kp.data() + j * tiles * pairs * 16,
                       vp.data() + j * tiles * 8 * d * 2);
  });
  at::Tensor out = at::empty({1, rows, heads * d}, q.options());
  at::BFloat16* po = out.data_ptr<at::BFloat16>();
  // tasks (key/value head, block of kPromptRows positions); a head's blocks alternate from both ends (0, last, 1, ...),
  // so that any run of tasks (a thread's share) mixes short and long rows
  const int64_t blocks = (rows + kPromptRows - 1) / kPromptRows;
  at::parallel_for(0, kv_heads * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> qb(kPromptRows * pairs);
    std::vector<float> scores(kPromptRows * width_max);
    std::vector<uint16_t> probs(kPromptRows * width_max);
    for (int64_t task = begin; task < end; task++) {
      const int64_t j = task / blocks, i = task % blocks, b = i % 2 == 0 ? i / 2 : blocks - 1 - i / 2;
      const int64_t t0 = b * kPromptRows, n = std::min(kPromptRows, rows - t0);
      for (int64_t g = 0; g < groups; g++) {
        const int64_t h = j * groups + g;
        for (int64_t r = 0; r < n; r++) std::memcpy(qb.data() + r * pairs, pq + h * q.stride(1) + (t0 + r) * q.stride(2), d * 2);
        for (int64_t r0 = 0; r0 < n; r0 += 4) {
          const int64_t last = std::min(r0 + 4, n) - 1, width = (offset + t0 + last + 1 + 31) / 32 * 32;  // keys of the block's last row
          const uint32_t* qr[4];
          for (int r = 0; r < 4; r++) qr[r] = qb.data() + std::min(r0 + r, last) * pairs;
          for (int64_t s = 0; s < width; s += 32)
            prompt_scores(qr, kp.data() + (j * tiles + s / 16) * pairs * 16, pairs, static_cast<float>(scale), scores.data() + r0 * width_max + s,
                          width_max);
          float inv[4];
          const uint32_t* pr[4];
          at::BFloat16* orow[4];
          for (int r = 0; r < 4; r++) {
            const int64_t row = std::min(r0 + r, last);
            if (r0 + r <= last)
              inv[r] = 1.f / prompt_softmax(scores.data() + row * width_max, offset + t0 + row + 1, width, probs.data() + row * width_max);
            else
              inv[r] = inv[last - r0];  // a copy of the last row (rewrites its output with the same values)
            pr[r] = reinterpret_cast<const uint32_t*>(probs.data() + row * width_max);
            orow[r] = po + (t0 + row) * heads * d + h * d;
          }
          const uint16_t* vh = vp.data() + j * tiles * 8 * d * 2;
          const int64_t position_pairs = width / 2;
          for (int64_t col = 0; col < d; col += 64) {
            switch (std::min<int64_t>(4, (d - col) / 16)) {
              case 4: prompt_values<4>(pr, vh, d, col, position_pairs, inv, orow); break;
              case 3: prompt_values<3>(pr, vh, d, col, position_pairs, inv, orow); break;
              case 2: prompt_values<2>(pr, vh, d, col, position_pairs, inv, orow); break;
              default: prompt_values<1>(pr, vh, d, col, position_pairs, inv, orow); break;
            }
          }
        }
      }
    }
  });
  return out;
}
#endif

#if defined(LLMSLIM_AVX512_BF16) || defined(LLMSLIM_AVX2)
// ---- a decoder layer's decode step in two calls -----------------------------------------------------------------------
//
// hf/decode.py's lean step, with every operator above called from here instead of from Python: a SmolLM2 layer took
// ~13 operator calls and their Python glue (~200 us of a ~400 us layer on a 2-core EPYC, more than its matmuls). The
// step is split where the KV cache (a Python object) takes the new key and value:
//   lean_qkv: h = rms_norm(x); q, k, v = h @ Wq/Wk/Wv (+ biases, one parallel region); rotary on q and k
//   lean_out: o = attend(q, cache k, cache v); x += o @ Wo (+ bias); h = rms_norm(x);
//             x += (silu(h @ Wg) * (h @ Wu)) @ Wd (biases added where given)
// Each step is the operator the Python step calls, in the same order on the same values: the results are its bits.
// The seven weights are of one kind (LeanWeights), the decode kernel this build runs for their format.
constexpr int64_t kLean4bitI16 = 0;    // AVX2: NF4/FP4 codes through mm_4bit_i16 (float32 absmax, one table and block)
constexpr int64_t kLean4bitTiles = 1;  // AVX-512 BF16: NF4/FP4 in the CPU layout through gemv_4bit_cpu_layout (bf16 absmax)
constexpr int64_t kLeanInt8 = 2;       // both: int8 rows through gemv_int8_rows (float32 absmax per row or row and block)

// out + bias.to(out.dtype) in bf16 (torch's add: in float32, rounded once)
void add_bias_rows(at::Tensor& out, const c10::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return;
  const at::Tensor b = bias->to(at::kBFloat16).contiguous();
  TORCH_CHECK(b.numel() == out.size(-1), "llmslim: a bias of ", b.numel(), " values for ", out.size(-1), " outputs");
  at::BFloat16* po = out.data_ptr<at::BFloat16>();
  const at::BFloat16* pb = b.data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < out.numel(); i++) po[i] = c10::BFloat16(static_cast<float>(po[i]) + static_cast<float>(pb[i % b.numel()]));
}

// A layer's weights of one kind, and the products lean_qkv and lean_out take of them
struct LeanWeights {
  int64_t kind;
  at::TensorList weights, scales;
  const c10::optional<at::Tensor>& lut;
  at::IntArrayRef ns;
  int64_t block;

  // rows h times weights [first, first + count), in one call (one parallel region, h quantized once)
  std::vector<at::Tensor> multi(const at::Tensor& h, size_t first, size_t count) const {
    const at::TensorList w = weights.slice(first, count), s = scales.slice(first, count);
    switch (kind) {
#ifdef LLMSLIM_AVX2
      case kLean4bitI16: return mm_4bit_i16_multi(h, w, *lut, s, {}, c10::nullopt, {}, ns.slice(first, count), block);
#endif
#ifdef LLMSLIM_AVX512_BF16
      case kLean4bitTiles: return gemv_4bit_multi(h, w, s, *lut, ns.slice(first, count), block);
#endif
      default: return gemv_int8_rows_multi(h, w, s);
    }
  }

  at::Tensor one(const at::Tensor& x, size_t j) const {
    switch (kind) {
#ifdef LLMSLIM_AVX2
      case kLean4bitI16: return mm_4bit_i16(x, weights[j], *lut, scales[j], c10::nullopt, c10::nullopt, c10::nullopt, ns[j], block);
#endif
#ifdef LLMSLIM_AVX512_BF16
      case kLean4bitTiles: return gemv_4bit_cpu_layout(x, weights[j], scales[j], *lut, ns[j], x.size(1), block);
#endif
      default: return gemv_int8_rows(x, weights[j], scales[j]);
    }
  }
};

LeanWeights lean_weights(int64_t kind, at::TensorList weights, at::TensorList scales, const c10::optional<at::Tensor>& lut,
                         const c10::List<c10::optional<at::Tensor>>& biases, at::IntArrayRef ns, int64_t block, size_t count, const char* op) {
  TORCH_CHECK(weights.size() == count && scales.size() == count && biases.size() == count && ns.size() == count, "llmslim: ", op, " takes ",
              count, " weights (weights, scales, biases, ns), got ", weights.size(), ", ", scales.size(), ", ", biases.size(), ", ", ns.size());
#ifdef LLMSLIM_AVX2
  const bool built = kind == kLean4bitI16 || kind == kLeanInt8;
#else
  const bool built = kind == kLean4bitTiles || kind == kLeanInt8;
#endif
  TORCH_CHECK(built, "llmslim: ", op, " has no weight kind ", kind, " in this build (", kLean4bitI16, ": 4-bit on AVX2, ", kLean4bitTiles,
              ": 4-bit in the CPU layout on AVX-512 BF16, ", kLeanInt8, ": int8 rows)");
  TORCH_CHECK(kind == kLeanInt8 || lut.has_value(), "llmslim: ", op, "'s 4-bit weights need their table");
  for (size_t j = 0; j < count; j++) {
    if (kind == kLean4bitI16)
      TORCH_CHECK(scales[j].scalar_type() == at::kFloat, "llmslim: ", op, " takes float32 absmax (block_scales_f32 decodes a double-quantized one), got ",
                  scales[j].scalar_type());
    if (kind == kLeanInt8)
      TORCH_CHECK(weights[j].dim() == 2 && weights[j].size(0) == ns[j], "llmslim: ", op, "'s int8 weight ", j, " has ", weights[j].sizes(),
                  " rows, not ", ns[j]);
  }
  return {kind, weights, scales, lut, ns, block};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lean_qkv(const at::Tensor& x, const at::Tensor& norm_weight, double eps, int64_t kind,
                                                        at::TensorList weights, at::TensorList scales, const c10::optional<at::Tensor>& lut,
                                                        const c10::List<c10::optional<at::Tensor>>& biases, at::IntArrayRef ns, int64_t block,
                                                        const at::Tensor& cos, const at::Tensor& sin, int64_t head_dim) {
  check_rows(x, "lean_qkv's x");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1, "llmslim: lean_qkv takes one token's row (1, hidden), got ", x.sizes());
  const LeanWeights lw = lean_weights(kind, weights, scales, lut, biases, ns, block, 3, "lean_qkv");
  TORCH_CHECK(head_dim > 0 && ns[0] % head_dim == 0 && ns[1] % head_dim == 0 && ns[1] == ns[2], "llmslim: lean_qkv's outputs ", ns,
              " are not whole heads of ", head_dim);
  const at::Tensor h = rms_norm_rows(x, norm_weight, eps);
  std::vector<at::Tensor> qkv = lw.multi(h, 0, 3);
  for (size_t j = 0; j < 3; j++) add_bias_rows(qkv[j], biases.get(j));
  const at::Tensor q = rotary_rows(qkv[0].view({1, ns[0] / head_dim, 1, head_dim}), cos, sin);
  const at::Tensor k = rotary_rows(qkv[1].view({1, ns[1] / head_dim, 1, head_dim}), cos, sin);
  return {q, k, qkv[2].view({1, ns[2] / head_dim, 1, head_dim})};
}

at::Tensor lean_out(const at::Tensor& x, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, int64_t kind,
                    at::TensorList weights, at::TensorList scales, const c10::optional<at::Tensor>& lut,
                    const c10::List<c10::optional<at::Tensor>>& biases, at::IntArrayRef ns, int64_t block, const at::Tensor& norm_weight,
                    double eps) {
  check_rows(x, "lean_out's x");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1, "llmslim: lean_out takes one token's row (1, hidden), got ", x.sizes());
  const LeanWeights lw = lean_weights(kind, weights, scales, lut, biases, ns, block, 4, "lean_out");  // o, gate, up, down
  TORCH_CHECK(ns[0] == x.size(1) && ns[3] == x.size(1) && ns[1] == ns[2], "llmslim: lean_out's outputs ", ns, " do not fit rows of ", x.size(1));
  const at::Tensor o = attend_one_rows(q, k, v, scale);
  at::Tensor projected = lw.one(o, 0);
  add_bias_rows(projected, biases.get(0));
  const auto [mid, h] = add_rms_norm_rows(x, projected, norm_weight, eps);
  std::vector<at::Tensor> gate_up = lw.multi(h, 1, 2);
  add_bias_rows(gate_up[0], biases.get(1));
  add_bias_rows(gate_up[1], biases.get(2));
  at::Tensor down = lw.one(silu_mul_rows(gate_up[0], gate_up[1]), 3);
  add_bias_rows(down, biases.get(3));
  at::Tensor out = at::empty_like(mid);
  const at::BFloat16 *pm = mid.data_ptr<at::BFloat16>(), *pd = down.data_ptr<at::BFloat16>();
  at::BFloat16* po = out.data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < out.numel(); i++) po[i] = c10::BFloat16(static_cast<float>(pm[i]) + static_cast<float>(pd[i]));
  return out;
}
#endif  // LLMSLIM_AVX512_BF16 || LLMSLIM_AVX2

}  // namespace


TORCH_LIBRARY(llmslim, m) {
  m.def(
      "mm_4bit(Tensor x, Tensor codes, Tensor lut, Tensor scales, Tensor? zeros, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? nested_offset, int n, int group, int row_stride) -> Tensor");
  m.def(
      "dequantize_4bit(Tensor codes, Tensor lut, Tensor scales, Tensor? zeros, Tensor? nested_absmax, Tensor? nested_code, "
      "float nested_offset, int n, int k, int group, int row_stride, ScalarType dtype) -> Tensor");
  m.def("mm_int4_q8(Tensor x, Tensor codes, Tensor scales, Tensor zeros, int n, int group) -> Tensor");
  m.def(
      "mm_4bit_q8(Tensor x, Tensor codes, Tensor levels, Tensor scales, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? nested_offset, int n, int block) -> Tensor");
  m.def(
      "mm_4bit_i16(Tensor x, Tensor codes, Tensor lut, Tensor scales, Tensor? nested_absmax, Tensor? nested_code, "
      "Tensor? nested_offset, int n, int block) -> Tensor");
  m.def(
      "mm_4bit_i16_multi(Tensor x, Tensor[] codes, Tensor lut, Tensor[] scales, Tensor[] nested_absmax, Tensor? nested_code, "
      "Tensor[] nested_offset, int[] ns, int block) -> Tensor[]");
  m.def("dequantize_4bit_cpu_layout(Tensor packed, Tensor absmax, Tensor lut, int n, int k, int block) -> Tensor");
  m.def("dequantize_int8_rows_bf16(Tensor q, Tensor absmax) -> Tensor");
  m.def("gemv_4bit_cpu_layout(Tensor x, Tensor packed, Tensor absmax, Tensor lut, int n, int k, int block) -> Tensor");
  m.def("gemv_int8_rows(Tensor x, Tensor weight, Tensor row_absmax) -> Tensor");
  m.def("gemv_4bit_multi(Tensor x, Tensor[] packed, Tensor[] absmax, Tensor lut, int[] ns, int block) -> Tensor[]");
  m.def("rms_norm_rows(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_rows(Tensor x, Tensor y, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rotary_rows(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("silu_mul_rows(Tensor gate, Tensor up) -> Tensor");
  m.def("attend_one_rows(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  m.def("attend_prompt_rows(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  m.def("kv_append(Tensor(a!) key_room, Tensor(b!) value_room, Tensor k, Tensor v, int seen) -> (Tensor(a), Tensor(b))");
  m.def("gemv_int8_rows_multi(Tensor x, Tensor[] weights, Tensor[] row_absmax) -> Tensor[]");
  m.def(
      "lean_qkv(Tensor x, Tensor norm_weight, float eps, int kind, Tensor[] weights, Tensor[] scales, Tensor? lut, Tensor?[] biases, "
      "int[] ns, int block, Tensor cos, Tensor sin, int head_dim) -> (Tensor, Tensor, Tensor)");
  m.def(
      "lean_out(Tensor x, Tensor q, Tensor k, Tensor v, float scale, int kind, Tensor[] weights, Tensor[] scales, Tensor? lut, "
      "Tensor?[] biases, int[] ns, int block, Tensor norm_weight, float eps) -> Tensor");
  m.def("simd_available() -> Tensor");
  m.def("int4_q8_available() -> Tensor");
  m.def("int8_rows_available() -> Tensor");
  m.def("i16_4bit_available() -> Tensor");
  m.def("block_scales_f32(Tensor scales, Tensor nested_absmax, Tensor nested_code, Tensor nested_offset, int blocks_per_row) -> Tensor");
  m.def("nf4_q8_available() -> Tensor");
  m.impl("mm_4bit", c10::DispatchKey::CPU, mm_4bit);
#if defined(LLMSLIM_AVX512_BF16) || defined(LLMSLIM_AVX2)
  m.impl("mm_int4_q8", c10::DispatchKey::CPU, mm_int4_q8);
#endif
#ifdef LLMSLIM_AVX2
  m.impl("mm_4bit_q8", c10::DispatchKey::CPU, mm_4bit_q8);
  m.impl("mm_4bit_i16", c10::DispatchKey::CPU, mm_4bit_i16);
  m.impl("mm_4bit_i16_multi", c10::DispatchKey::CPU, mm_4bit_i16_multi);
  m.impl("block_scales_f32", c10::DispatchKey::CPU, block_scales_f32);
#endif
#if defined(LLMSLIM_AVX512_BF16) || defined(LLMSLIM_AVX2)
  m.impl("gemv_int8_rows", c10::DispatchKey::CPU, gemv_int8_rows);
  m.impl("gemv_int8_rows_multi", c10::DispatchKey::CPU, gemv_int8_rows_multi);
  m.impl("lean_qkv", c10::DispatchKey::CPU, lean_qkv);
  m.impl("lean_out", c10::DispatchKey::CPU, lean_out);
#endif
#ifdef LLMSLIM_AVX512_BF16
  m.impl("gemv_4bit_cpu_layout", c10::DispatchKey::CPU, gemv_4bit_cpu_layout);
  m.impl("gemv_4bit_multi", c10::DispatchKey::CPU, gemv_4bit_multi);
  m.impl("dequantize_int8_rows_bf16", c10::DispatchKey::CPU, dequantize_int8_rows_bf16);
  m.impl("attend_prompt_rows", c10::DispatchKey::CPU, attend_prompt_rows);
#endif
  m.impl("rms_norm_rows", c10::DispatchKey::CPU, rms_norm_rows);
  m.impl("add_rms_norm_rows", c10::DispatchKey::CPU, add_rms_norm_rows);
  m.impl("rotary_rows", c10::DispatchKey::CPU, rotary_rows);
  m.impl("silu_mul_rows", c10::DispatchKey::CPU, silu_mul_rows);
  m.impl("attend_one_rows", c10::DispatchKey::CPU, attend_one_rows);
  m.impl("kv_append", c10::DispatchKey::CPU, kv_append);
  m.impl("dequantize_4bit", c10::DispatchKey::CPU, dequantize_4bit);
  m.impl("dequantize_4bit_cpu_layout", c10::DispatchKey::CPU, dequantize_4bit_cpu_layout);
  m.impl("simd_available", c10::DispatchKey::CompositeExplicitAutograd, simd_available);
  m.impl("int4_q8_available", c10::DispatchKey::CompositeExplicitAutograd, int4_q8_available);
  m.impl("int8_rows_available", c10::DispatchKey::CompositeExplicitAutograd, int8_rows_available);
  m.impl("i16_4bit_available", c10::DispatchKey::CompositeExplicitAutograd, i16_4bit_available);
  m.impl("nf4_q8_available", c10::DispatchKey::CompositeExplicitAutograd, nf4_q8_available);
}
