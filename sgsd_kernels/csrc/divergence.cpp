// Native CPU element-wise kernel of the full-vocabulary divergence (docs/design.md §3.1, the
// "native" backend of linear_divergence). The GEMMs stay in Python (torch.mm/addmm, near
// the GEMM rate); this file replaces the ~10 ATen element-wise passes the torch backend
// runs over each row chunk's logits with one fused loop per sweep.
//
// Input: a row chunk's scaled student and teacher logits (z / T, the whole vocabulary),
// laid out vocabulary-major as the torch backend's GEMM writes them: zs and zt are
// [V, r] views with unit stride across rows (stride(0) = ld >= r; with a shared head they
// are the two column halves of one [V, 2r] buffer). Rows are split into groups of
// kGroup; one at::parallel_for task walks a group's rows down the vocabulary, vectorised
// across the group (the compiler vectorises the `omp simd` loops with -O3 -march=native).
// Each row's arithmetic depends only on its position in its group, never on the thread
// count, so results are bitwise identical at any number of threads.
//
//   sweep 1: per-row online max / Σexp of both logits (blocks of kLines entries: the block
//            max, one rescale of the running sum, then Σexp(z − max) over the block while
//            it is in L1) -> lse_S, lse_T;
//   sweep 2: a = z_S − lse_S, c = z_T − lse_T, the element terms d and e = ∂d/∂a (β = 0,
//            β = 1, or the general-β mixture), the element clip, the teacher top-k mask;
//            D = Σd and Σe per row; for the unit-gradient forward also e -> zt in place;
//   then, for the unit-gradient forward only, zs = e − Σe·p_S (Σe is known only after
//   sweep 2; p_S = exp(a) is recomputed from zs rather than stored, which saves one
//   write of the chunk and costs no exp at β = 0, where sweep 2 does not need p_S). The
//   recompute backward (lse and Σe saved) writes e − Σe·p_S in sweep 2 directly.
// Column sums are cascaded: fp32 partials over a block of kLines entries, added into
// fp64 row totals (the rounding error grows like kLines·ε, not like V·ε as a running
// fp32 sum's would). Columns outside the teacher's top-k count as z = −inf: no mass,
// d = e = p_S = 0.
//
// Cost: ~13 ms per 144-row chunk at V = 32768 (unit-gradient forward, fp32, 1 thread,
// AMD EPYC dev box), ~10 % of the chunk's GEMMs. A group's 16 logits of one vocabulary
// entry must be one aligned 64-byte line (the Python side pads chunks to a multiple of
// 16 rows): otherwise each line is shared by two groups and fetched by both, and the
// kernel took 2.2x as long per row (142 rows vs 144).
//
// fp32 logits (fp32/bf16/fp16 inputs) use the polynomial exp of tiles.h and the log
// below, both vectorisable; fp64 logits use std::exp / std::log1p.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "ops.h"
#include "tiles.h"

