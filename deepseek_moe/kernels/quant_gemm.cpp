// Many-row products with weight-only quantized weights (prefill: every token of a prompt) on
// integer arithmetic, for processors with AVX512-VNNI:
//
//   deepseek_moe::quant_gemm_int4(x, packed, scale, zero, group, act_group) -> out
//   deepseek_moe::quant_gemm_int8(x, weight, scale, act_group) -> out
//
// x [M, K] (fp32 or bf16); int4: packed uint8 [N, K/2] (element 2j in the low nibble of byte j),
// scale and zero bf16 [N, K/group] (W = q * scale + zero, q in [0, 15]); int8: weight [N, K] and
// scale bf16 [N] (W = q * scale); out fp32 [M, N] = x W^T.
//
// The activations are quantized per row and group of `act_group` inputs (a multiple of 64; int4:
// one that divides the weight's group) to int8 (symmetric, the group's largest magnitude as 127),
// so that one integer sum per row, channel and group takes one fp32 scaling (by the weight's and
// the activations' scales), and the zero's share is the zero times the group's sum of the
// quantized activations: the result is the product of the dequantized weight with the quantized
// activations. The weight is unpacked 32 channels at a time into a panel of bytes, four inputs of
// 16 channels per 512-bit vector, which vpdpbusd multiplies by four inputs of one row broadcast
// (unsigned weights by signed activations, summed by fours into int32: exact, at most 255 * 127 *
// 4 per step and 64 steps per group of 256); a tile of six rows and 32 channels keeps its 24 sums
// in registers. int8 weights enter the panel plus 128 (unsigned), and their zero, -128 times the
// scale, takes that share away again. int4 inputs are taken in an order of their own within each
// chunk of 64 (its 32 even-numbered ones, then its 32 odd-numbered ones: the nibbles' order), the
// same for weights and activations.
//
// `quant_gemm_supported()` says whether this processor has AVX512-VNNI (and F, VL, BW; not with
// DEEPSEEK_MOE_AVX2_ONLY=1: quant_gemv.cpp's `cpu_level`); the file is compiled without such flags
// (only the kernel functions carry them).

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace deepseek_moe_kernels {  // quant_gemv.cpp's: 2 with AVX512-VNNI (and F, VL, BW), as its kernels need
int processor_level();
}

namespace {

#define GEMM_TARGET __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")))

constexpr int64_t kTileRows = 6;   // rows of one tile
constexpr int64_t kPanel = 32;     // output channels of one panel (two vectors of 16)
constexpr int64_t kChunk = 64;     // inputs of one reordered chunk (32 packed bytes)

bool quant_gemm_supported() { return deepseek_moe_kernels::processor_level() == 2; }

// The activations quantized per row and group: q [M, K] in the reordered input order, and per row
// and group the scale (largest magnitude / 127) and the scaled sum of q.
struct GroupRows {
  int64_t K = 0, groups = 0;
  std::vector<int8_t> q;
  std::vector<float> scale, sum;
};

template <bool BF16>
GEMM_TARGET inline __m512 load16(const void* x, int64_t i) {
  if (BF16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  return _mm512_loadu_ps(static_cast<const float*>(x) + i);
}

// Rows m0 <= m < m1. Per group: the largest magnitude (a NaN is passed over: vmaxps returns its
// second operand), then x * (127 / amax) rounded to nearest (ties to even) and saturated to int8.
template <bool BF16, bool REORDER>
GEMM_TARGET void quantize_group_rows(const void* x, int64_t m0, int64_t m1, int64_t K, int64_t group,
                                     GroupRows& r) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t g = 0; g < r.groups; ++g) {
      const int64_t k0 = m * K + g * group;
      __m512 amax = _mm512_setzero_ps();
      for (int64_t i = 0; i < group; i += 16) amax = _mm512_max_ps(_mm512_abs_ps(load16<BF16>(x, k0 + i)), amax);
      const float a = _mm512_reduce_max_ps(amax);
      const __m512 inv = _mm512_set1_ps(a > 0.f ? 127.f / a : 0.f);
      __m512i total = _mm512_setzero_si512();
      for (int64_t c = 0; c < group; c += kChunk) {
        __m512 v[4];
        for (int i = 0; i < 4; ++i) v[i] = _mm512_mul_ps(load16<BF16>(x, k0 + c + 16 * i), inv);
        const __m512 parts[4] = {
            REORDER ? _mm512_permutex2var_ps(v[0], even, v[1]) : v[0], REORDER ? _mm512_permutex2var_ps(v[2], even, v[3]) : v[1],
            REORDER ? _mm512_permutex2var_ps(v[0], odd, v[1]) : v[2], REORDER ? _mm512_permutex2var_ps(v[2], odd, v[3]) : v[3]};
        int8_t* dst = r.q.data() + k0 + c;
        for (int i = 0; i < 4; ++i) {
          const __m512i qi = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(parts[i]), _mm512_set1_epi32(127)),
                                              _mm512_set1_epi32(-127));
          total = _mm512_add_epi32(total, qi);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16 * i), _mm512_cvtepi32_epi8(qi));
        }
      }
      const float s = a / 127.f;
      r.scale[m * r.groups + g] = s;
      r.sum[m * r.groups + g] = s * static_cast<float>(_mm512_reduce_add_epi32(total));
    }
  }
}

