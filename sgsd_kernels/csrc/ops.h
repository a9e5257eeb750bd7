// The native operators registered as torch.ops.sgsd_native (registration.cpp holds their
// schemas); each is defined in the source file of its op.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace sgsd_native {

// linear_logprobs.cpp: log p(target), entropy and their gradients from hidden states and W
// (softcap: the logits c·tanh(z/c) before the temperature, docs/design.md §3.3).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, double inv_temperature, int64_t ignore_index, bool with_entropy,
    std::optional<double> softcap);
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_backward(
    const at::Tensor& grad_logprobs, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& targets, const at::Tensor& lse, const std::optional<at::Tensor>& entropy,
    double inv_temperature, int64_t ignore_index, bool need_weight_grad,
    std::optional<double> softcap);
bool bf16_gemms();
std::vector<int64_t> tile_plan(int64_t N, int64_t V, int64_t H);

// divergence.cpp: the fused element-wise pass of linear_divergence over one row chunk.
at::Tensor divergence_forward(at::Tensor zs, at::Tensor zt, const std::optional<at::Tensor>& top,
                              double beta, std::optional<double> clip, bool unit_grad);
void divergence_grad(at::Tensor zs, const at::Tensor& zt, const std::optional<at::Tensor>& top,
                     const at::Tensor& lse_s, const at::Tensor& lse_t, const at::Tensor& sum_e,
                     double beta, std::optional<double> clip);

// local_support.cpp: the top-k local support terms.
std::tuple<at::Tensor, at::Tensor, at::Tensor> local_support_teacher(const at::Tensor& logits,
                                                                     const at::Tensor& targets,
                                                                     int64_t k,
                                                                     double inv_temperature);
std::tuple<at::Tensor, at::Tensor> local_support_student(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& student_row, const at::Tensor& columns, const at::Tensor& t_local,
    const at::Tensor& in_support, double inv_temperature);
std::tuple<at::Tensor, at::Tensor, at::Tensor> local_support_backward(
    const at::Tensor& grad, const at::Tensor& hidden, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& student_row,
    const at::Tensor& columns, const at::Tensor& t_local, const at::Tensor& in_support,
    double inv_temperature, bool need_weight_grad);

}  // namespace sgsd_native
