// The RNG contract of speed_kernels/rng.py, shared by the C++ CPU kernels, the CUDA kernels and the
// C++ unit tests. No torch headers: CI compiles this with plain g++ and plain nvcc.
//
//  * Philox4x32-10 (Random123), counter (element group, sample, call, stream), key = fold_key(seed, rank).
//  * uniform(x) = ((x >> 9) * 2 + 1) * 2^-24: an odd multiple of 2^-24, exact in float32, in (0, 1).
//  * Box-Muller lanes: n0 = r01 cos(2pi u1), n1 = r01 sin(2pi u1), n2 = r23 cos(2pi u3), n3 = r23 sin(2pi u3),
//    r = sqrt(-2 ln u), 2pi = float32(2 pi) = 6.2831854820251465.
//  * t = #(cdf <= u) clamped to T-1 (searchsorted right) on a float32 CDF: exact comparisons, so t is
//    bit-identical on every backend; eps agrees to float rounding (the transcendental functions differ).
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define SK_HD __host__ __device__ __forceinline__
#else
#define SK_HD inline
#endif

namespace speed_kernels {

constexpr uint32_t PHILOX_M0 = 0xD2511F53u;
constexpr uint32_t PHILOX_M1 = 0xCD9E8D57u;
constexpr uint32_t PHILOX_W0 = 0x9E3779B9u;
constexpr uint32_t PHILOX_W1 = 0xBB67AE85u;
constexpr uint64_t RANK_FOLD = 0x9E3779B97F4A7C15ull;
constexpr uint32_t STREAM_T = 0;
constexpr uint32_t STREAM_EPS = 1;
constexpr float TWO_PI_F32 = 6.2831854820251465f;

struct PhiloxOut {
  uint32_t w0, w1, w2, w3;
};

// Key words (k0 = low, k1 = high) of seed ^ (rank * golden ratio): rank 0 keeps the plain seed.
SK_HD void fold_key(uint64_t seed, uint64_t rank, uint32_t& k0, uint32_t& k1) {
  const uint64_t key = seed ^ (rank * RANK_FOLD);
  k0 = static_cast<uint32_t>(key);
  k1 = static_cast<uint32_t>(key >> 32);
}

SK_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  // 32x32 -> 64 multiply: GCC turns this into vpmuludq when the caller's loop is vectorised.
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

// Philox4x32-10. Branch-free and fully unrolled so loops over counters vectorise on the CPU.
SK_HD PhiloxOut philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(PHILOX_M0, c0, hi0, lo0);
    mulhilo32(PHILOX_M1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += PHILOX_W0;  // the bump after the last round is never used
    k1 += PHILOX_W1;
  }
  return PhiloxOut{c0, c1, c2, c3};
}

// ((x >> 9) * 2 + 1) * 2^-24: the integer is below 2^24, so the int -> float conversion is exact.
SK_HD float bits_to_uniform(uint32_t x) {
  return static_cast<float>(static_cast<int32_t>((x >> 9) * 2u + 1u)) * 5.9604644775390625e-08f;
}