// v[i]: 16 dwords of row i -> v[j]: dword j of the 16 rows.
GEMM_TARGET inline void transpose16(__m512i v[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  // b[4i + j], 128-bit lane L: dword 4L + j of rows 4i to 4i + 3
  for (int j = 0; j < 4; ++j) {
    const __m512i c0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x88), c1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xDD);
    const __m512i d0 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x88), d1 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xDD);
    v[j] = _mm512_shuffle_i32x4(c0, d0, 0x88);
    v[4 + j] = _mm512_shuffle_i32x4(c1, d1, 0x88);
    v[8 + j] = _mm512_shuffle_i32x4(c0, d0, 0xDD);
    v[12 + j] = _mm512_shuffle_i32x4(c1, d1, 0xDD);
  }
}

// The channels n0 <= n < n0 + nc (nc <= 32) of an int4 weight as a panel: for each step of four
// reordered inputs, 32 channels' four bytes (128 bytes; missing channels zero); and their scales
// and zeros in fp32, 32 per group.
GEMM_TARGET void pack_panel(const uint8_t* w, int64_t ldw, const uint16_t* scale, const uint16_t* zero, int64_t lds,
                            int64_t n0, int64_t nc, int64_t K, int64_t groups, int64_t per_group, uint8_t* panel,
                            float* ps, float* pz) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  for (int64_t c = 0; c < K / kChunk; ++c) {
    for (int64_t h = 0; h < 2; ++h) {
      __m512i v[16];
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t ch = 16 * h + i;
        if (ch < nc) {
          const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n0 + ch) * ldw + c * (kChunk / 2)));
          const __m256i lo = _mm256_and_si256(p, low), hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), low);
          v[i] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        } else {
          v[i] = _mm512_setzero_si512();
        }
      }
      transpose16(v);
      for (int64_t j = 0; j < 16; ++j)
        _mm512_store_si512(reinterpret_cast<__m512i*>(panel + ((c * 16 + j) * kPanel + 16 * h) * 4), v[j]);
    }
  }
  for (int64_t g = 0; g < groups; ++g)  // activation groups, `per_group` to a weight's group
    for (int64_t ch = 0; ch < kPanel; ++ch) {
      uint32_t s = 0, z = 0;
      if (ch < nc) {
        s = static_cast<uint32_t>(scale[(n0 + ch) * lds + g / per_group]) << 16;
        z = static_cast<uint32_t>(zero[(n0 + ch) * lds + g / per_group]) << 16;
      }
      std::memcpy(ps + g * kPanel + ch, &s, 4);
      std::memcpy(pz + g * kPanel + ch, &z, 4);
    }
}

// The same for an int8 weight [N, K] (inputs in their order): each byte plus 128 (unsigned, as
// vpdpbusd takes its weights), whose share, 128 times the activations' sum, the zero term takes
// away (zero = -128 * scale); the per-channel scale for every group.
GEMM_TARGET void pack_panel_int8(const int8_t* w, int64_t ldw, const uint16_t* scale, int64_t n0, int64_t nc,
                                 int64_t K, int64_t groups, uint8_t* panel, float* ps, float* pz) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t c = 0; c < K / kChunk; ++c) {
    for (int64_t h = 0; h < 2; ++h) {
      __m512i v[16];
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t ch = 16 * h + i;
        v[i] = ch < nc ? _mm512_xor_si512(_mm512_loadu_si512(w + (n0 + ch) * ldw + c * kChunk), flip)
                       : _mm512_setzero_si512();
      }
      transpose16(v);
      for (int64_t j = 0; j < 16; ++j)
        _mm512_store_si512(reinterpret_cast<__m512i*>(panel + ((c * 16 + j) * kPanel + 16 * h) * 4), v[j]);
    }
  }
  for (int64_t ch = 0; ch < kPanel; ++ch) {
    uint32_t bits = ch < nc ? static_cast<uint32_t>(scale[n0 + ch]) << 16 : 0;
    float sc;
    std::memcpy(&sc, &bits, 4);
    for (int64_t g = 0; g < groups; ++g) {
      ps[g * kPanel + ch] = sc;
      pz[g * kPanel + ch] = -128.f * sc;
    }
  }
}

