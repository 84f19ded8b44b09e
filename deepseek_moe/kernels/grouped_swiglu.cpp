// The routed experts' grouped SwiGLU for training on the CPU, one expert per thread.
//
//   deepseek_moe::grouped_swiglu(x, token, gate, w1, w3, w2, counts, pads) -> (out, g, u)
//   deepseek_moe::grouped_swiglu_backward(grad, x, token, gate, w1, w3, w2, g, u, counts, pads,
//                                         need_x, need_gate, need_w) -> (gx, ggate, gw1, gw3, gw2)
//   deepseek_moe::topk_indices(scores, k), deepseek_moe::routing_entropy(scores),
//   deepseek_moe::sort_by_expert(ids, n_experts): the routing's selection, entropy and sort, and
//   deepseek_moe::decode_attention(q, k, v, scale): one new token's attention over the cache
//   (inference; at the end of this file).
//   deepseek_moe::gradient_blocks_free_bytes(): the memory of freed expert weight gradients kept
//   for the next step's (GradientBlocks).
//
// w1, w3 [E, I, D] and w2 [E, D, I]; or, without w3 (None), w1 = w13 [E, 2I, D], each expert's gate
// rows then its up rows (the fused form): the two up projections are then one GEMM [np, D] x
// [D, 2I], and so are their input gradient and their weight gradient (gw1 = gw13 [E, 2I, D],
// gw3 empty), which at small experts is much faster than two (bf16 at 455 x 128 x 88: 1.4x). The
// forward's g is then gu [sum(pads), 2I] (u empty).
//
// Rows are sorted by expert: expert e owns rows [s_e, s_e + counts[e]) (s_e the sum of the earlier
// counts). Row m reads x[token[m]] (routed) or x[m] (no token), and its result is
// gate[m] * w2_e (silu(w1_e x) * w3_e x), the gate (fp32; 1 without one) scaling the input of the
// down projection (eq. 9's g_{i,t} FFN_i(u_t)). Routed, `out` is the fp32 [T, D] sum of each token's
// rows (the combine), taken in row order, so it is deterministic; without a token it is the rows'
// results [M, D].
//
// Why one expert per thread: at the small experts of the tiny presets (128 x 88) a per-expert
// GEMM run by all threads spends more on starting and joining the threads than on arithmetic,
// and the work between the GEMMs (gathers, SwiGLU, gate, combine) costs as much again in passes
// over memory. Here each thread takes whole experts (largest first, the next free one when it is
// done) and does everything for one expert in buffers that stay in its cache: the gather of its
// rows, the three GEMMs (the BLAS's, which run on the calling thread inside a parallel region), the
// SwiGLU with the gate in one pass, and the backward's mirror of it. Rows are padded per expert to
// pads[e] >= counts[e] rows of zeros (bf16: a few GEMM shapes that stay compiled); padding rows
// have a zero gate and zero inputs and gradients, so they add exactly 0 everywhere. The forward
// keeps g = w1 x and u = w3 x in that padded layout ([sum(pads), I]) for the backward.
//
// Element-wise arithmetic is fp32 whatever the storage dtype (fp32 or bf16), rounded once to the
// storage dtype where a GEMM reads the result.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <sys/mman.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace {

using at::Tensor;

// The routed experts' weight gradients, from blocks of memory kept across training steps. They
// are the biggest tensors of a step (at the 16B layer shape, three of 738 MB in fp32: 8x the
// parameters of the dense FFN of the same activated FLOPs), made afresh by every backward and
// freed by the optimizer's zero_grad. From the C heap, a block that finds no free hole of its size
// (the heap's free space is fragmented differently from step to step) grows the heap, and every
// fresh page is a page fault on first touch: about 10 us a 4 KiB page on a virtual machine, some
// two seconds for one such gradient, in steps chosen by chance. Here a freed gradient's block
// goes back to a pool and the next gradient of the same size takes it, so after the first step no
// gradient touches fresh memory; new blocks are mapped on their own and advised to the kernel as
// huge pages (512x fewer first-touch faults where it grants them). The pool keeps its blocks for
// the life of the process, as the C heap does with freed memory under keep_freed_memory: the
// memory a process once needed for its gradients stays with it.
class GradientBlocks {
 public:
  static constexpr size_t kMinBytes = size_t{1} << 20;  // smaller ones come from the C heap

  static GradientBlocks& instance() {
    static GradientBlocks* pool = new GradientBlocks();  // never destroyed: gradients may outlive statics
    return *pool;
  }

  Tensor empty_like(const Tensor& w) {
    const size_t bytes = static_cast<size_t>(w.numel()) * w.element_size();
    if (bytes < kMinBytes || !w.is_contiguous()) return at::empty_like(w);
    void* p = take(bytes);
    return at::from_blob(p, w.sizes(), [bytes](void* q) { GradientBlocks::instance().give(q, bytes); },
                         w.options());
  }

  int64_t free_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t n = 0;
    for (const auto& kv : free_) n += kv.first * kv.second.size();
    return static_cast<int64_t>(n);
  }

 private:
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        return p;
      }
    }
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "out of memory: could not map ", bytes, " bytes for an expert weight gradient");
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);  // advice only: without huge pages the block still works
#endif
    return p;
  }

  void give(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_[bytes].push_back(p);
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;  // by size in bytes
};

struct Layout {
  int64_t E = 0, D = 0, I = 0, M = 0, P = 0, max_pad = 0;
  bool fused = false;  // w1 is w13 [E, 2I, D] (no w3)
  int64_t J = 0;       // the up projections' output width: I, or 2I fused
  std::vector<int64_t> counts, pads, start, pstart, order;  // order: experts with rows, largest first
  // Routed: row m's result goes to row dest[m] of the [M, D] results, which hold token t's rows in
  // [first[t], first[t + 1]), in increasing m (a counting sort by token), so that the combine reads
  // each token's rows contiguously.
  std::vector<int64_t> first, dest;
};

