// The `speed_kernels._C` Python module: plain Python helpers (the op registrations live in
// registration.cpp, linked into the same shared object, so importing _C registers the ops).
// Only pybind11 (no torch headers): nothing here touches a tensor, and torch/extension.h is the
// slowest header of the build by far.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "philox.h"

namespace py = pybind11;

namespace sk = speed_kernels;

namespace speed_kernels {
const char* cpu_isa_in_use();  // cpu_ops.cpp
}

namespace {

bool has_cuda() {
#ifdef SPEED_KERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// Known-answer helper: the four output words of Philox4x32-10 for a counter and key.
std::vector<int64_t> philox4x32(int64_t c0, int64_t c1, int64_t c2, int64_t c3, int64_t k0, int64_t k1) {
  const sk::PhiloxOut o = sk::philox4x32_10(static_cast<uint32_t>(c0), static_cast<uint32_t>(c1),
                                            static_cast<uint32_t>(c2), static_cast<uint32_t>(c3),
                                            static_cast<uint32_t>(k0), static_cast<uint32_t>(k1));
  return {o.w0, o.w1, o.w2, o.w3};
}

std::pair<int64_t, int64_t> fold_key(uint64_t seed, uint64_t rank) {
  uint32_t k0, k1;
  sk::fold_key(seed, rank, k0, k1);
  return {k0, k1};
}

// The four normals of one element group (the CPU header path), for tests of the conversion.
std::vector<float> group_normals(int64_t g, int64_t sample, int64_t call, int64_t k0, int64_t k1) {
  float out[4];
  sk::group_normals(static_cast<uint32_t>(g), static_cast<uint32_t>(sample), static_cast<uint32_t>(call),
                    static_cast<uint32_t>(k0), static_cast<uint32_t>(k1), out);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "speed-kernels compiled ops (registered as torch.ops.speed_kernels.*) and helpers";
  m.def("has_cuda", &has_cuda, "whether the CUDA kernels were compiled in");
  m.def("philox4x32", &philox4x32, "Philox4x32-10 output words for counter (c0..c3) and key (k0, k1)");
  m.def("fold_key", &fold_key, "(k0, k1) of seed ^ (rank * golden ratio)");
  m.def("group_normals", &group_normals, "the four normals of element group g (C++ header path)");
  m.def("cpu_isa", [] { return std::string(sk::cpu_isa_in_use()); },
        "the CPU loop variant the ops run now: 'avx2' or 'generic' (SPEED_KERNELS_CPU_ISA=generic forces it)");
#if defined(__x86_64__) && defined(__GNUC__)
  m.attr("cpu_avx2") = py::bool_(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
#else
  m.attr("cpu_avx2") = py::bool_(false);  // other CPUs run the portable loops
#endif
}
