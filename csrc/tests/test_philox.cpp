// Unit tests of csrc/philox.h: the published Random123 Philox4x32-10 known-answer vectors, the
// uniform conversion, the inverse-CDF search and the accuracy of the vectorisable host math.
// Plain C++ (no torch, no test framework) so CI can build it anywhere; ctest runs it.
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "../philox.h"

using namespace speed_kernels;

static int failures = 0;
#define CHECK(cond, ...)                        \
  do {                                          \
    if (!(cond)) {                              \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                 \
      std::printf("\n");                        \
      ++failures;                               \
    }                                           \
  } while (0)

static void kat(const uint32_t c[4], const uint32_t k[2], const uint32_t want[4]) {
  const PhiloxOut o = philox4x32_10(c[0], c[1], c[2], c[3], k[0], k[1]);
  const uint32_t got[4] = {o.w0, o.w1, o.w2, o.w3};
  for (int i = 0; i < 4; ++i)
    CHECK(got[i] == want[i], "KAT ctr %08x.. word %d: got %08x want %08x", c[0], i, got[i], want[i]);
}

static double ulp_err(float got, double exact) {
  const float r = static_cast<float>(exact);
  const double ulp = std::nextafter(std::fabs(r), INFINITY) - std::fabs(r);
  return std::fabs(got - exact) / ulp;
}

int main() {
  // Random123 kat_vectors: philox4x32_10.
  {
    const uint32_t c[4] = {0, 0, 0, 0}, k[2] = {0, 0};
    const uint32_t w[4] = {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u};
    kat(c, k, w);
  }
  {
    const uint32_t c[4] = {0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}, k[2] = {0xffffffffu, 0xffffffffu};
    const uint32_t w[4] = {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu};
    kat(c, k, w);
  }
  {
    const uint32_t c[4] = {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}, k[2] = {0xa4093822u, 0x299f31d0u};
    const uint32_t w[4] = {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u};
    kat(c, k, w);
  }
  // Key fold: rank 0 keeps the seed; rank 1 xors the golden-ratio constant.
  {
    uint32_t k0, k1;
    fold_key(0x0123456789abcdefull, 0, k0, k1);
    CHECK(k0 == 0x89abcdefu && k1 == 0x01234567u, "fold_key rank 0: %08x %08x", k0, k1);
    fold_key(0, 1, k0, k1);
    CHECK(k0 == 0x7f4a7c15u && k1 == 0x9e3779b9u, "fold_key rank 1: %08x %08x", k0, k1);
  }
  // Uniform: extremes are 2^-24 and 1 - 2^-24, both strictly inside (0, 1).
  CHECK(bits_to_uniform(0u) == 0x1p-24f, "uniform(0) = %a", bits_to_uniform(0u));
  CHECK(bits_to_uniform(0xffffffffu) == 1.0f - 0x1p-24f, "uniform(max) = %a", bits_to_uniform(0xffffffffu));
  CHECK(bits_to_uniform(0x80000000u) == 0.5f + 0x1p-24f, "uniform(2^31) = %a", bits_to_uniform(0x80000000u));
  // Inverse CDF = searchsorted(right=True) clamped to T-1.
  {
    const float cdf[5] = {0.1f, 0.1f, 0.5f, 0.9f, 1.0f};
    CHECK(cdf_search(cdf, 5, 0.05f) == 0, "cdf below first");
    CHECK(cdf_search(cdf, 5, 0.1f) == 2, "cdf tie goes right: %d", cdf_search(cdf, 5, 0.1f));
    CHECK(cdf_search(cdf, 5, 0.7f) == 3, "cdf middle");
    CHECK(cdf_search(cdf, 5, 1.0f) == 4, "cdf clamp to T-1");
  }
  // Mirror: B = 5 -> 3 draws, samples 3 and 4 mirror samples 0 and 1 around the pivot.
  {
    float cdf[100];
    for (int i = 0; i < 100; ++i) cdf[i] = (i + 1) / 100.0f;
    cdf[99] = 1.0f;
    for (int i = 0; i < 2; ++i) {
      const int32_t t = sample_timestep(cdf, 100, i, 5, true, 40, 7, 1, 2);
      const int32_t m = sample_timestep(cdf, 100, i + 3, 5, true, 40, 7, 1, 2);
      CHECK(m == std::abs(t - 40), "mirror sample %d: t %d m %d", i, t, m);
    }
  }
  // Host math: worst error in ulps over the Box-Muller argument grid.
  {
    double worst_log = 0, worst_sin = 0, worst_cos = 0;
    for (uint32_t x = 0; x < (1u << 23); x += 7) {
      const float u = static_cast<float>(2 * x + 1) * 0x1p-24f;
      worst_log = std::fmax(worst_log, ulp_err(host_logf(u), std::log(static_cast<double>(u))));
      const float th = u * TWO_PI_F32;
      float s, c;
      host_sincosf(th, s, c);
      // Absolute error scaled by the ulp of 1 near zeros of sin/cos (relative error is meaningless there).
      const double es = std::sin(static_cast<double>(th)), ec = std::cos(static_cast<double>(th));
      worst_sin = std::fmax(worst_sin, std::fabs(es) > 1e-3 ? ulp_err(s, es) : std::fabs(s - es) / 0x1p-24);
      worst_cos = std::fmax(worst_cos, std::fabs(ec) > 1e-3 ? ulp_err(c, ec) : std::fabs(c - ec) / 0x1p-24);
    }
    std::printf("host math worst error: log %.2f ulp, sin %.2f ulp, cos %.2f ulp\n", worst_log, worst_sin, worst_cos);
    CHECK(worst_log <= 2.0, "host_logf error %.2f ulp", worst_log);
    CHECK(worst_sin <= 2.0, "host_sincosf sin error %.2f ulp", worst_sin);
    CHECK(worst_cos <= 2.0, "host_sincosf cos error %.2f ulp", worst_cos);
  }
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("philox: all checks passed\n");
  return 0;
}