namespace {

using at::Tensor;
using sgsd_native::exp_acc;

// Rows per task: one 512-bit vector of fp32 lanes (two 256-bit ones).
constexpr int64_t kGroup = 16;
// Vocabulary entries per sweep-1 block: kLines × kGroup × 2 logits = 8 KiB stay in L1
// between the block-max loop and the Σexp loop.
constexpr int64_t kLines = 64;

// log(1 + t) for t in [0, 1] (the logaddexp of the β mixture), vectorisable: Cephes-style
// x = 2^e·m with m in [√½, √2), polynomial in m − 1; ~1 ulp for arguments in [1, 2].
inline float log1p_unit(float t) {
  const float x = 1.0f + t;
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 126;
  bits = (bits & 0x007fffff) | 0x3f000000;  // m in [0.5, 1)
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const bool small = m < 0.70710678118654752f;
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return m + y + 0.693359375f * fe;
}
inline double log1p_unit(double t) { return std::log1p(t); }

// Which element formula: β = 0 (forward KL), β = 1 (reverse KL), 0 < β < 1 (mixture).
enum Mode : int { kForwardKL = 0, kReverseKL = 1, kMixture = 2 };
// What sweep 2 writes back: nothing, e -> zt (then the gradient -> zs), or the gradient
// -> zs.
enum Write : int { kNone = 0, kUnit = 1, kGrad = 2 };

template <typename T>
struct Hypers {
  T beta, log_1mb, log_b, clip;  // clip = +inf when off
};

// d (the clipped element divergence), e = ∂d/∂a (0 where clipped) and p_S at one element,
// from the log-probs a (student) and c (teacher). Unused outputs are dead code after
// inlining (p_S at β = 0 without a write-back).
template <typename T, int kMode>
inline void element(T a, T c, const Hypers<T>& h, T& d, T& e, T& ps) {
  ps = exp_acc(a);
  if constexpr (kMode == kForwardKL) {
    const T pt = exp_acc(c);
    d = pt * (c - a);
    e = -pt;
  } else if constexpr (kMode == kReverseKL) {
    const T diff = a - c;
    d = ps * diff;
    e = ps * (diff + T(1));
  } else {
    const T u = a + h.log_1mb, w = c + h.log_b;  // log (1−β)p_S, log β p_T
    const T hi = u > w ? u : w, lo = u > w ? w : u;
    const T log_m = hi + log1p_unit(exp_acc(lo - hi));
    const T pt = exp_acc(c);
    e = (T(1) - h.beta) * ps * (a - log_m);
    d = h.beta * pt * (c - log_m) + e;
  }
  const bool clipped = d > h.clip;
  e = clipped ? T(0) : e;
  d = clipped ? h.clip : d;
}

// Per-task scratch: the group's top-k membership ([V, kGroup] bytes) and row vectors.
template <typename T>
struct GroupScratch {
  std::vector<uint8_t> keep;
  T ms[kGroup], mt[kGroup], shs[kGroup], sht[kGroup], bs[kGroup], bt[kGroup];
  double ss[kGroup], st[kGroup];
};

struct Args {
  int64_t V, ld_s, ld_t, k;
  const int64_t* top;  // [r, k] or nullptr
};

// keep[v·g + i] = 1 when vocabulary entry v is among row (r0 + i)'s teacher top-k.
inline void fill_keep(std::vector<uint8_t>& keep, const Args& a, int64_t r0, int64_t g) {
  keep.assign(static_cast<size_t>(a.V * g), 0);
  for (int64_t i = 0; i < g; ++i) {
    const int64_t* row = a.top + (r0 + i) * a.k;
    for (int64_t j = 0; j < a.k; ++j) {
      TORCH_CHECK(row[j] >= 0 && row[j] < a.V, "sgsd native divergence: top-k index ",
                  row[j], " outside [0, ", a.V, ")");
      keep[row[j] * g + i] = 1;
    }
  }
}

// Sweep 1 on rows [0, g) of the group (pointers already offset to the group): lse per row.
template <typename T, bool kTopK, int64_t kG>
void row_lse(const T* zs, const T* zt, const Args& a, int64_t g_dyn, const uint8_t* keep,
             GroupScratch<T>& sc, T* lse_s, T* lse_t) {
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  const int64_t g = kG > 0 ? kG : g_dyn;
  for (int64_t i = 0; i < g; ++i) sc.ms[i] = sc.mt[i] = ninf, sc.ss[i] = sc.st[i] = 0;
  for (int64_t v0 = 0; v0 < a.V; v0 += kLines) {
    const int64_t v1 = std::min(a.V, v0 + kLines);
    T bms[kGroup], bmt[kGroup];
    for (int64_t i = 0; i < g; ++i) bms[i] = bmt[i] = ninf;
    for (int64_t v = v0; v < v1; ++v) {
      const T *s = zs + v * a.ld_s, *t = zt + v * a.ld_t;
#pragma omp simd
      for (int64_t i = 0; i < g; ++i) {
        const bool in = !kTopK || keep[v * g + i];
        const T x = in ? s[i] : ninf, y = in ? t[i] : ninf;
        bms[i] = x > bms[i] ? x : bms[i];
        bmt[i] = y > bmt[i] ? y : bmt[i];
      }
    }
    // New running max; the running sums are rescaled once per block (in fp64). A row
    // still all −inf keeps max −inf and sums 0, and shifts by 0.
    for (int64_t i = 0; i < g; ++i) {
      const T ns = std::max(sc.ms[i], bms[i]), nt = std::max(sc.mt[i], bmt[i]);
      if (ns != sc.ms[i] && sc.ms[i] != ninf) sc.ss[i] *= std::exp(double(sc.ms[i]) - ns);
      if (nt != sc.mt[i] && sc.mt[i] != ninf) sc.st[i] *= std::exp(double(sc.mt[i]) - nt);
      sc.ms[i] = ns, sc.mt[i] = nt;
      sc.shs[i] = ns == ninf ? T(0) : ns;
      sc.sht[i] = nt == ninf ? T(0) : nt;
      sc.bs[i] = sc.bt[i] = 0;
    }
    for (int64_t v = v0; v < v1; ++v) {
      const T *s = zs + v * a.ld_s, *t = zt + v * a.ld_t;
#pragma omp simd
      for (int64_t i = 0; i < g; ++i) {
        const bool in = !kTopK || keep[v * g + i];
        const T es = exp_acc(s[i] - sc.shs[i]), et = exp_acc(t[i] - sc.sht[i]);
        sc.bs[i] += in ? es : T(0);
        sc.bt[i] += in ? et : T(0);
      }
    }
    for (int64_t i = 0; i < g; ++i) sc.ss[i] += sc.bs[i], sc.st[i] += sc.bt[i];
  }
  for (int64_t i = 0; i < g; ++i) {
    lse_s[i] = sc.ms[i] == ninf ? ninf : static_cast<T>(sc.ms[i] + std::log(sc.ss[i]));
    lse_t[i] = sc.mt[i] == ninf ? ninf : static_cast<T>(sc.mt[i] + std::log(sc.st[i]));
  }
}

// Sweep 2 on one group: D and Σe per row (unless kWrite == kGrad), and the write-back.
// With kGrad, sum_e holds the saved Σe and zs receives e − Σe·p_S.
template <typename T, int kMode, bool kTopK, int kWrite, int64_t kG>
void row_terms(T* zs, T* zt, const Args& a, int64_t g_dyn, const uint8_t* keep,
               const Hypers<T>& h, const T* lse_s, const T* lse_t, T* d_out, T* sum_e) {
  const int64_t g = kG > 0 ? kG : g_dyn;
  double dt[kGroup], et[kGroup];
  T ls[kGroup], lt[kGroup], se[kGroup];
  for (int64_t i = 0; i < g; ++i) {
    dt[i] = et[i] = 0, ls[i] = lse_s[i], lt[i] = lse_t[i];
    se[i] = kWrite == kGrad ? sum_e[i] : T(0);
  }
  for (int64_t v0 = 0; v0 < a.V; v0 += kLines) {
    const int64_t v1 = std::min(a.V, v0 + kLines);
    T bd[kGroup], be[kGroup];
    for (int64_t i = 0; i < g; ++i) bd[i] = be[i] = 0;
    for (int64_t v = v0; v < v1; ++v) {
      T *s = zs + v * a.ld_s, *t = zt + v * a.ld_t;
#pragma omp simd
      for (int64_t i = 0; i < g; ++i) {
        T d, e, ps;
        element<T, kMode>(s[i] - ls[i], t[i] - lt[i], h, d, e, ps);
        if constexpr (kTopK) {
          const bool in = keep[v * g + i];
          d = in ? d : T(0), e = in ? e : T(0), ps = in ? ps : T(0);
        }
        if constexpr (kWrite == kGrad) {
          s[i] = e - se[i] * ps;
        } else {
          bd[i] += d, be[i] += e;
          if constexpr (kWrite == kUnit) t[i] = e;
        }
      }
    }
    if constexpr (kWrite != kGrad)
      for (int64_t i = 0; i < g; ++i) dt[i] += bd[i], et[i] += be[i];
  }
  if constexpr (kWrite == kGrad) return;
  for (int64_t i = 0; i < g; ++i) {
    d_out[i] = static_cast<T>(dt[i]);
    sum_e[i] = static_cast<T>(et[i]);
  }
  if constexpr (kWrite == kUnit) {  // zs = e − Σe·p_S, e in zt, p_S recomputed from zs
    for (int64_t i = 0; i < g; ++i) se[i] = sum_e[i];
    for (int64_t v = 0; v < a.V; ++v) {
      T* s = zs + v * a.ld_s;
      const T* t = zt + v * a.ld_t;
#pragma omp simd
      for (int64_t i = 0; i < g; ++i) {
        T ps = exp_acc(s[i] - ls[i]);
        if constexpr (kTopK) ps = keep[v * g + i] ? ps : T(0);
        s[i] = t[i] - se[i] * ps;
      }
    }
  }
}

// Both sweeps on one group of g rows starting at row r0 (out: [4, r] rows D, Σe, lse_S,
// lse_T, or for kGrad the saved lse_S, lse_T, Σe).
template <typename T, int kMode, bool kTopK, int kWrite, int64_t kG>
void group(T* zs, T* zt, const Args& a, int64_t r0, int64_t g, const Hypers<T>& h,
           GroupScratch<T>& sc, T* out, int64_t r) {
  const uint8_t* keep = nullptr;
  if constexpr (kTopK) {
    fill_keep(sc.keep, a, r0, g);
    keep = sc.keep.data();
  }
  T *d = out + r0, *se = out + r + r0, *ls = out + 2 * r + r0, *lt = out + 3 * r + r0;
  if constexpr (kWrite != kGrad) row_lse<T, kTopK, kG>(zs + r0, zt + r0, a, g, keep, sc, ls, lt);
  row_terms<T, kMode, kTopK, kWrite, kG>(zs + r0, zt + r0, a, g, keep, h, ls, lt, d, se);
}

template <typename T, int kMode, bool kTopK, int kWrite>
void run(T* zs, T* zt, const Args& a, int64_t r, const Hypers<T>& h, T* out) {
  const int64_t groups = (r + kGroup - 1) / kGroup;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    GroupScratch<T> sc;
    for (int64_t gi = g0; gi < g1; ++gi) {
      const int64_t r0 = gi * kGroup, g = std::min(kGroup, r - r0);
      if (g == kGroup)
        group<T, kMode, kTopK, kWrite, kGroup>(zs, zt, a, r0, g, h, sc, out, r);
      else
        group<T, kMode, kTopK, kWrite, 0>(zs, zt, a, r0, g, h, sc, out, r);
    }
  });
}

