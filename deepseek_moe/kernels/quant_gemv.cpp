// Few-row products with weight-only quantized weights (int8 per output channel, int4 in groups
// of the input), for decoding: every weight of a call is read from memory once, whatever the
// number of rows it multiplies, and one call serves many weights (all of a token's experts).
//
//   deepseek_moe::quant_gemv(x, weights, scales, zeros, starts, counts, bits, group) -> out
//
// x [M, K] (fp32 or bf16). For weight i (int8 [N, K], or int4 packed uint8 [N, K/2]: element 2j
// in the low nibble of byte j), the rows x[starts[i] : starts[i] + counts[i]] are multiplied by
// it: out[o_i + r] = W_i x[starts[i] + r], where o_i = counts[0] + ... + counts[i-1]; out is fp32
// [sum(counts), N]. scales: int8 bf16 [N] (W = q * s); int4 bf16 [N, K/group] with zeros of the
// same shape (W = q * s + z, q in [0, 15]). A weight's rows (and int4 scales' and zeros' rows) need
// only be contiguous each: a slice of a wider weight's inputs serves as it is (a shared expert's
// down projection split into expert-wide pieces beside the routed experts'). A weight c times as
// wide as x's rows (c >= 1) takes c consecutive rows side by side as each of its rows: out[o_i + r]
// = W_i [x[s + rc], ..., x[s + rc + c - 1]], s = starts[i] (the shared experts' whole down
// projection on their pieces' activations: one stream of memory where the slices read each row twice).
//
// The activations are quantized per block of 32 inputs to int8 (symmetric, the block's largest
// magnitude as 127), as llama.cpp quantizes them for its Q8_0 / Q4_0 products, and the dot
// products run on integers, with one fp32 fused multiply-add per block's scale: on any processor
// with AVX2 and FMA, unsigned-by-signed byte products summed by fours into int32 lanes (vpmaddubsw
// then vpmaddwd, exact for these ranges); for int4 groups of a multiple of 128 on processors with
// AVX512-VNNI, 512-bit vpdpbusd (the 256-bit kernels wait on memory; this one halves the
// instructions of the int4 unpacking, which limit it there). The int4 zero term uses the group
// sums of the quantized activations, so that the result is the product with the dequantized
// weight of the quantized activations, as for int8 (the unquantized sums would not cancel the
// zeros' share of the quantized dot products: about twice the error).
//
// `quant_gemv_supported()` says whether this processor has AVX2 and FMA. The file is compiled
// without such flags (only the kernel functions carry them), so the library loads on any x86-64
// processor.

#include <torch/custom_class.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace deepseek_moe_kernels {  // grouped_swiglu.cpp's decode_attention_rope and route_tokens
at::Tensor attention_rope(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, int64_t start, double scale);
std::tuple<at::Tensor, at::Tensor> route(const at::Tensor& x, const at::Tensor& w, int64_t k, bool norm, double scale);
}

namespace {

constexpr int64_t kBlock = 32;  // inputs per activation scale
constexpr int64_t kChunk = 64;  // inputs of one 32-byte vector of packed int4 weights
constexpr int64_t kPrefetch = 4096;  // bytes ahead of the weights read (software prefetch)
constexpr int64_t kRowsPerTask = 32;  // output channels per parallel task
#define KERNEL_TARGET __attribute__((target("avx2,fma")))
#define VNNI_TARGET __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")))

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

KERNEL_TARGET inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Unsigned-by-signed byte products summed by fours into int32 lanes (lane i: bytes 4i to 4i + 3),
// the lanes of AVX512-VNNI's vpdpbusd; exact while each pair of products fits in int16.
KERNEL_TARGET inline __m256i dot_u8s8(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

// The activations of one call, quantized: per row, K int8 values (for int4, each chunk of 64 or
// 128 inputs reordered as its even-numbered inputs then its odd-numbered ones, to meet the
// nibbles), their magnitudes (int8: the unsigned operand of vpdpbusd), K/32 block scales, and
// (int4) the K/group sums of the quantized inputs.
struct QuantizedRows;
struct QuantizedActivations {
  int64_t M, K, blocks, groups;
  std::vector<int8_t> q;
  std::vector<uint8_t> mag;
  std::vector<float> scale;
  std::vector<float> group_sum;
  QuantizedRows rows(int64_t first, int64_t span) const;
};

// What a weight reads of them: from row `first` on, `span` consecutive rows as each of its rows of
// span * K inputs (a row's blocks and groups end where the next row's begin, so that consecutive
// rows quantized alone are the quantization of their concatenation: one weight as wide as several
// takes them as its input).
struct QuantizedRows {
  int64_t K, blocks, groups;
  const int8_t* q;
  const uint8_t* mag;
  const float* scale;
  const float* group_sum;
};

QuantizedRows QuantizedActivations::rows(int64_t first, int64_t span) const {
  return {K * span, blocks * span, groups * span, q.data() + first * K, mag.empty() ? nullptr : mag.data() + first * K,
          scale.data() + first * blocks, group_sum.empty() ? nullptr : group_sum.data() + first * groups};
}

// Per block of 32 inputs: the largest magnitude (a NaN input is passed over, as std::max passes it
// over), then x * (127 / amax) rounded to nearest, ties to even (the rounding mode's conversion:
// std::nearbyint's result), packed to bytes in input order.
KERNEL_TARGET QuantizedActivations quantize_rows(const float* x, int64_t M, int64_t K, int bits, int64_t group,
                                                 int64_t chunk) {
  QuantizedActivations r;
  r.M = M;
  r.K = K;
  r.blocks = K / kBlock;
  r.groups = bits == 4 ? K / group : 0;
  r.q.resize(M * K);
  r.scale.resize(M * r.blocks);
  if (bits == 8) r.mag.resize(M * K);
  if (bits == 4) r.group_sum.assign(M * r.groups, 0.f);
  const __m256 sign = _mm256_set1_ps(-0.f);
  // per 128-bit lane: its 8 even-numbered bytes, then its 8 odd-numbered ones
  const __m256i deinterleave = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                                0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m256i dword_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < r.blocks; ++b) {
      const float* xb = x + m * K + b * kBlock;
      __m256 v[4];
      __m256 amax8 = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        amax8 = _mm256_max_ps(_mm256_andnot_ps(sign, v[i]), amax8);  // a NaN gives the second operand
      }
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax8), _mm256_extractf128_ps(amax8, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      const float amax = std::max(_mm_cvtss_f32(h), _mm_cvtss_f32(_mm_movehdup_ps(h)));
      const float s = amax / 127.f;
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      r.scale[m * r.blocks + b] = s;
      const __m256 iv = _mm256_set1_ps(inv);
      __m256i q[4];
      for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], iv));
      // bytes in input order: the packs interleave the four vectors' 128-bit halves by dwords
      const __m256i bytes = _mm256_permutevar8x32_epi32(
          _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])), dword_order);
      int8_t* dst = r.q.data() + m * K;
      if (bits == 8) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + b * kBlock), bytes);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(r.mag.data() + m * K + b * kBlock), _mm256_abs_epi8(bytes));
        continue;
      }
      // int4: the block's 16 even-numbered inputs and its 16 odd-numbered ones, each to its half
      // of the chunk
      const __m256i halves = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(bytes, deinterleave), 0xD8);
      const int64_t i0 = (b * kBlock) % chunk, base = b * kBlock - i0;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + base + i0 / 2), _mm256_castsi256_si128(halves));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + base + chunk / 2 + i0 / 2), _mm256_extracti128_si256(halves, 1));
      const __m256i s4 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
      __m128i s2 = _mm_add_epi32(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
      s2 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0x4E));
      s2 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xB1));
      r.group_sum[m * r.groups + (b * kBlock) / group] += s * static_cast<float>(_mm_cvtsi128_si32(s2));
    }
  }
  return r;
}