Layout make_layout(const Tensor& x, const c10::optional<Tensor>& token, const c10::optional<Tensor>& gate,
                   const Tensor& w1, const c10::optional<Tensor>& w3, const Tensor& w2, at::IntArrayRef counts,
                   at::IntArrayRef pads) {
  Layout L;
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be fp32 or bf16");
  for (const Tensor* w : {&w1, w3.has_value() ? &*w3 : &w1, &w2})
    TORCH_CHECK(w->dim() == 3 && w->is_contiguous() && w->scalar_type() == x.scalar_type() && w->device().is_cpu(),
                "the expert weights must be contiguous 3-D CPU tensors of x's dtype");
  L.fused = !w3.has_value();
  L.E = w1.size(0);
  L.J = w1.size(1);
  L.I = L.fused ? L.J / 2 : L.J;
  L.D = w1.size(2);
  TORCH_CHECK(x.size(1) == L.D && (L.fused ? L.J % 2 == 0 : w3->sizes() == w1.sizes()) && w2.size(0) == L.E &&
                  w2.size(1) == L.D && w2.size(2) == L.I,
              "weight shapes do not match: w1/w3 [E, I, D] (or w13 [E, 2I, D] without w3), w2 [E, D, I], x [*, D]");
  TORCH_CHECK(static_cast<int64_t>(counts.size()) == L.E && pads.size() == counts.size(),
              "counts and pads need one entry per expert");
  L.counts = counts.vec();
  L.pads = pads.vec();
  L.start.resize(L.E);
  L.pstart.resize(L.E);
  for (int64_t e = 0; e < L.E; ++e) {
    TORCH_CHECK(L.counts[e] >= 0 && L.pads[e] >= L.counts[e], "each pad must be at least its count");
    L.start[e] = L.M;
    L.pstart[e] = L.P;
    L.M += L.counts[e];
    L.P += L.pads[e];
    L.max_pad = std::max(L.max_pad, L.pads[e]);
    if (L.counts[e] > 0) L.order.push_back(e);
  }
  std::stable_sort(L.order.begin(), L.order.end(), [&](int64_t a, int64_t b) { return L.counts[a] > L.counts[b]; });
  if (token.has_value()) {
    TORCH_CHECK(token->scalar_type() == at::kLong && token->dim() == 1 && token->numel() == L.M &&
                    token->is_contiguous(),
                "token must be a contiguous int64 [M] tensor");
    const int64_t* t = token->data_ptr<int64_t>();
    const int64_t T = x.size(0);
    L.first.assign(T + 1, 0);
    for (int64_t m = 0; m < L.M; ++m) {
      TORCH_CHECK(t[m] >= 0 && t[m] < T, "token index ", t[m], " out of range for ", T, " rows");
      ++L.first[t[m] + 1];
    }
    for (int64_t i = 0; i < T; ++i) L.first[i + 1] += L.first[i];
    std::vector<int64_t> fill(L.first.begin(), L.first.end() - 1);
    L.dest.resize(L.M);
    for (int64_t m = 0; m < L.M; ++m) L.dest[m] = fill[t[m]]++;
  } else {
    TORCH_CHECK(x.size(0) == L.M, "without tokens x must hold the M = ", L.M, " rows");
  }
  if (gate.has_value())
    TORCH_CHECK(gate->scalar_type() == at::kFloat && gate->dim() == 1 && gate->numel() == L.M && gate->is_contiguous(),
                "gate must be a contiguous fp32 [M] tensor");
  return L;
}

// Runs body(e) for every expert with rows, the experts shared out over torch's threads (each
// thread takes the next expert of `order` when it is done), with per-thread state made by init().
template <typename Init, typename Body>
void for_each_expert(const Layout& L, Init init, Body body) {
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(L.order.size());
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  const at::ThreadLocalState caller;  // inference mode and the like, which torch's threads lack
  at::parallel_for(0, workers, 1, [&](int64_t b, int64_t end) {
    at::ThreadLocalStateGuard same_as_caller(caller);
    at::AutoDispatchBelowAutograd below_autograd;  // the GEMMs below are plain arithmetic
    at::NoGradGuard no_grad;
    for (int64_t w = b; w < end; ++w) {
      auto state = init();
      for (int64_t j = next++; j < n; j = next++) body(L.order[j], state);
    }
  });
}

// The element-wise passes are functions over arrays of the storage type with fp32 arithmetic and
// an exp the compiler can vectorise; the library is compiled for the processor it runs on
// (-march=native for this file), which makes them 1.5-2x faster than clones for generic AVX-512
// or AVX2 did.

// exp(x) for x <= 0 (clamped below at -87), within 2 ulp: 2^n * p(r), r = x - n ln 2 (Cephes'
// expf), written without branches so that it vectorises.
inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  const float t = x * 1.44269504088896341f + 0.5f;
  int32_t n = static_cast<int32_t>(t);  // toward zero, then down to the floor
  n -= static_cast<float>(n) > t ? 1 : 0;
  const float fn = static_cast<float>(n);
  const float r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  const uint32_t bits = static_cast<uint32_t>(n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// sigmoid(g) from exp(-|g|), which cannot overflow.
inline float sigmoid(float g) {
  const float e = exp_nonpositive(-std::fabs(g));
  const float s = 1.f / (1.f + e);
  return g >= 0.f ? s : e * s;
}

// Storage values to and from fp32: plain for fp32; bf16 by its bits, rounded to nearest even with
// NaN kept (vectorisable, unlike a call per element).
__attribute__((always_inline)) inline float load(const float* p, int64_t i) { return p[i]; }
__attribute__((always_inline)) inline void store(float* p, int64_t i, float v) { p[i] = v; }
__attribute__((always_inline)) inline float load(const uint16_t* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
__attribute__((always_inline)) inline void store(uint16_t* p, int64_t i, float v) {
  uint32_t a;
  std::memcpy(&a, &v, sizeof(a));
  const uint16_t rounded = static_cast<uint16_t>((a + 0x7FFFu + ((a >> 16) & 1u)) >> 16);
  p[i] = (a & 0x7FFFFFFFu) > 0x7F800000u ? static_cast<uint16_t>(0x7FC0u) : rounded;
}

// sum_{i < n} term(i) in 16 partial sums (a vector's worth, so that the loop vectorises), the
// remainder then the partial sums added in order.
template <typename Term>
__attribute__((always_inline)) inline float lane_sum(int64_t n, Term term) {
  constexpr int64_t L = 16;
  float acc[L] = {0.f};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int64_t j = 0; j < L; ++j) acc[j] += term(i + j);
  float sum = 0.f;
  for (; i < n; ++i) sum += term(i);
  for (int64_t j = 0; j < L; ++j) sum += acc[j];
  return sum;
}

// One expert's rows at once: [rows, n] arrays of the storage type S (g and u rows `ld` apart,
// the others contiguous), a gate per row (0 for padding rows), the arithmetic in fp32.
// h = w * silu(g) * u.
template <typename S>
__attribute__((always_inline)) inline void swiglu_block_impl(const S* __restrict g, const S* __restrict u,
                                                             int64_t ld, const float* __restrict w,
                                                             S* __restrict h, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    const float wr = w[r];
    const S *gr = g + r * ld, *ur = u + r * ld;
    S* hr = h + r * n;
    for (int64_t i = 0; i < n; ++i) {
      const float gi = load(gr, i);
      store(hr, i, wr * ((gi * sigmoid(gi)) * load(ur, i)));  // as the backward recomputes it
    }
  }
}

