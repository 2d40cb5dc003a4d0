// Torch-side declarations of the two ops (CPU in cpu_ops.cpp, CUDA glue in cuda_glue.cpp) and the
// argument checks every backend shares, so bad input gets the same error on CPU and CUDA.
#pragma once

// Core tensor header only (not ATen/ATen.h, which pulls in every operator and doubles build time).
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include <tuple>

#include "table_rows.h"  // ROW_* and NUM_ROWS, generated from speed_kernels/tables.py

namespace speed_kernels {


std::tuple<at::Tensor, at::Tensor> noise_cpu(const at::Tensor& x0, const std::optional<at::Tensor>& t_in,
                                             const at::Tensor& tables, int64_t k0, int64_t k1,
                                             const at::Tensor& call, bool mirror, int64_t pivot);
std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_cpu(const at::Tensor& pred, const at::Tensor& x0,
                                                        const at::Tensor& t, const at::Tensor& tables, int64_t k0,
                                                        int64_t k1, const at::Tensor& call, int64_t target,
                                                        bool learn_sigma, bool reduce_mean, bool with_grad);
at::Tensor loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& x0,
                             const at::Tensor& t, const at::Tensor& tables, int64_t k0, int64_t k1,
                             const at::Tensor& call, int64_t target, bool learn_sigma);

#ifdef SPEED_KERNELS_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> noise_cuda(const at::Tensor& x0, const std::optional<at::Tensor>& t_in,
                                              const at::Tensor& tables, int64_t k0, int64_t k1,
                                              const at::Tensor& call, bool mirror, int64_t pivot);
std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_cuda(const at::Tensor& pred, const at::Tensor& x0,
                                                         const at::Tensor& t, const at::Tensor& tables, int64_t k0,
                                                         int64_t k1, const at::Tensor& call, int64_t target,
                                                         bool learn_sigma, bool reduce_mean, bool with_grad);
at::Tensor loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& x0,
                              const at::Tensor& t, const at::Tensor& tables, int64_t k0, int64_t k1,
                              const at::Tensor& call, int64_t target, bool learn_sigma);
#endif

// ---- shared checks (ValueError / TypeError naming the argument) -------------------------------

inline void check_float_dtype(const at::Tensor& x, const char* name) {
  const auto d = x.scalar_type();
  TORCH_CHECK_TYPE(d == at::kFloat || d == at::kHalf || d == at::kBFloat16, name,
                   " must be float32, float16 or bfloat16 for the compiled backends (got ", d,
                   "); use backend='torch' for float64");
}

inline void check_key(int64_t k0, int64_t k1) {
  TORCH_CHECK_VALUE(k0 >= 0 && k0 <= 0xFFFFFFFFll, "k0 must be a 32-bit unsigned key word, got ", k0);
  TORCH_CHECK_VALUE(k1 >= 0 && k1 <= 0xFFFFFFFFll, "k1 must be a 32-bit unsigned key word, got ", k1);
}

inline void check_same_device(const at::Tensor& ref, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.device() == ref.device(), name, " is on ", x.device(), " but x0 is on ", ref.device());
}

inline void check_tables(const at::Tensor& x0, const at::Tensor& tables, int64_t rows_needed) {
  check_same_device(x0, tables, "tables");
  TORCH_CHECK_TYPE(tables.scalar_type() == at::kFloat, "tables must be float32, got ", tables.scalar_type());
  TORCH_CHECK_VALUE(tables.dim() == 2 && tables.size(0) >= rows_needed && tables.size(1) >= 1,
                    "tables must be [", static_cast<int64_t>(NUM_ROWS), ", T] (at least ", rows_needed,
                    " rows), got shape ", tables.sizes());
  TORCH_CHECK_VALUE(tables.size(1) < (1ll << 31), "T must be below 2^31, got ", tables.size(1));
}

inline void check_call(const at::Tensor& x0, const at::Tensor& call) {
  check_same_device(x0, call, "call");
  TORCH_CHECK_TYPE(call.scalar_type() == at::kLong, "call must be an int64 tensor, got ", call.scalar_type());
  TORCH_CHECK_VALUE(call.numel() == 1, "call must hold one element, got shape ", call.sizes());
}

inline void check_x0(const at::Tensor& x0) {
  TORCH_CHECK_VALUE(x0.dim() >= 1 && x0.size(0) >= 1, "x0 must be [B, ...] with B >= 1, got shape ", x0.sizes());
  check_float_dtype(x0, "x0");
  TORCH_CHECK_VALUE(x0.size(0) < (1ll << 32), "batch size must be below 2^32, got ", x0.size(0));
  const int64_t n = x0.numel() / x0.size(0);
  TORCH_CHECK_VALUE(n < (1ll << 34), "x0 has too many elements per sample (", n, "), the element counter is 32-bit");
}