// y[r][n] = W[n] . x[r] for the output channels n0 <= n < n1 of one int8 weight and
// `rows` rows, 32 inputs per step. Each weight row is read in order, into four accumulators so
// that the fused multiply-adds overlap. (512-bit vectors, 64 inputs per step, were measured no
// faster: the kernel waits on memory, not on its arithmetic.)
KERNEL_TARGET void int8_channels(const int8_t* w, int64_t ldw, const uint16_t* w_scale, const QuantizedRows& x,
                                 int64_t rows, int64_t n0, int64_t n1, int64_t N,
                                 float* out) {
  const int64_t K = x.K;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wn = w + n * ldw;
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* xq = x.q + r * K;
      const uint8_t* xm = x.mag + r * K;
      const float* xs = x.scale + r * x.blocks;
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      int64_t b = 0;
      for (; b + 4 <= x.blocks; b += 4) {
        // Two cache lines, 4 KiB ahead of the weight row read now (measured: faster than 0.5-2 KiB
        // ahead, or none, on a 2-core machine).
        _mm_prefetch(reinterpret_cast<const char*>(wn + b * kBlock + kPrefetch), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(wn + b * kBlock + kPrefetch + 64), _MM_HINT_T0);
        for (int u = 0; u < 4; ++u) {
          const int64_t k = (b + u) * kBlock;
          const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wn + k));
          const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k));
          const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + k));
          const __m256i dot = dot_u8s8(a, _mm256_sign_epi8(wv, q));  // |q| <= 127: pairs fit
          acc[u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(xs[b + u]), acc[u]);
        }
      }
      for (; b < x.blocks; ++b) {
        const int64_t k = b * kBlock;
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wn + k));
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + k));
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + k));
        const __m256i dot = dot_u8s8(a, _mm256_sign_epi8(wv, q));  // |q| <= 127: pairs fit
        acc[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(xs[b]), acc[0]);
      }
      const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
      out[r * N + n] = hsum(sum) * bf16_to_float(w_scale[n]);
    }
  }
}

// The same for an int4 weight (packed [N, K/2], scales and zeros [N, K/group]). Per chunk of 64
// inputs (32 packed bytes): the low nibbles times the chunk's even inputs and the high nibbles
// times its odd ones; lanes 0-3 of the sum hold inputs 0-31 (activation block 2c), lanes 4-7
// inputs 32-63 (block 2c + 1), so the blocks' scales multiply the lanes (`lane_scale`). The
// group's sum is scaled once by the group's weight scale.
template <int C>
KERNEL_TARGET inline void int4_tile(const uint8_t* w, int64_t ldw, const uint16_t* w_scale, const uint16_t* w_zero,
                                    int64_t lds, int64_t group, const QuantizedRows& x, const float* lane_scale,
                                    int64_t rows, int64_t n0, int64_t N, float* out) {
  const int64_t K = x.K;
  const int64_t groups = K / group;
  const int64_t chunks_per_group = group / kChunk;
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* xq = x.q + r * K;
    const float* ls = lane_scale + r * (K / kChunk) * 8;
    const float* xg = x.group_sum + r * groups;
    __m256 acc[C];
    float zero_term[C];
    for (int c = 0; c < C; ++c) {
      acc[c] = _mm256_setzero_ps();
      zero_term[c] = 0.f;
    }
    for (int64_t g = 0; g < groups; ++g) {
      __m256 gacc[C];
      for (int c = 0; c < C; ++c) gacc[c] = _mm256_setzero_ps();
      for (int64_t j = 0; j < chunks_per_group; ++j) {
        const int64_t ch = g * chunks_per_group + j;
        const __m256i even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + ch * kChunk));
        const __m256i odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + ch * kChunk + 32));
        const __m256 s = _mm256_loadu_ps(ls + ch * 8);
        for (int c = 0; c < C; ++c) {
          const uint8_t* wp = w + (n0 + c) * ldw + ch * (kChunk / 2);
          _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetch), _MM_HINT_T0);
          const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
          const __m256i lo = _mm256_and_si256(p, low);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), low);
          // 15 * 127 * 4 fits in int16: the two halves' pairs are added before widening
          const __m256i dot = _mm256_madd_epi16(
              _mm256_add_epi16(_mm256_maddubs_epi16(lo, even), _mm256_maddubs_epi16(hi, odd)), _mm256_set1_epi16(1));
          gacc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, gacc[c]);
        }
      }
      for (int c = 0; c < C; ++c) {
        const int64_t at = (n0 + c) * lds + g;
        acc[c] = _mm256_fmadd_ps(gacc[c], _mm256_set1_ps(bf16_to_float(w_scale[at])), acc[c]);
        zero_term[c] += bf16_to_float(w_zero[at]) * xg[g];
      }
    }
    for (int c = 0; c < C; ++c) out[r * N + n0 + c] = hsum(acc[c]) + zero_term[c];
  }
}

