// CUDA kernels of the noise op and the loss op (the `cuda` backend), and of the flow-matching
// flow_noise / flow_loss ops. Torch-free: see cuda_ops.h.
//
// Layout: a 1-D grid of B * blocks_per_sample blocks (block b works on sample b / bps), each thread
// handles units of 8 elements (two Philox groups): one 16-byte load for 16-bit dtypes, two for
// float32, when the sample length is a multiple of 8 and the pointers are 16-byte aligned (else a
// guarded scalar path). The call counter is read on the device. Per-sample sums are reduced
// per block (fixed shuffle tree), written as partials, and summed in a fixed order by one tiny
// finalize block: results are deterministic for a given shape.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>

#include "cuda_ops.h"
#include "flow_table.h"
#include "philox.h"
#include "table_rows.h"
#include "vlb.h"

namespace speed_kernels {
namespace cuda {
namespace {

constexpr int THREADS = 256;
constexpr int E = 8;  // elements per thread unit (two Philox groups)

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// E elements starting at p[e0] into floats: vectorised (16-byte loads) or guarded scalar.
template <typename T>
__device__ __forceinline__ void load_unit(const T* __restrict__ p, int64_t e0, int64_t n, bool vec, float* out) {
  if (vec) {
    alignas(16) T buf[E];
    constexpr int NV = E * sizeof(T) / 16;
#pragma unroll
    for (int k = 0; k < NV; ++k)
      reinterpret_cast<uint4*>(buf)[k] = __ldg(reinterpret_cast<const uint4*>(p + e0) + k);
#pragma unroll
    for (int k = 0; k < E; ++k) out[k] = to_f(buf[k]);
  } else {
#pragma unroll
    for (int k = 0; k < E; ++k) out[k] = e0 + k < n ? to_f(p[e0 + k]) : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void store_unit(T* __restrict__ p, int64_t e0, int64_t n, bool vec, const float* v) {
  if (vec) {
    alignas(16) T buf[E];
#pragma unroll
    for (int k = 0; k < E; ++k) buf[k] = from_f<T>(v[k]);
    constexpr int NV = E * sizeof(T) / 16;
#pragma unroll
    for (int k = 0; k < NV; ++k) reinterpret_cast<uint4*>(p + e0)[k] = reinterpret_cast<const uint4*>(buf)[k];
  } else {
#pragma unroll
    for (int k = 0; k < E; ++k)
      if (e0 + k < n) p[e0 + k] = from_f<T>(v[k]);
  }
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Sum over the block in a fixed tree; the result is valid in thread 0.
__device__ __forceinline__ float block_sum(float v, float* shared) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  float s = 0.0f;
  if (threadIdx.x == 0)
    for (int w = 0; w < THREADS / 32; ++w) s += shared[w];
  return s;
}

template <typename X>
__global__ void __launch_bounds__(THREADS) noise_kernel(NoiseParams p, int bps) {
  const int64_t i = blockIdx.x / bps;
  const int chunk = blockIdx.x % bps;
  const int64_t T = p.T;
  __shared__ int64_t t_sh;
  if (threadIdx.x == 0) {
    int64_t t;
    if (p.t_in) {
      t = p.t_in[i];
    } else {
      t = sample_timestep(p.tables + ROW_CDF * T, static_cast<int32_t>(T), i, p.B, p.mirror, p.pivot,
                          static_cast<uint32_t>(*p.call), p.k0, p.k1);
    }
    if (chunk == 0) p.t_out[i] = t;
    t_sh = t;
  }
  __syncthreads();
  const int64_t t_raw = t_sh;
  const bool bad = t_raw < 0 || t_raw >= T;  // a given t out of range: NaN output, no OOB read
  const int64_t t = bad ? 0 : t_raw;
  const float ca = bad ? NAN : p.tables[ROW_SQRT_AB * T + t];
  const float cb = bad ? NAN : p.tables[ROW_SQRT_1MAB * T + t];
  const uint32_t call = static_cast<uint32_t>(*p.call);
  const X* x0 = static_cast<const X*>(p.x0) + i * p.n;
  X* xt = static_cast<X*>(p.xt) + i * p.n;
  const bool vec = (p.n % E == 0) && aligned16(p.x0) && aligned16(p.xt);
  const int64_t units = (p.n + E - 1) / E;
  for (int64_t u = static_cast<int64_t>(chunk) * THREADS + threadIdx.x; u < units; u += static_cast<int64_t>(bps) * THREADS) {
    const int64_t e0 = u * E;
    float x[E], eps[E], y[E];
    load_unit(x0, e0, p.n, vec, x);
    group_normals(static_cast<uint32_t>(e0 / 4), static_cast<uint32_t>(i), call, p.k0, p.k1, eps);
    group_normals(static_cast<uint32_t>(e0 / 4 + 1), static_cast<uint32_t>(i), call, p.k0, p.k1, eps + 4);
#pragma unroll
    for (int k = 0; k < E; ++k) y[k] = __fadd_rn(__fmul_rn(ca, x[k]), __fmul_rn(cb, eps[k]));  // no FMA: as the reference
    store_unit(xt, e0, p.n, vec, y);
  }
}

template <typename P, typename X>
__global__ void __launch_bounds__(THREADS) loss_kernel(LossParams p, int bps) {
  __shared__ float red[THREADS / 32];
  const int64_t i = blockIdx.x / bps;
  const int chunk = blockIdx.x % bps;
  const int64_t T = p.T;
  const int64_t t_raw = p.t[i];
  const bool bad = t_raw < 0 || t_raw >= T;
  const int64_t t = bad ? 0 : t_raw;
  const float* row = p.tables;
  const float sab = row[ROW_SQRT_AB * T + t];
  const float s1mab = row[ROW_SQRT_1MAB * T + t];
  const float w = bad ? NAN : row[ROW_WEIGHT * T + t];
  const float scale = p.gscale ? p.gscale[i] : p.gscale_const;
  const float g_mse = static_cast<float>(2.0 * static_cast<double>(w) / static_cast<double>(p.n)) * scale;
  float cx0 = 0, cxt = 0, lt = 0, lmax = 0, hxt = 0, hout = 0, g_vb = 0;
  if (p.learn_sigma) {
    const LearnedSigmaCoefs c = load_learned_sigma(row, T, t);
    cx0 = c.c_x0, cxt = c.c_xt, lt = c.lv_true, lmax = c.lv_max, hxt = c.x0hat_xt, hout = c.x0hat_out;
    g_vb = static_cast<float>(0.5 / (static_cast<double>(p.n) * 0.69314718055994530942)) * (lmax - lt) * scale;
    if (bad) g_vb = NAN;
  }
  const uint32_t call = static_cast<uint32_t>(*p.call - 1);
  const X* x0 = static_cast<const X*>(p.x0) + i * p.n;
  const P* out = static_cast<const P*>(p.pred) + i * p.pred_stride;
  const P* var = out + p.n;
  P* gout = p.grad ? static_cast<P*>(p.grad) + i * p.pred_stride : nullptr;
  P* gvar = gout ? gout + p.n : nullptr;
  const bool vec = (p.n % E == 0) && aligned16(p.x0) && aligned16(p.pred) && (!p.grad || aligned16(p.grad));
  const int64_t units = (p.n + E - 1) / E;
  float acc_sq = 0.0f, acc_vb = 0.0f;
  for (int64_t u = static_cast<int64_t>(chunk) * THREADS + threadIdx.x; u < units; u += static_cast<int64_t>(bps) * THREADS) {
    const int64_t e0 = u * E;
    float x[E], o[E], eps[E], g[E];
    load_unit(x0, e0, p.n, vec, x);
    load_unit(out, e0, p.n, vec, o);
    group_normals(static_cast<uint32_t>(e0 / 4), static_cast<uint32_t>(i), call, p.k0, p.k1, eps);
    group_normals(static_cast<uint32_t>(e0 / 4 + 1), static_cast<uint32_t>(i), call, p.k0, p.k1, eps + 4);
#pragma unroll
    for (int k = 0; k < E; ++k) {
      float tgt;
      if (p.target == 0) {
        tgt = eps[k];
      } else if (p.target == 1) {
        tgt = __fsub_rn(__fmul_rn(sab, eps[k]), __fmul_rn(s1mab, x[k]));
      } else {
        tgt = x[k];
      }
      const float d = o[k] - tgt;
      acc_sq += (e0 + k < p.n) ? d * d : 0.0f;
      g[k] = g_mse * d;
    }
    if (gout) store_unit(gout, e0, p.n, vec, g);
    if (p.learn_sigma) {
      float v[E];
      load_unit(var, e0, p.n, vec, v);
#pragma unroll
      for (int k = 0; k < E; ++k) {
        const float x_t = __fadd_rn(__fmul_rn(sab, x[k]), __fmul_rn(s1mab, eps[k]));
        const float x0_hat = hxt * x_t + hout * o[k];
        const float frac = (v[k] + 1.0f) / 2.0f;
        const float lm = frac * lmax + (1.0f - frac) * lt;
        const VlbTerm term = t == 0 ? nll_term(x[k], cx0 * x0_hat + cxt * x_t, lm) : kl_term(cx0 * (x[k] - x0_hat), lt, lm);
        acc_vb += (e0 + k < p.n) ? term.value : 0.0f;
        g[k] = g_vb * term.dlm;
      }
      if (gvar) store_unit(gvar, e0, p.n, vec, g);
    }
  }
  if (p.partial) {
    const float s_sq = block_sum(acc_sq, red);
    const float s_vb = block_sum(acc_vb, red);
    if (threadIdx.x == 0) {
      p.partial[(i * bps + chunk) * 2 + 0] = bad ? NAN : s_sq;
      p.partial[(i * bps + chunk) * 2 + 1] = s_vb;
    }
  }
}

// One block: per-sample sums of the partials in a fixed order, then the batch mean in a fixed tree.
__global__ void __launch_bounds__(THREADS) finalize_kernel(LossParams p, int bps) {
  __shared__ double red[THREADS];
  double local = 0.0;
  for (int64_t i = threadIdx.x; i < p.B; i += THREADS) {
    double s_sq = 0.0, s_vb = 0.0;
    for (int c = 0; c < bps; ++c) {
      s_sq += p.partial[(i * bps + c) * 2 + 0];
      s_vb += p.partial[(i * bps + c) * 2 + 1];
    }
    const int64_t t_raw = p.t[i];
    const bool bad = t_raw < 0 || t_raw >= p.T;
    const float w = bad ? NAN : p.tables[ROW_WEIGHT * p.T + t_raw];
    const float mse = static_cast<float>(s_sq / static_cast<double>(p.n)) * w;
    const float vb = p.learn_sigma ? static_cast<float>(s_vb / (static_cast<double>(p.n) * 0.69314718055994530942)) : 0.0f;
    if (p.terms) {
      p.terms[i] = mse;
      p.terms[p.B + i] = vb;
    }
    if (p.loss && !p.reduce_mean) p.loss[i] = mse + vb;
    local += static_cast<double>(mse) + static_cast<double>(vb);
  }
  red[threadIdx.x] = local;
  __syncthreads();
  for (int s = THREADS / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0 && p.loss && p.reduce_mean) p.loss[0] = static_cast<float>(red[0] / static_cast<double>(p.B));
}

// ---- flow matching: x_t = (1 - sigma) x0 + sigma eps; per = w(sigma) mean((pred - target)^2) ----
template <typename X>
__global__ void __launch_bounds__(THREADS) flow_noise_kernel(FlowNoiseParams p, int bps) {
  const int64_t i = blockIdx.x / bps;
  const int chunk = blockIdx.x % bps;
  __shared__ float s_sh;
  if (threadIdx.x == 0) {
    float s;
    if (p.draw) {
      s = flow_draw_sigma(p.tables + FLOW_ROW_Q * p.W, p.tables + FLOW_ROW_DQ * p.W, static_cast<int32_t>(p.W - 1),
                          static_cast<uint32_t>(i), static_cast<uint32_t>(*p.call), p.k0, p.k1);
      if (chunk == 0) p.sigma[i] = s;
    } else {
      s = p.sigma[i];
    }
    s_sh = s;
  }
  __syncthreads();
  const float s = s_sh;
  const float one_m_s = __fsub_rn(1.0f, s);
  const uint32_t call = static_cast<uint32_t>(*p.call);
  const X* x0 = static_cast<const X*>(p.x0) + i * p.n;
  X* xt = static_cast<X*>(p.xt) + i * p.n;
  const bool vec = (p.n % E == 0) && aligned16(p.x0) && aligned16(p.xt);
  const int64_t units = (p.n + E - 1) / E;
  for (int64_t u = static_cast<int64_t>(chunk) * THREADS + threadIdx.x; u < units; u += static_cast<int64_t>(bps) * THREADS) {
    const int64_t e0 = u * E;
    float x[E], eps[E], y[E];
    load_unit(x0, e0, p.n, vec, x);
    group_normals(static_cast<uint32_t>(e0 / 4), static_cast<uint32_t>(i), call, p.k0, p.k1, eps);
    group_normals(static_cast<uint32_t>(e0 / 4 + 1), static_cast<uint32_t>(i), call, p.k0, p.k1, eps + 4);
#pragma unroll
    for (int k = 0; k < E; ++k) y[k] = __fadd_rn(__fmul_rn(one_m_s, x[k]), __fmul_rn(s, eps[k]));  // as the reference
    store_unit(xt, e0, p.n, vec, y);
  }
}

template <typename P, typename X>
__global__ void __launch_bounds__(THREADS) flow_loss_kernel(FlowLossParams p, int bps) {
  __shared__ float red[THREADS / 32];
  const int64_t i = blockIdx.x / bps;
  const int chunk = blockIdx.x % bps;
  const float w = flow_weight(p.tables + FLOW_ROW_W * p.W, static_cast<int32_t>(p.W - 1), p.sigma[i], p.inv_sigma2);
  const float gscale = 2.0f * w / static_cast<float>(p.n);  // d per / d pred_j = 2 w (pred_j - target_j) / n
  const uint32_t call = static_cast<uint32_t>(*p.call_used);
  const X* x0 = static_cast<const X*>(p.x0) + i * p.n;
  const P* pred = static_cast<const P*>(p.pred) + i * p.n;
  P* grad = p.grad ? static_cast<P*>(p.grad) + i * p.n : nullptr;
  const bool vec = (p.n % E == 0) && aligned16(p.x0) && aligned16(p.pred) && (!p.grad || aligned16(p.grad));
  const int64_t units = (p.n + E - 1) / E;
  float acc = 0.0f;
  for (int64_t u = static_cast<int64_t>(chunk) * THREADS + threadIdx.x; u < units; u += static_cast<int64_t>(bps) * THREADS) {
    const int64_t e0 = u * E;
    float x[E], o[E], eps[E], g[E];
    load_unit(x0, e0, p.n, vec, x);
    load_unit(pred, e0, p.n, vec, o);
    if (p.target != 2) {
      group_normals(static_cast<uint32_t>(e0 / 4), static_cast<uint32_t>(i), call, p.k0, p.k1, eps);
      group_normals(static_cast<uint32_t>(e0 / 4 + 1), static_cast<uint32_t>(i), call, p.k0, p.k1, eps + 4);
    }
#pragma unroll
    for (int k = 0; k < E; ++k) {
      const float tgt = p.target == 0 ? eps[k] : (p.target == 1 ? __fsub_rn(eps[k], x[k]) : x[k]);
      const float d = __fsub_rn(o[k], tgt);
      acc += (e0 + k < p.n) ? d * d : 0.0f;
      g[k] = d * gscale;
    }
    if (grad) store_unit(grad, e0, p.n, vec, g);
  }
  const float s = block_sum(acc, red);
  if (threadIdx.x == 0) p.partial[i * bps + chunk] = s;
}

// One block: per[b] = (sum of its partials in a fixed order) / n * w(sigma_b).
__global__ void __launch_bounds__(THREADS) flow_finalize_kernel(FlowLossParams p, int bps) {
  for (int64_t i = threadIdx.x; i < p.B; i += THREADS) {
    double s = 0.0;
    for (int c = 0; c < bps; ++c) s += p.partial[i * bps + c];
    const float w = flow_weight(p.tables + FLOW_ROW_W * p.W, static_cast<int32_t>(p.W - 1), p.sigma[i], p.inv_sigma2);
    p.per[i] = static_cast<float>(s / static_cast<double>(p.n)) * w;
  }
}

int blocks_per_sample(int64_t B, int64_t n, int num_sms) {
  const int64_t units = (n + E - 1) / E;
  const int64_t need = (units + THREADS - 1) / THREADS;          // enough threads for one unit each
  const int64_t fill = (8ll * num_sms + B - 1) / B;               // ~8 blocks per SM over the grid
  int64_t bps = need < fill ? need : fill;
  if (bps < 1) bps = 1;
  int64_t max_grid = 2147483647ll / (B > 0 ? B : 1);
  if (max_grid < 1) max_grid = 1;  // B >= 2^31: the launch fails with a clear CUDA error
  if (bps > max_grid) bps = max_grid;
  return static_cast<int>(bps);
}

template <typename F>
cudaError_t dispatch(int dtype, F&& f) {
  switch (dtype) {
    case F32:
      return f(float{});
    case F16:
      return f(__half{});
    case BF16:
      return f(__nv_bfloat16{});
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

int loss_blocks_per_sample(int64_t B, int64_t n, int num_sms) { return blocks_per_sample(B, n, num_sms); }

cudaError_t launch_noise(const NoiseParams& p, int num_sms, cudaStream_t stream) {
  if (p.B <= 0) return cudaSuccess;
  const int bps = blocks_per_sample(p.B, p.n, num_sms);
  const unsigned grid = static_cast<unsigned>(p.B * bps);
  return dispatch(p.dtype, [&](auto tag) {
    using X = decltype(tag);
    noise_kernel<X><<<grid, THREADS, 0, stream>>>(p, bps);
    return cudaGetLastError();
  });
}

cudaError_t launch_loss(const LossParams& p, int num_sms, cudaStream_t stream) {
  if (p.B <= 0) return cudaSuccess;
  const int bps = blocks_per_sample(p.B, p.n, num_sms);
  const unsigned grid = static_cast<unsigned>(p.B * bps);
  cudaError_t err = dispatch(p.pred_dtype, [&](auto ptag) {
    using P = decltype(ptag);
    return dispatch(p.x0_dtype, [&](auto xtag) {
      using X = decltype(xtag);
      loss_kernel<P, X><<<grid, THREADS, 0, stream>>>(p, bps);
      return cudaGetLastError();
    });
  });
  if (err != cudaSuccess || p.partial == nullptr) return err;
  finalize_kernel<<<1, THREADS, 0, stream>>>(p, bps);
  return cudaGetLastError();
}

cudaError_t launch_flow_noise(const FlowNoiseParams& p, int num_sms, cudaStream_t stream) {
  if (p.B <= 0) return cudaSuccess;
  const int bps = blocks_per_sample(p.B, p.n, num_sms);
  const unsigned grid = static_cast<unsigned>(p.B * bps);
  return dispatch(p.dtype, [&](auto tag) {
    using X = decltype(tag);
    flow_noise_kernel<X><<<grid, THREADS, 0, stream>>>(p, bps);
    return cudaGetLastError();
  });
}

cudaError_t launch_flow_loss(const FlowLossParams& p, int num_sms, cudaStream_t stream) {
  if (p.B <= 0) return cudaSuccess;
  const int bps = blocks_per_sample(p.B, p.n, num_sms);
  const unsigned grid = static_cast<unsigned>(p.B * bps);
  cudaError_t err = dispatch(p.pred_dtype, [&](auto ptag) {
    using P = decltype(ptag);
    return dispatch(p.x0_dtype, [&](auto xtag) {
      using X = decltype(xtag);
      flow_loss_kernel<P, X><<<grid, THREADS, 0, stream>>>(p, bps);
      return cudaGetLastError();
    });
  });
  if (err != cudaSuccess) return err;
  flow_finalize_kernel<<<1, THREADS, 0, stream>>>(p, bps);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace speed_kernels
