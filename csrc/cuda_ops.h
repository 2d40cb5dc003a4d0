// Launch API of the CUDA kernels (csrc/cuda_ops.cu). No torch headers: cuda_ops.cu compiles with plain
// `nvcc -c` (csrc/check_nvcc.sh, CI), and the torch glue (cuda_glue.cpp) only fills these structs.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace speed_kernels {
namespace cuda {

enum DType : int { F32 = 0, F16 = 1, BF16 = 2 };

struct NoiseParams {
  const void* x0;        // [B, n] contiguous, dtype
  void* xt;              // [B, n], dtype
  const int64_t* t_in;   // [B] given time steps, or nullptr to draw them
  int64_t* t_out;        // [B]
  const float* tables;   // [NUM_ROWS, T]
  int64_t T;
  int64_t B;
  int64_t n;             // elements per sample
  const int64_t* call;   // device counter: this call's index (read on the device, no host sync)
  uint32_t k0, k1;
  bool mirror;
  int32_t pivot;
  int dtype;
};

struct LossParams {
  const void* pred;      // [B, pred_stride]
  const void* x0;        // [B, n]
  const int64_t* t;      // [B]
  const float* tables;   // [NUM_ROWS, T]
  int64_t T;
  int64_t B;
  int64_t n;
  int64_t pred_stride;   // n, or 2n with learned sigma
  const int64_t* call;   // the loss uses *call - 1 (the noise call it follows)
  uint32_t k0, k1;
  int target;            // 0 eps, 1 v, 2 x0
  bool learn_sigma;
  int pred_dtype, x0_dtype;
  void* grad;            // pred-shaped gradient (pred dtype), or nullptr
  const float* gscale;   // per-sample d loss / d per-sample loss (backward of reduction none), or nullptr
  float gscale_const;    // used when gscale is nullptr (1/B for the mean)
  float* partial;        // workspace [B * blocks_per_sample * 2], or nullptr (gradient only)
  float* terms;          // [2, B] (weighted MSE, VLB bits), or nullptr
  float* loss;           // [] (mean) or [B], or nullptr
  bool reduce_mean;
};

struct FlowNoiseParams {
  const void* x0;        // [B, n] contiguous, dtype
  void* xt;              // [B, n], dtype
  float* sigma;          // [B]: the given sigma (draw false) or where the drawn one is written
  bool draw;             // draw sigma from the table (else read it from `sigma`)
  const float* tables;   // [3, W]: quantiles, slopes, weight (flow_table.h)
  int64_t W;             // N + 1
  int64_t B;
  int64_t n;
  const int64_t* call;   // device counter: this call's index
  uint32_t k0, k1;
  int dtype;
};

struct FlowLossParams {
  const void* pred;      // [B, n]
  const void* x0;        // [B, n]
  const float* sigma;    // [B] float32
  const float* tables;   // [3, W]
  int64_t W;
  int64_t B;
  int64_t n;
  const int64_t* call_used;  // the eps's call index (a snapshot, not the counter)
  uint32_t k0, k1;
  int target;            // 0 eps, 1 v (eps - x0), 2 x0
  bool inv_sigma2;
  int pred_dtype, x0_dtype;
  void* grad;            // d sum(per) / d pred (pred dtype), or nullptr
  float* partial;        // workspace [B * blocks_per_sample]
  float* per;            // [B] weighted per-sample MSE
};

// Blocks per sample for a launch (so the partial workspace can be sized by the caller).
int loss_blocks_per_sample(int64_t B, int64_t n, int num_sms);

// Noise: one kernel. The caller advances *call afterwards (stream-ordered, still no host sync).
cudaError_t launch_noise(const NoiseParams& p, int num_sms, cudaStream_t stream);
// Loss: the fused loss + gradient kernel, then (when terms/loss are wanted) one tiny single-block
// kernel that reduces the per-block partials in a fixed order (deterministic).
cudaError_t launch_loss(const LossParams& p, int num_sms, cudaStream_t stream);
// Flow matching: the same grid (loss_blocks_per_sample sizes the partials); the loss is one fused
// kernel plus the fixed-order finalize, as above.
cudaError_t launch_flow_noise(const FlowNoiseParams& p, int num_sms, cudaStream_t stream);
cudaError_t launch_flow_loss(const FlowLossParams& p, int num_sms, cudaStream_t stream);

}  // namespace cuda
}  // namespace speed_kernels
