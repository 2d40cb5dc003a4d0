// Torch glue of the CUDA kernels: checks, allocation, stream, launch (compiled only with a CUDA torch).
// The kernels themselves (cuda_ops.cu) never see a torch header.
// c10/cuda only (not ATen/cuda/CUDAContext.h): that one pulls in cuBLAS/cuSPARSE headers, which a
// minimal toolkit may not have.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <atomic>

#include "cuda_ops.h"
#include "flow_ops.h"
#include "ops.h"

namespace speed_kernels {
namespace {

int dtype_code(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return cuda::F32;
    case at::kHalf:
      return cuda::F16;
    case at::kBFloat16:
      return cuda::BF16;
    default:
      TORCH_CHECK_TYPE(false, "unsupported dtype ", x.scalar_type());
  }
  return -1;
}

void check_cuda_tensor(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.is_cuda(), "the cuda backend runs on CUDA tensors; ", name, " is on ", x.device());
}

// SM count of the current device, cached (cudaDeviceGetAttribute is cheap but not free).
int num_sms() {
  static std::array<std::atomic<int>, 64> cache{};
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 0 || dev >= 64) dev = 0;
  int v = cache[dev].load(std::memory_order_relaxed);
  if (v == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev));
    cache[dev].store(v, std::memory_order_relaxed);
  }
  return v;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "speed_kernels ", what, " launch failed: ", cudaGetErrorString(err));
}