// The same with 512-bit vectors for groups of a multiple of 128 inputs: per step, 64 packed bytes
// (128 inputs, four activation blocks: lanes 4j to 4j + 3 hold block j) and its chunk of the
// activations reordered as 64 even-numbered inputs then 64 odd-numbered ones. Half the
// instructions per weight of the 256-bit kernel, which its arithmetic limits (measured).
template <int C>
VNNI_TARGET inline void int4_tile_512(const uint8_t* w, int64_t ldw, const uint16_t* w_scale, const uint16_t* w_zero,
                                        int64_t lds, int64_t group, const QuantizedRows& x, const float* lane_scale,
                                        int64_t rows, int64_t n0, int64_t N, float* out) {
  const int64_t K = x.K;
  const int64_t groups = K / group;
  const int64_t steps_per_group = group / 128;
  const __m512i low = _mm512_set1_epi8(0x0F);
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* xq = x.q + r * K;
    const float* ls = lane_scale + r * (K / 128) * 16;
    const float* xg = x.group_sum + r * groups;
    __m512 acc[C];
    float zero_term[C];
    for (int c = 0; c < C; ++c) {
      acc[c] = _mm512_setzero_ps();
      zero_term[c] = 0.f;
    }
    for (int64_t g = 0; g < groups; ++g) {
      __m512 sv[C];
      for (int c = 0; c < C; ++c) {
        const int64_t at = (n0 + c) * lds + g;
        sv[c] = _mm512_set1_ps(bf16_to_float(w_scale[at]));
        zero_term[c] += bf16_to_float(w_zero[at]) * xg[g];
      }
      for (int64_t j = 0; j < steps_per_group; ++j) {
        const int64_t st = g * steps_per_group + j;
        const __m512i even = _mm512_loadu_si512(xq + st * 128);
        const __m512i odd = _mm512_loadu_si512(xq + st * 128 + 64);
        const __m512 s = _mm512_loadu_ps(ls + st * 16);
        for (int c = 0; c < C; ++c) {
          const uint8_t* wp = w + (n0 + c) * ldw + st * 64;
          _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetch), _MM_HINT_T0);
          const __m512i p = _mm512_loadu_si512(wp);
          const __m512i lo = _mm512_and_si512(p, low);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(p, 4), low);
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, even), hi, odd);
          acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s, sv[c]), acc[c]);
        }
      }
    }
    for (int c = 0; c < C; ++c) out[r * N + n0 + c] = _mm512_reduce_add_ps(acc[c]) + zero_term[c];
  }
}

VNNI_TARGET void int4_channels_512(const uint8_t* w, int64_t ldw, const uint16_t* w_scale, const uint16_t* w_zero,
                                   int64_t lds, int64_t group, const QuantizedRows& x, const float* lane_scale,
                                   int64_t rows, int64_t n0, int64_t n1, int64_t N,
                                   float* out) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4)
    int4_tile_512<4>(w, ldw, w_scale, w_zero, lds, group, x, lane_scale, rows, n, N, out);
  for (; n < n1; ++n) int4_tile_512<1>(w, ldw, w_scale, w_zero, lds, group, x, lane_scale, rows, n, N, out);
}

// One row of activations (decoding one token) times one int4 channel, `CPG` chunks of 64 inputs
// per group: the arithmetic of `int4_tile` with a group's chunks unrolled (`int4_row_group`), its
// weight scale broadcast straight from the bf16 bits, two accumulators taking the groups in turn
// (each fused multiply-add waits for the last one's result), and the zero term as a vector dot
// product over the groups at the end. About half the instructions per weight of `int4_tile<1>`,
// whose loop over a group's chunks and scalar per-group work were as many instructions as the
// products themselves, and which they limited (one core, weights in cache: 16.5 -> 20.6 GB/s).
// Defined twice (`DEFINE_INT4_ONE_ROW`): with AVX2's byte products (vpmaddubsw, an add and vpmaddwd;
// exact: 15 * 127 * 4 fits in int16), and where the processor has AVX512-VNNI with vpdpbusd on 256-bit
// vectors, one instruction in place of three for the same integer sums, so the same results (one row,
// 0.9 GB of int4 experts' weights read cold, 2 cores: 1.01x and 1.05x in two in-process alternations).
#define DOT_MADDUBS                                                                                                \
  _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, even), _mm256_maddubs_epi16(hi, odd)),               \
                    _mm256_set1_epi16(1))
#define DOT_VNNI _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, even), hi, odd)
#define DEFINE_INT4_ONE_ROW(TARGET, S, DOT)                                                                        \
  template <int CPG>                                                                                               \
  TARGET inline __m256 int4_row_group##S(const uint8_t* w, const uint16_t* w_scale, int64_t g, const int8_t* xq,   \
                                         const float* ls, __m256 acc) {                                            \
    const __m256i low = _mm256_set1_epi8(0x0F);                                                                    \
    const uint8_t* wg = w + g * (CPG * kChunk / 2);                                                                \
    const int8_t* xgq = xq + g * (CPG * kChunk);                                                                   \
    const float* lg = ls + g * (CPG * 8);                                                                          \
    _mm_prefetch(reinterpret_cast<const char*>(wg + kPrefetch), _MM_HINT_T0);                                      \
    if (CPG > 2) _mm_prefetch(reinterpret_cast<const char*>(wg + kPrefetch + 64), _MM_HINT_T0); /* a second line */ \
    __m256 gacc = _mm256_setzero_ps();                                                                             \
    for (int j = 0; j < CPG; ++j) {                                                                                \
      const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + j * 32));                         \
      const __m256i even = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xgq + j * kChunk));                 \
      const __m256i odd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xgq + j * kChunk + 32));             \
      const __m256i lo = _mm256_and_si256(p, low);                                                                 \
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), low);                                           \
      gacc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT), _mm256_loadu_ps(lg + j * 8), gacc);                          \
    }                                                                                                              \
    /* bf16 to fp32 in every lane: the 16-bit value broadcast, then shifted into the high half */                  \
    const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_set1_epi16(static_cast<short>(w_scale[g])), 16)); \
    return _mm256_fmadd_ps(gacc, s, acc);                                                                          \
  }                                                                                                                \
                                                                                                                   \
  template <int CPG>                                                                                               \
  TARGET inline float int4_row##S(const uint8_t* w, const uint16_t* w_scale, const uint16_t* w_zero,               \
                                  int64_t groups, const int8_t* xq, const float* ls, const float* xg) {            \
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();                                                 \
    int64_t g = 0;                                                                                                 \
    for (; g + 2 <= groups; g += 2) {                                                                              \
      acc0 = int4_row_group##S<CPG>(w, w_scale, g, xq, ls, acc0);                                                  \
      acc1 = int4_row_group##S<CPG>(w, w_scale, g + 1, xq, ls, acc1);                                              \
    }                                                                                                              \
    if (g < groups) acc0 = int4_row_group##S<CPG>(w, w_scale, g, xq, ls, acc0);                                    \
    __m256 zt = _mm256_setzero_ps();                                                                               \
    for (g = 0; g + 8 <= groups; g += 8) {                                                                         \
      const __m256i z16 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w_zero + g)));    \
      zt = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(z16, 16)), _mm256_loadu_ps(xg + g), zt);          \
    }                                                                                                              \
    float zero_term = 0.f;                                                                                         \
    for (; g < groups; ++g) zero_term += bf16_to_float(w_zero[g]) * xg[g];                                         \
    return hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), zt)) + zero_term;                                         \
  }                                                                                                                \
                                                                                                                   \
  /* The channels n0 <= n < n1 for x's first row alone; false where the group is not 1, 2 or 4 chunks. */          \
  TARGET bool int4_one_row##S(const uint8_t* w, int64_t ldw, const uint16_t* w_scale, const uint16_t* w_zero,     \
                              int64_t lds, int64_t group, const QuantizedRows& x, const float* lane_scale,         \
                              int64_t n0, int64_t n1, float* out) {                                                \
    const int64_t K = x.K, groups = K / group, cpg = group / kChunk;                                               \
    if (cpg != 1 && cpg != 2 && cpg != 4) return false;                                                            \
    auto row = cpg == 1 ? int4_row##S<1> : cpg == 2 ? int4_row##S<2> : int4_row##S<4>;                             \
    for (int64_t n = n0; n < n1; ++n)                                                                              \
      out[n] = row(w + n * ldw, w_scale + n * lds, w_zero + n * lds, groups, x.q, lane_scale, x.group_sum);        \
    return true;                                                                                                   \
  }

