// CPU kernels of the noise op and the loss op (the `cpp` backend).
//
// Work is split over the batch with at::parallel_for; inside a sample, elements are processed in
// chunks of CHUNK = 64 (16 Philox groups): one loop generates the 64 normals into a stack buffer
// (Philox, uniform, Box-Muller: all branch-free, so GCC vectorises it), the next loops consume
// them. The row loops are compiled twice (generic x86-64 and AVX2+FMA) and picked at run time, so
// a wheel built anywhere is both portable and fast. Per-sample sums are accumulated in 8 float
// lanes per chunk and in double across chunks, in a fixed order: results are deterministic and do
// not depend on the thread count.
//
// eps cache (CPU only, cpu_eps.h; the flow ops use it too): eps is a pure function of (call, key,
// sample, element), and on a CPU its generation (Philox + log + sincos) costs ~20x more than a
// memory pass. So the noise op also writes eps into a per-thread buffer tagged with (call, k0, k1,
// B, n); a loss op whose call - 1 and shapes match reads it instead of regenerating (bit-identical
// either way: same code, same inputs). The buffer is reused across steps (no fresh pages per
// step). Off with SPEED_KERNELS_CPU_EPS_CACHE=0; not used above EPS_CACHE_MAX elements.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "cpu_eps.h"
#include "ops.h"
#include "philox.h"
#include "vlb.h"