// Rows m0 to m0 + MR of the product with one panel: out[m][n0 + c] for c < nc.
template <int MR>
GEMM_TARGET void gemm_tile(const uint8_t* panel, const float* ps, const float* pz, const GroupRows& x, int64_t m0,
                           int64_t group, float* out, int64_t ldo, int64_t nc) {
  const int64_t K = x.K, groups = x.groups, steps = group / 4;
  __m512 acc[MR][2];
  const int8_t* xr[MR];
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    xr[r] = x.q.data() + (m0 + r) * K;
  }
  for (int64_t g = 0; g < groups; ++g) {
    __m512i sum[MR][2];
    for (int r = 0; r < MR; ++r) sum[r][0] = sum[r][1] = _mm512_setzero_si512();
    const uint8_t* pg = panel + g * steps * (kPanel * 4);
    for (int64_t s = 0; s < steps; ++s) {
      const __m512i w0 = _mm512_load_si512(pg + s * (kPanel * 4));
      const __m512i w1 = _mm512_load_si512(pg + s * (kPanel * 4) + 64);
      for (int r = 0; r < MR; ++r) {
        int32_t four;
        std::memcpy(&four, xr[r] + g * group + 4 * s, 4);
        const __m512i xb = _mm512_set1_epi32(four);
        sum[r][0] = _mm512_dpbusd_epi32(sum[r][0], w0, xb);
        sum[r][1] = _mm512_dpbusd_epi32(sum[r][1], w1, xb);
      }
    }
    const __m512 s0 = _mm512_loadu_ps(ps + g * kPanel), s1 = _mm512_loadu_ps(ps + g * kPanel + 16);
    const __m512 z0 = _mm512_loadu_ps(pz + g * kPanel), z1 = _mm512_loadu_ps(pz + g * kPanel + 16);
    for (int r = 0; r < MR; ++r) {
      const __m512 xs = _mm512_set1_ps(x.scale[(m0 + r) * groups + g]);
      const __m512 xm = _mm512_set1_ps(x.sum[(m0 + r) * groups + g]);
      acc[r][0] = _mm512_fmadd_ps(z0, xm, _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r][0]), _mm512_mul_ps(s0, xs), acc[r][0]));
      acc[r][1] = _mm512_fmadd_ps(z1, xm, _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r][1]), _mm512_mul_ps(s1, xs), acc[r][1]));
    }
  }
  const __mmask16 m0_mask = nc >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << nc) - 1);
  const __mmask16 m1_mask = nc >= 32 ? 0xFFFF : nc <= 16 ? 0 : static_cast<__mmask16>((1u << (nc - 16)) - 1);
  for (int r = 0; r < MR; ++r) {
    float* o = out + (m0 + r) * ldo;
    _mm512_mask_storeu_ps(o, m0_mask, acc[r][0]);
    _mm512_mask_storeu_ps(o + 16, m1_mask, acc[r][1]);
  }
}

GEMM_TARGET void gemm_rows(const uint8_t* panel, const float* ps, const float* pz, const GroupRows& x, int64_t M,
                           int64_t group, float* out, int64_t ldo, int64_t nc) {
  int64_t m = 0;
  for (; m + kTileRows <= M; m += kTileRows) gemm_tile<kTileRows>(panel, ps, pz, x, m, group, out, ldo, nc);
  switch (M - m) {
    case 5: gemm_tile<5>(panel, ps, pz, x, m, group, out, ldo, nc); break;
    case 4: gemm_tile<4>(panel, ps, pz, x, m, group, out, ldo, nc); break;
    case 3: gemm_tile<3>(panel, ps, pz, x, m, group, out, ldo, nc); break;
    case 2: gemm_tile<2>(panel, ps, pz, x, m, group, out, ldo, nc); break;
    case 1: gemm_tile<1>(panel, ps, pz, x, m, group, out, ldo, nc); break;
    default: break;
  }
}

// The activations of x [M, K] quantized per row and group (REORDER: in the int4 panels' input order).
GroupRows quantize_activations(const at::Tensor& x, int64_t group, bool reorder) {
  const int64_t M = x.size(0), K = x.size(1), groups = K / group;
  GroupRows q;
  q.K = K;
  q.groups = groups;
  q.q.resize(M * K);
  q.scale.resize(M * groups);
  q.sum.resize(M * groups);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const void* xp = bf16 ? static_cast<const void*>(x.data_ptr<at::BFloat16>()) : x.data_ptr<float>();
  auto fn = bf16 ? (reorder ? quantize_group_rows<true, true> : quantize_group_rows<true, false>)
                 : (reorder ? quantize_group_rows<false, true> : quantize_group_rows<false, false>);
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) { fn(xp, begin, end, K, group, q); });
  return q;
}