DEFINE_INT4_ONE_ROW(KERNEL_TARGET, , DOT_MADDUBS)
DEFINE_INT4_ONE_ROW(VNNI_TARGET, _vnni, DOT_VNNI)

KERNEL_TARGET void int4_channels(const uint8_t* w, int64_t ldw, const uint16_t* w_scale, const uint16_t* w_zero,
                                 int64_t lds, int64_t group, const QuantizedRows& x, const float* lane_scale,
                                 int64_t rows, int64_t n0, int64_t n1, int64_t N,
                                 float* out) {
  // One row of activations (decoding one token): the weight channel by channel, one sequential
  // stream of memory, which the processor prefetches best; four interleaved channel streams wait
  // on memory (one row, experts' weights read cold, 2 cores: 24.4 GB/s against 18.5; one core
  // 14.3 against 10.7). With more rows the arithmetic dominates, and four channels at a time
  // share each load of the activations (two rows: 4 channels 1.04x faster cold, 1.2x in cache).
  if (rows == 1 && int4_one_row(w, ldw, w_scale, w_zero, lds, group, x, lane_scale, n0, n1, out)) return;
  int64_t n = n0;
  if (rows > 1)
    for (; n + 4 <= n1; n += 4) int4_tile<4>(w, ldw, w_scale, w_zero, lds, group, x, lane_scale, rows, n, N, out);
  for (; n < n1; ++n) int4_tile<1>(w, ldw, w_scale, w_zero, lds, group, x, lane_scale, rows, n, N, out);
}

// The same where the processor has AVX512-VNNI: one row through `int4_one_row_vnni`.
VNNI_TARGET void int4_channels_vnni(const uint8_t* w, int64_t ldw, const uint16_t* w_scale, const uint16_t* w_zero,
                                    int64_t lds, int64_t group, const QuantizedRows& x, const float* lane_scale,
                                    int64_t rows, int64_t n0, int64_t n1, int64_t N, float* out) {
  if (rows == 1 && int4_one_row_vnni(w, ldw, w_scale, w_zero, lds, group, x, lane_scale, n0, n1, out)) return;
  int4_channels(w, ldw, w_scale, w_zero, lds, group, x, lane_scale, rows, n0, n1, N, out);
}

// What this processor runs: 2 with AVX512-VNNI (and F, VL, BW), 1 with AVX2 and FMA only, 0 without;
// at most 1 with DEEPSEEK_MOE_AVX2_ONLY=1 in the environment (the AVX2 kernels on any processor).
int cpu_level() {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return 0;
  const char* avx2_only = std::getenv("DEEPSEEK_MOE_AVX2_ONLY");
  if (avx2_only != nullptr && std::strcmp(avx2_only, "1") == 0) return 1;
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                 __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni")
             ? 2
             : 1;
}

bool quant_gemv_supported() { return cpu_level() > 0; }