// With a = silu(g), s = sigmoid(g) and h = w * a * u, given dh = dL/dh: h, du = dh * w * a,
// dg = dh * w * u * s * (1 + g (1 - s)), and dw[r] = dL/dw = sum_i dh * a * u (tmp: [rows, n] fp32
// scratch). g and u rows are `ld` apart, dg and du rows `ldd`; dh, h and tmp are contiguous.
template <typename S>
__attribute__((always_inline)) inline void swiglu_block_backward_impl(
    const S* __restrict g, const S* __restrict u, int64_t ld, const S* __restrict dh, const float* __restrict w,
    S* __restrict h, S* __restrict dg, S* __restrict du, int64_t ldd, float* __restrict dw, float* __restrict tmp,
    int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    const float wr = w[r];
    const S *gr = g + r * ld, *ur = u + r * ld, *dhr = dh + r * n;
    S *hr = h + r * n, *dgr = dg + r * ldd, *dur = du + r * ldd;
    float* tr = tmp + r * n;
    for (int64_t i = 0; i < n; ++i) {
      const float gi = load(gr, i), ui = load(ur, i), d = load(dhr, i);
      const float s = sigmoid(gi);
      const float a = gi * s;
      const float au = a * ui;
      tr[i] = d * au;
      store(hr, i, wr * au);
      store(dur, i, d * wr * a);
      store(dgr, i, d * wr * ui * s * (1.f + gi * (1.f - s)));
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* t = tmp + r * n;
    dw[r] = lane_sum(n, [&](int64_t i) { return t[i]; });
  }
}

// The same for each storage type, compiled for each target.
void swiglu_block(const float* g, const float* u, int64_t ld, const float* w, float* h, int64_t rows,
                              int64_t n) {
  swiglu_block_impl(g, u, ld, w, h, rows, n);
}
void swiglu_block(const uint16_t* g, const uint16_t* u, int64_t ld, const float* w, uint16_t* h,
                              int64_t rows, int64_t n) {
  swiglu_block_impl(g, u, ld, w, h, rows, n);
}
void swiglu_block_backward(const float* g, const float* u, int64_t ld, const float* dh, const float* w,
                                       float* h, float* dg, float* du, int64_t ldd, float* dw, float* tmp,
                                       int64_t rows, int64_t n) {
  swiglu_block_backward_impl(g, u, ld, dh, w, h, dg, du, ldd, dw, tmp, rows, n);
}
void swiglu_block_backward(const uint16_t* g, const uint16_t* u, int64_t ld, const uint16_t* dh,
                                       const float* w, uint16_t* h, uint16_t* dg, uint16_t* du, int64_t ldd,
                                       float* dw, float* tmp, int64_t rows, int64_t n) {
  swiglu_block_backward_impl(g, u, ld, dh, w, h, dg, du, ldd, dw, tmp, rows, n);
}

// Raw storage of a tensor's elements: float, or the bits of bf16.
inline float* bits(float* p) { return p; }
inline const float* bits(const float* p) { return p; }
inline uint16_t* bits(at::BFloat16* p) { return reinterpret_cast<uint16_t*>(p); }
inline const uint16_t* bits(const at::BFloat16* p) { return reinterpret_cast<const uint16_t*>(p); }

// Rows between bf16 and fp32.
void to_float(const at::BFloat16* src, float* __restrict dst, int64_t n) {
  const uint16_t* s = bits(src);
  for (int64_t i = 0; i < n; ++i) dst[i] = load(s, i);
}

void from_float(const float* __restrict src, at::BFloat16* dst, int64_t n) {
  uint16_t* d = bits(dst);
  for (int64_t i = 0; i < n; ++i) store(d, i, src[i]);
}

void add_row(const float* __restrict src, float* __restrict acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += src[i];
}

// Row conversions between storage dtypes (a plain copy when they agree).
inline void convert_row(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void convert_row(const at::BFloat16* src, at::BFloat16* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(at::BFloat16));
}
inline void convert_row(const at::BFloat16* src, float* dst, int64_t n) { to_float(src, dst, n); }
inline void convert_row(const float* src, at::BFloat16* dst, int64_t n) { from_float(src, dst, n); }

// dst rows [0, n) = src rows idx[r] (or r0 + r), converted; rows [n, np) = 0.
template <typename S, typename T>
void gather_rows(const S* src, const int64_t* idx, int64_t r0, int64_t n, int64_t np, int64_t D, T* dst) {
  for (int64_t r = 0; r < n; ++r) convert_row(src + (idx ? idx[r] : r0 + r) * D, dst + r * D, D);
  std::memset(static_cast<void*>(dst + n * D), 0, (np - n) * D * sizeof(T));
}

// The n rows of `src` as rows s, s + 1, ... of the results `y` [M, D]: routed, row m to row
// L.dest[m] (its token's group); else to row m itself.
template <typename T>
void put_rows(const T* src, const Layout& L, int64_t s, int64_t n, T* y) {
  const int64_t D = L.D;
  if (L.dest.empty()) {
    std::memcpy(static_cast<void*>(y + s * D), src, n * D * sizeof(T));
    return;
  }
  for (int64_t r = 0; r < n; ++r)
    std::memcpy(static_cast<void*>(y + L.dest[s + r] * D), src + r * D, D * sizeof(T));
}

// out[t] = the sum of rows [first[t], first[t + 1]) of y (token t's rows, in increasing m), fp32
// (then stored as O).
template <typename S, typename O>
void token_sums(const S* y, const std::vector<int64_t>& first, int64_t D, O* out) {
  const int64_t T = static_cast<int64_t>(first.size()) - 1;
  at::parallel_for(0, T, 64, [&](int64_t b, int64_t e) {
    std::vector<float> acc(D), row(D);
    for (int64_t t = b; t < e; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = first[t]; j < first[t + 1]; ++j) {
        if constexpr (std::is_same_v<S, float>) {
          add_row(y + j * D, acc.data(), D);
        } else {
          convert_row(y + j * D, row.data(), D);
          add_row(row.data(), acc.data(), D);
        }
      }
      convert_row(acc.data(), out + t * D, D);
    }
  });
}

// w[r] = the gate of row s + r (1 without gates) for the n real rows, 0 for the padding up to np.
inline void gates(const float* gate, int64_t s, int64_t n, int64_t np, float* w) {
  for (int64_t r = 0; r < np; ++r) w[r] = r >= n ? 0.f : (gate ? gate[s + r] : 1.f);
}

// The BLAS's fp32 GEMM (column-major, 32-bit sizes), as torch's own GEMM calls it on the CPU; a
// weak reference, null where the loaded libraries have none (then torch's GEMM is used).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

