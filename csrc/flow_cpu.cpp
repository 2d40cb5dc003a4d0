// CPU kernels of the flow-matching ops (the `cpp` flow backend, speed_kernels/flow.py).
//
//   flow_noise(x0, sigma_in?, tables, k0, k1, call!) -> (x_t, sigma)
//       sigma drawn per sample (Philox stream 2, exact-slope inverse-CDF table) unless given;
//       x_t = (1 - sigma) x0 + sigma eps; advances call by one.
//   flow_loss(pred, x0, sigma, tables, k0, k1, call_used, target, inv_sigma2, with_grad) -> (per [B], grad)
//       per[b] = w(sigma_b) * mean((pred - target)^2), target 0 eps / 1 eps - x0 / 2 x0, with eps of
//       call index call_used; grad = d sum(per) / d pred (empty unless with_grad).
// Flow table rows and arithmetic: flow_table.h (shared with the CUDA kernels).
// Per-sample work runs under at::parallel_for in chunks of 64 elements; eps comes from the DDPM
// ops' vectorised generator and eps cache (cpu_eps.h): the noise op leaves its eps for the loss op
// of the same call. eps agrees with the reference to float rounding, sigma bit for bit (philox.h).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <tuple>

#include "cpu_eps.h"
#include "flow_table.h"
#include "ops.h"
#include "philox.h"