namespace speed_kernels {
namespace {

constexpr int64_t GROUPS = 16;
constexpr int64_t CHUNK = GROUPS * 4;
static_assert(CHUNK == EPS_CHUNK, "cpu_eps.h promises chunks of 64 normals");
constexpr double LN2 = 0.69314718055994530942;

#if defined(__GNUC__)
#define SK_INLINE inline __attribute__((always_inline))
#else
#define SK_INLINE inline
#endif

template <typename T>
SK_INLINE float load(const T* p, int64_t i) {
  return static_cast<float>(p[i]);
}
template <typename T>
SK_INLINE void store(T* p, int64_t i, float v) {
  p[i] = static_cast<T>(v);
}

// Box-Muller of GROUPS Philox outputs into 64 normals (lanes interleaved as the contract says).
SK_INLINE void box_muller_chunk(const uint32_t* __restrict w0, const uint32_t* __restrict w1,
                                const uint32_t* __restrict w2, const uint32_t* __restrict w3, float* __restrict out) {
  float u0[GROUPS], u1[GROUPS], u2[GROUPS], u3[GROUPS];
  for (int64_t g = 0; g < GROUPS; ++g) {
    u0[g] = bits_to_uniform(w0[g]);
    u1[g] = bits_to_uniform(w1[g]);
    u2[g] = bits_to_uniform(w2[g]);
    u3[g] = bits_to_uniform(w3[g]);
  }
  for (int64_t g = 0; g < GROUPS; ++g) {
    const float r01 = __builtin_sqrtf(-2.0f * host_logf(u0[g]));
    const float r23 = __builtin_sqrtf(-2.0f * host_logf(u2[g]));
    float s1, c1, s3, c3;
    host_sincosf(u1[g] * TWO_PI_F32, s1, c1);
    host_sincosf(u3[g] * TWO_PI_F32, s3, c3);
    out[4 * g + 0] = r01 * c1;
    out[4 * g + 1] = r01 * s1;
    out[4 * g + 2] = r23 * c3;
    out[4 * g + 3] = r23 * s3;
  }
}

// The 64 normals of the chunk starting at element group g0 of a sample (portable Philox).
SK_INLINE void eps_chunk(uint32_t g0, uint32_t sample, uint32_t call, uint32_t k0, uint32_t k1,
                         float* __restrict out) {
  uint32_t w0[GROUPS], w1[GROUPS], w2[GROUPS], w3[GROUPS];
  for (int64_t g = 0; g < GROUPS; ++g) {
    const PhiloxOut w = philox4x32_10(g0 + static_cast<uint32_t>(g), sample, call, STREAM_EPS, k0, k1);
    w0[g] = w.w0;
    w1[g] = w.w1;
    w2[g] = w.w2;
    w3[g] = w.w3;
  }
  box_muller_chunk(w0, w1, w2, w3, out);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define SK_HAVE_AVX2_VARIANT 1
// Philox4x32-10 of 16 consecutive groups with AVX2 intrinsics: each 32-bit word sits in a 64-bit
// lane, so the 32x32->64 products are plain vpmuludq with no shuffles (GCC's auto-vectorised
// widening multiply spends most of its time permuting). Bit-identical to philox4x32_10.
__attribute__((target("avx2,fma"), always_inline)) inline void philox16_avx2(uint32_t g0, uint32_t sample,
                                                                              uint32_t call, uint32_t k0, uint32_t k1,
                                                                              uint32_t* w0, uint32_t* w1,
                                                                              uint32_t* w2, uint32_t* w3) {
  const __m256i lo_mask = _mm256_set1_epi64x(0xFFFFFFFFll);
  const __m256i m0 = _mm256_set1_epi64x(PHILOX_M0);
  const __m256i m1 = _mm256_set1_epi64x(PHILOX_M1);
  const __m256i pack = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  __m256i rk0[10], rk1[10];
  for (int r = 0; r < 10; ++r) {
    rk0[r] = _mm256_set1_epi64x(static_cast<uint32_t>(k0 + static_cast<uint32_t>(r) * PHILOX_W0));
    rk1[r] = _mm256_set1_epi64x(static_cast<uint32_t>(k1 + static_cast<uint32_t>(r) * PHILOX_W1));
  }
  __m256i c0[4], c1[4], c2[4], c3[4];
  for (int b = 0; b < 4; ++b) {
    const uint32_t g = g0 + 4u * static_cast<uint32_t>(b);
    c0[b] = _mm256_setr_epi64x(g, static_cast<uint32_t>(g + 1u), static_cast<uint32_t>(g + 2u),
                               static_cast<uint32_t>(g + 3u));
    c1[b] = _mm256_set1_epi64x(sample);
    c2[b] = _mm256_set1_epi64x(call);
    c3[b] = _mm256_set1_epi64x(STREAM_EPS);
  }
  for (int r = 0; r < 10; ++r) {
    for (int b = 0; b < 4; ++b) {  // four independent chains: latency hidden
      const __m256i p0 = _mm256_mul_epu32(c0[b], m0);
      const __m256i p1 = _mm256_mul_epu32(c2[b], m1);
      const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c1[b]), rk0[r]);
      const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c3[b]), rk1[r]);
      c1[b] = _mm256_and_si256(p1, lo_mask);
      c3[b] = _mm256_and_si256(p0, lo_mask);
      c0[b] = n0;
      c2[b] = n2;
    }
  }
  for (int b = 0; b < 4; ++b) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(w0 + 4 * b), _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(c0[b], pack)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(w1 + 4 * b), _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(c1[b], pack)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(w2 + 4 * b), _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(c2[b], pack)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(w3 + 4 * b), _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(c3[b], pack)));
  }
}

// Not inlined (a default-target caller cannot inline an AVX2 function); one call per 64 elements.
__attribute__((target("avx2,fma"), noinline)) void eps_chunk_avx2(uint32_t g0, uint32_t sample,
                                                                               uint32_t call, uint32_t k0,
                                                                               uint32_t k1, float* __restrict out) {
  alignas(32) uint32_t w0[GROUPS], w1[GROUPS], w2[GROUPS], w3[GROUPS];
  static_assert(GROUPS == 16, "philox16_avx2 makes 16 groups");
  philox16_avx2(g0, sample, call, k0, k1, w0, w1, w2, w3);
  box_muller_chunk(w0, w1, w2, w3, out);
}
#endif

// The normals of a chunk: ISA-specific Philox, shared Box-Muller.
template <bool AVX2>
SK_INLINE void eps_chunk_isa(uint32_t g0, uint32_t sample, uint32_t call, uint32_t k0, uint32_t k1,
                             float* __restrict out) {
#ifdef SK_HAVE_AVX2_VARIANT
  if constexpr (AVX2) {
    eps_chunk_avx2(g0, sample, call, k0, k1, out);
    return;
  }
#endif
  eps_chunk(g0, sample, call, k0, k1, out);
}