template <typename T, int kWrite>
void dispatch(T* zs, T* zt, const Args& a, int64_t r, const Hypers<T>& h, T* out) {
  const int mode = h.beta == T(0) ? kForwardKL : h.beta == T(1) ? kReverseKL : kMixture;
  const bool topk = a.top != nullptr;
#define SGSD_DIV_CASE(M)                                   \
  if (mode == M) {                                         \
    if (topk)                                              \
      run<T, M, true, kWrite>(zs, zt, a, r, h, out);       \
    else                                                   \
      run<T, M, false, kWrite>(zs, zt, a, r, h, out);      \
    return;                                                \
  }
  SGSD_DIV_CASE(kForwardKL)
  SGSD_DIV_CASE(kReverseKL)
  SGSD_DIV_CASE(kMixture)
#undef SGSD_DIV_CASE
}

Args check(const Tensor& zs, const Tensor& zt, const std::optional<Tensor>& top, double beta,
           std::optional<double> clip) {
  TORCH_CHECK(zs.device().is_cpu() && zt.device().is_cpu(),
              "sgsd native divergence: logits must be CPU tensors");
  TORCH_CHECK(zs.dim() == 2 && zt.sizes() == zs.sizes(),
              "sgsd native divergence: student and teacher logits must both be [V, r], got ",
              zs.sizes(), " and ", zt.sizes());
  TORCH_CHECK(zs.scalar_type() == zt.scalar_type() &&
                  (zs.scalar_type() == at::kFloat || zs.scalar_type() == at::kDouble),
              "sgsd native divergence: logits must both be float32 or both float64, got ",
              zs.scalar_type(), " and ", zt.scalar_type());
  TORCH_CHECK(zs.size(0) >= 1, "sgsd native divergence: V must be >= 1");
  TORCH_CHECK((zs.size(1) <= 1 || (zs.stride(1) == 1 && zt.stride(1) == 1)) &&
                  zs.stride(0) >= zs.size(1) && zt.stride(0) >= zt.size(1),
              "sgsd native divergence: logits must be vocabulary-major (stride 1 across rows, "
              "stride(0) >= r), got strides ",
              zs.strides(), " and ", zt.strides());
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, "sgsd native divergence: beta must be in [0, 1], got ",
              beta);
  TORCH_CHECK(!clip.has_value() || *clip > 0.0,
              "sgsd native divergence: clip must be > 0, got ", clip.value_or(0.0));
  Args a{zs.size(0), zs.stride(0), zt.stride(0), 0, nullptr};
  if (top.has_value()) {
    TORCH_CHECK(top->scalar_type() == at::kLong && top->dim() == 2 &&
                    top->size(0) == zs.size(1) && top->size(1) >= 1 &&
                    top->size(1) <= zs.size(0) && top->is_contiguous() && top->device().is_cpu(),
                "sgsd native divergence: top-k indices must be a contiguous int64 [r, k] "
                "CPU tensor with 1 <= k <= V, got ",
                top->scalar_type(), " ", top->sizes());
    a.k = top->size(1);
    a.top = top->const_data_ptr<int64_t>();
  }
  return a;
}