// C = op(A) op(B) (+ C with accumulate) for row-major arrays: C [m, n] (rows ldc apart), op(A)
// [m, k] (A stored [k, m] when ta), op(B) [k, n] (B stored [n, k] when tb). A row-major product
// is the column-major one of the transposes, C^T = op(B)^T op(A)^T: the BLAS takes B first. fp32
// calls the BLAS directly: torch's GEMM adds about 2.6 us a call of checks, dispatch and views,
// and a layer's experts make some 600 calls a step (1.5 ms; 455 x 128 x 88 takes 130 us).
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
          bool accumulate, T* c, int64_t ldc) {
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr && std::max({m, n, k, lda, ldb, ldc}) <= INT32_MAX) {
      const int M = static_cast<int>(m), N = static_cast<int>(n), K = static_cast<int>(k);
      const int LDA = static_cast<int>(lda), LDB = static_cast<int>(ldb), LDC = static_cast<int>(ldc);
      const float one = 1.f, beta = accumulate ? 1.f : 0.f;
      sgemm_(tb ? "T" : "N", ta ? "T" : "N", &N, &M, &K, &one, b, &LDB, a, &LDA, &beta, c, &LDC);
      return;
    }
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
    Tensor v = at::from_blob(const_cast<T*>(p), {t ? cols : rows, t ? rows : cols}, {ld, 1}, opts);
    return t ? v.t() : v;
  };
  Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (accumulate)
    out.addmm_(view(a, m, k, lda, ta), view(b, k, n, ldb, tb));
  else
    at::mm_out(out, view(a, m, k, lda, ta), view(b, k, n, ldb, tb));
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor> forward_impl(const Tensor& x, const c10::optional<Tensor>& token,
                                               const c10::optional<Tensor>& gate, const Tensor& w1,
                                               const c10::optional<Tensor>& w3, const Tensor& w2, const Layout& L) {
  const int64_t D = L.D, I = L.I;
  const bool routed = token.has_value();
  Tensor g = at::empty({L.P, L.J}, x.options());  // fused: gu
  Tensor u = at::empty({L.fused ? 0 : L.P, I}, x.options());
  Tensor y = at::empty({L.M, D}, x.options());  // each row's result: routed by token (L.dest), else in row order
  const T* xp = x.data_ptr<T>();
  const T *w1p = w1.data_ptr<T>(), *w3p = L.fused ? nullptr : w3->data_ptr<T>(), *w2p = w2.data_ptr<T>();
  const int64_t* tok = routed ? token->data_ptr<int64_t>() : nullptr;
  const float* gp = gate.has_value() ? gate->data_ptr<float>() : nullptr;
  auto init = [&] {
    return std::make_tuple(at::empty({L.max_pad, D}, x.options()), at::empty({L.max_pad, I}, x.options()),
                           std::vector<float>(L.max_pad));
  };
  for_each_expert(L, init, [&](int64_t e, auto& buf) {
    const int64_t n = L.counts[e], np = L.pads[e], s = L.start[e];
    T* xe = std::get<0>(buf).template data_ptr<T>();  // [np, D]
    T* he = std::get<1>(buf).template data_ptr<T>();  // [np, I]
    gather_rows(xp, tok ? tok + s : nullptr, s, n, np, D, xe);
    T* gv = g.data_ptr<T>() + L.pstart[e] * L.J;
    gemm<T>(false, true, np, L.J, D, xe, D, w1p + e * L.J * D, D, false, gv, L.J);
    const T* uv = gv + I;  // fused: the up projection's columns follow the gate's
    if (!L.fused) {
      T* ue = u.data_ptr<T>() + L.pstart[e] * I;
      gemm<T>(false, true, np, I, D, xe, D, w3p + e * I * D, D, false, ue, I);
      uv = ue;
    }
    float* f = std::get<2>(buf).data();  // the rows' gates
    gates(gp, s, n, np, f);
    swiglu_block(bits(gv), bits(uv), L.J, f, bits(he), np, I);
    gemm<T>(false, true, np, D, I, he, I, w2p + e * D * I, I, false, xe, D);  // xe is dead: it takes the result
    put_rows(xe, L, s, n, y.data_ptr<T>());
  });
  if (!routed) return {y, g, u};
  Tensor out = at::empty({x.size(0), D}, x.options().dtype(at::kFloat));
  token_sums(y.data_ptr<T>(), L.first, D, out.data_ptr<float>());
  return {out, g, u};
}

std::tuple<Tensor, Tensor, Tensor> grouped_swiglu(const Tensor& x, const c10::optional<Tensor>& token,
                                                  const c10::optional<Tensor>& gate, const Tensor& w1,
                                                  const c10::optional<Tensor>& w3, const Tensor& w2,
                                                  at::IntArrayRef counts, at::IntArrayRef pads) {
  const Layout L = make_layout(x, token, gate, w1, w3, w2, counts, pads);
  if (x.scalar_type() == at::kBFloat16) return forward_impl<at::BFloat16>(x, token, gate, w1, w3, w2, L);
  return forward_impl<float>(x, token, gate, w1, w3, w2, L);
}

struct BackwardBuffers {
  Tensor dy, work, x;  // [max_pad, D], [max_pad, 4 I], [max_pad, D]
  Tensor t;  // bf16: a weight gradient's left operand transposed, max_pad max(D, J)
  std::vector<float> f;  // gates, their gradients, products: max_pad (2 + I)
};

// A weight gradient a^T b. In bf16 torch's GEMM takes a transposed view of `a` at about half the
// speed of a row-major copy of a^T once the weights are large (one core: 1.4x at 455 x 1280 x 856,
// 1.06x at 455 x 768 x 512; below about 2^18 weights the copy costs more than it saves), so bf16
// copies a^T into `t` first there; fp32 takes the view at full speed.
template <typename T>
constexpr bool copies_transposed(int64_t weights) {
  return !std::is_same_v<T, float> && weights >= (int64_t{1} << 18);
}

