// Registration of the ops in the `speed_kernels` torch library (schemas, CPU and CUDA kernels).
// No Python here: the CMake library for C++ embedders links this file too.
//
// Ops (schemas and contract: speed_kernels/op_schema.py, which also holds the fake kernels):
//   noise(x0, t_in?, tables, k0, k1, call!, mirror, pivot) -> (x_t, t)          advances call by one
//   loss(pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean, with_grad)
//        -> (loss, terms [2, B], grad)   grad = d loss / d pred (empty when with_grad is false)
//   loss_backward(grad_loss [B], pred, x0, t, tables, k0, k1, call, target, learn_sigma) -> grad
//   flow_noise(x0, sigma_in?, tables, k0, k1, call!) -> (x_t, sigma)   flow matching (flow_cpu.cpp)
//   flow_loss(pred, x0, sigma, tables, k0, k1, call_used, target, inv_sigma2, with_grad) -> (per, grad)
// `call` is the device counter: noise uses its value and increments it; loss uses call - 1.
//
// The autograd formula of `loss` lives here too (one C++ autograd node per step): registered from
// Python with torch.library.register_autograd it cost ~100 us of interpreter time per call on the
// CPU (argument normalisation, a Python autograd.Function), more than the kernels at small sizes.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include "flow_ops.h"
#include "op_schemas.h"
#include "ops.h"

namespace sk = speed_kernels;

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using LossSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                               const at::Tensor&, const at::Tensor&, int64_t,
                                                               int64_t, const at::Tensor&, int64_t, bool, bool,
                                                               bool);
using LossBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, int64_t, int64_t, const at::Tensor&, int64_t, bool);

// A tensor we may scale in place: a real eager tensor, no tracing (fake / functional tensors, a
// dispatch mode) and no double backward (create_graph needs the graph of the multiplication).
bool eager_plain(const at::Tensor& x) {
  const c10::DispatchKeySet traced({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                    c10::DispatchKey::Functionalize});
  return !x.key_set().has_any(traced) && !x.is_meta() && c10::impl::TorchDispatchModeTLS::stack_len() == 0 &&
         !at::GradMode::is_enabled();
}

// loss(...) -> (loss, terms, grad). Mean reduction with with_grad: the forward already wrote
// d loss / d pred, backward scales it by grad_output. Otherwise backward recomputes the gradient,
// fused with the per-sample grad_output, from the inputs (x0, t, the counter snapshot).
struct LossFunction : public torch::autograd::Function<LossFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& x0,
                               const at::Tensor& t, const at::Tensor& tables, int64_t k0, int64_t k1,
                               const at::Tensor& call, int64_t target, bool learn_sigma, bool reduce_mean,
                               bool with_grad) {
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("speed_kernels::loss", "").typed<LossSig>();
    at::Tensor loss, terms, grad;
    {
      at::AutoDispatchBelowADInplaceOrView below;  // to the CPU / CUDA kernel, not back here
      std::tie(loss, terms, grad) = op.call(pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean, with_grad);
    }
    ctx->set_materialize_grads(false);  // terms / grad carry no gradient: no pred-sized zeros for them
    ctx->mark_non_differentiable({terms, grad});
    ctx->saved_data["reduce_mean"] = reduce_mean;
    ctx->saved_data["with_grad"] = with_grad;
    if (reduce_mean) {
      ctx->save_for_backward({grad});
    } else {
      ctx->saved_data["k0"] = k0;
      ctx->saved_data["k1"] = k1;
      ctx->saved_data["target"] = target;
      ctx->saved_data["learn_sigma"] = learn_sigma;
      ctx->save_for_backward({pred, x0, t, tables, call});
    }
    return {loss, terms, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list out(11);
    const at::Tensor& grad_loss = grad_outputs[0];
    if (!grad_loss.defined()) return out;
    auto saved = ctx->get_saved_variables();
    if (ctx->saved_data["reduce_mean"].toBool()) {
      TORCH_CHECK(ctx->saved_data["with_grad"].toBool(),
                  "speed_kernels::loss was run with with_grad=False; call it with with_grad=True to backprop");
      at::Tensor& grad = saved[0];
      const at::Tensor g = grad_loss.to(grad.scalar_type());
      // Eager: in place, the buffer is ours and used once (a retain_graph second backward fails the
      // saved-tensor version check instead of scaling twice); saves a pred-sized allocation.
      out[0] = eager_plain(grad) ? grad.mul_(g) : grad.mul(g);
    } else {
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("speed_kernels::loss_backward", "")
                           .typed<LossBackwardSig>();
      out[0] = op.call(grad_loss, saved[0], saved[1], saved[2], saved[3], ctx->saved_data["k0"].toInt(),
                       ctx->saved_data["k1"].toInt(), saved[4], ctx->saved_data["target"].toInt(),
                       ctx->saved_data["learn_sigma"].toBool());
    }
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_autograd(const at::Tensor& pred, const at::Tensor& x0,
                                                             const at::Tensor& t, const at::Tensor& tables,
                                                             int64_t k0, int64_t k1, const at::Tensor& call,
                                                             int64_t target, bool learn_sigma, bool reduce_mean,
                                                             bool with_grad) {
  auto r = LossFunction::apply(pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean, with_grad);
  return {r[0], r[1], r[2]};
}

}  // namespace

TORCH_LIBRARY(speed_kernels, m) {
  // the schemas are declared once, in speed_kernels/op_schema.py (generated into op_schemas.h)
  m.def(SK_SCHEMA_NOISE);
  m.def(SK_SCHEMA_LOSS);
  m.def(SK_SCHEMA_LOSS_BACKWARD);
  m.def(SK_SCHEMA_FLOW_NOISE);
  m.def(SK_SCHEMA_FLOW_LOSS);
}

TORCH_LIBRARY_IMPL(speed_kernels, CPU, m) {
  m.impl("noise", &sk::noise_cpu);
  m.impl("loss", &sk::loss_cpu);
  m.impl("loss_backward", &sk::loss_backward_cpu);
  m.impl("flow_noise", &sk::flow_noise_cpu);
  m.impl("flow_loss", &sk::flow_loss_cpu);
}

#ifdef SPEED_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(speed_kernels, CUDA, m) {
  m.impl("noise", &sk::noise_cuda);
  m.impl("loss", &sk::loss_cuda);
  m.impl("loss_backward", &sk::loss_backward_cuda);
  m.impl("flow_noise", &sk::flow_noise_cuda);
  m.impl("flow_loss", &sk::flow_loss_cuda);
}
#endif

// One autograd kernel for every device (the forward redispatches to the CPU / CUDA kernel).
TORCH_LIBRARY_IMPL(speed_kernels, Autograd, m) { m.impl("loss", &loss_autograd); }