at::Tensor quant_gemv(const at::Tensor& x, at::TensorList weights, at::TensorList scales,
                      at::TensorList zeros, at::IntArrayRef starts, at::IntArrayRef counts,
                      int64_t bits, int64_t group) {
  const int level = cpu_level();
  TORCH_CHECK(level > 0, "quant_gemv needs a processor with AVX2 and FMA");
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4, got ", bits);
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x must be a 2-D CPU tensor");
  const int64_t W = static_cast<int64_t>(weights.size());
  TORCH_CHECK(W > 0 && static_cast<int64_t>(scales.size()) == W &&
                  static_cast<int64_t>(starts.size()) == W && static_cast<int64_t>(counts.size()) == W &&
                  (bits == 8 || static_cast<int64_t>(zeros.size()) == W),
              "one scale, start and count (and for int4 one zero) per weight");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % kBlock == 0, "the inputs (", K, ") must be a multiple of ", kBlock);
  TORCH_CHECK(bits == 8 || (group % kChunk == 0 && K % group == 0),
              "the int4 group (", group, ") must be a multiple of 64 that divides ", K);
  const int64_t N = weights[0].size(0);
  // A weight of span * K inputs (span >= 1) reads `span` consecutive rows of x as each of its rows
  // (the shared experts' down projection, one token: their pieces' rows of the intermediate
  // activations, side by side)
  std::vector<int64_t> offset(W + 1, 0), span(W, 1);
  for (int64_t i = 0; i < W; ++i) {
    const at::Tensor& w = weights[i];
    const int64_t row_bytes = bits == 8 ? K : K / 2;
    span[i] = w.dim() == 2 && w.size(1) % row_bytes == 0 ? std::max<int64_t>(1, w.size(1) / row_bytes) : 1;
    const int64_t Ki = span[i] * K;
    TORCH_CHECK(w.dim() == 2 && w.size(0) == N && w.size(1) == span[i] * row_bytes && w.stride(1) == 1 &&
                    w.stride(0) >= w.size(1) && w.scalar_type() == (bits == 8 ? at::kChar : at::kByte),
                "weight ", i, " must be a ", bits == 8 ? "int8" : "uint8", " [", N, ", a multiple of ", row_bytes,
                "] tensor with contiguous rows");
    if (bits == 8) {
      TORCH_CHECK(scales[i].scalar_type() == at::kBFloat16 && scales[i].is_contiguous() && scales[i].numel() == N,
                  "scale ", i, " must be a contiguous bf16 tensor of the weight's channels");
    } else {
      for (const at::Tensor* t : {&scales[i], &zeros[i]})
        TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->dim() == 2 && t->size(0) == N &&
                        t->size(1) == Ki / group && t->stride(1) == 1 && t->stride(0) >= Ki / group &&
                        t->stride(0) == scales[i].stride(0),
                    "scale and zero ", i, " must be bf16 [N, K/group] tensors with contiguous rows, one stride");
    }
    TORCH_CHECK(starts[i] >= 0 && counts[i] >= 0 && starts[i] + counts[i] * span[i] <= M,
                "rows ", starts[i], " + ", counts[i], span[i] > 1 ? " x " + std::to_string(span[i]) : "",
                " out of the ", M, " rows of x");
    offset[i + 1] = offset[i] + counts[i];
  }
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  int64_t most = 0;
  for (int64_t i = 0; i < W; ++i) most = std::max(most, counts[i]);
  // int4 in 512-bit steps for several rows; one row (decoding) takes `int4_channels`' loop, one
  // channel at a time, one stream of memory (the 16B's int4 decode on an AVX512-VNNI processor, 2
  // cores: 10.6 -> 14.3 tokens/s against four channels in 512-bit steps)
  const bool wide = bits == 4 && group % 128 == 0 && level == 2 && most > 1;
  const int64_t chunk = wide ? 128 : 64;
  const QuantizedActivations q = quantize_rows(xf.data_ptr<float>(), M, K, static_cast<int>(bits), group, chunk);
  // int4: per row and chunk of inputs, its blocks' scales, one per lane of the chunk's dot
  // products (four lanes per block of 32 inputs).
  std::vector<float> lane_scale;
  if (bits == 4) {
    const int64_t lanes = chunk / 8;
    lane_scale.resize(M * (K / chunk) * lanes);
    for (int64_t i = 0; i < M * (K / chunk); ++i)
      for (int64_t l = 0; l < lanes; ++l) lane_scale[i * lanes + l] = q.scale[i * (chunk / kBlock) + l / 4];
  }
  at::Tensor out = at::empty({offset[W], N}, x.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  // Tasks of kRowsPerTask channels, fewer of a wider weight's (the same bytes each), so that the
  // threads' equal shares of the tasks are equal shares of the weights read.
  std::vector<int64_t> per_task(W), first_task(W + 1, 0);
  for (int64_t i = 0; i < W; ++i) {
    per_task[i] = std::max<int64_t>(1, kRowsPerTask / span[i]);
    first_task[i + 1] = first_task[i] + (N + per_task[i] - 1) / per_task[i];
  }
  // Each weight's pointers and strides, read once here (a tensor's data_ptr checks its type and
  // storage: thousands of tasks a token)
  struct Weight {
    const void* w;
    const uint16_t *s, *z;
    int64_t ldw, lds;
    QuantizedRows rows;
    const float* lanes;
  };
  std::vector<Weight> ws(W);
  for (int64_t i = 0; i < W; ++i)
    ws[i] = {weights[i].data_ptr(), reinterpret_cast<const uint16_t*>(scales[i].data_ptr<at::BFloat16>()),
             bits == 4 ? reinterpret_cast<const uint16_t*>(zeros[i].data_ptr<at::BFloat16>()) : nullptr,
             weights[i].stride(0), scales[i].stride(0), q.rows(starts[i], span[i]),
             bits == 4 ? lane_scale.data() + starts[i] * (K / chunk) * (chunk / 8) : nullptr};
  at::parallel_for(0, first_task[W], 1, [&](int64_t begin, int64_t end) {
    int64_t i = std::upper_bound(first_task.begin(), first_task.end(), begin) - first_task.begin() - 1;
    for (int64_t t = begin; t < end; ++t) {
      while (t >= first_task[i + 1]) ++i;
      if (counts[i] == 0) continue;
      const int64_t n0 = (t - first_task[i]) * per_task[i], n1 = std::min(N, n0 + per_task[i]);
      const Weight& wt = ws[i];
      if (bits == 8) {
        int8_channels(static_cast<const int8_t*>(wt.w), wt.ldw, wt.s, wt.rows, counts[i], n0, n1, N,
                      o + offset[i] * N);
      } else {
        (wide ? int4_channels_512 : level == 2 ? int4_channels_vnni : int4_channels)(
            static_cast<const uint8_t*>(wt.w), wt.ldw, wt.s, wt.z, wt.lds, group, wt.rows, wt.lanes, counts[i], n0,
            n1, N, o + offset[i] * N);
      }
    }
  });
  return out;
}

// e^x in every lane (the Cephes single-precision method: x = n ln 2 + r, |r| <= ln 2 / 2, a degree-5
// polynomial for e^r, then 2^n), within about 2 ulp of the exact value; NaN stays NaN, and x is
// clamped to [-87.3, 88.4], where e^x is a normal float.
KERNEL_TARGET inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.37626f), _mm256_max_ps(_mm256_set1_ps(-87.33654f), x));  // NaN passes
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(two_n));
}

// h[r] = silu(g[r]) * u[r] * gate[r] for the rows of g and u [rows, I] (gate 1 for rows past the
// gates given): silu(g) = g / (1 + e^-g).
KERNEL_TARGET void swiglu_rows(const float* g, const float* u, const float* gate, int64_t gates, int64_t rows,
                               int64_t I, float* h) {
  for (int64_t r = 0; r < rows; ++r) {
    const __m256 gr = _mm256_set1_ps(r < gates ? gate[r] : 1.f);
    const float* gp = g + r * I;
    const float* up = u + r * I;
    float* hp = h + r * I;
    int64_t i = 0;
    for (; i + 8 <= I; i += 8) {
      const __m256 gv = _mm256_loadu_ps(gp + i);
      const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv));
      const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.f), e));
      _mm256_storeu_ps(hp + i, _mm256_mul_ps(_mm256_mul_ps(silu, _mm256_loadu_ps(up + i)), gr));
    }
    for (; i < I; ++i) hp[i] = gp[i] / (1.f + std::exp(-gp[i])) * up[i] * (r < gates ? gate[r] : 1.f);
  }
}