void check_x(const at::Tensor& x, int64_t group) {
  TORCH_CHECK(quant_gemm_supported(), "the integer GEMM needs a processor with AVX512-VNNI");
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be a 2-D fp32 or bf16 CPU tensor");
  TORCH_CHECK(group > 0 && group % kChunk == 0 && x.size(1) % group == 0,
              "the group (", group, ") must be a multiple of ", kChunk, " that divides ", x.size(1));
}

// Every panel of N channels, in parallel: `pack(n0, nc, panel, scales, zeros)` fills one.
template <typename Pack>
at::Tensor panels_product(const GroupRows& q, int64_t M, int64_t N, int64_t group, const at::TensorOptions& options,
                          const Pack& pack) {
  const int64_t K = q.K, groups = q.groups;
  at::Tensor out = at::empty({M, N}, options.dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const int64_t panels = (N + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    uint8_t* buf = static_cast<uint8_t*>(std::aligned_alloc(64, K * kPanel));
    std::vector<float> ps(groups * kPanel), pz(groups * kPanel);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * kPanel, nc = std::min(kPanel, N - n0);
      pack(n0, nc, buf, ps.data(), pz.data());
      gemm_rows(buf, ps.data(), pz.data(), q, M, group, o + n0, N, nc);
    }
    std::free(buf);
  });
  return out;
}

at::Tensor quant_gemm_int4(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                           const at::Tensor& zero, int64_t group, int64_t act_group) {
  check_x(x, act_group);
  TORCH_CHECK(group % act_group == 0, "the activations' group (", act_group, ") must divide the weight's (", group, ")");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.size(1) == K / 2 && packed.stride(1) == 1,
              "packed must be a uint8 [N, ", K / 2, "] tensor with contiguous rows");
  const int64_t N = packed.size(0), groups = K / group;
  for (const at::Tensor* t : {&scale, &zero})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->dim() == 2 && t->size(0) == N && t->size(1) == groups &&
                    t->stride(1) == 1 && t->stride(0) == scale.stride(0),
                "scale and zero must be bf16 [", N, ", ", groups, "] tensors with contiguous rows, one stride");
  const GroupRows q = quantize_activations(x.contiguous(), act_group, true);
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const uint16_t* s = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>());
  const uint16_t* z = reinterpret_cast<const uint16_t*>(zero.data_ptr<at::BFloat16>());
  return panels_product(q, M, N, act_group, x.options(), [&](int64_t n0, int64_t nc, uint8_t* panel, float* ps, float* pz) {
    pack_panel(w, packed.stride(0), s, z, scale.stride(0), n0, nc, K, q.groups, group / act_group, panel, ps, pz);
  });
}

// x W^T for a per-channel int8 weight [N, K] (W = q * scale), the activations quantized per row
// and group of `group` inputs.
at::Tensor quant_gemm_int8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, int64_t group) {
  check_x(x, group);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.size(1) == K && weight.stride(1) == 1,
              "the weight must be an int8 [N, ", K, "] tensor with contiguous rows");
  const int64_t N = weight.size(0);
  TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.is_contiguous() && scale.numel() == N,
              "the scale must be a contiguous bf16 [", N, "] tensor");
  const GroupRows q = quantize_activations(x.contiguous(), group, false);
  const int8_t* w = weight.data_ptr<int8_t>();
  const uint16_t* s = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>());
  return panels_product(q, M, N, group, x.options(), [&](int64_t n0, int64_t nc, uint8_t* panel, float* ps, float* pz) {
    pack_panel_int8(w, weight.stride(0), s, n0, nc, K, q.groups, panel, ps, pz);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(deepseek_moe, m) {
  m.def("quant_gemm_int4(Tensor x, Tensor packed, Tensor scale, Tensor zero, int group, int act_group) -> Tensor");
  m.def("quant_gemm_int8(Tensor x, Tensor weight, Tensor scale, int group) -> Tensor");
  m.def("quant_gemm_supported() -> bool", &quant_gemm_supported);
}

TORCH_LIBRARY_IMPL(deepseek_moe, CPU, m) {
  m.impl("quant_gemm_int4", &quant_gemm_int4);
  m.impl("quant_gemm_int8", &quant_gemm_int8);
}