struct NoiseArgs {
  const void* x0;
  void* xt;
  float* eps_out;  // [B, n] eps written for the loss op, or nullptr
  const int64_t* t;
  const float* sqrt_ab;
  const float* sqrt_1mab;
  int64_t n;  // elements per sample
  uint32_t call, k0, k1;
};

template <typename X, bool AVX2>
SK_INLINE void noise_rows_body(const NoiseArgs& a, int64_t i0, int64_t i1) {
  const X* x0 = static_cast<const X*>(a.x0);
  X* xt = static_cast<X*>(a.xt);
  alignas(64) float eps[CHUNK];
  for (int64_t i = i0; i < i1; ++i) {
    const float ca = a.sqrt_ab[a.t[i]];
    const float cb = a.sqrt_1mab[a.t[i]];
    const X* xi = x0 + i * a.n;
    X* yi = xt + i * a.n;
    for (int64_t e0 = 0; e0 < a.n; e0 += CHUNK) {
      eps_chunk_isa<AVX2>(static_cast<uint32_t>(e0 / 4), static_cast<uint32_t>(i), a.call, a.k0, a.k1, eps);
      const int64_t m = std::min<int64_t>(CHUNK, a.n - e0);
      // Two products and a sum, each rounded, as the reference computes x_t.
      for (int64_t j = 0; j < m; ++j) store(yi, e0 + j, ca * load(xi, e0 + j) + cb * eps[j]);
      if (a.eps_out) std::memcpy(a.eps_out + i * a.n + e0, eps, static_cast<size_t>(m) * sizeof(float));
    }
  }
}

struct LossArgs {
  const float* eps_in;  // [B, n] cached eps of this call, or nullptr (regenerate)
  const void* pred;
  const void* x0;
  const int64_t* t;
  const float* tables;
  int64_t T;
  int64_t n;            // elements per sample of x0
  int64_t pred_stride;  // elements per sample of pred (n, or 2n with learned sigma)
  uint32_t call, k0, k1;
  int target;
  bool learn_sigma;
  float* mse;             // [B] weighted MSE per sample
  float* vb;              // [B] VLB per sample (bits)
  void* grad;             // pred-shaped gradient, or nullptr
  const float* gscale;    // per-sample gradient scale (d loss / d per-sample loss), or nullptr
  float gscale_const;     // used when gscale is nullptr
};

