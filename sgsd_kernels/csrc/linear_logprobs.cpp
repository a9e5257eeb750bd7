// Native CPU kernels for the linear log-prob op (docs/design.md §5, "native" backend):
// log p(target), optional entropy, and their gradients straight from hidden states and
// the LM-head weight, never materialising N×V logits.
//
// Work split (both passes): the vocabulary is cut into blocks of `vblock` rows of W, and
// task t of T = at::get_num_threads() owns a fixed contiguous range of vocabulary blocks.
// A task walks its blocks; for each block it keeps W[v0:v1] (converted to the compute
// dtype once per block when needed) hot and walks all row blocks, computing the
// `rows × vblock` logits tile with one GEMM (at::mm_out into a per-task buffer) and then
// the whole epilogue on the tile while it is in cache:
//   forward:  scale/bias, row max, Σexp, Σexp·(z−m) (entropy), target pick, merged into the
//             task's running (max, sum, acc) per row;
//   backward: G = g·(onehot − p) [+ entropy term], then dh_task += G·W_blk and
//             dW_blk += Gᵀ·h_blk (dW rows are owned by exactly one task), db_blk += ΣG.
// Partials are combined in task order, so results are bitwise identical across runs at a
// fixed thread count. Measured single-threaded on the 2-core AMD EPYC dev box (MKL via
// torch.mm into a preallocated output): a 256×256×256 fp32 tile runs at ~103 GFLOP/s,
// the full N=1024, V=32768, H=256 GEMM at ~58 (its 128 MiB output leaves cache).
//
// Threads come from at::parallel_for (torch's own OpenMP runtime): compiling this file
// with -fopenmp would load a second libgomp next to the one bundled with torch. The
// elementwise loops are vectorised by the compiler (-O3 -march=native -fopenmp-simd
// -fno-trapping-math: without the last flag GCC 12 keeps the exp loop scalar, 14 ns per
// element instead of 1.6 on the loaded dev box);
// exp uses a polynomial that vectorises (below).
//
// Inputs: fp32/bf16/fp16 are computed in fp32, fp64 in fp64. Hidden is converted to the
// compute dtype once ([N,H]); a strided W is made contiguous once (a copy, in its own
// dtype); low-precision W blocks are converted per block into a per-task buffer.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <tuple>

#include "tiles.h"

