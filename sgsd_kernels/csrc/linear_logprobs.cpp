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

#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

// exp(x) for float, vectorisable: Cephes-style range reduction x = n·ln2 + r, degree-6
// polynomial on r, 2^n built in the exponent bits. Relative error ~2 ulp on
// [-87.3, 88]; exactly 0 below -87.3 (all our arguments are z − max ≤ 0 or log p ≤ ~0).
// NaN in → NaN out (the polynomial carries it).
inline float exp_approx(float x) {
  const bool underflow = x < -87.3f;
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.0f ? 88.0f : x;
  float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  const float r2 = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r2 + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float pow2;
  std::memcpy(&pow2, &bits, sizeof(pow2));
  return underflow ? 0.0f : y * pow2;
}

inline float exp_acc(float x) { return exp_approx(x); }
inline double exp_acc(double x) { return std::exp(x); }

// torch calls mkl_set_dynamic(false) (it keeps one OpenMP team alive across MKL and
// non-MKL regions), so an MKL GEMM issued from inside our parallel region would try to
// use every thread again: on the 2-core dev box that made each 256×256×256 tile ~20×
// slower (1.8 → 41 ms). Each task therefore pins MKL to one thread for its own calls with
// MKL_Set_Num_Threads_Local (thread-local; 0 restores the global setting). The symbol is
// looked up at run time so that a torch built without MKL still loads this library; the
// lower-case mkl_set_num_threads_local exported by libtorch_cpu is the Fortran entry
// (argument by pointer) and must not be called with an int.
class OneBlasThread {
 public:
  OneBlasThread() {
    if (set_local_ != nullptr) previous_ = set_local_(1);
  }
  ~OneBlasThread() {
    if (set_local_ != nullptr) set_local_(previous_);
  }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;

 private:
  using SetLocal = int (*)(int);
  static SetLocal lookup() {
    void* sym = dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local");
    if (sym == nullptr) {
      void* torch_cpu = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);
      if (torch_cpu != nullptr) sym = dlsym(torch_cpu, "MKL_Set_Num_Threads_Local");
    }
    return reinterpret_cast<SetLocal>(sym);
  }
  static inline const SetLocal set_local_ = lookup();
  int previous_ = 0;
};

struct Plan {
  int64_t rows;    // rows per tile
  int64_t vblock;  // vocabulary entries per tile
  int64_t nvb;     // number of vocabulary blocks
  int64_t tasks;   // parallel tasks (each owns a contiguous range of vocabulary blocks)
};

// Tile sizes from the single-thread tile-GEMM sweep on the dev box (fp32, MKL):
// H=256: 256×256 tiles ~103 GFLOP/s for all three GEMMs (64-row tiles ~97);
// H=1024: 256×128 ~100 GFLOP/s with the W block (128 KiB·H/256) still in the 1 MiB L2.
Plan make_plan(int64_t N, int64_t V, int64_t H) {
  Plan p;
  p.vblock = std::min<int64_t>(V, H <= 512 ? 256 : 128);
  p.rows = std::max<int64_t>(1, std::min<int64_t>(N, 256));
  p.nvb = (V + p.vblock - 1) / p.vblock;
  p.tasks = std::max<int64_t>(1, std::min<int64_t>(p.nvb, at::get_num_threads()));
  return p;
}

inline int64_t block_begin(const Plan& p, int64_t task) { return task * p.nvb / p.tasks; }

at::ScalarType compute_dtype(const Tensor& hidden) {
  return hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
                  const Tensor& targets) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && targets.device().is_cpu(),
              "sgsd native kernels run on CPU tensors only");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "sgsd native: hidden must be [N, H] and weight [V, H], got ", hidden.sizes(),
              " and ", weight.sizes());
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(),
              "sgsd native: hidden and weight dtypes differ");
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()),
              "sgsd native: hidden must be floating point");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0),
              "sgsd native: targets must be [N]");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0)),
              "sgsd native: bias must be [V]");
  TORCH_CHECK(weight.size(0) > 0 && weight.size(1) > 0, "sgsd native: V and H must be >= 1");
}

// W[v0:v0+nv] in the compute dtype: a view when W (made contiguous by the caller) already
// is in that dtype, otherwise converted into the task's buffer by a plain loop. (at::copy_
// from inside the parallel region took ~23 ms per 256×256 bf16 block on the loaded dev
// box, 10× the block's GEMM; this loop is a few µs.)
template <typename src_t>
void convert(const src_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename acc_t>
Tensor weight_block(const Tensor& weight, Tensor& buf, int64_t v0, int64_t nv) {
  if (weight.scalar_type() == c10::CppTypeToScalarType<acc_t>::value)
    return weight.narrow(0, v0, nv);
  const int64_t H = weight.size(1);
  Tensor w = buf.narrow(0, 0, nv);
  float* dst = w.data_ptr<float>();
  if (weight.scalar_type() == at::kBFloat16) {
    convert(weight.const_data_ptr<c10::BFloat16>() + v0 * H, dst, nv * H);
  } else if (weight.scalar_type() == at::kHalf) {
    convert(weight.const_data_ptr<c10::Half>() + v0 * H, dst, nv * H);
  } else {
    TORCH_CHECK(false, "sgsd native: unsupported weight dtype ", weight.scalar_type());
  }
  return w;
}

template <typename acc_t>
inline void scale_row(acc_t* z, int64_t n, const acc_t* b, acc_t inv_t) {
  if (b != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) z[j] = (z[j] + b[j]) * inv_t;
  } else if (inv_t != acc_t(1)) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) z[j] *= inv_t;
  }
}

template <typename acc_t>
inline acc_t row_max(const acc_t* z, int64_t n) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = z[j] > m ? z[j] : m;
  return m;
}

// Merge a partial (m2, s2, a2) into (m, s, a): s = Σexp(z − m), a = Σexp(z − m)·(z − m).
template <typename acc_t>
inline void merge(acc_t& m, acc_t& s, acc_t& a, acc_t m2, acc_t s2, acc_t a2) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  if (m2 == ninf) return;  // empty partial (or an all −inf block: contributes 0)
  if (m == ninf) {
    m = m2, s = s2, a = a2;
    return;
  }
  const acc_t nm = std::max(m, m2);  // NaN in m2 is carried by s2/a2
  const acc_t d1 = m - nm, d2 = m2 - nm;
  const acc_t c1 = exp_acc(d1), c2 = exp_acc(d2);
  a = c1 * (a + d1 * s) + c2 * (a2 + d2 * s2);
  s = c1 * s + c2 * s2;
  m = nm;
}

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
