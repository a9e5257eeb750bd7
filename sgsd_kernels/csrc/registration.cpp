// torch.ops.sgsd_native: every native operator's schema and its CPU kernel, in one place.
// The Python backends (sgsd_kernels/ops/native_backend/) call these from inside the
// package's custom ops, which own autograd and the fake (meta) implementations.

#include <torch/library.h>

#include "ops.h"
#include "probe.h"

TORCH_LIBRARY(sgsd_native, m) {
  // True when bf16 inputs run on bf16 GEMMs here (engines.h, Bf16Tiles).
  m.def("bf16_gemms() -> bool", &sgsd_native::bf16_gemms);
  // (rows, vocabulary entries) of one tile at this shape: the benchmark's GEMM yardstick.
  m.def("tile_plan(int N, int V, int H) -> int[]", &sgsd_native::tile_plan);
  // Seconds per call of the engine's logits GEMM and gradient GEMMs at one tile (probe.h).
  m.def("tile_gemm_seconds(Tensor hidden, Tensor weight, int reps) -> float[]",
        &sgsd_native::tile_gemm_seconds);

  // linear_logprobs.cpp
  m.def(
      "linear_logprobs_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
      "float inv_temperature, int ignore_index, bool with_entropy, float? softcap=None) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "linear_logprobs_backward(Tensor grad_logprobs, Tensor? grad_entropy, Tensor hidden, "
      "Tensor weight, Tensor? bias, Tensor targets, Tensor lse, Tensor? entropy, "
      "float inv_temperature, int ignore_index, bool need_weight_grad, float? softcap=None) "
      "-> (Tensor, Tensor, Tensor)");

  // divergence.cpp: both overwrite their logits chunks in place (the (a!) annotations).
  m.def(
      "divergence_forward(Tensor(a!) zs, Tensor(b!) zt, Tensor? top, float beta, float? clip, "
      "bool unit_grad) -> Tensor");
  m.def(
      "divergence_grad(Tensor(a!) zs, Tensor zt, Tensor? top, Tensor lse_s, Tensor lse_t, "
      "Tensor sum_e, float beta, float? clip) -> ()");

  // local_support.cpp
  m.def(
      "local_support_teacher(Tensor logits, Tensor targets, int k, float inv_temperature) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "local_support_student(Tensor hidden, Tensor weight, Tensor? bias, Tensor student_row, "
      "Tensor columns, Tensor t_local, Tensor in_support, float inv_temperature) "
      "-> (Tensor, Tensor)");
  m.def(
      "local_support_backward(Tensor grad, Tensor hidden, Tensor weight, Tensor? bias, "
      "Tensor student_row, Tensor columns, Tensor t_local, Tensor in_support, "
      "float inv_temperature, bool need_weight_grad) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sgsd_native, CPU, m) {
  m.impl("linear_logprobs_forward", &sgsd_native::linear_logprobs_forward);
  m.impl("linear_logprobs_backward", &sgsd_native::linear_logprobs_backward);
  m.impl("divergence_forward", &sgsd_native::divergence_forward);
  m.impl("divergence_grad", &sgsd_native::divergence_grad);
  m.impl("local_support_teacher", &sgsd_native::local_support_teacher);
  m.impl("local_support_student", &sgsd_native::local_support_student);
  m.impl("local_support_backward", &sgsd_native::local_support_backward);
}