// The experts of one token of a mixture-of-experts layer (eq. 9's two sums) in one operation: x [1,
// D]; gate_up: the n experts' gate projections, then their up projections (int8 or int4 [I, D]);
// gates fp32 [k], k <= n: the routed experts' gates, in the order given (the n - k experts after
// them are shared experts' pieces, gate 1); down: the down projections, which take the rows of
// the intermediate activations h [n, I] in order, each as many as it is wide: the k routed
// experts' [D, I] one row each, then the shared experts' whole down projection [D, (n - k) I] (or
// one per piece) their rows side by side, one contiguous weight read in one stream (its pieces,
// slices of every row, read the rows' other halves with them: the slowest part of the block).
// Returns fp32 [1, D]: the gated routed experts' outputs summed in order, plus the shared
// experts': `quant_gemv` for the gate and up projections (int4: in groups of `group`), silu(g) * u
// * gate, `quant_gemv` for the down projections (groups of `down_group`), the sums.
at::Tensor experts_one_token(const at::Tensor& x, at::TensorList gate_up, at::TensorList gate_up_scales,
                             at::TensorList gate_up_zeros, at::TensorList down, at::TensorList down_scales,
                             at::TensorList down_zeros, const at::Tensor& gates, int64_t bits, int64_t group,
                             int64_t down_group) {
  const int64_t n = static_cast<int64_t>(gate_up.size()) / 2, d = static_cast<int64_t>(down.size());
  TORCH_CHECK(n > 0 && static_cast<int64_t>(gate_up.size()) == 2 * n && d > 0 && d <= n,
              "2n gate and up projections, and at most n down ones");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1, "x must be one row [1, D]");
  TORCH_CHECK(gates.scalar_type() == at::kFloat && gates.dim() == 1 && gates.numel() <= d && gates.is_contiguous(),
              "gates must be a contiguous fp32 vector of at most one gate per down projection");
  const at::Tensor gu = quant_gemv(x, gate_up, gate_up_scales, gate_up_zeros, std::vector<int64_t>(2 * n, 0),
                                   std::vector<int64_t>(2 * n, 1), bits, group);
  const int64_t I = gu.size(1), k = gates.numel();
  at::Tensor h = at::empty({n, I}, gu.options());
  swiglu_rows(gu.data_ptr<float>(), gu.data_ptr<float>() + n * I, gates.data_ptr<float>(), k, n, I,
              h.data_ptr<float>());
  std::vector<int64_t> rows(d);
  const int64_t row_bytes = bits == 8 ? I : I / 2;
  for (int64_t i = 0, at = 0; i < d; ++i) {
    const int64_t width = down[i].dim() == 2 ? down[i].size(1) : 0;
    TORCH_CHECK(width > 0 && width % row_bytes == 0 && (i >= k || width == row_bytes),
                "down projection ", i, " must take ", i < k ? "one expert's" : "whole experts'", " intermediate activations");
    rows[i] = at;
    at += width / row_bytes;
    TORCH_CHECK(i + 1 < d || at == n, "the down projections take ", at, " experts' activations, not ", n);
  }
  const at::Tensor y = quant_gemv(h, down, down_scales, down_zeros, rows, std::vector<int64_t>(d, 1), bits, down_group);
  const int64_t D = y.size(1);
  at::Tensor out = at::zeros({1, D}, y.options());
  at::Tensor shared = at::zeros({D}, y.options());
  float* o = out.data_ptr<float>();
  float* sh = shared.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  for (int64_t r = 0; r < d; ++r) {
    float* acc = r < k ? o : sh;
    for (int64_t j = 0; j < D; ++j) acc[j] += yp[r * D + j];
  }
  if (k < d)
    for (int64_t j = 0; j < D; ++j) o[j] += sh[j];
  return out;
}

// The weight of a group-wise int4 one in bf16 or fp32, in one pass (prefill multiplies it as a
// GEMM): w[n, k] = q[n, k] * scale[n, g] + zero[n, g], g = k / group, computed in fp32 (bf16: then
// rounded once, to nearest, ties to even). q * scale is exact in fp32 (4 by 8 significant bits).
KERNEL_TARGET inline void put(float* o, int64_t i, float v) { o[i] = v; }
KERNEL_TARGET inline void put(uint16_t* o, int64_t i, float v) {
  uint32_t a;
  std::memcpy(&a, &v, 4);
  o[i] = static_cast<uint16_t>((a + 0x7FFF + ((a >> 16) & 1)) >> 16);
}

template <typename O>
KERNEL_TARGET void dequant_int4_rows(const uint8_t* packed, const uint16_t* scale, const uint16_t* zero,
                                     int64_t K, int64_t group, int64_t n0, int64_t n1, O* out) {
  const int64_t groups = K / group;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t g = 0; g < groups; ++g) {
      const float s = bf16_to_float(scale[n * groups + g]), z = bf16_to_float(zero[n * groups + g]);
      const uint8_t* p = packed + n * (K / 2) + g * (group / 2);
      O* o = out + n * K + g * group;
      for (int64_t j = 0; j < group / 2; ++j) {
        put(o, 2 * j, static_cast<float>(p[j] & 15) * s + z);
        put(o, 2 * j + 1, static_cast<float>(p[j] >> 4) * s + z);
      }
    }
  }
}

at::Tensor dequant_int4(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero, int64_t group,
                        bool fp32) {
  TORCH_CHECK(packed.dim() == 2 && packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed must be a contiguous uint8 [N, K/2] CPU tensor");
  const int64_t N = packed.size(0), K = 2 * packed.size(1);
  TORCH_CHECK(group > 0 && group % 2 == 0 && K % group == 0, "the group (", group, ") must be even and divide ", K);
  for (const at::Tensor* t : {&scale, &zero})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->numel() == N * (K / group),
                "scales and zeros must be contiguous bf16 [N, K/group] tensors");
  TORCH_CHECK(cpu_level() > 0, "dequant_int4 needs a processor with AVX2 and FMA");
  at::Tensor out = at::empty({N, K}, packed.options().dtype(fp32 ? at::kFloat : at::kBFloat16));
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const uint16_t* s = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>());
  const uint16_t* z = reinterpret_cast<const uint16_t*>(zero.data_ptr<at::BFloat16>());
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    if (fp32)
      dequant_int4_rows(p, s, z, K, group, begin, end, out.data_ptr<float>());
    else
      dequant_int4_rows(p, s, z, K, group, begin, end, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  });
  return out;
}