inline void check_timesteps(const at::Tensor& x0, const at::Tensor& t, const char* name) {
  check_same_device(x0, t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == x0.size(0), name, " must be [B] = [", x0.size(0), "], got shape ",
                    t.sizes());
}

// t values are checked where that needs no device sync (CPU); CUDA kernels write NaN for an
// out-of-range t instead of reading out of bounds.
inline void check_timestep_range_cpu(const at::Tensor& t, int64_t T, const char* name) {
  const int64_t* p = t.data_ptr<int64_t>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    TORCH_CHECK_VALUE(p[i] >= 0 && p[i] < T, name, "[", i, "] = ", p[i], " is outside [0, T-1] = [0, ", T - 1, "]");
  }
}

inline void check_loss_args(const at::Tensor& pred, const at::Tensor& x0, const at::Tensor& t,
                            const at::Tensor& tables, int64_t k0, int64_t k1, const at::Tensor& call, int64_t target,
                            bool learn_sigma) {
  check_x0(x0);
  check_same_device(x0, pred, "pred");
  check_float_dtype(pred, "pred");
  TORCH_CHECK_VALUE(target >= 0 && target <= 2, "target must be 0 (eps), 1 (v) or 2 (x0), got ", target);
  if (learn_sigma) {
    TORCH_CHECK_VALUE(x0.dim() >= 2, "learn_sigma needs x0 with a channel dim [B, C, ...], got shape ", x0.sizes());
    auto want = x0.sizes().vec();
    want[1] *= 2;
    TORCH_CHECK_VALUE(pred.sizes() == at::IntArrayRef(want), "pred must be [B, 2C, ...] = ", at::IntArrayRef(want),
                      " with learn_sigma (out and variance channels), got ", pred.sizes());
  } else {
    TORCH_CHECK_VALUE(pred.sizes() == x0.sizes(), "pred must have x0's shape ", x0.sizes(), ", got ", pred.sizes());
  }
  check_timesteps(x0, t, "t");
  check_tables(x0, tables, learn_sigma ? NUM_ROWS : ROW_CDF + 1);
  check_key(k0, k1);
  check_call(x0, call);
}

// The flow ops' table and key (any device): [3, N + 1] float32 on x0's device, N >= 1.
inline void check_flow_tables(const at::Tensor& x0, const at::Tensor& tables, int64_t k0, int64_t k1) {
  check_x0(x0);
  check_same_device(x0, tables, "tables");
  TORCH_CHECK_TYPE(tables.scalar_type() == at::kFloat, "tables must be float32, got ", tables.scalar_type());
  TORCH_CHECK_VALUE(tables.dim() == 2 && tables.size(0) == 3 && tables.size(1) >= 2,
                    "flow tables must be [3, N + 1] with N >= 1, got shape ", tables.sizes());
  check_key(k0, k1);
}

// The flow loss's inputs (any device; x0 itself is checked by the caller with its device).
inline void check_flow_loss_args(const at::Tensor& pred, const at::Tensor& x0, const at::Tensor& sigma,
                                 const at::Tensor& tables, int64_t k0, int64_t k1, const at::Tensor& call_used,
                                 int64_t target) {
  check_flow_tables(x0, tables, k0, k1);
  check_call(x0, call_used);
  check_same_device(x0, pred, "pred");
  check_float_dtype(pred, "pred");
  TORCH_CHECK_VALUE(pred.sizes() == x0.sizes(), "pred must have x0's shape ", x0.sizes(), ", got ", pred.sizes());
  TORCH_CHECK_VALUE(target >= 0 && target <= 2, "target must be 0 (eps), 1 (v) or 2 (x0), got ", target);
  check_same_device(x0, sigma, "sigma");
  TORCH_CHECK_VALUE(sigma.dim() == 1 && sigma.size(0) == x0.size(0), "sigma must be [B] = [", x0.size(0),
                    "], got shape ", sigma.sizes());
}

// A given sigma of the flow noise op, checked ([B] floating point on x0's device), as a float32
// copy (an op's outputs must not alias its inputs).
inline at::Tensor given_sigma(const at::Tensor& x0, const at::Tensor& sigma) {
  check_same_device(x0, sigma, "sigma");
  TORCH_CHECK_VALUE(sigma.dim() == 1 && sigma.size(0) == x0.size(0), "sigma must be [B] = [", x0.size(0),
                    "], got shape ", sigma.sizes());
  TORCH_CHECK_TYPE(sigma.is_floating_point(), "sigma must be a floating-point tensor, got ", sigma.scalar_type());
  return sigma.to(at::kFloat).clone(at::MemoryFormat::Contiguous);
}

}  // namespace speed_kernels