// out [m, n] = a^T b, a [rows, m] and b [rows, n] contiguous.
template <typename T>
void weight_grad(T* out, const T* a, const T* b, int64_t rows, int64_t m, int64_t n, T* t) {
  if (!copies_transposed<T>(m * n)) {
    gemm<T>(true, false, m, n, rows, a, m, b, n, false, out, n);
  } else {
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    at::from_blob(t, {m, rows}, opts).copy_(at::from_blob(const_cast<T*>(a), {rows, m}, opts).t());
    gemm<T>(false, false, m, n, rows, t, rows, b, n, false, out, n);
  }
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_impl(
    const Tensor& grad, const Tensor& x, const c10::optional<Tensor>& token, const c10::optional<Tensor>& gate,
    const Tensor& w1, const c10::optional<Tensor>& w3, const Tensor& w2, const Tensor& g, const Tensor& u,
    const Layout& L, bool need_x, bool need_gate, bool need_w) {
  const int64_t D = L.D, I = L.I;
  const bool routed = token.has_value();
  const int64_t* tok = routed ? token->data_ptr<int64_t>() : nullptr;
  const float* gp = gate.has_value() ? gate->data_ptr<float>() : nullptr;
  Tensor gw1, gw3, gw2, ggate, dx, gx;  // fused: gw1 is gw13
  if (need_w) {
    GradientBlocks& blocks = GradientBlocks::instance();
    gw1 = blocks.empty_like(w1);
    gw3 = L.fused ? at::empty({0}, w1.options()) : blocks.empty_like(*w3);
    gw2 = blocks.empty_like(w2);
    for (int64_t e = 0; e < L.E; ++e)
      if (L.counts[e] == 0) {
        gw1[e].zero_();
        if (!L.fused) gw3[e].zero_();
        gw2[e].zero_();
      }
  }
  float* ggp = nullptr;
  if (need_gate && gp) {
    ggate = at::empty({L.M}, gate->options());
    ggp = ggate.data_ptr<float>();
  }
  if (need_x) dx = at::empty({L.M, D}, x.options());  // each row's input gradient, placed as the forward's y
  const T* xp = x.data_ptr<T>();
  const T *w1p = w1.data_ptr<T>(), *w3p = L.fused ? nullptr : w3->data_ptr<T>(), *w2p = w2.data_ptr<T>();
  T *gw1p = need_w ? gw1.data_ptr<T>() : nullptr, *gw2p = need_w ? gw2.data_ptr<T>() : nullptr;
  T* gw3p = need_w && !L.fused ? gw3.data_ptr<T>() : nullptr;
  const T* gv0 = g.data_ptr<T>();
  const T* uv0 = L.fused ? gv0 + I : u.data_ptr<T>();  // fused: g is gu
  auto init = [&] {
    const int64_t t = copies_transposed<T>(D * L.J) ? L.max_pad * std::max(D, L.J) : 0;
    return BackwardBuffers{at::empty({L.max_pad, D}, x.options()), at::empty({L.max_pad, 4 * I}, x.options()),
                           at::empty({L.max_pad, D}, x.options()), at::empty({t}, x.options()),
                           std::vector<float>(L.max_pad * (2 + I))};
  };
  auto body = [&](int64_t e, BackwardBuffers& buf, auto grad_ptr) {
    const int64_t n = L.counts[e], np = L.pads[e], s = L.start[e], p = L.pstart[e];
    T* dy = buf.dy.data_ptr<T>();  // [np, D]
    T* xe = buf.x.data_ptr<T>();   // [np, D]
    gather_rows(grad_ptr, tok ? tok + s : nullptr, s, n, np, D, dy);
    // dh and h, contiguous [np, I]; then dg and du: [np, I] each, or fused one [np, 2I] dgu.
    T* dhe = buf.work.data_ptr<T>();
    T* he = dhe + np * I;
    T* dgv = dhe + 2 * np * I;
    T* duv = L.fused ? dgv + I : dgv + np * I;
    gemm<T>(false, false, np, I, D, dy, D, w2p + e * D * I, I, false, dhe, I);
    const T* gv = gv0 + p * L.J;
    const T* uv = uv0 + p * L.J;
    float* f = buf.f.data();  // gates, dL/dgates, [np, I] products
    float *fw = f, *fdw = f + L.max_pad, *ft = fdw + L.max_pad;
    gates(gp, s, n, np, fw);
    // h again (as the forward computed it, for the down projection's weight gradient), dg, du
    swiglu_block_backward(bits(gv), bits(uv), L.J, bits(dhe), fw, bits(he), bits(dgv), bits(duv), L.J, fdw, ft,
                          np, I);
    if (ggp) std::memcpy(ggp + s, fdw, n * sizeof(float));
    gather_rows(xp, tok ? tok + s : nullptr, s, n, np, D, xe);
    // fused: dgu [np, 2I] (dgv); else dg and du [np, I] (dgv, duv)
    if (need_w) {
      T* t = buf.t.data_ptr<T>();
      weight_grad(gw2p + e * D * I, dy, he, np, D, I, t);
      weight_grad(gw1p + e * L.J * D, dgv, xe, np, L.J, D, t);
      if (!L.fused) weight_grad(gw3p + e * I * D, duv, xe, np, I, D, t);
    }
    if (need_x) {
      // the gathered gradient is dead: its buffer takes dx
      gemm<T>(false, false, np, D, L.J, dgv, L.J, w1p + e * L.J * D, D, false, dy, D);
      if (!L.fused) gemm<T>(false, false, np, D, I, duv, I, w3p + e * I * D, D, true, dy, D);
      put_rows(dy, L, s, n, dx.data_ptr<T>());
    }
  };
  if (grad.scalar_type() == at::kFloat) {
    const float* gr = grad.data_ptr<float>();
    for_each_expert(L, init, [&](int64_t e, BackwardBuffers& b) { body(e, b, gr); });
  } else {
    const T* gr = grad.data_ptr<T>();
    for_each_expert(L, init, [&](int64_t e, BackwardBuffers& b) { body(e, b, gr); });
  }
  if (need_x) {
    if (routed) {
      gx = at::empty_like(x);
      token_sums(dx.data_ptr<T>(), L.first, D, gx.data_ptr<T>());
    } else {
      gx = dx;
    }
  }
  auto none = [&] { return at::empty({0}, x.options()); };
  return {gx.defined() ? gx : none(), ggate.defined() ? ggate : none(), need_w ? gw1 : none(),
          need_w ? gw3 : none(), need_w ? gw2 : none()};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> grouped_swiglu_backward(
    const Tensor& grad, const Tensor& x, const c10::optional<Tensor>& token, const c10::optional<Tensor>& gate,
    const Tensor& w1, const c10::optional<Tensor>& w3, const Tensor& w2, const Tensor& g, const Tensor& u,
    at::IntArrayRef counts, at::IntArrayRef pads, bool need_x, bool need_gate, bool need_w) {
  const Layout L = make_layout(x, token, gate, w1, w3, w2, counts, pads);
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous() && grad.size(1) == L.D &&
                  grad.size(0) == (token.has_value() ? x.size(0) : L.M),
              "grad must be a contiguous [", token.has_value() ? x.size(0) : L.M, ", ", L.D, "] tensor");
  TORCH_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == x.scalar_type(),
              "grad must be fp32 or x's dtype");
  for (const Tensor* t : {&g, &u})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == x.scalar_type() && t->dim() == 2 &&
                    t->size(0) == (t == &u && L.fused ? 0 : L.P) && t->size(1) == (t == &g ? L.J : L.I),
                "g and u must be the forward's tensors: [sum(pads), I] each, or fused gu [sum(pads), 2I] and u empty");
  if (x.scalar_type() == at::kBFloat16)
    return backward_impl<at::BFloat16>(grad, x, token, gate, w1, w3, w2, g, u, L, need_x, need_gate, need_w);
  return backward_impl<float>(grad, x, token, gate, w1, w3, w2, g, u, L, need_x, need_gate, need_w);
}

// Routing on the CPU without torch's general-purpose kernels (a sort, a selection per row).

// The indices of the k largest scores of each row [T, E] (fp32), largest first, a tie going to
// the lower index and NaN counting as the largest: int64 [T, k].
//
// With AVX2 (this file is compiled for the processor it runs on): each row's scores become int32
// keys in the same order (`score_key`), padded to whole vectors with a key below them all, and
// the k picks are k passes of a vector maximum and a search for its first position, which then
// takes the padding key. No branch depends on the scores' order, so a row costs the same whatever
// its scores (the insertion below mispredicts a branch for about a third of the experts: 3x
// slower at 4096 x 63, k = 7).
#if defined(__AVX2__)
// An int32 that orders as the score does: the float's bits, the magnitude bits flipped for
// negative numbers; NaN taken as +inf and -0 as +0 (a tie, as the comparison of floats has it).
inline int32_t score_key(float v) {
  v = std::isnan(v) ? INFINITY : v + 0.f;
  int32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b ^ ((b >> 31) & 0x7FFFFFFF);
}

