// The CPU eps path shared by the DDPM ops (cpu_ops.cpp) and the flow ops (flow_cpu.cpp): the 64
// normals of a chunk with the fastest ISA the machine has, the per-thread eps cache that a noise
// op fills for the loss op of the same call, and the fixed-order sum of a chunk.
#pragma once

#include <cstdint>

namespace speed_kernels {

constexpr int64_t EPS_CHUNK = 64;  // normals per chunk: 16 Philox groups of 4

// Whether the AVX2+FMA variants run here (SPEED_KERNELS_CPU_ISA=generic forces the portable ones).
bool cpu_use_avx2();

// The EPS_CHUNK normals of a sample starting at element group g0 (element 4 * g0).
void eps_chunk64(uint32_t g0, uint32_t sample, uint32_t call, uint32_t k0, uint32_t k1, float* out, bool avx2);

// The eps cache: eps is a pure function of (call, key, sample, element), and on a CPU generating
// it costs ~20x a memory pass, so a noise op writes it into this thread's buffer and the loss op
// of the same call and shape reads it back (bit-identical either way).
// eps_cache_begin: a [numel] buffer to fill (invalidated until eps_cache_commit), or nullptr when
// the cache is off (SPEED_KERNELS_CPU_EPS_CACHE=0, or too large).
float* eps_cache_begin(int64_t numel);
void eps_cache_commit(int64_t call, uint32_t k0, uint32_t k1, int64_t B, int64_t n);
// The cached [B, n] eps of that call, or nullptr.
const float* eps_cache_find(int64_t call, uint32_t k0, uint32_t k1, int64_t B, int64_t n);

// Sum of EPS_CHUNK floats (zero-padded at a tail) in 8 independent lanes: vectorisable, fixed order.
inline double chunk_sum64(const float* __restrict v) {
  float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t j = 0; j < EPS_CHUNK; j += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += v[j + l];
  double s = 0;
  for (int l = 0; l < 8; ++l) s += lanes[l];
  return s;
}

}  // namespace speed_kernels