// The weight of a per-channel int8 one in bf16 or fp32, in one pass: w[n, k] = q[n, k] * scale[n]
// (exact in fp32: 7 by 8 significant bits; bf16: rounded once), for prefill's GEMMs.
template <typename O>
KERNEL_TARGET void dequant_int8_rows(const int8_t* q, const uint16_t* scale, int64_t K, int64_t n0, int64_t n1,
                                     O* out) {
  for (int64_t n = n0; n < n1; ++n) {
    const float s = bf16_to_float(scale[n]);
    const int8_t* qn = q + n * K;
    O* o = out + n * K;
    for (int64_t k = 0; k < K; ++k) put(o, k, static_cast<float>(qn[k]) * s);
  }
}

at::Tensor dequant_int8(const at::Tensor& weight, const at::Tensor& scale, bool fp32) {
  TORCH_CHECK(weight.dim() == 2 && weight.device().is_cpu() && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "the weight must be a contiguous int8 [N, K] CPU tensor");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.is_contiguous() && scale.numel() == N,
              "the scales must be a contiguous bf16 [N] tensor");
  TORCH_CHECK(cpu_level() > 0, "dequant_int8 needs a processor with AVX2 and FMA");
  at::Tensor out = at::empty({N, K}, weight.options().dtype(fp32 ? at::kFloat : at::kBFloat16));
  const int8_t* q = weight.data_ptr<int8_t>();
  const uint16_t* s = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>());
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    if (fp32)
      dequant_int8_rows(q, s, K, begin, end, out.data_ptr<float>());
    else
      dequant_int8_rows(q, s, K, begin, end, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
  });
  return out;
}

// RMSNorm of a few rows for inference, one operation (torch's CPU rms_norm is a composite of
// about fifteen): y = w * round(x * 1 / sqrt(mean(x^2) + eps)), the statistics in fp32; for bf16
// x and w the normalised row is rounded to bf16 before the product with w and the product is
// rounded once, as `w * rms_norm(x.float()).to(bf16)` computes it.
inline uint16_t float_to_bf16(float f) {
  uint32_t a;
  std::memcpy(&a, &f, 4);
  return static_cast<uint16_t>((a + 0x7FFF + ((a >> 16) & 1)) >> 16);
}

at::Tensor rms_norm_rows(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1, "x must be a contiguous CPU tensor");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK((bf16 || x.scalar_type() == at::kFloat) && w.scalar_type() == x.scalar_type(),
              "x and the weight must both be fp32 or both bf16");
  const int64_t D = x.size(-1);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == D && w.is_contiguous() && w.device().is_cpu(),
              "the weight must be a contiguous [", D, "] CPU tensor");
  const int64_t M = D ? x.numel() / D : 0;
  at::Tensor out = at::empty_like(x);
  const uint16_t* xb = bf16 ? reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) : nullptr;
  const float* xf = bf16 ? nullptr : x.data_ptr<float>();
  constexpr int64_t L = 16;  // partial sums
  for (int64_t m = 0; m < M; ++m) {
    float acc[L] = {0.f};
    for (int64_t i = 0; i < D; ++i) {
      const float v = bf16 ? bf16_to_float(xb[m * D + i]) : xf[m * D + i];
      acc[i % L] += v * v;
    }
    float sum = 0.f;
    for (int j = 0; j < L; ++j) sum += acc[j];
    const float r = 1.f / std::sqrt(sum / static_cast<float>(D) + static_cast<float>(eps));
    if (bf16) {
      const uint16_t* xr = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()) + m * D;
      const uint16_t* wr = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
      uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) + m * D;
      for (int64_t i = 0; i < D; ++i)
        o[i] = float_to_bf16(bf16_to_float(wr[i]) * bf16_to_float(float_to_bf16(bf16_to_float(xr[i]) * r)));
    } else {
      const float* xr = x.data_ptr<float>() + m * D;
      const float* wr = w.data_ptr<float>();
      float* o = out.data_ptr<float>() + m * D;
      for (int64_t i = 0; i < D; ++i) o[i] = wr[i] * (xr[i] * r);
    }
  }
  return out;
}

// One new token's attention block of a quantized bf16 model (decoding) in one operation:
// x + o_proj(attention(rms_norm(x))) for x [B, 1, D]: `rms_norm_rows`, `quant_gemv` for the query,
// key and value projections (`bits`, `group`), `decode_attention_rope` (the cache's slot `start`
// written), `quant_gemv` for the output projection (`o_bits`, `o_group`) rounded to bf16, and the
// residual sum rounded to bf16: those steps' numbers.
at::Tensor attention_block(const at::Tensor& x, const at::Tensor& norm_weight, double eps, at::TensorList qkv,
                           at::TensorList qkv_scales, at::TensorList qkv_zeros, at::TensorList o, at::TensorList o_scales,
                           at::TensorList o_zeros, int64_t bits, int64_t group, int64_t o_bits, int64_t o_group,
                           const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, int64_t start, double scale) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "x must be a contiguous bf16 [B, 1, D] tensor");
  TORCH_CHECK(qkv.size() == 3 && o.size() == 1, "three projections (query, key, value) and one output projection");
  const int64_t B = x.size(0), D = x.size(2);
  const at::Tensor h = rms_norm_rows(x, norm_weight, eps).view({B, D});
  const at::Tensor q = quant_gemv(h, qkv, qkv_scales, qkv_zeros, std::vector<int64_t>(3, 0),
                                  std::vector<int64_t>(3, B), bits, group);
  const at::Tensor y = deepseek_moe_kernels::attention_rope(q.view({3, B, -1}), cos, sin, k_cache, v_cache, start, scale);
  const at::Tensor ob = quant_gemv(y.view({B, -1}), o, o_scales, o_zeros, {0}, {B}, o_bits, o_group);
  TORCH_CHECK(ob.size(1) == D, "the output projection gives ", ob.size(1), " values, not ", D);
  at::Tensor out = at::empty_like(x);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const float* op = ob.data_ptr<float>();
  uint16_t* outp = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  for (int64_t i = 0; i < B * D; ++i)  // (no NaN from finite weights; rounding as torch rounds)
    outp[i] = float_to_bf16(bf16_to_float(xp[i]) + bf16_to_float(float_to_bf16(op[i])));
  return out;
}