inline __m256i score_keys(__m256 v) {
  v = _mm256_blendv_ps(_mm256_add_ps(v, _mm256_setzero_ps()), _mm256_set1_ps(INFINITY), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i b = _mm256_castps_si256(v);
  return _mm256_xor_si256(b, _mm256_and_si256(_mm256_srai_epi32(b, 31), _mm256_set1_epi32(0x7FFFFFFF)));
}

void topk_rows(const float* sp, int64_t E, int64_t k, int64_t t0, int64_t t1, int64_t* op) {
  const int64_t nv = (E + 7) / 8;
  std::vector<int32_t> keys(nv * 8, INT32_MIN);  // below every score's key
  int32_t* kp = keys.data();
  for (int64_t t = t0; t < t1; ++t) {
    const float* row = sp + t * E;
    int64_t e = 0;
    for (; e + 8 <= E; e += 8)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(kp + e), score_keys(_mm256_loadu_ps(row + e)));
    for (; e < E; ++e) kp[e] = score_key(row[e]);
    for (int64_t j = 0; j < k; ++j) {
      __m256i m = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kp));
      for (int64_t v = 1; v < nv; ++v)
        m = _mm256_max_epi32(m, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kp + 8 * v)));
      __m128i h = _mm_max_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
      h = _mm_max_epi32(h, _mm_shuffle_epi32(h, 0x4E));
      h = _mm_max_epi32(h, _mm_shuffle_epi32(h, 0xB1));
      const __m256i best = _mm256_broadcastd_epi32(h);
      // its first position: the lowest set bit of the matches, 64 keys a word (no branch on
      // where it is)
      int64_t at = -1;
      for (int64_t w = 0; at < 0; w += 8) {
        uint64_t found = 0;
        for (int64_t v = w; v < std::min(nv, w + 8); ++v) {
          const __m256i c = _mm256_cmpeq_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kp + 8 * v)), best);
          found |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_castsi256_ps(c))) << (8 * (v - w));
        }
        if (found) at = 8 * w + __builtin_ctzll(found);
      }
      op[t * k + j] = at;
      kp[at] = INT32_MIN;  // taken (k <= E real keys, all above it, remain to pick from)
    }
  }
}
#else
void topk_rows(const float* sp, int64_t E, int64_t k, int64_t t0, int64_t t1, int64_t* op) {
  std::vector<float> best(k);
  for (int64_t t = t0; t < t1; ++t) {
    const float* row = sp + t * E;
    int64_t* ids = op + t * k;
    int64_t n = 0;  // kept so far, best[0] >= best[1] >= ...
    for (int64_t e = 0; e < E; ++e) {
      const float v = std::isnan(row[e]) ? INFINITY : row[e];
      if (n == k && !(v > best[k - 1])) continue;
      int64_t j = n < k ? n++ : k - 1;  // the slot it takes, moved up past the smaller ones
      for (; j > 0 && v > best[j - 1]; --j) {
        best[j] = best[j - 1];
        ids[j] = ids[j - 1];
      }
      best[j] = v;
      ids[j] = e;
    }
  }
}
#endif

Tensor topk_indices(const Tensor& scores, int64_t k) {
  TORCH_CHECK(scores.device().is_cpu() && scores.dim() == 2 && scores.is_contiguous() &&
                  scores.scalar_type() == at::kFloat,
              "scores must be a contiguous fp32 [T, E] CPU tensor");
  const int64_t T = scores.size(0), E = scores.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "k must be in [1, ", E, "], got ", k);
  Tensor out = at::empty({T, k}, scores.options().dtype(at::kLong));
  const float* sp = scores.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, T, 256, [&](int64_t b, int64_t end) { topk_rows(sp, E, k, b, end, op); });
  return out;
}

// log(x) for a positive normal x, within 2 ulp: e ln 2 + log(m), x = m 2^e with m in
// [sqrt(1/2), sqrt(2)), log(m) = f - f^2 / 2 + f^3 p(f) for f = m - 1 (Cephes' logf), written
// without branches so that it vectorises.
inline float log_positive(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t e = static_cast<int32_t>(bits >> 23) - 127;
  bits = (bits & 0x007FFFFFu) | 0x3F800000u;  // m in [1, 2)
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const bool high = m > 1.41421356f;
  m = high ? 0.5f * m : m;
  e += high ? 1 : 0;
  const float f = m - 1.f, z = f * f, fe = static_cast<float>(e);
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z - 2.12194440e-4f * fe - 0.5f * z;
  return f + y + 0.693359375f * fe;
}

// -v log v, 0 at v = 0 (as torch.special.entr has it), -inf for v < 0, NaN for NaN.
inline float entr(float v) {
  return v > 0.f ? -v * log_positive(v) : (v == 0.f ? 0.f : (v < 0.f ? -INFINITY : v));
}

// The routing entropy (the layer's statistic): the mean over rows of H(s_t) = -sum_i entr(s) of
// scores [T, E] (fp32), in nats. One pass with a vectorised log instead of torch's entr, sum and
// mean. The elements are summed as one array, in blocks of a fixed size whose sums are added in
// order, so the result does not depend on the number of threads. (A subnormal score's log is off
// by up to 16, which moves the entropy by less than 1e-37.)
Tensor routing_entropy(const Tensor& scores) {
  TORCH_CHECK(scores.device().is_cpu() && scores.dim() == 2 && scores.is_contiguous() &&
                  scores.scalar_type() == at::kFloat,
              "scores must be a contiguous fp32 [T, E] CPU tensor");
  const int64_t T = scores.size(0), n = scores.numel();
  constexpr int64_t kBlockElems = 8192;
  const int64_t blocks = (n + kBlockElems - 1) / kBlockElems;
  const float* sp = scores.data_ptr<float>();
  std::vector<float> sums(blocks);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* v = sp + b * kBlockElems;
      sums[b] = lane_sum(std::min(kBlockElems, n - b * kBlockElems), [&](int64_t i) { return entr(v[i]); });
    }
  });
  double total = 0.0;
  for (int64_t b = 0; b < blocks; ++b) total += sums[b];
  return at::scalar_tensor(T > 0 ? static_cast<float>(total / static_cast<double>(T)) : NAN, scores.options());
}

// A stable sort of expert ids (int64 [M], each in [0, E)) by counting: (sorted ids, order), as
// torch.sort(ids, stable=True) returns them.
std::tuple<Tensor, Tensor> sort_by_expert(const Tensor& ids, int64_t E) {
  TORCH_CHECK(ids.device().is_cpu() && ids.dim() == 1 && ids.is_contiguous() && ids.scalar_type() == at::kLong,
              "ids must be a contiguous int64 [M] CPU tensor");
  const int64_t M = ids.numel();
  const int64_t* ip = ids.data_ptr<int64_t>();
  std::vector<int64_t> next(E + 1, 0);
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(ip[m] >= 0 && ip[m] < E, "expert id ", ip[m], " out of range for ", E, " experts");
    ++next[ip[m] + 1];
  }
  for (int64_t e = 0; e < E; ++e) next[e + 1] += next[e];
  Tensor sorted = at::empty_like(ids), order = at::empty_like(ids);
  int64_t* sp = sorted.data_ptr<int64_t>();
  int64_t* op = order.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) {
    const int64_t pos = next[ip[m]]++;
    sp[pos] = ip[m];
    op[pos] = m;
  }
  return {sorted, order};
}