namespace speed_kernels {
namespace {

template <typename F>
void dispatch_float(at::ScalarType st, F&& fn) {
  switch (st) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", st);
  }
}

// Samples per task, so that a task holds at least ~16K elements (thread start-up is not free).
int64_t flow_grain(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> flow_noise_cpu(const at::Tensor& x0_in, const std::optional<at::Tensor>& sigma_in,
                                                  const at::Tensor& tables_in, int64_t k0, int64_t k1,
                                                  const at::Tensor& call) {
  check_x0(x0_in);
  TORCH_CHECK_VALUE(x0_in.device().is_cpu(), "x0 must be a CPU tensor for the cpp flow ops, got ", x0_in.device());
  check_flow_tables(x0_in, tables_in, k0, k1);
  check_call(x0_in, call);
  const at::Tensor x0 = x0_in.contiguous();
  const at::Tensor tables = tables_in.contiguous();
  const int64_t B = x0.size(0);
  const int64_t n = x0.numel() / B;
  const int32_t nq = static_cast<int32_t>(tables.size(1) - 1);
  const uint32_t c = static_cast<uint32_t>(call.data_ptr<int64_t>()[0]);
  const uint32_t u0 = static_cast<uint32_t>(k0), u1 = static_cast<uint32_t>(k1);
  at::Tensor sigma;
  if (sigma_in.has_value() && sigma_in->defined()) {
    sigma = given_sigma(x0, *sigma_in);
  } else {
    sigma = at::empty({B}, x0.options().dtype(at::kFloat));
    const float* q = tables.data_ptr<float>() + FLOW_ROW_Q * tables.size(1);
    const float* dq = tables.data_ptr<float>() + FLOW_ROW_DQ * tables.size(1);
    float* sp = sigma.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) sp[b] = flow_draw_sigma(q, dq, nq, static_cast<uint32_t>(b), c, u0, u1);
  }
  at::Tensor xt = at::empty_like(x0);
  const float* sp = sigma.data_ptr<float>();
  const bool avx2 = cpu_use_avx2();
  float* eps_out = eps_cache_begin(x0.numel());  // for the loss op of this call
  dispatch_float(x0.scalar_type(), [&](auto tag) {
    using X = decltype(tag);
    const X* xp = x0.data_ptr<X>();
    X* op = xt.data_ptr<X>();
    at::parallel_for(0, B, flow_grain(n), [&](int64_t b0, int64_t b1) {
      alignas(64) float eps[EPS_CHUNK];
      for (int64_t b = b0; b < b1; ++b) {
        const float s = sp[b];
        const X* xr = xp + b * n;
        X* orow = op + b * n;
        for (int64_t e0 = 0; e0 < n; e0 += EPS_CHUNK) {
          eps_chunk64(static_cast<uint32_t>(e0 / 4), static_cast<uint32_t>(b), c, u0, u1, eps, avx2);
          const int64_t m = std::min<int64_t>(EPS_CHUNK, n - e0);
          for (int64_t j = 0; j < m; ++j)
            orow[e0 + j] = static_cast<X>((1.0f - s) * static_cast<float>(xr[e0 + j]) + s * eps[j]);
          if (eps_out) std::memcpy(eps_out + b * n + e0, eps, static_cast<size_t>(m) * sizeof(float));
        }
      }
    });
  });
  if (eps_out) eps_cache_commit(call.data_ptr<int64_t>()[0], u0, u1, B, n);
  call.add_(1);
  return {xt, sigma};
}

std::tuple<at::Tensor, at::Tensor> flow_loss_cpu(const at::Tensor& pred_in, const at::Tensor& x0_in,
                                                 const at::Tensor& sigma_in, const at::Tensor& tables_in, int64_t k0,
                                                 int64_t k1, const at::Tensor& call_used, int64_t target,
                                                 bool inv_sigma2, bool with_grad) {
  check_x0(x0_in);
  TORCH_CHECK_VALUE(x0_in.device().is_cpu(), "x0 must be a CPU tensor for the cpp flow ops, got ", x0_in.device());
  check_flow_loss_args(pred_in, x0_in, sigma_in, tables_in, k0, k1, call_used, target);
  const at::Tensor pred = pred_in.contiguous();
  const at::Tensor x0 = x0_in.contiguous();
  const at::Tensor sigma = sigma_in.to(at::kFloat).contiguous();
  const at::Tensor tables = tables_in.contiguous();
  const int64_t B = x0.size(0);
  const int64_t n = x0.numel() / B;
  const int32_t nw = static_cast<int32_t>(tables.size(1) - 1);
  const float* wrow = tables.data_ptr<float>() + FLOW_ROW_W * tables.size(1);
  const uint32_t c = static_cast<uint32_t>(call_used.data_ptr<int64_t>()[0]);
  const uint32_t u0 = static_cast<uint32_t>(k0), u1 = static_cast<uint32_t>(k1);
  at::Tensor per = at::empty({B}, x0.options().dtype(at::kFloat));
  at::Tensor grad = with_grad ? at::empty_like(pred) : at::empty({0}, pred.options());
  float* perp = per.data_ptr<float>();
  const float* sp = sigma.data_ptr<float>();
  const bool avx2 = cpu_use_avx2();
  dispatch_float(pred.scalar_type(), [&](auto ptag) {
    using P = decltype(ptag);
    dispatch_float(x0.scalar_type(), [&](auto xtag) {
      using X = decltype(xtag);
      const P* pp = pred.data_ptr<P>();
      const X* xp = x0.data_ptr<X>();
      P* gp = with_grad ? grad.data_ptr<P>() : nullptr;
      const float* cached = target == 2 ? nullptr : eps_cache_find(call_used.data_ptr<int64_t>()[0], u0, u1, B, n);
      at::parallel_for(0, B, flow_grain(n), [&](int64_t b0, int64_t b1) {
        alignas(64) float eps_buf[EPS_CHUNK];
        alignas(64) float sq[EPS_CHUNK];
        for (int64_t b = b0; b < b1; ++b) {
          const float w = flow_weight(wrow, nw, sp[b], inv_sigma2);
          const float gscale = 2.0f * w / static_cast<float>(n);
          const P* pr = pp + b * n;
          const X* xr = xp + b * n;
          P* gr = gp ? gp + b * n : nullptr;
          double sse = 0.0;  // 8 float lanes per chunk, double across chunks: fixed order, any thread count
          for (int64_t e0 = 0; e0 < n; e0 += EPS_CHUNK) {
            const int64_t m = std::min<int64_t>(EPS_CHUNK, n - e0);
            const float* eps = eps_buf;
            if (target == 2) {
              // x0 target: no eps needed
            } else if (cached) {
              eps = cached + b * n + e0;  // only [0, m) is read
            } else {
              eps_chunk64(static_cast<uint32_t>(e0 / 4), static_cast<uint32_t>(b), c, u0, u1, eps_buf, avx2);
            }
            for (int64_t j = m; j < EPS_CHUNK; ++j) sq[j] = 0.0f;
            if (target == 0) {
              for (int64_t j = 0; j < m; ++j) sq[j] = static_cast<float>(pr[e0 + j]) - eps[j];
            } else if (target == 1) {
              for (int64_t j = 0; j < m; ++j)
                sq[j] = static_cast<float>(pr[e0 + j]) - (eps[j] - static_cast<float>(xr[e0 + j]));
            } else {
              for (int64_t j = 0; j < m; ++j) sq[j] = static_cast<float>(pr[e0 + j]) - static_cast<float>(xr[e0 + j]);
            }
            if (gr) {
              for (int64_t j = 0; j < m; ++j) gr[e0 + j] = static_cast<P>(sq[j] * gscale);
            }
            for (int64_t j = 0; j < m; ++j) sq[j] = sq[j] * sq[j];
            sse += chunk_sum64(sq);
          }
          perp[b] = static_cast<float>(sse / static_cast<double>(n)) * w;
        }
      });
    });
  });
  return {per, grad};
}

}  // namespace speed_kernels
