// Registration of the ops in the `speed_kernels` torch library (schemas, CPU and CUDA kernels).
// No Python here: the CMake library for C++ embedders links this file too.
//
// Ops (the Python side, speed_kernels/_ext.py, adds fake kernels for torch.compile and autograd):
//   noise(x0, t_in?, tables, k0, k1, call!, mirror, pivot) -> (x_t, t)          advances call by one
//   loss(pred, x0, t, tables, k0, k1, call, target, learn_sigma, reduce_mean, with_grad)
//        -> (loss, terms [2, B], grad)   grad = d loss / d pred (empty when with_grad is false)
//   loss_backward(grad_loss [B], pred, x0, t, tables, k0, k1, call, target, learn_sigma) -> grad
//   flow_noise(x0, sigma_in?, tables, k0, k1, call!) -> (x_t, sigma)   flow matching (flow_cpu.cpp)
//   flow_loss(pred, x0, sigma, tables, k0, k1, call_used, target, inv_sigma2, with_grad) -> (per, grad)
// `call` is the device counter: noise uses its value and increments it; loss uses call - 1.
#include <torch/library.h>

#include "flow_ops.h"
#include "ops.h"

namespace sk = speed_kernels;

TORCH_LIBRARY(speed_kernels, m) {
  m.def(
      "noise(Tensor x0, Tensor? t_in, Tensor tables, int k0, int k1, Tensor(a!) call, bool mirror, int pivot)"
      " -> (Tensor, Tensor)");
  m.def(
      "loss(Tensor pred, Tensor x0, Tensor t, Tensor tables, int k0, int k1, Tensor call, int target,"
      " bool learn_sigma, bool reduce_mean, bool with_grad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "loss_backward(Tensor grad_loss, Tensor pred, Tensor x0, Tensor t, Tensor tables, int k0, int k1,"
      " Tensor call, int target, bool learn_sigma) -> Tensor");
  m.def("flow_noise(Tensor x0, Tensor? sigma_in, Tensor tables, int k0, int k1, Tensor(a!) call) -> (Tensor, Tensor)");
  m.def(
      "flow_loss(Tensor pred, Tensor x0, Tensor sigma, Tensor tables, int k0, int k1, Tensor call_used, int target,"
      " bool inv_sigma2, bool with_grad) -> (Tensor, Tensor)");
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
}
#endif