namespace {

using at::Tensor;
using namespace sgsd_native;

template <typename acc_t>
std::tuple<Tensor, Tensor, Tensor> forward_impl(const Tensor& hidden_in, const Tensor& weight,
                                                const std::optional<Tensor>& bias_in,
                                                const Tensor& targets_in, double inv_temperature,
                                                int64_t ignore_index, bool with_entropy) {
  const auto dt = compute_dtype(hidden_in);
  const int64_t N = hidden_in.size(0), H = hidden_in.size(1), V = weight.size(0);
  const Tensor h = hidden_in.to(dt).contiguous();
  const Tensor targets = targets_in.to(at::kLong).contiguous();
  Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(dt).contiguous();
  const bool direct = weight.scalar_type() == dt;
  const acc_t inv_t = static_cast<acc_t>(inv_temperature);
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();

  const auto opts = h.options();
  Tensor lse = at::empty({N}, opts);
  Tensor logprobs = at::empty({N}, opts);
  Tensor entropy = at::empty({with_entropy ? N : 0}, opts);
  if (N == 0) return {logprobs, entropy, lse};

  const Plan p = make_plan(N, V, H);
  Tensor pm = at::full({p.tasks, N}, ninf, opts);
  Tensor ps = at::zeros({p.tasks, N}, opts);
  Tensor pa = at::zeros({p.tasks, N}, opts);
  // Target logit (scaled); each target lies in one block owned by one task: no race.
  Tensor tgt = at::zeros({N}, opts);
  const int64_t* tp = targets.data_ptr<int64_t>();
  acc_t* tgt_p = tgt.data_ptr<acc_t>();
  const acc_t* bp = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;

  at::parallel_for(0, p.tasks, 1, [&](int64_t t0, int64_t t1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    OneBlasThread one_blas_thread;
    Tensor tile = at::empty({p.rows * p.vblock}, opts);
    Tensor wbuf = direct ? Tensor() : at::empty({p.vblock, H}, opts);
    acc_t* zp = tile.data_ptr<acc_t>();
    for (int64_t task = t0; task < t1; ++task) {
      acc_t* m = pm[task].data_ptr<acc_t>();
      acc_t* s = ps[task].data_ptr<acc_t>();
      acc_t* a = pa[task].data_ptr<acc_t>();
      for (int64_t blk = block_begin(p, task); blk < block_begin(p, task + 1); ++blk) {
        const int64_t v0 = blk * p.vblock, nv = std::min(p.vblock, V - v0);
        const Tensor w = weight_block<acc_t>(weight, wbuf, v0, nv);
        for (int64_t r0 = 0; r0 < N; r0 += p.rows) {
          const int64_t nr = std::min(p.rows, N - r0);
          Tensor z = tile.narrow(0, 0, nr * nv).view({nr, nv});
          at::mm_out(z, h.narrow(0, r0, nr), w.t());
          for (int64_t i = 0; i < nr; ++i) {
            const int64_t r = r0 + i;
            acc_t* zr = zp + i * nv;
            scale_row(zr, nv, bp ? bp + v0 : nullptr, inv_t);
            const int64_t tr = tp[r];
            if (tr >= v0 && tr < v0 + nv) tgt_p[r] = zr[tr - v0];
            const acc_t bm = row_max(zr, nv);
            if (bm == ninf) continue;  // every logit −inf: adds nothing
            acc_t bs = 0, ba = 0;
            if (with_entropy) {
#pragma omp simd reduction(+ : bs, ba)
              for (int64_t j = 0; j < nv; ++j) {
                const acc_t d = zr[j] - bm;
                const acc_t e = exp_acc(d);
                bs += e;
                ba += e * d;
              }
            } else {
#pragma omp simd reduction(+ : bs)
              for (int64_t j = 0; j < nv; ++j) bs += exp_acc(zr[j] - bm);
            }
            merge(m[r], s[r], a[r], bm, bs, ba);
          }
        }
      }
    }
  });

  // Combine the task partials in task order (deterministic), then the outputs.
  const acc_t* pmp = pm.data_ptr<acc_t>();
  const acc_t* psp = ps.data_ptr<acc_t>();
  const acc_t* pap = pa.data_ptr<acc_t>();
  acc_t* lse_p = lse.data_ptr<acc_t>();
  acc_t* lp_p = logprobs.data_ptr<acc_t>();
  acc_t* ent_p = with_entropy ? entropy.data_ptr<acc_t>() : nullptr;
  for (int64_t r = 0; r < N; ++r) {
    acc_t m = ninf, s = 0, a = 0;
    for (int64_t task = 0; task < p.tasks; ++task)
      merge(m, s, a, pmp[task * N + r], psp[task * N + r], pap[task * N + r]);
    const acc_t log_s = std::log(s);
    lse_p[r] = m + log_s;
    const bool valid = tp[r] != ignore_index;
    // (z_t − m) − log Σ as eager log_softmax: z_t − lse loses eps·|z| to rounding.
    lp_p[r] = valid ? (tgt_p[r] - m) - log_s : acc_t(0);
    if (ent_p) ent_p[r] = valid ? log_s - a / s : acc_t(0);
  }
  return {logprobs, entropy, lse};
}

template <typename acc_t>
std::tuple<Tensor, Tensor, Tensor> backward_impl(
    const Tensor& grad_logprobs, const std::optional<Tensor>& grad_entropy,
    const Tensor& hidden_in, const Tensor& weight, const std::optional<Tensor>& bias_in,
    const Tensor& targets_in, const Tensor& lse_in, const std::optional<Tensor>& entropy_in,
    double inv_temperature, int64_t ignore_index, bool need_weight_grad) {
  const auto dt = compute_dtype(hidden_in);
  const int64_t N = hidden_in.size(0), H = hidden_in.size(1), V = weight.size(0);
  const Tensor h = hidden_in.to(dt).contiguous();
  const Tensor targets = targets_in.to(at::kLong).contiguous();
  const Tensor lse = lse_in.to(dt).contiguous();
  const bool with_entropy = grad_entropy.has_value() && entropy_in.has_value();
  Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(dt).contiguous();
  const bool direct = weight.scalar_type() == dt;
  const acc_t inv_t = static_cast<acc_t>(inv_temperature);
  const auto opts = h.options();

  // Per-row scales with the ignore mask and ∂z/∂logits = 1/T folded in.
  const int64_t* tp = targets.data_ptr<int64_t>();
  Tensor g = grad_logprobs.to(dt).contiguous().clone();
  Tensor ge = with_entropy ? grad_entropy->to(dt).contiguous().clone() : Tensor();
  Tensor ent = with_entropy ? entropy_in->to(dt).contiguous() : Tensor();
  acc_t* gp = g.data_ptr<acc_t>();
  acc_t* gep = with_entropy ? ge.data_ptr<acc_t>() : nullptr;
  for (int64_t r = 0; r < N; ++r) {
    const bool valid = tp[r] != ignore_index;
    gp[r] = valid ? gp[r] * inv_t : acc_t(0);
    if (gep) gep[r] = valid ? gep[r] * inv_t : acc_t(0);
  }
  const acc_t* lse_p = lse.data_ptr<acc_t>();
  const acc_t* ent_p = with_entropy ? ent.data_ptr<acc_t>() : nullptr;
  const acc_t* bp = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;
  const bool need_bias_grad = need_weight_grad && bias.defined();

  Tensor grad_w = need_weight_grad ? at::empty({V, H}, opts) : Tensor();
  Tensor grad_b = need_bias_grad ? at::zeros({V}, opts) : Tensor();
  acc_t* gbp = need_bias_grad ? grad_b.data_ptr<acc_t>() : nullptr;
  if (N == 0) {
    if (need_weight_grad) grad_w.zero_();
  }
  const Plan p = make_plan(std::max<int64_t>(N, 1), V, H);
  // One dh partial per task (tasks split the vocabulary, dh sums over it).
  Tensor dh_part = at::zeros({p.tasks, N, H}, opts);

  if (N > 0) {
    at::parallel_for(0, p.tasks, 1, [&](int64_t t0, int64_t t1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
    OneBlasThread one_blas_thread;
      Tensor tile = at::empty({p.rows * p.vblock}, opts);
      Tensor wbuf = direct ? Tensor() : at::empty({p.vblock, H}, opts);
      acc_t* zp = tile.data_ptr<acc_t>();
      for (int64_t task = t0; task < t1; ++task) {
        Tensor dh = dh_part[task];
        for (int64_t blk = block_begin(p, task); blk < block_begin(p, task + 1); ++blk) {
          const int64_t v0 = blk * p.vblock, nv = std::min(p.vblock, V - v0);
          const Tensor w = weight_block<acc_t>(weight, wbuf, v0, nv);
          for (int64_t r0 = 0; r0 < N; r0 += p.rows) {
            const int64_t nr = std::min(p.rows, N - r0);
            const Tensor hb = h.narrow(0, r0, nr);
            Tensor z = tile.narrow(0, 0, nr * nv).view({nr, nv});
            at::mm_out(z, hb, w.t());
            for (int64_t i = 0; i < nr; ++i) {
              const int64_t r = r0 + i;
              acc_t* zr = zp + i * nv;
              scale_row(zr, nv, bp ? bp + v0 : nullptr, inv_t);
              const acc_t l = lse_p[r], gr = gp[r];
              if (with_entropy) {
                // ∂H/∂z_j = −p_j (log p_j + H): G = −p (g + ge (log p + H)).
                const acc_t ger = gep[r], hr = ent_p[r];
#pragma omp simd
                for (int64_t j = 0; j < nv; ++j) {
                  const acc_t lp = zr[j] - l;
                  zr[j] = -exp_acc(lp) * (gr + ger * (lp + hr));
                }
              } else {
#pragma omp simd
                for (int64_t j = 0; j < nv; ++j) zr[j] = -gr * exp_acc(zr[j] - l);
              }
              const int64_t tr = tp[r];
              if (tr >= v0 && tr < v0 + nv) zr[tr - v0] += gr;
              if (gbp) {
                acc_t* db = gbp + v0;  // rows of db owned by this task
#pragma omp simd
                for (int64_t j = 0; j < nv; ++j) db[j] += zr[j];
              }
            }
            dh.narrow(0, r0, nr).addmm_(z, w);
            if (need_weight_grad) {
              Tensor dw = grad_w.narrow(0, v0, nv);
              if (r0 == 0) {
                at::mm_out(dw, z.t(), hb);
              } else {
                dw.addmm_(z.t(), hb);
              }
            }
          }
        }
      }
    });
  }

  Tensor grad_h = dh_part[0];
  for (int64_t task = 1; task < p.tasks; ++task) grad_h.add_(dh_part[task]);
  grad_h = grad_h.to(hidden_in.scalar_type());
  if (need_weight_grad) grad_w = grad_w.to(weight.scalar_type());
  else grad_w = at::empty({0}, weight.options());
  if (need_bias_grad) grad_b = grad_b.to(bias_in->scalar_type());
  else grad_b = at::empty({0}, weight.options());
  return {grad_h, grad_w, grad_b};
}

std::tuple<Tensor, Tensor, Tensor> linear_logprobs_forward(
    const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& targets, double inv_temperature, int64_t ignore_index, bool with_entropy) {
  check_inputs(hidden, weight, bias, targets);
  const Tensor hd = hidden.detach(), wd = weight.detach().contiguous();
  std::optional<Tensor> bd;
  if (bias.has_value()) bd = bias->detach();
  if (compute_dtype(hidden) == at::kDouble)
    return forward_impl<double>(hd, wd, bd, targets, inv_temperature, ignore_index, with_entropy);
  return forward_impl<float>(hd, wd, bd, targets, inv_temperature, ignore_index, with_entropy);
}

std::tuple<Tensor, Tensor, Tensor> linear_logprobs_backward(
    const Tensor& grad_logprobs, const std::optional<Tensor>& grad_entropy, const Tensor& hidden,
    const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& targets,
    const Tensor& lse, const std::optional<Tensor>& entropy, double inv_temperature,
    int64_t ignore_index, bool need_weight_grad) {
  check_inputs(hidden, weight, bias, targets);
  const int64_t N = hidden.size(0);
  TORCH_CHECK(grad_logprobs.numel() == N && lse.numel() == N,
              "sgsd native: grad_logprobs and lse must have N elements");
  const Tensor hd = hidden.detach(), wd = weight.detach().contiguous();
  std::optional<Tensor> bd;
  if (bias.has_value()) bd = bias->detach();
  if (compute_dtype(hidden) == at::kDouble)
    return backward_impl<double>(grad_logprobs.detach(), grad_entropy, hd, wd, bd, targets,
                                 lse.detach(), entropy, inv_temperature, ignore_index,
                                 need_weight_grad);
  return backward_impl<float>(grad_logprobs.detach(), grad_entropy, hd, wd, bd, targets,
                              lse.detach(), entropy, inv_temperature, ignore_index,
                              need_weight_grad);
}

}  // namespace

TORCH_LIBRARY(sgsd_native, m) {
  m.def(
      "linear_logprobs_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
      "float inv_temperature, int ignore_index, bool with_entropy) -> (Tensor, Tensor, Tensor)");
  m.def(
      "linear_logprobs_backward(Tensor grad_logprobs, Tensor? grad_entropy, Tensor hidden, "
      "Tensor weight, Tensor? bias, Tensor targets, Tensor lse, Tensor? entropy, "
      "float inv_temperature, int ignore_index, bool need_weight_grad) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sgsd_native, CPU, m) {
  m.impl("linear_logprobs_forward", &linear_logprobs_forward);
  m.impl("linear_logprobs_backward", &linear_logprobs_backward);
}