// The stored tensors of a mixture-of-experts layer's experts, for `moe_block`: its weight, scale
// and (int4) zero per gate and up projection of each routed expert and then of each piece of the
// shared experts (`QuantLinear.pieces`), then per down projection of each routed expert and then
// the shared experts' whole down projection (`experts_one_token`; or one per piece); built once
// per layer.
struct ExpertTable : torch::CustomClassHolder {
  std::vector<at::Tensor> tensors;
  int64_t experts, pieces, per, shared_down;
  ExpertTable(std::vector<at::Tensor> t, int64_t experts_, int64_t pieces_, int64_t per_)
      : tensors(std::move(t)), experts(experts_), pieces(pieces_), per(per_) {
    const int64_t entries = per > 0 ? static_cast<int64_t>(tensors.size()) / per : 0;
    shared_down = entries - 2 * (experts + pieces) - experts;
    TORCH_CHECK(experts > 0 && pieces >= 0 && (per == 2 || per == 3) && entries * per == static_cast<int64_t>(tensors.size()) &&
                    (pieces == 0 ? shared_down == 0 : shared_down >= 1 && shared_down <= pieces),
                "an expert table holds 2 or 3 tensors per projection: experts + pieces gate and up projections, "
                "experts + 1 to pieces down projections (none without pieces)");
  }
  const at::Tensor& get(int64_t projection, int64_t i, int64_t field) const {
    return tensors[(projection * (experts + pieces) + i) * per + field];
  }
};

// One new token's mixture-of-experts block of a quantized bf16 model (decoding) in one operation:
// x + moe(rms_norm(x)) for x [1, 1, D]: `rms_norm_rows`, the routing (`route_tokens`: the top k of
// the softmax over the centroids' logits, the gates normalised where `norm`, times `scale`), the
// routed experts and the shared experts' pieces (`experts_one_token`), the sum rounded to bf16 and
// the residual sum rounded to bf16: those steps' numbers. Returns (the new x, the token's
// assignments per expert: int64 [E]).
std::tuple<at::Tensor, at::Tensor> moe_block(const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                                             const at::Tensor& centroids, int64_t k, bool norm, double scale,
                                             const c10::intrusive_ptr<ExpertTable>& table, int64_t bits,
                                             int64_t group, int64_t down_group) {
  TORCH_CHECK(x.dim() == 3 && x.size(0) == 1 && x.size(1) == 1 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "x must be a contiguous bf16 [1, 1, D] tensor");
  const int64_t D = x.size(2), E = table->experts, P = table->pieces;
  TORCH_CHECK(centroids.dim() == 2 && centroids.size(0) == E, "one centroid per routed expert of the table");
  TORCH_CHECK(k >= 1 && k <= E, "cannot route to ", k, " of ", E, " experts");
  const at::Tensor h = rms_norm_rows(x, norm_weight, eps).view({1, D});
  const auto routed = deepseek_moe_kernels::route(h, centroids, k, norm, scale);
  const at::Tensor& ids = std::get<0>(routed);
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t F = table->per;
  std::vector<at::Tensor> gu[3], dn[3];
  for (int64_t projection = 0; projection < 2; ++projection) {
    for (int64_t j = 0; j < k + P; ++j) {
      const int64_t i = j < k ? id[j] : E + (j - k);
      for (int64_t f = 0; f < F; ++f) gu[f].push_back(table->get(projection, i, f));
    }
  }
  for (int64_t j = 0; j < k + table->shared_down; ++j) {
    const int64_t i = j < k ? id[j] : E + (j - k);
    for (int64_t f = 0; f < F; ++f) dn[f].push_back(table->get(2, i, f));
  }
  const at::Tensor y = experts_one_token(h, gu[0], gu[1], gu[2], dn[0], dn[1], dn[2], std::get<1>(routed).view({-1}),
                                         bits, group, down_group);
  TORCH_CHECK(y.size(1) == D, "the experts give ", y.size(1), " values, not ", D);
  at::Tensor out = at::empty_like(x);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const float* yp = y.data_ptr<float>();
  uint16_t* outp = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  for (int64_t i = 0; i < D; ++i)
    outp[i] = float_to_bf16(bf16_to_float(xp[i]) + bf16_to_float(float_to_bf16(yp[i])));
  at::Tensor counts = at::zeros({E}, ids.options());
  int64_t* c = counts.data_ptr<int64_t>();
  for (int64_t j = 0; j < k; ++j) ++c[id[j]];
  return {out, counts};
}

}  // namespace

namespace deepseek_moe_kernels {  // for quant_gemm.cpp
int processor_level() { return cpu_level(); }
}  // namespace deepseek_moe_kernels

TORCH_LIBRARY(deepseek_moe, m) {
  m.class_<ExpertTable>("ExpertTable").def(torch::init<std::vector<at::Tensor>, int64_t, int64_t, int64_t>());
  m.def("quant_gemv(Tensor x, Tensor[] weights, Tensor[] scales, Tensor[] zeros, int[] starts, "
        "int[] counts, int bits, int group) -> Tensor");
  m.def("quant_gemv_supported() -> bool", &quant_gemv_supported);
  m.def("dequant_int4(Tensor packed, Tensor scale, Tensor zero, int group, bool fp32=False) -> Tensor");
  m.def("dequant_int8(Tensor weight, Tensor scale, bool fp32=False) -> Tensor");
  m.def("rms_norm_rows(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("experts_one_token(Tensor x, Tensor[] gate_up, Tensor[] gate_up_scales, Tensor[] gate_up_zeros, "
        "Tensor[] down, Tensor[] down_scales, Tensor[] down_zeros, Tensor gates, int bits, int group, "
        "int down_group) -> Tensor");
  m.def("moe_block(Tensor x, Tensor norm_weight, float eps, Tensor centroids, int k, bool norm, float scale, "
        "__torch__.torch.classes.deepseek_moe.ExpertTable table, int bits, int group, int down_group) -> (Tensor, Tensor)");
  m.def("attention_block(Tensor x, Tensor norm_weight, float eps, Tensor[] qkv, Tensor[] qkv_scales, "
        "Tensor[] qkv_zeros, Tensor[] o, Tensor[] o_scales, Tensor[] o_zeros, int bits, int group, int o_bits, "
        "int o_group, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int start, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(deepseek_moe, CPU, m) {
  m.impl("quant_gemv", &quant_gemv);
  m.impl("dequant_int4", &dequant_int4);
  m.impl("dequant_int8", &dequant_int8);
  m.impl("rms_norm_rows", &rms_norm_rows);
  m.impl("experts_one_token", &experts_one_token);
  m.impl("attention_block", &attention_block);
  m.impl("moe_block", &moe_block);
}
