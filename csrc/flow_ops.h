// Declarations of the flow-matching ops (CPU kernels in flow_cpu.cpp, CUDA glue in cuda_glue.cpp;
// schemas in speed_kernels/op_schema.py -> op_schemas.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace speed_kernels {

std::tuple<at::Tensor, at::Tensor> flow_noise_cpu(const at::Tensor& x0, const std::optional<at::Tensor>& sigma_in,
                                                  const at::Tensor& tables, int64_t k0, int64_t k1,
                                                  const at::Tensor& call);
std::tuple<at::Tensor, at::Tensor> flow_loss_cpu(const at::Tensor& pred, const at::Tensor& x0, const at::Tensor& sigma,
                                                 const at::Tensor& tables, int64_t k0, int64_t k1,
                                                 const at::Tensor& call_used, int64_t target, bool inv_sigma2,
                                                 bool with_grad);

#ifdef SPEED_KERNELS_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> flow_noise_cuda(const at::Tensor& x0, const std::optional<at::Tensor>& sigma_in,
                                                   const at::Tensor& tables, int64_t k0, int64_t k1,
                                                   const at::Tensor& call);
std::tuple<at::Tensor, at::Tensor> flow_loss_cuda(const at::Tensor& pred, const at::Tensor& x0, const at::Tensor& sigma,
                                                  const at::Tensor& tables, int64_t k0, int64_t k1,
                                                  const at::Tensor& call_used, int64_t target, bool inv_sigma2,
                                                  bool with_grad);
#endif

}  // namespace speed_kernels