// sum_i a[i] b[i] (lane_sum's order).
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  return lane_sum(n, [&](int64_t i) { return a[i] * b[i]; });
}

// The routing of a few tokens for inference (eq. 10-11) in one operation: the logits x W^T in fp32
// (bf16 x and centroids W converted exactly), their softmax, the k largest scores (`topk_rows`:
// largest first, a tie to the lower index) and their gates (divided by their sum plus 1e-20 where
// `norm`, then times `scale`). Returns (ids int64 [T, k], gates fp32 [T, k]).
std::tuple<Tensor, Tensor> route_tokens(const Tensor& x, const Tensor& w, int64_t k, bool norm, double scale) {
  for (const Tensor* t : {&x, &w})
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 2 && t->is_contiguous() &&
                    (t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16),
                "x and the centroids must be contiguous fp32 or bf16 2-D CPU tensors");
  const int64_t T = x.size(0), D = x.size(1), E = w.size(0);
  TORCH_CHECK(w.size(1) == D, "the centroids [", E, ", ", w.size(1), "] do not take ", D, " inputs");
  TORCH_CHECK(k >= 1 && k <= E, "k must be in [1, ", E, "], got ", k);
  const Tensor xf = x.to(at::kFloat);
  const float* xp = xf.data_ptr<float>();
  Tensor scores = at::empty({T, E}, x.options().dtype(at::kFloat));
  float* sp = scores.data_ptr<float>();
  at::parallel_for(0, E, 16, [&](int64_t e0, int64_t e1) {
    std::vector<float> row(w.scalar_type() == at::kBFloat16 ? D : 0);
    for (int64_t e = e0; e < e1; ++e) {
      const float* we = w.scalar_type() == at::kFloat ? w.data_ptr<float>() + e * D : row.data();
      if (w.scalar_type() == at::kBFloat16) convert_row(w.data_ptr<at::BFloat16>() + e * D, row.data(), D);
      for (int64_t t = 0; t < T; ++t) sp[t * E + e] = dot(xp + t * D, we, D);
    }
  });
  for (int64_t t = 0; t < T; ++t) {  // softmax: exp(s - max) / sum
    float* row = sp + t * E;
    float m = -INFINITY, sum = 0.f;
    for (int64_t e = 0; e < E; ++e) m = std::max(m, row[e]);
    for (int64_t e = 0; e < E; ++e) sum += (row[e] = std::exp(row[e] - m));
    for (int64_t e = 0; e < E; ++e) row[e] /= sum;
  }
  Tensor ids = at::empty({T, k}, x.options().dtype(at::kLong));
  Tensor gates = at::empty({T, k}, x.options().dtype(at::kFloat));
  int64_t* ip = ids.data_ptr<int64_t>();
  float* gp = gates.data_ptr<float>();
  topk_rows(sp, E, k, 0, T, ip);
  for (int64_t t = 0; t < T; ++t) {
    float sum = 0.f;
    for (int64_t j = 0; j < k; ++j) sum += (gp[t * k + j] = sp[t * E + ip[t * k + j]]);
    for (int64_t j = 0; j < k; ++j) {
      if (norm) gp[t * k + j] /= sum + 1e-20f;
      if (scale != 1.0) gp[t * k + j] *= static_cast<float>(scale);
    }
  }
  return {ids, gates};
}

// One head of one new token's attention: s_t = scale * q . k_t over the T rows of kh (rows
// `k_stride` apart), p = softmax(s), acc = sum_t p_t v_t, in fp32. `row` (d) and `p` (T) are the
// caller's scratch.
template <typename T_>
void attend(const float* qf, const T_* kh, int64_t k_stride, const T_* vh, int64_t v_stride, int64_t T,
            int64_t d, float scale, float* acc, float* row, float* p) {
  float m = -INFINITY;
  for (int64_t t = 0; t < T; ++t) {
    convert_row(kh + t * k_stride, row, d);
    p[t] = dot(qf, row, d) * scale;
    m = std::max(m, p[t]);
  }
  float sum = 0.f;
  for (int64_t t = 0; t < T; ++t) {
    p[t] = exp_nonpositive(p[t] - m);
    sum += p[t];
  }
  std::fill(acc, acc + d, 0.f);
  for (int64_t t = 0; t < T; ++t) {
    convert_row(vh + t * v_stride, row, d);
    const float w = p[t] / sum;
    for (int64_t i = 0; i < d; ++i) acc[i] += w * row[i];
  }
}

// Attention of one new token over a cache, for decoding (inference only): q [B, H, 1, d] and the
// cache's keys and values k, v [B, Hkv, T, d] (views: rows contiguous, other strides free; query
// head h reads key-value head h / (H / Hkv)), all fp32 or all bf16; out [B, H, 1, d] of q's dtype.
// Per head: s_t = scale * q . k_t, p = softmax(s), out = sum_t p_t v_t, in fp32 and rounded once.
// torch's scaled_dot_product_attention takes 0.13-1.3 ms for 16 heads of 128 over 32-450 keys on
// a 2-core AVX2 machine (bf16; 0.1-0.85 ms in fp32): a GEMM kernel's setup for one query row.
Tensor decode_attention(const Tensor& q, const Tensor& k, const Tensor& v, double scale) {
  TORCH_CHECK(q.device().is_cpu() && q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1,
              "q must be [B, H, 1, d] and k, v [B, Hkv, T, d] CPU tensors");
  TORCH_CHECK((q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16) &&
                  k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "q, k and v must all be fp32 or all bf16");
  const int64_t B = q.size(0), H = q.size(1), d = q.size(3), Hkv = k.size(1), T = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == d && Hkv > 0 && H % Hkv == 0 && T > 0,
              "k and v must be [B, Hkv, T, d] with H a multiple of Hkv and T > 0");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "rows of q, k and v must be contiguous");
  Tensor out = at::empty({B, H, 1, d}, q.options());
  auto run = [&](auto tag) {
    using T_ = decltype(tag);
    const T_* qp = q.data_ptr<T_>();
    const T_* kp = k.data_ptr<T_>();
    const T_* vp = v.data_ptr<T_>();
    T_* op = out.data_ptr<T_>();
    at::parallel_for(0, B * H, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> qf(d), acc(d), row(d), p(T);
      for (int64_t bh = b0; bh < b1; ++bh) {
        const int64_t b = bh / H, h = bh % H, g = h / (H / Hkv);
        convert_row(qp + b * q.stride(0) + h * q.stride(1), qf.data(), d);
        attend(qf.data(), kp + b * k.stride(0) + g * k.stride(1), k.stride(2), vp + b * v.stride(0) + g * v.stride(1),
               v.stride(2), T, d, static_cast<float>(scale), acc.data(), row.data(), p.data());
        convert_row(acc.data(), op + bh * d, d);
      }
    });
  };
  if (q.scalar_type() == at::kBFloat16)
    run(at::BFloat16());
  else
    run(float());
  return out;
}