template <typename P, typename X, bool AVX2>
SK_INLINE void loss_rows_body(const LossArgs& a, int64_t i0, int64_t i1) {
  const P* pred = static_cast<const P*>(a.pred);
  const X* x0 = static_cast<const X*>(a.x0);
  P* grad = static_cast<P*>(a.grad);
  const float* row = a.tables;
  const int64_t T = a.T;
  alignas(64) float eps_buf[CHUNK];
  alignas(64) float sq[CHUNK];
  alignas(64) float vb[CHUNK];
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t t = a.t[i];
    const float sab = row[ROW_SQRT_AB * T + t];
    const float s1mab = row[ROW_SQRT_1MAB * T + t];
    const float w = row[ROW_WEIGHT * T + t];
    const float scale = a.gscale ? a.gscale[i] : a.gscale_const;
    // d(per-sample loss)/d out_j = w * 2 (out_j - target_j) / n, times the reduction's scale.
    const float g_mse = static_cast<float>(2.0 * w / static_cast<double>(a.n)) * scale;
    const X* xi = x0 + i * a.n;
    const P* oi = pred + i * a.pred_stride;
    const P* vi = oi + a.n;  // variance channels (learned sigma)
    P* go = grad ? grad + i * a.pred_stride : nullptr;
    P* gv = go ? go + a.n : nullptr;
    float cx0 = 0, cxt = 0, lt = 0, lmax = 0, hxt = 0, hout = 0, g_vb = 0;
    if (a.learn_sigma) {
      const LearnedSigmaCoefs c = load_learned_sigma(row, T, t);
      cx0 = c.c_x0, cxt = c.c_xt, lt = c.lv_true, lmax = c.lv_max, hxt = c.x0hat_xt, hout = c.x0hat_out;
      // d vb / d v_j = dterm/dlm * dlm/dv / (n ln 2), dlm/dv = (lmax - lt) / 2.
      g_vb = static_cast<float>(0.5 / (static_cast<double>(a.n) * LN2)) * (lmax - lt) * scale;
    }
    double sum_mse = 0, sum_vb = 0;
    for (int64_t e0 = 0; e0 < a.n; e0 += CHUNK) {
      const int64_t m = std::min<int64_t>(CHUNK, a.n - e0);
      const float* __restrict eps = eps_buf;
      if (a.eps_in) {
        eps = a.eps_in + i * a.n + e0;  // only [0, m) is read
      } else {
        eps_chunk_isa<AVX2>(static_cast<uint32_t>(e0 / 4), static_cast<uint32_t>(i), a.call, a.k0, a.k1, eps_buf);
      }
      for (int64_t j = m; j < CHUNK; ++j) sq[j] = 0.0f;
      if (a.target == 0) {
        for (int64_t j = 0; j < m; ++j) sq[j] = load(oi, e0 + j) - eps[j];
      } else if (a.target == 1) {
        for (int64_t j = 0; j < m; ++j) sq[j] = load(oi, e0 + j) - (sab * eps[j] - s1mab * load(xi, e0 + j));
      } else {
        for (int64_t j = 0; j < m; ++j) sq[j] = load(oi, e0 + j) - load(xi, e0 + j);
      }
      if (go) {
        for (int64_t j = 0; j < m; ++j) store(go, e0 + j, g_mse * sq[j]);
      }
      for (int64_t j = 0; j < m; ++j) sq[j] = sq[j] * sq[j];
      sum_mse += chunk_sum64(sq);
      if (a.learn_sigma) {
        for (int64_t j = m; j < CHUNK; ++j) vb[j] = 0.0f;
        for (int64_t j = 0; j < m; ++j) {
          const float x = load(xi, e0 + j);
          const float x_t = sab * x + s1mab * eps[j];
          const float x0_hat = hxt * x_t + hout * load(oi, e0 + j);
          const float frac = (load(vi, e0 + j) + 1.0f) / 2.0f;
          const float lm = frac * lmax + (1.0f - frac) * lt;
          const VlbTerm term = t == 0 ? nll_term(x, cx0 * x0_hat + cxt * x_t, lm)
                                      : kl_term(cx0 * (x - x0_hat), lt, lm);
          vb[j] = term.value;
          if (gv) store(gv, e0 + j, g_vb * term.dlm);
        }
        sum_vb += chunk_sum64(vb);
      }
    }
    a.mse[i] = static_cast<float>(sum_mse / static_cast<double>(a.n)) * w;
    a.vb[i] = static_cast<float>(sum_vb / (static_cast<double>(a.n) * LN2));
  }
}

// ---- ISA variants: the same bodies compiled for generic x86-64 and for AVX2+FMA ----------------
#ifdef SK_HAVE_AVX2_VARIANT
template <typename X>
__attribute__((target("avx2,fma"))) void noise_rows_avx2(const NoiseArgs& a, int64_t i0, int64_t i1) {
  noise_rows_body<X, true>(a, i0, i1);
}
template <typename P, typename X>
__attribute__((target("avx2,fma"))) void loss_rows_avx2(const LossArgs& a, int64_t i0, int64_t i1) {
  loss_rows_body<P, X, true>(a, i0, i1);
}
#endif
template <typename X>
void noise_rows_generic(const NoiseArgs& a, int64_t i0, int64_t i1) {
  noise_rows_body<X, false>(a, i0, i1);
}
template <typename P, typename X>
void loss_rows_generic(const LossArgs& a, int64_t i0, int64_t i1) {
  loss_rows_body<P, X, false>(a, i0, i1);
}