// Inverse CDF: the number of entries <= u (upper bound), clamped to T-1.
SK_HD int32_t cdf_search(const float* cdf, int32_t T, float u) {
  int32_t lo = 0, hi = T;
  while (lo < hi) {
    const int32_t mid = (lo + hi) >> 1;
    if (cdf[mid] <= u) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo < T ? lo : T - 1;
}

// The time-step uniform of a draw slot `src` (word 0 of philox(0, src, call, STREAM_T)).
SK_HD float timestep_uniform(uint32_t src, uint32_t call, uint32_t k0, uint32_t k1) {
  return bits_to_uniform(philox4x32_10(0u, src, call, STREAM_T, k0, k1).w0);
}

// t of sample i of a batch of B: a fresh draw, or with `mirror` the SpeeD half batch
// (B/2+1 draws, sample i >= B/2+1 takes |t[i - (B/2+1)] - pivot|).
SK_HD int32_t sample_timestep(const float* cdf, int32_t T, int64_t i, int64_t B, bool mirror, int32_t pivot,
                              uint32_t call, uint32_t k0, uint32_t k1) {
  const int64_t n_draw = mirror ? B / 2 + 1 : B;
  const int64_t src = i < n_draw ? i : i - n_draw;
  const int32_t t = cdf_search(cdf, T, timestep_uniform(static_cast<uint32_t>(src), call, k0, k1));
  if (i < n_draw) return t;
  const int32_t d = t - pivot;
  return d < 0 ? -d : d;
}

// ---------------------------------------------------------------------------------------------
// Host float math that the compiler can vectorise (glibc's logf/sinf/cosf are opaque calls).
// Both are within ~1 ulp of the correctly rounded result on the arguments Box-Muller feeds them
// (u in [2^-24, 1), theta in (0, 2pi)); the reference (SLEEF u10 on CPU, libdevice on GPU) is
// within 1 ulp too, so eps agrees to float rounding. (Also valid device code; the CUDA path uses
// logf/sincosf instead.)
SK_HD float as_float(uint32_t i) {
  union {
    uint32_t i;
    float f;
  } v;
  v.i = i;
  return v.f;
}
SK_HD uint32_t as_uint(float f) {
  union {
    uint32_t i;
    float f;
  } v;
  v.f = f;
  return v.i;
}

// ln(x) for positive normal x (musl / FreeBSD logf, branch-free form).
SK_HD float host_logf(float x) {
  uint32_t ix = as_uint(x);
  ix += 0x3f800000u - 0x3f3504f3u;  // reduce to [sqrt(2)/2, sqrt(2))
  const int32_t k = static_cast<int32_t>(ix >> 23) - 0x7f;
  ix = (ix & 0x007fffffu) + 0x3f3504f3u;
  const float f = as_float(ix) - 1.0f;
  const float s = f / (2.0f + f);
  const float z = s * s;
  const float w = z * z;
  const float t1 = w * (0.40000972152f + w * 0.24279078841f);
  const float t2 = z * (0.66666662693f + w * 0.28498786688f);
  const float R = t2 + t1;
  const float hfsq = 0.5f * f * f;
  const float dk = static_cast<float>(k);
  return s * (hfsq + R) + dk * 9.0580006145e-06f - hfsq + f + dk * 6.9313812256e-01f;
}

// sin and cos of 0 <= x <= 2pi + a bit: Cody-Waite reduction by pi/2 in float (the three parts
// of pi/2 have few enough bits that q * part is exact for q <= 4), cephes minimax polynomials on
// [-pi/4, pi/4]. All float, so 8 lanes per AVX2 vector.
SK_HD void host_sincosf(float x, float& s_out, float& c_out) {
  // nearest multiple of pi/2; x >= 0 so truncation is floor (a conversion, no libm call)
  const int32_t q = static_cast<int32_t>(x * 0.636619772f + 0.5f);
  const float qf = static_cast<float>(q);
  const float r = ((x - qf * 1.5703125f) - qf * 4.837512969970703125e-4f) - qf * 7.54978995489188216e-8f;
  const float z = r * r;
  const float sn = r + r * z * (-1.6666654611e-1f + z * (8.3321608736e-3f + z * -1.9515295891e-4f));
  const float cs = 1.0f - 0.5f * z + z * z * (4.166664568298827e-2f + z * (-1.388731625493765e-3f + z * 2.443315711809948e-5f));
  const bool swap = (q & 1) != 0;
  float s = swap ? cs : sn;
  float c = swap ? sn : cs;
  s = (q & 2) ? -s : s;
  c = ((q + 1) & 2) ? -c : c;
  s_out = s;
  c_out = c;
}

// Four normals of element group g of a sample (lanes 0..3 = elements 4g..4g+3).
SK_HD void group_normals(uint32_t g, uint32_t sample, uint32_t call, uint32_t k0, uint32_t k1, float out[4]) {
  const PhiloxOut w = philox4x32_10(g, sample, call, STREAM_EPS, k0, k1);
  const float u0 = bits_to_uniform(w.w0), u1 = bits_to_uniform(w.w1);
  const float u2 = bits_to_uniform(w.w2), u3 = bits_to_uniform(w.w3);
#if defined(__CUDA_ARCH__)
  const float r01 = sqrtf(-2.0f * logf(u0));
  const float r23 = sqrtf(-2.0f * logf(u2));
  float s1, c1, s3, c3;
  sincosf(u1 * TWO_PI_F32, &s1, &c1);
  sincosf(u3 * TWO_PI_F32, &s3, &c3);
#else
  const float r01 = __builtin_sqrtf(-2.0f * host_logf(u0));
  const float r23 = __builtin_sqrtf(-2.0f * host_logf(u2));
  float s1, c1, s3, c3;
  host_sincosf(u1 * TWO_PI_F32, s1, c1);
  host_sincosf(u3 * TWO_PI_F32, s3, c3);
#endif
  out[0] = r01 * c1;
  out[1] = r01 * s1;
  out[2] = r23 * c3;
  out[3] = r23 * s3;
}

}  // namespace speed_kernels