// v rounded to bf16 (to nearest, ties to even) and back.
inline float round_bf16(float v) {
  uint16_t b;
  store(&b, 0, v);
  return load(&b, 0);
}

// One new token per row, from its query, key and value projections to its attention output, for
// decoding a bf16 model (one operation instead of the fifteen or so of rotating, writing the cache
// and viewing it): qkv [3, B, H * d] (fp32 or bf16, as the projections give them) are rounded to
// bf16; the query and key rotated by RoPE as `apply_rope` does in bf16 (x cos and rotate_half(x)
// sin each rounded, then their sum); the key and value written to slot `start` of the caches
// k_cache, v_cache [B, H, L, d] (bf16, contiguous); the query attends over slots [0, start] as
// `decode_attention`. cos and sin: bf16, d values for every row or B x d. Returns [B, 1, H * d]
// bf16, the heads side by side (the output projection's input). The same numbers as those steps.
Tensor decode_attention_rope(const Tensor& qkv, const Tensor& cos, const Tensor& sin, const Tensor& k_cache,
                             const Tensor& v_cache, int64_t start, double scale) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.dim() == 3 && qkv.size(0) == 3 && qkv.is_contiguous() &&
                  (qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16),
              "qkv must be a contiguous fp32 or bf16 [3, B, H * d] CPU tensor");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && k_cache.scalar_type() == at::kBFloat16 &&
                  v_cache.scalar_type() == at::kBFloat16,
              "the caches must be contiguous bf16 [B, H, L, d] tensors");
  const int64_t B = k_cache.size(0), H = k_cache.size(1), L = k_cache.size(2), d = k_cache.size(3);
  TORCH_CHECK(qkv.size(1) == B && qkv.size(2) == H * d && d % 2 == 0, "qkv must be [3, ", B, ", ", H * d, "]");
  TORCH_CHECK(start >= 0 && start < L, "slot ", start, " out of the cache's ", L);
  TORCH_CHECK(cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16 && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == sin.numel() && (cos.numel() == d || cos.numel() == B * d),
              "cos and sin must be contiguous bf16 with ", d, " or ", B * d, " values");
  Tensor out = at::empty({B, 1, H * d}, k_cache.options());
  const uint16_t* cp = reinterpret_cast<const uint16_t*>(cos.data_ptr<at::BFloat16>());
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(sin.data_ptr<at::BFloat16>());
  at::BFloat16* kc = k_cache.data_ptr<at::BFloat16>();
  at::BFloat16* vc = v_cache.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  const bool per_row = cos.numel() == B * d;
  auto run = [&](auto tag) {
    using T_ = decltype(tag);
    const T_* src = qkv.data_ptr<T_>();
    at::parallel_for(0, B * H, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> x(d), qf(d), acc(d), row(d), p(start + 1);
      std::vector<uint16_t> rotated(d);
      for (int64_t bh = b0; bh < b1; ++bh) {
        const int64_t b = bh / H, h = bh % H;
        const uint16_t* c = cp + (per_row ? b * d : 0);
        const uint16_t* s = sp + (per_row ? b * d : 0);
        // the query (j = 0) and the key (j = 1), each rounded to bf16 and then rotated
        for (int64_t j = 0; j < 2; ++j) {
          convert_row(src + (j * B + b) * H * d + h * d, x.data(), d);
          for (int64_t i = 0; i < d; ++i) x[i] = round_bf16(x[i]);
          for (int64_t i = 0; i < d; ++i) {
            const float r = i < d / 2 ? -x[i + d / 2] : x[i - d / 2];  // rotate_half
            store(rotated.data(), i, round_bf16(x[i] * load(c, i)) + round_bf16(r * load(s, i)));
          }
          if (j == 0) {
            for (int64_t i = 0; i < d; ++i) qf[i] = load(rotated.data(), i);
          } else {
            std::memcpy(kc + (bh * L + start) * d, rotated.data(), d * sizeof(uint16_t));
          }
        }
        convert_row(src + (2 * B + b) * H * d + h * d, x.data(), d);
        convert_row(x.data(), vc + (bh * L + start) * d, d);
        attend(qf.data(), kc + bh * L * d, d, vc + bh * L * d, d, start + 1, d, static_cast<float>(scale), acc.data(),
               row.data(), p.data());
        convert_row(acc.data(), op + b * H * d + h * d, d);
      }
    });
  };
  if (qkv.scalar_type() == at::kBFloat16)
    run(at::BFloat16());
  else
    run(float());
  return out;
}

}  // namespace

// For quant_gemv.cpp's attention and mixture-of-experts blocks, which take these steps.
namespace deepseek_moe_kernels {
at::Tensor attention_rope(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                          const at::Tensor& v_cache, int64_t start, double scale) {
  return decode_attention_rope(qkv, cos, sin, k_cache, v_cache, start, scale);
}
std::tuple<at::Tensor, at::Tensor> route(const at::Tensor& x, const at::Tensor& w, int64_t k, bool norm, double scale) {
  return route_tokens(x, w, k, norm, scale);
}
}  // namespace deepseek_moe_kernels

TORCH_LIBRARY_FRAGMENT(deepseek_moe, m) {
  m.def("grouped_swiglu(Tensor x, Tensor? token, Tensor? gate, Tensor w1, Tensor? w3, Tensor w2, int[] counts, "
        "int[] pads) -> (Tensor, Tensor, Tensor)");
  m.def("grouped_swiglu_backward(Tensor grad, Tensor x, Tensor? token, Tensor? gate, Tensor w1, Tensor? w3, "
        "Tensor w2, Tensor g, Tensor u, int[] counts, int[] pads, bool need_x, bool need_gate, bool need_w) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("topk_indices(Tensor scores, int k) -> Tensor");
  m.def("routing_entropy(Tensor scores) -> Tensor");
  m.def("sort_by_expert(Tensor ids, int n_experts) -> (Tensor, Tensor)");
  m.def("route_tokens(Tensor x, Tensor centroids, int k, bool norm, float scale) -> (Tensor, Tensor)");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
  m.def("decode_attention_rope(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "int start, float scale) -> Tensor");
  m.def("gradient_blocks_free_bytes() -> int", [] { return GradientBlocks::instance().free_bytes(); });
}

TORCH_LIBRARY_IMPL(deepseek_moe, CPU, m) {
  m.impl("grouped_swiglu", &grouped_swiglu);
  m.impl("grouped_swiglu_backward", &grouped_swiglu_backward);
  m.impl("topk_indices", &topk_indices);
  m.impl("routing_entropy", &routing_entropy);
  m.impl("sort_by_expert", &sort_by_expert);
  m.impl("route_tokens", &route_tokens);
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_attention_rope", &decode_attention_rope);
}
