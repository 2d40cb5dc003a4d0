// Smoke test of the CMake library: the ops are reachable through the torch dispatcher (as a C++
// embedder would call them), draw t in range, advance the counter, and the loss gradient is the
// analytic ε-MSE gradient.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>

int main() {
  const int64_t B = 8, T = 1000;
  auto tables = torch::zeros({10, T});
  tables[0] = torch::linspace(1.0, 0.0, T).sqrt();   // sqrt(alphabar)
  tables[1] = torch::linspace(0.0, 1.0, T).sqrt();   // sqrt(1 - alphabar)
  tables[2] = torch::ones({T});                      // weights
  tables[3] = torch::linspace(1.0 / T, 1.0, T);      // uniform CDF
  auto x0 = torch::randn({B, 3, 8, 8});
  auto call = torch::zeros({1}, torch::kLong);
  auto noise = c10::Dispatcher::singleton()
                   .findSchemaOrThrow("speed_kernels::noise", "")
                   .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&,
                                                             const at::Tensor&, int64_t, int64_t, const at::Tensor&,
                                                             bool, int64_t)>();
  auto loss = c10::Dispatcher::singleton()
                  .findSchemaOrThrow("speed_kernels::loss", "")
                  .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
                      const at::Tensor&, int64_t, bool, bool, bool)>();
  auto [x_t, t] = noise.call(x0, std::nullopt, tables, 1, 2, call, false, 0);
  int fails = 0;
  if (call.item<int64_t>() != 1) { std::printf("FAIL: call not advanced\n"); ++fails; }
  if (t.min().item<int64_t>() < 0 || t.max().item<int64_t>() >= T) { std::printf("FAIL: t out of range\n"); ++fails; }
  // eps recovered from x_t, then the loss of pred = 0 is mean(eps^2) and its gradient -2 eps / (n B)
  auto sab = tables[0].index_select(0, t).view({B, 1, 1, 1});
  auto s1 = tables[1].index_select(0, t).view({B, 1, 1, 1});
  auto keep = (s1 > 1e-3).view({B});
  auto eps = (x_t - sab * x0) / s1.clamp_min(1e-3);
  auto pred = torch::zeros_like(x0);
  auto [l, terms, grad] = loss.call(pred, x0, t, tables, 1, 2, call, 0, false, true, true);
  auto want = -2.0 * eps / (3 * 8 * 8) / B;
  auto err = (grad - want).abs().index({keep}).max().item<float>();
  if (!(err < 1e-4)) { std::printf("FAIL: gradient error %g\n", err); ++fails; }
  if (!(l.item<float>() > 0.5f && l.item<float>() < 1.5f)) { std::printf("FAIL: loss %g\n", l.item<float>()); ++fails; }
  if (fails) return 1;
  std::printf("cpu ops smoke test passed (loss %.4f)\n", l.item<float>());
  return 0;
}