// SPEED_KERNELS_CPU_ISA=generic forces the portable variant (tests run both).
bool use_avx2() {
#ifdef SK_HAVE_AVX2_VARIANT
  const char* env = std::getenv("SPEED_KERNELS_CPU_ISA");
  if (env && std::strcmp(env, "generic") == 0) return false;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

template <typename X>
void noise_rows(const NoiseArgs& a, int64_t i0, int64_t i1, bool avx2) {
#ifdef SK_HAVE_AVX2_VARIANT
  if (avx2) return noise_rows_avx2<X>(a, i0, i1);
#endif
  noise_rows_generic<X>(a, i0, i1);
}
template <typename P, typename X>
void loss_rows(const LossArgs& a, int64_t i0, int64_t i1, bool avx2) {
#ifdef SK_HAVE_AVX2_VARIANT
  if (avx2) return loss_rows_avx2<P, X>(a, i0, i1);
#endif
  loss_rows_generic<P, X>(a, i0, i1);
}

template <typename F>
void dispatch_float(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat:
      return f(float{});
    case at::kHalf:
      return f(c10::Half{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    default:
      TORCH_CHECK_TYPE(false, "unsupported dtype ", st);
  }
}

void check_cpu(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "the cpp backend runs on CPU tensors; ", name, " is on ", x.device());
}

constexpr int64_t EPS_CACHE_MAX = int64_t(1) << 26;  // 64M floats = 256 MB per thread at most

struct EpsCache {
  std::vector<float> eps;
  int64_t call = -1, B = 0, n = 0;
  uint32_t k0 = 0, k1 = 0;
  bool valid = false;
};
thread_local EpsCache tls_eps_cache;

bool eps_cache_enabled(int64_t numel) {
  const char* env = std::getenv("SPEED_KERNELS_CPU_EPS_CACHE");
  if (env && std::strcmp(env, "0") == 0) return false;
  return numel <= EPS_CACHE_MAX;
}

// Grain: samples per task, so that a task holds at least ~16K elements (thread start-up is not free).
int64_t grain_for(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

void run_loss(const at::Tensor& pred, const at::Tensor& x0, const at::Tensor& t, const at::Tensor& tables,
              int64_t k0, int64_t k1, const at::Tensor& call, int64_t target, bool learn_sigma, float* mse,
              float* vb, void* grad, const float* gscale, float gscale_const) {
  const int64_t B = x0.size(0);
  LossArgs a{};
  a.pred = pred.data_ptr();
  a.x0 = x0.data_ptr();
  a.t = t.data_ptr<int64_t>();
  a.tables = tables.data_ptr<float>();
  a.T = tables.size(1);
  a.n = x0.numel() / B;
  a.pred_stride = pred.numel() / B;
  const int64_t call_v = call.data_ptr<int64_t>()[0] - 1;  // the noise call this loss belongs to
  a.call = static_cast<uint32_t>(call_v);
  a.eps_in = eps_cache_find(call_v, static_cast<uint32_t>(k0), static_cast<uint32_t>(k1), B, a.n);
  a.k0 = static_cast<uint32_t>(k0);
  a.k1 = static_cast<uint32_t>(k1);
  a.target = static_cast<int>(target);
  a.learn_sigma = learn_sigma;
  a.mse = mse;
  a.vb = vb;
  a.grad = grad;
  a.gscale = gscale;
  a.gscale_const = gscale_const;
  const bool avx2 = use_avx2();
  dispatch_float(pred.scalar_type(), [&](auto p) {
    using P = decltype(p);
    dispatch_float(x0.scalar_type(), [&](auto x) {
      using X = decltype(x);
      at::parallel_for(0, B, grain_for(a.n), [&](int64_t i0, int64_t i1) { loss_rows<P, X>(a, i0, i1, avx2); });
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> noise_cpu(const at::Tensor& x0_in, const std::optional<at::Tensor>& t_in,
                                             const at::Tensor& tables_in, int64_t k0, int64_t k1,
                                             const at::Tensor& call, bool mirror, int64_t pivot) {
  check_x0(x0_in);
  check_cpu(x0_in, "x0");
  check_tables(x0_in, tables_in, ROW_CDF + 1);
  check_key(k0, k1);
  check_call(x0_in, call);
  const at::Tensor x0 = x0_in.contiguous();
  const at::Tensor tables = tables_in.contiguous();
  const int64_t B = x0.size(0);
  const int64_t T = tables.size(1);
  const uint32_t c = static_cast<uint32_t>(call.data_ptr<int64_t>()[0]);
  at::Tensor t;
  if (t_in.has_value() && t_in->defined()) {
    check_timesteps(x0, *t_in, "t_in");
    t = t_in->clone(at::MemoryFormat::Contiguous);  // outputs must not alias inputs (torch.compile)
    check_timestep_range_cpu(t, T, "t_in");
  } else {
    if (mirror) TORCH_CHECK_VALUE(pivot >= 0 && pivot < T, "pivot must be in [0, T-1] = [0, ", T - 1, "], got ", pivot);
    t = at::empty({B}, x0.options().dtype(at::kLong));
    const float* cdf = tables.data_ptr<float>() + ROW_CDF * T;
    int64_t* tp = t.data_ptr<int64_t>();
    for (int64_t i = 0; i < B; ++i)
      tp[i] = sample_timestep(cdf, static_cast<int32_t>(T), i, B, mirror, static_cast<int32_t>(pivot), c,
                              static_cast<uint32_t>(k0), static_cast<uint32_t>(k1));
  }
  at::Tensor xt = at::empty_like(x0);
  NoiseArgs a{};
  a.x0 = x0.data_ptr();
  a.xt = xt.data_ptr();
  a.t = t.data_ptr<int64_t>();
  a.sqrt_ab = tables.data_ptr<float>() + ROW_SQRT_AB * T;
  a.sqrt_1mab = tables.data_ptr<float>() + ROW_SQRT_1MAB * T;
  a.n = x0.numel() / B;
  a.call = c;
  a.k0 = static_cast<uint32_t>(k0);
  a.k1 = static_cast<uint32_t>(k1);
  a.eps_out = eps_cache_begin(x0.numel());
  const bool avx2 = use_avx2();
  dispatch_float(x0.scalar_type(), [&](auto x) {
    using X = decltype(x);
    at::parallel_for(0, B, grain_for(a.n), [&](int64_t i0, int64_t i1) { noise_rows<X>(a, i0, i1, avx2); });
  });
  if (a.eps_out) eps_cache_commit(call.data_ptr<int64_t>()[0], a.k0, a.k1, B, a.n);
  call.add_(1);
  return {xt, t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_cpu(const at::Tensor& pred_in, const at::Tensor& x0_in,
                                                        const at::Tensor& t_in, const at::Tensor& tables_in,
                                                        int64_t k0, int64_t k1, const at::Tensor& call,
                                                        int64_t target, bool learn_sigma, bool reduce_mean,
                                                        bool with_grad) {
  check_loss_args(pred_in, x0_in, t_in, tables_in, k0, k1, call, target, learn_sigma);
  TORCH_CHECK(!with_grad || reduce_mean, "speed_kernels::loss: with_grad needs reduce_mean (the forward writes "
              "the gradient of the batch mean; reduction none recomputes it in loss_backward)");
  check_cpu(x0_in, "x0");
  const at::Tensor pred = pred_in.contiguous(), x0 = x0_in.contiguous(), t = t_in.contiguous();
  const at::Tensor tables = tables_in.contiguous();
  check_timestep_range_cpu(t, tables.size(1), "t");
  const int64_t B = x0.size(0);
  at::Tensor terms = at::empty({2, B}, x0.options().dtype(at::kFloat));
  at::Tensor grad = with_grad ? at::empty_like(pred) : at::empty({0}, pred.options());
  float* mse = terms.data_ptr<float>();
  float* vb = mse + B;
  // Mean reduction: d loss / d per-sample loss = 1/B, so the forward writes the final gradient.
  run_loss(pred, x0, t, tables, k0, k1, call, target, learn_sigma, mse, vb, with_grad ? grad.data_ptr() : nullptr,
           nullptr, reduce_mean ? static_cast<float>(1.0 / static_cast<double>(B)) : 1.0f);
  if (!learn_sigma) std::fill(vb, vb + B, 0.0f);
  at::Tensor loss;
  if (reduce_mean) {
    double s = 0;  // fixed order: deterministic
    for (int64_t i = 0; i < B; ++i) s += static_cast<double>(mse[i]) + static_cast<double>(vb[i]);
    loss = at::scalar_tensor(static_cast<float>(s / static_cast<double>(B)), x0.options().dtype(at::kFloat));
  } else {
    loss = terms[0].add(terms[1]);
  }
  return {loss, terms, grad};
}

at::Tensor loss_backward_cpu(const at::Tensor& grad_loss_in, const at::Tensor& pred_in, const at::Tensor& x0_in,
                             const at::Tensor& t_in, const at::Tensor& tables_in, int64_t k0, int64_t k1,
                             const at::Tensor& call, int64_t target, bool learn_sigma) {
  check_loss_args(pred_in, x0_in, t_in, tables_in, k0, k1, call, target, learn_sigma);
  check_cpu(x0_in, "x0");
  const int64_t B = x0_in.size(0);
  check_same_device(x0_in, grad_loss_in, "grad_loss");
  TORCH_CHECK_VALUE(grad_loss_in.numel() == B, "grad_loss must hold one value per sample (", B, "), got shape ",
                    grad_loss_in.sizes());
  const at::Tensor grad_loss = grad_loss_in.reshape({B}).to(at::kFloat).contiguous();
  const at::Tensor pred = pred_in.contiguous(), x0 = x0_in.contiguous(), t = t_in.contiguous();
  const at::Tensor tables = tables_in.contiguous();
  check_timestep_range_cpu(t, tables.size(1), "t");
  at::Tensor scratch = at::empty({2, B}, x0.options().dtype(at::kFloat));
  at::Tensor grad = at::empty_like(pred);
  run_loss(pred, x0, t, tables, k0, k1, call, target, learn_sigma, scratch.data_ptr<float>(),
           scratch.data_ptr<float>() + B, grad.data_ptr(), grad_loss.data_ptr<float>(), 1.0f);
  return grad;
}

// ---- cpu_eps.h: the eps path the flow ops share ------------------------------------------------
bool cpu_use_avx2() { return use_avx2(); }

void eps_chunk64(uint32_t g0, uint32_t sample, uint32_t call, uint32_t k0, uint32_t k1, float* out, bool avx2) {
  if (avx2) {
    eps_chunk_isa<true>(g0, sample, call, k0, k1, out);
  } else {
    eps_chunk_isa<false>(g0, sample, call, k0, k1, out);
  }
}

float* eps_cache_begin(int64_t numel) {
  EpsCache& cache = tls_eps_cache;
  cache.valid = false;
  if (!eps_cache_enabled(numel)) return nullptr;
  if (static_cast<int64_t>(cache.eps.size()) < numel) cache.eps.resize(static_cast<size_t>(numel));
  return cache.eps.data();
}

void eps_cache_commit(int64_t call, uint32_t k0, uint32_t k1, int64_t B, int64_t n) {
  EpsCache& cache = tls_eps_cache;
  cache.call = call;
  cache.k0 = k0;
  cache.k1 = k1;
  cache.B = B;
  cache.n = n;
  cache.valid = true;
}

const float* eps_cache_find(int64_t call, uint32_t k0, uint32_t k1, int64_t B, int64_t n) {
  const EpsCache& cache = tls_eps_cache;
  const bool hit = cache.valid && eps_cache_enabled(B * n) && cache.call == call && cache.k0 == k0 &&
                   cache.k1 == k1 && cache.B == B && cache.n == n;
  return hit ? cache.eps.data() : nullptr;
}

// The loop variant the ops pick now, "avx2" or "generic" (read by _C.cpu_isa() so the tests can
// check that the fast path is really the one they compare with the portable one).
const char* cpu_isa_in_use() { return use_avx2() ? "avx2" : "generic"; }

}  // namespace speed_kernels