void run_loss(const at::Tensor& pred, const at::Tensor& x0, const at::Tensor& t, const at::Tensor& tables,
              int64_t k0, int64_t k1, const at::Tensor& call, int64_t target, bool learn_sigma, bool reduce_mean,
              void* grad, const float* gscale, float gscale_const, float* terms, float* loss) {
  const int64_t B = x0.size(0);
  cuda::LossParams p{};
  p.pred = pred.data_ptr();
  p.x0 = x0.data_ptr();
  p.t = t.data_ptr<int64_t>();
  p.tables = tables.data_ptr<float>();
  p.T = tables.size(1);
  p.B = B;
  p.n = x0.numel() / B;
  p.pred_stride = pred.numel() / B;
  p.call = call.data_ptr<int64_t>();
  p.k0 = static_cast<uint32_t>(k0);
  p.k1 = static_cast<uint32_t>(k1);
  p.target = static_cast<int>(target);
  p.learn_sigma = learn_sigma;
  p.pred_dtype = dtype_code(pred);
  p.x0_dtype = dtype_code(x0);
  p.grad = grad;
  p.gscale = gscale;
  p.gscale_const = gscale_const;
  p.terms = terms;
  p.loss = loss;
  p.reduce_mean = reduce_mean;
  const int sms = num_sms();
  at::Tensor partial;
  if (terms || loss) {
    const int64_t bps = cuda::loss_blocks_per_sample(B, p.n, sms);
    partial = at::empty({B * bps * 2}, x0.options().dtype(at::kFloat));
    p.partial = partial.data_ptr<float>();
  }
  check_launch(cuda::launch_loss(p, sms, c10::cuda::getCurrentCUDAStream().stream()), "loss");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> noise_cuda(const at::Tensor& x0_in, const std::optional<at::Tensor>& t_in,
                                              const at::Tensor& tables_in, int64_t k0, int64_t k1,
                                              const at::Tensor& call, bool mirror, int64_t pivot) {
  check_x0(x0_in);
  check_cuda_tensor(x0_in, "x0");
  check_tables(x0_in, tables_in, ROW_CDF + 1);
  check_key(k0, k1);
  check_call(x0_in, call);
  const bool given = t_in.has_value() && t_in->defined();
  if (given) check_timesteps(x0_in, *t_in, "t_in");
  const int64_t T = tables_in.size(1);
  if (!given && mirror) TORCH_CHECK_VALUE(pivot >= 0 && pivot < T, "pivot must be in [0, T-1] = [0, ", T - 1, "], got ", pivot);
  c10::cuda::CUDAGuard guard(x0_in.device());
  const at::Tensor x0 = x0_in.contiguous();
  const at::Tensor tables = tables_in.contiguous();
  const int64_t B = x0.size(0);
  at::Tensor t_given = given ? t_in->contiguous() : at::Tensor();
  at::Tensor t = at::empty({B}, x0.options().dtype(at::kLong));
  at::Tensor xt = at::empty_like(x0, at::MemoryFormat::Contiguous);
  cuda::NoiseParams p{};
  p.x0 = x0.data_ptr();
  p.xt = xt.data_ptr();
  p.t_in = given ? t_given.data_ptr<int64_t>() : nullptr;
  p.t_out = t.data_ptr<int64_t>();
  p.tables = tables.data_ptr<float>();
  p.T = T;
  p.B = B;
  p.n = x0.numel() / B;
  p.call = call.data_ptr<int64_t>();
  p.k0 = static_cast<uint32_t>(k0);
  p.k1 = static_cast<uint32_t>(k1);
  p.mirror = mirror;
  p.pivot = static_cast<int32_t>(pivot);
  p.dtype = dtype_code(x0);
  check_launch(cuda::launch_noise(p, num_sms(), c10::cuda::getCurrentCUDAStream().stream()), "noise");
  call.add_(1);  // stream-ordered after the kernel that read it: no host sync
  return {xt, t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_cuda(const at::Tensor& pred_in, const at::Tensor& x0_in,
                                                         const at::Tensor& t_in, const at::Tensor& tables_in,
                                                         int64_t k0, int64_t k1, const at::Tensor& call,
                                                         int64_t target, bool learn_sigma, bool reduce_mean,
                                                         bool with_grad) {
  check_loss_args(pred_in, x0_in, t_in, tables_in, k0, k1, call, target, learn_sigma);
  TORCH_CHECK(!with_grad || reduce_mean, "speed_kernels::loss: with_grad needs reduce_mean (the forward writes "
              "the gradient of the batch mean; reduction none recomputes it in loss_backward)");
  check_cuda_tensor(x0_in, "x0");
  c10::cuda::CUDAGuard guard(x0_in.device());
  const at::Tensor pred = pred_in.contiguous(), x0 = x0_in.contiguous(), t = t_in.contiguous();
  const at::Tensor tables = tables_in.contiguous();
  const int64_t B = x0.size(0);
  at::Tensor terms = at::empty({2, B}, x0.options().dtype(at::kFloat));
  at::Tensor loss = reduce_mean ? at::empty({}, x0.options().dtype(at::kFloat)) : at::empty({B}, x0.options().dtype(at::kFloat));
  at::Tensor grad = with_grad ? at::empty_like(pred, at::MemoryFormat::Contiguous) : at::empty({0}, pred.options());
  run_loss(pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean, with_grad ? grad.data_ptr() : nullptr,
           nullptr, reduce_mean ? static_cast<float>(1.0 / static_cast<double>(B)) : 1.0f, terms.data_ptr<float>(),
           loss.data_ptr<float>());
  return {loss, terms, grad};
}

at::Tensor loss_backward_cuda(const at::Tensor& grad_loss_in, const at::Tensor& pred_in, const at::Tensor& x0_in,
                              const at::Tensor& t_in, const at::Tensor& tables_in, int64_t k0, int64_t k1,
                              const at::Tensor& call, int64_t target, bool learn_sigma) {
  check_loss_args(pred_in, x0_in, t_in, tables_in, k0, k1, call, target, learn_sigma);
  check_cuda_tensor(x0_in, "x0");
  check_same_device(x0_in, grad_loss_in, "grad_loss");
  const int64_t B = x0_in.size(0);
  TORCH_CHECK_VALUE(grad_loss_in.numel() == B, "grad_loss must hold one value per sample (", B, "), got shape ",
                    grad_loss_in.sizes());
  c10::cuda::CUDAGuard guard(x0_in.device());
  const at::Tensor grad_loss = grad_loss_in.reshape({B}).to(at::kFloat).contiguous();
  const at::Tensor pred = pred_in.contiguous(), x0 = x0_in.contiguous(), t = t_in.contiguous();
  const at::Tensor tables = tables_in.contiguous();
  at::Tensor grad = at::empty_like(pred, at::MemoryFormat::Contiguous);
  run_loss(pred, x0, t, tables, k0, k1, call, target, learn_sigma, false, grad.data_ptr(), grad_loss.data_ptr<float>(),
           1.0f, nullptr, nullptr);
  return grad;
}

// ---- flow matching ---------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> flow_noise_cuda(const at::Tensor& x0_in, const std::optional<at::Tensor>& sigma_in,
                                                   const at::Tensor& tables_in, int64_t k0, int64_t k1,
                                                   const at::Tensor& call) {
  check_x0(x0_in);
  check_cuda_tensor(x0_in, "x0");
  check_flow_tables(x0_in, tables_in, k0, k1);
  check_call(x0_in, call);
  c10::cuda::CUDAGuard guard(x0_in.device());
  const at::Tensor x0 = x0_in.contiguous();
  const at::Tensor tables = tables_in.contiguous();
  const int64_t B = x0.size(0);
  const bool given = sigma_in.has_value() && sigma_in->defined();
  at::Tensor sigma;
  if (given) {
    sigma = given_sigma(x0, *sigma_in);
  } else {
    sigma = at::empty({B}, x0.options().dtype(at::kFloat));
  }
  at::Tensor xt = at::empty_like(x0, at::MemoryFormat::Contiguous);
  cuda::FlowNoiseParams p{};
  p.x0 = x0.data_ptr();
  p.xt = xt.data_ptr();
  p.sigma = sigma.data_ptr<float>();
  p.draw = !given;
  p.tables = tables.data_ptr<float>();
  p.W = tables.size(1);
  p.B = B;
  p.n = x0.numel() / B;
  p.call = call.data_ptr<int64_t>();
  p.k0 = static_cast<uint32_t>(k0);
  p.k1 = static_cast<uint32_t>(k1);
  p.dtype = dtype_code(x0);
  check_launch(cuda::launch_flow_noise(p, num_sms(), c10::cuda::getCurrentCUDAStream().stream()), "flow_noise");
  call.add_(1);  // stream-ordered after the kernel that read it: no host sync
  return {xt, sigma};
}

std::tuple<at::Tensor, at::Tensor> flow_loss_cuda(const at::Tensor& pred_in, const at::Tensor& x0_in,
                                                  const at::Tensor& sigma_in, const at::Tensor& tables_in, int64_t k0,
                                                  int64_t k1, const at::Tensor& call_used, int64_t target,
                                                  bool inv_sigma2, bool with_grad) {
  check_x0(x0_in);
  check_cuda_tensor(x0_in, "x0");
  check_flow_loss_args(pred_in, x0_in, sigma_in, tables_in, k0, k1, call_used, target);
  c10::cuda::CUDAGuard guard(x0_in.device());
  const at::Tensor pred = pred_in.contiguous(), x0 = x0_in.contiguous();
  const at::Tensor sigma = sigma_in.to(at::kFloat).contiguous();
  const at::Tensor tables = tables_in.contiguous();
  const int64_t B = x0.size(0);
  at::Tensor per = at::empty({B}, x0.options().dtype(at::kFloat));
  at::Tensor grad = with_grad ? at::empty_like(pred, at::MemoryFormat::Contiguous) : at::empty({0}, pred.options());
  cuda::FlowLossParams p{};
  p.pred = pred.data_ptr();
  p.x0 = x0.data_ptr();
  p.sigma = sigma.data_ptr<float>();
  p.tables = tables.data_ptr<float>();
  p.W = tables.size(1);
  p.B = B;
  p.n = x0.numel() / B;
  p.call_used = call_used.data_ptr<int64_t>();
  p.k0 = static_cast<uint32_t>(k0);
  p.k1 = static_cast<uint32_t>(k1);
  p.target = static_cast<int>(target);
  p.inv_sigma2 = inv_sigma2;
  p.pred_dtype = dtype_code(pred);
  p.x0_dtype = dtype_code(x0);
  p.grad = with_grad ? grad.data_ptr() : nullptr;
  const int sms = num_sms();
  at::Tensor partial = at::empty({B * cuda::loss_blocks_per_sample(B, p.n, sms)}, x0.options().dtype(at::kFloat));
  p.partial = partial.data_ptr<float>();
  p.per = per.data_ptr<float>();
  check_launch(cuda::launch_flow_loss(p, sms, c10::cuda::getCurrentCUDAStream().stream()), "flow_loss");
  return {per, grad};
}

}  // namespace speed_kernels