template <typename T>
Hypers<T> hypers(double beta, std::optional<double> clip) {
  const double inf = std::numeric_limits<double>::infinity();
  return {static_cast<T>(beta), static_cast<T>(std::log1p(-beta)),
          static_cast<T>(std::log(beta)), static_cast<T>(clip.value_or(inf))};
}

}  // namespace

namespace sgsd_native {

// -> [4, r]: D, Σe (= Σ_v ∂D/∂a_v), lse_S, lse_T. With unit_grad, zs receives the student
// logit gradient of D for a unit upstream gradient, ∂D/∂(z/T) = e − Σe·p_S (zt is
// overwritten with e).
Tensor divergence_forward(Tensor zs, Tensor zt, const std::optional<Tensor>& top, double beta,
                          std::optional<double> clip, bool unit_grad) {
  const Args a = check(zs, zt, top, beta, clip);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t r = zs.size(1);
  Tensor out = at::empty({4, r}, zs.options());
  if (r == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(zs.scalar_type(), "divergence_forward", [&] {
    const auto h = hypers<scalar_t>(beta, clip);
    scalar_t *s = zs.data_ptr<scalar_t>(), *t = zt.data_ptr<scalar_t>();
    if (unit_grad)
      dispatch<scalar_t, kUnit>(s, t, a, r, h, out.data_ptr<scalar_t>());
    else
      dispatch<scalar_t, kNone>(s, t, a, r, h, out.data_ptr<scalar_t>());
  });
  return out;
}

// The recompute backward: zs receives e − Σe·p_S from the saved lse_S, lse_T and Σe.
void divergence_grad(Tensor zs, const Tensor& zt, const std::optional<Tensor>& top,
                     const Tensor& lse_s, const Tensor& lse_t, const Tensor& sum_e, double beta,
                     std::optional<double> clip) {
  const Args a = check(zs, zt, top, beta, clip);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t r = zs.size(1);
  for (const Tensor* x : {&lse_s, &lse_t, &sum_e})
    TORCH_CHECK(x->dim() == 1 && x->size(0) == r && x->scalar_type() == zs.scalar_type(),
                "sgsd native divergence: lse_s, lse_t and sum_e must be [r] in the logits' "
                "dtype, got ",
                x->sizes(), " ", x->scalar_type());
  if (r == 0) return;
  // The row statistics in the [4, r] layout of the forward (row 0, D, unused).
  Tensor stats = at::stack({lse_t, sum_e, lse_s, lse_t}).contiguous();
  AT_DISPATCH_FLOATING_TYPES(zs.scalar_type(), "divergence_grad", [&] {
    const auto h = hypers<scalar_t>(beta, clip);
    // kGrad only reads zt.
    auto* t = const_cast<scalar_t*>(zt.const_data_ptr<scalar_t>());
    dispatch<scalar_t, kGrad>(zs.data_ptr<scalar_t>(), t, a, r, h, stats.data_ptr<scalar_t>());
  });
}

}  // namespace sgsd_native
