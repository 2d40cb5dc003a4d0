// The flow table arithmetic shared by the CPU (flow_cpu.cpp) and CUDA (cuda_ops.cu) flow kernels:
// sigma by inverse CDF of the quantile rows, and the interpolated loss weight. Torch-free.
// Rows (speed_kernels/reference.py, flow section): 0 quantiles q, 1 slopes dq, 2 weight, each N + 1.
#pragma once

#include <stdint.h>

#include "philox.h"

namespace speed_kernels {

constexpr uint32_t FLOW_STREAM_SIGMA = 2;
constexpr int64_t FLOW_ROW_Q = 0, FLOW_ROW_DQ = 1, FLOW_ROW_W = 2, FLOW_NUM_ROWS = 3;

// sigma = q[j] + f * dq[j] with u the first word of philox(0, b, call, stream 2): f * dq[j] is
// exact (12 + 12 significant bits), one rounding remains, so contraction into an FMA changes
// nothing and every backend draws the same sigma bit for bit.
SK_HD float flow_draw_sigma(const float* q, const float* dq, int32_t nq, uint32_t b, uint32_t call, uint32_t k0,
                            uint32_t k1) {
  const float u = bits_to_uniform(philox4x32_10(0u, b, call, FLOW_STREAM_SIGMA, k0, k1).w0);
  const float pos = u * static_cast<float>(nq);
  int32_t j = static_cast<int32_t>(pos);
  if (j > nq - 1) j = nq - 1;
  const float f = pos - static_cast<float>(j);
  return q[j] + f * dq[j];
}

// w(sigma): linear interpolation of the weight row on its N + 1 point grid over [0, 1], times
// sigma^-2 when the weighting carries it (computed exactly, not tabulated).
SK_HD float flow_weight(const float* w, int32_t nw, float sigma, bool inv_sigma2) {
  const float s = sigma < 0.0f ? 0.0f : (sigma > 1.0f ? 1.0f : sigma);
  const float pos = s * static_cast<float>(nw);
  int32_t j = static_cast<int32_t>(pos);
  if (j > nw - 1) j = nw - 1;
  const float f = pos - static_cast<float>(j);
  float v = w[j] + f * (w[j + 1] - w[j]);
  if (inv_sigma2) v = v / (sigma * sigma);
  return v;
}

}  // namespace speed_kernels
