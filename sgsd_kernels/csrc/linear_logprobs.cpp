// Native CPU kernels for the linear log-prob op (docs/design.md §5, "native" backend):
// log p(target), optional entropy, and their gradients straight from hidden states and
// the LM-head weight, never materialising N×V logits.
//
// Work split (both passes): the vocabulary is cut into blocks of `vblock` rows of W, and
// task t of T = at::get_num_threads() owns a fixed contiguous range of vocabulary blocks.
// A task walks its blocks; for each block it keeps W[v0:v1] hot and walks all row tiles,
// computing the transposed logits tile zt[nv, nr] = W_blk·h_tileᵀ with one GEMM of its
// engine (engines.h: fp32/fp64 BLAS, or bf16 brgemm with fp32 output) and then the whole
// epilogue on the tile while it is in cache, vectorised across the tile's rows:
//   forward:  scale/bias, per-row max, Σexp, Σexp·(z−m) (entropy), target pick, merged into
//             the task's running (max, sum, acc) per row;
//   backward: G = g·(onehot − p) [+ entropy term], then dh_task += G·W_blk and
//             dW_blk += Gᵀ·h_tile (dW rows are owned by exactly one task), db_blk += ΣG.
// Partials are combined in task order, so results are bitwise identical across runs at a
// fixed thread count. Single-threaded on the 2-core AMD EPYC dev box a 256×256×256 tile
// GEMM runs at ~103 GFLOP/s in fp32 (MKL) and ~232 in bf16 (oneDNN brgemm), against ~58
// for the whole N=1024, V=32768, H=256 fp32 GEMM (its 128 MiB output leaves cache).
//
// Threads come from at::parallel_for, whose OpenMP body is inlined from ATen's headers, so
// this file is built with -fopenmp (sgsd_kernels/native.py); it links libgomp.so.1, the
// runtime torch has already loaded. The elementwise loops are vectorised by the compiler
// (-O3 -march=native -fopenmp-simd -fno-trapping-math: without the last flag GCC 12 keeps
// the exp loop scalar, 14 ns per element instead of 1.6 on the loaded dev box); exp uses a
// polynomial that vectorises (tiles.h). The GEMM-rate probe the benchmark times is in
// probe.h.
//
// Inputs: fp32/fp16 are computed in fp32, fp64 in fp64, bf16 in fp32 from bf16 operands
// (Bf16Tiles) where the CPU has bf16 dot products, else converted like fp16 (hidden once,
// W per block into a per-task buffer). A strided W is made contiguous once (a copy, in
// its own dtype).
//
// One file over ~450 lines on purpose: the forward and backward epilogues, their tile walk
// and the two entry points share RowInputs, Scratch and for_each_tile; the GEMM engines
// (engines.h), the shared helpers (tiles.h) and the schemas (registration.cpp) live apart.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>

#include <tuple>
#include <type_traits>
#include <vector>

#include "engines.h"
#include "probe.h"
#include "ops.h"
#include "tiles.h"

namespace {

using at::Tensor;
using namespace sgsd_native;

// The per-row inputs of the epilogues, in the compute dtype (pointers into tensors the
// caller keeps alive); g and ge carry the ignore mask and the 1/T of ∂z/∂logits.
template <typename acc_t>
struct RowInputs {
  const int64_t* targets = nullptr;
  const acc_t* bias = nullptr;  // [V] or nullptr
  acc_t inv_t = 1;
  // Soft cap c (docs/design.md §3.3): z = (c/T)·tanh((z_raw + b)/c); inv_cap = 1/c, 0 = none.
  acc_t inv_cap = 0, cap_post = 0;  // cap_post = c/T
  const acc_t* lse = nullptr;  // backward only
  const acc_t* g = nullptr;
  const acc_t* ge = nullptr;   // entropy gradient, or nullptr
  const acc_t* ent = nullptr;  // entropy, with ge
};

// Per-thread scratch of the epilogues: the tile and four row vectors.
template <typename acc_t>
struct Scratch {
  Reused<acc_t> tile, bm, shift, bs, ba;
  explicit Scratch(const Plan& p)
      : tile(p.rows * p.vblock), bm(p.rows), shift(p.rows), bs(p.rows), ba(p.rows) {}
};

// Every task on at::parallel_for, one engine and one scratch per thread: for each of the
// task's vocabulary blocks and each row tile, the logits tile into the scratch, then
// on_tile(engine, scratch, task, v0, nv, r0, nr); engine.end_block() after each block.
template <typename acc_t, typename Make, typename OnTile>
void for_each_tile(const Plan& p, int64_t N, int64_t V, bool backward, const Make& make_engine,
                   const OnTile& on_tile) {
  at::parallel_for(0, p.tasks, 1, [&](int64_t t0, int64_t t1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    OneBlasThread one_blas_thread;
    auto engine = make_engine();
    Scratch<acc_t> sc(p);
    for (int64_t task = t0; task < t1; ++task) {
      for (int64_t blk = block_begin(p, task); blk < block_begin(p, task + 1); ++blk) {
        const int64_t v0 = blk * p.vblock, nv = std::min(p.vblock, V - v0);
        engine.set_block(v0, nv, backward);
        for (int64_t r0 = 0; r0 < N; r0 += p.rows) {
          const int64_t nr = std::min(p.rows, N - r0);
          engine.logits(r0, nr, sc.tile.data());
          on_tile(engine, sc, task, v0, nv, r0, nr);
        }
        engine.end_block();
      }
    }
    engine.finish();
  });
}

// zt ← (zt + b)·(1/T) in place, rounded once per operation, when there is a bias or T ≠ 1.
// Forward and backward both scale this way, in a pass of its own, so that the backward's
// log p = z − lse sees the very logits the forward's lse came from (a multiply-add fused
// into the subtraction would round differently: with V = 1, p would come out 1 − 1e-7 and
// the gradients 1e-5 where they are exactly 0).
// The soft-capped logit of a raw one (the forward and the backward both call this, so the
// backward's log p sees the very logits the forward's lse came from).
template <typename acc_t>
inline acc_t capped(acc_t raw, acc_t bj, const RowInputs<acc_t>& in) {
  return std::tanh((raw + bj) * in.inv_cap) * in.cap_post;
}

template <typename acc_t>
void scale_tile(acc_t* zt, int64_t nv, int64_t nr, int64_t v0, const RowInputs<acc_t>& in) {
  if (in.inv_cap != acc_t(0)) {  // soft cap: its own pass, outside the uncapped loop
    for (int64_t j = 0; j < nv; ++j) {
      const acc_t bj = in.bias ? in.bias[v0 + j] : acc_t(0);
      acc_t* zj = zt + j * nr;
      for (int64_t i = 0; i < nr; ++i) zj[i] = capped(zj[i], bj, in);
    }
    return;
  }
  if (in.bias == nullptr && in.inv_t == acc_t(1)) return;
  for (int64_t j = 0; j < nv; ++j) {
    const acc_t bj = in.bias ? in.bias[v0 + j] : acc_t(0), it = in.inv_t;
    acc_t* zj = zt + j * nr;
#pragma omp simd
    for (int64_t i = 0; i < nr; ++i) zj[i] = (zj[i] + bj) * it;
  }
}

#if defined(__AVX512F__)
// exp_sums for fp32 on 16 rows at a time, their sums and max held in registers across the
// whole vocabulary block (same order of additions as a row-vector sweep per entry).
template <bool kEntropy, bool kMax>
void exp_sums16(const float* zt, int64_t nv, int64_t nr, const float* sh, float* bm, float* bs,
                float* ba) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t i = 0; i < nr; i += 16) {
    const __mmask16 k = lanes_from(i, nr);
    const __m512 shift = _mm512_maskz_loadu_ps(k, sh + i);
    __m512 sum = zero, acc = zero, mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < nv; ++j) {
      const __m512 z = _mm512_maskz_loadu_ps(k, zt + j * nr + i);
      const __m512 d = _mm512_sub_ps(z, shift);
      const __m512 e = exp16(d);
      sum = _mm512_add_ps(sum, e);
      if constexpr (kEntropy)  // a −inf logit adds 0, not 0·(−inf)
        acc = _mm512_add_ps(acc,
                            _mm512_maskz_mul_ps(_mm512_cmp_ps_mask(e, zero, _CMP_NEQ_UQ), e, d));
      if constexpr (kMax) mx = _mm512_max_ps(z, mx);  // z first: a NaN z keeps the max
    }
    _mm512_mask_storeu_ps(bs + i, k, sum);
    if constexpr (kEntropy) _mm512_mask_storeu_ps(ba + i, k, acc);
    if constexpr (kMax) _mm512_mask_storeu_ps(bm + i, k, mx);
  }
}
#endif

// Σexp(z − sh) (bs), Σexp(z − sh)·(z − sh) (ba, with_entropy; a −inf logit adds 0, not
// 0·(−inf)) per row of zt[nv, nr], and with track_max the tile's max (bm; NaN ignored;
// bm is left alone without track_max).
template <typename acc_t>
void exp_sums(const acc_t* zt, int64_t nv, int64_t nr, const acc_t* sh, bool with_entropy,
              bool track_max, acc_t* bm, acc_t* bs, acc_t* ba) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < nr; ++i) bs[i] = 0, ba[i] = 0;
  if (track_max)
    for (int64_t i = 0; i < nr; ++i) bm[i] = ninf;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (with_entropy)
      track_max ? exp_sums16<true, true>(zt, nv, nr, sh, bm, bs, ba)
                : exp_sums16<true, false>(zt, nv, nr, sh, bm, bs, ba);
    else
      track_max ? exp_sums16<false, true>(zt, nv, nr, sh, bm, bs, ba)
                : exp_sums16<false, false>(zt, nv, nr, sh, bm, bs, ba);
    return;
  }
#endif
  for (int64_t j = 0; j < nv; ++j) {
    const acc_t* zj = zt + j * nr;
    if (track_max) {
#pragma omp simd
      for (int64_t i = 0; i < nr; ++i) bm[i] = zj[i] > bm[i] ? zj[i] : bm[i];
    }
    if (with_entropy) {
#pragma omp simd
      for (int64_t i = 0; i < nr; ++i) {
        const acc_t d = zj[i] - sh[i];
        const acc_t e = exp_acc(d);
        bs[i] += e;
        ba[i] += e == acc_t(0) ? acc_t(0) : e * d;
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < nr; ++i) bs[i] += exp_acc(zj[i] - sh[i]);
    }
  }
}

// Forward epilogue on zt[nv, nr] (rows r0.., vocabulary v0..): per-row partials merged
// into the task's (m, s, a); the target logit into tgt (one owner per target: no race).
//
// Where every row of the tile already has a finite running max m from the task's earlier
// blocks, one pass shifts by it (exp(z − m) while the tile max is tracked), and a row whose
// tile max exceeds m is rebased onto that max afterwards; only the first tile of a row in
// each task, and a row more than kMaxGap above its running max (the shifted sum could
// overflow), take a max pass first. The max pass is ~3 µs of a 256×256 fp32 tile's epilogue
// (~20 µs with exp16) next to its ~290 µs GEMM (1 thread, AMD EPYC dev box).
template <typename acc_t>
void forward_tile(acc_t* zt, int64_t nv, int64_t nr, int64_t v0, int64_t r0,
                  const RowInputs<acc_t>& in, bool with_entropy, Scratch<acc_t>& sc, acc_t* m,
                  acc_t* s, acc_t* a, acc_t* tgt) {
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  constexpr acc_t kMaxGap = 64;  // 256 terms of at most e^64 stay far below FLT_MAX
  acc_t *bm = sc.bm.data(), *sh = sc.shift.data(), *bs = sc.bs.data(), *ba = sc.ba.data();
  scale_tile(zt, nv, nr, v0, in);
  bool shifted = true;
  for (int64_t i = 0; i < nr; ++i) {
    const int64_t tr = in.targets[r0 + i];
    if (tr >= v0 && tr < v0 + nv) tgt[r0 + i] = zt[(tr - v0) * nr + i];
    sh[i] = m[r0 + i];
    shifted = shifted && std::isfinite(sh[i]);
  }
  if (shifted) {
    exp_sums(zt, nv, nr, sh, with_entropy, true, bm, bs, ba);
    for (int64_t i = 0; i < nr; ++i)  // also false for a +inf logit (inf − sh)
      shifted = shifted && bm[i] - sh[i] <= kMaxGap;
  }
  if (shifted) {
    for (int64_t i = 0; i < nr; ++i) {
      if (bm[i] > sh[i]) {  // rebase: Σexp(z − bm) = c·Σexp(z − sh), c = exp(sh − bm)
        const acc_t gap = sh[i] - bm[i], c = exp_acc(gap);
        ba[i] = c * (ba[i] + gap * bs[i]);
        bs[i] *= c;
        sh[i] = bm[i];
      }
      merge(m[r0 + i], s[r0 + i], a[r0 + i], sh[i], bs[i], ba[i]);
    }
    return;
  }
  for (int64_t i = 0; i < nr; ++i) bm[i] = ninf;
  for (int64_t j = 0; j < nv; ++j) {
    const acc_t* zj = zt + j * nr;
#pragma omp simd
    for (int64_t i = 0; i < nr; ++i) bm[i] = zj[i] > bm[i] ? zj[i] : bm[i];
  }
  // An all −inf row keeps bm = −inf and adds nothing (merge skips it); shift by 0 there.
  for (int64_t i = 0; i < nr; ++i) sh[i] = bm[i] == ninf ? acc_t(0) : bm[i];
  exp_sums(zt, nv, nr, sh, with_entropy, false, bm, bs, ba);
  for (int64_t i = 0; i < nr; ++i) merge(m[r0 + i], s[r0 + i], a[r0 + i], bm[i], bs[i], ba[i]);
}

// Backward epilogue: zt[nv, nr] becomes the gradient tile gt = (∂loss/∂z)ᵀ; db (the
// task's own rows of the bias gradient, or nullptr) += Σ over the tile's rows.
// Backward epilogue with a soft cap: as below, times the slope ∂z/∂(z_raw/T) = 1 − tanh²,
// recomputed from the raw logit element by element (target column included).
template <typename acc_t>
void backward_tile_capped(acc_t* zt, int64_t nv, int64_t nr, int64_t v0, int64_t r0,
                          const RowInputs<acc_t>& in, acc_t* db) {
  const acc_t *l = in.lse + r0, *g = in.g + r0;
  const acc_t *ge = in.ge ? in.ge + r0 : nullptr, *hr = in.ent ? in.ent + r0 : nullptr;
  const int64_t* tr = in.targets + r0;
  for (int64_t j = 0; j < nv; ++j) {
    const acc_t bj = in.bias ? in.bias[v0 + j] : acc_t(0);
    acc_t* zj = zt + j * nr;
    acc_t sum = 0;
    for (int64_t i = 0; i < nr; ++i) {
      const acc_t t = std::tanh((zj[i] + bj) * in.inv_cap);
      const acc_t lp = capped(zj[i], bj, in) - l[i];
      const acc_t p = exp_acc(lp);
      acc_t gz = ge ? -p * (g[i] + ge[i] * (lp + hr[i])) : -g[i] * p;
      if (tr[i] == v0 + j) gz += g[i];
      zj[i] = gz * (acc_t(1) - t * t);
      sum += zj[i];
    }
    if (db != nullptr) db[v0 + j] += sum;
  }
}

template <typename acc_t>
void backward_tile(acc_t* zt, int64_t nv, int64_t nr, int64_t v0, int64_t r0,
                   const RowInputs<acc_t>& in, acc_t* db) {
  if (in.inv_cap != acc_t(0)) return backward_tile_capped(zt, nv, nr, v0, r0, in, db);
  const acc_t *l = in.lse + r0, *g = in.g + r0;
  scale_tile(zt, nv, nr, v0, in);
  for (int64_t j = 0; j < nv; ++j) {
    acc_t* zj = zt + j * nr;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<acc_t, float>) {  // exp16: see tiles.h
      if (in.ge == nullptr) {
        constexpr int kSign = static_cast<int>(0x80000000u);
        for (int64_t i = 0; i < nr; i += 16) {
          const __mmask16 k = lanes_from(i, nr);
          const __m512 lp =
              _mm512_sub_ps(_mm512_maskz_loadu_ps(k, zj + i), _mm512_maskz_loadu_ps(k, l + i));
          const __m512i neg_g = _mm512_xor_si512(  // −g: the sign bit flipped, as −g[i]
              _mm512_castps_si512(_mm512_maskz_loadu_ps(k, g + i)), _mm512_set1_epi32(kSign));
          _mm512_mask_storeu_ps(zj + i, k, _mm512_mul_ps(_mm512_castsi512_ps(neg_g), exp16(lp)));
        }
        continue;
      }
    }
#endif
    if (in.ge != nullptr) {
      // ∂H/∂z_j = −p_j (log p_j + H): G = −p (g + ge (log p + H)).
      const acc_t *ge = in.ge + r0, *hr = in.ent + r0;
#pragma omp simd
      for (int64_t i = 0; i < nr; ++i) {
        const acc_t lp = zj[i] - l[i];
        zj[i] = -exp_acc(lp) * (g[i] + ge[i] * (lp + hr[i]));
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < nr; ++i) zj[i] = -g[i] * exp_acc(zj[i] - l[i]);
    }
  }
  for (int64_t i = 0; i < nr; ++i) {
    const int64_t tr = in.targets[r0 + i];
    if (tr >= v0 && tr < v0 + nv) zt[(tr - v0) * nr + i] += g[i];
  }
  if (db == nullptr) return;
  for (int64_t j = 0; j < nv; ++j) {
    const acc_t* zj = zt + j * nr;
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < nr; ++i) sum += zj[i];
    db[v0 + j] += sum;
  }
}

template <typename acc_t>
void set_cap(RowInputs<acc_t>& in, std::optional<double> softcap, double inv_temperature) {
  if (!softcap.has_value()) return;
  in.inv_cap = static_cast<acc_t>(1.0 / *softcap);
  in.cap_post = static_cast<acc_t>(*softcap * inv_temperature);
}

template <typename acc_t, typename Make>
void forward_tiles(const Plan& p, const Make& make_engine, int64_t N, int64_t V,
                   const RowInputs<acc_t>& in, bool with_entropy, acc_t* pm, acc_t* ps,
                   acc_t* pa, acc_t* tgt) {
  for_each_tile<acc_t>(p, N, V, false, make_engine,
                       [&](auto&, Scratch<acc_t>& sc, int64_t task, int64_t v0, int64_t nv,
                           int64_t r0, int64_t nr) {
                         const int64_t o = task * N;
                         forward_tile(sc.tile.data(), nv, nr, v0, r0, in, with_entropy, sc,
                                      pm + o, ps + o, pa + o, tgt);
                       });
}

// dh partials: [tasks, N, H], or [tasks, H, N] for engines that accumulate dhᵀ.
// grad_w: the fresh dW [V, H] the engines write (row_bytes per vocabulary entry), or null.
template <typename acc_t, typename Make>
void backward_tiles(const Plan& p, const Make& make_engine, int64_t N, int64_t V, int64_t H,
                    const RowInputs<acc_t>& in, acc_t* dh_part, acc_t* grad_b, void* grad_w,
                    size_t row_bytes) {
  for_each_tile<acc_t>(
      p, N, V, true, make_engine,
      [&](auto& eng, Scratch<acc_t>& sc, int64_t task, int64_t v0, int64_t nv, int64_t r0,
          int64_t nr) {
        backward_tile(sc.tile.data(), nv, nr, v0, r0, in, grad_b);
        acc_t* dh = dh_part + task * N * H;
        // the task's first tile: its dh partial zeroed and its dW rows faulted in, here
        if (r0 == 0 && v0 == block_begin(p, task) * p.vblock) {
          std::fill(dh, dh + N * H, acc_t(0));
          if (grad_w != nullptr) {
            const int64_t v1 = std::min(V, block_begin(p, task + 1) * p.vblock);
            prefault(static_cast<char*>(grad_w) + v0 * row_bytes, (v1 - v0) * row_bytes);
          }
        }
        eng.grads(r0, nr, sc.tile.data(), r0 == 0, dh);
      });
}

template <typename acc_t>
std::tuple<Tensor, Tensor, Tensor> forward_impl(const Tensor& hidden_in, const Tensor& weight,
                                                const std::optional<Tensor>& bias_in,
                                                const Tensor& targets_in, double inv_temperature,
                                                int64_t ignore_index, bool with_entropy,
                                                std::optional<double> softcap) {
  const auto dt = compute_dtype(hidden_in);
  const int64_t N = hidden_in.size(0), H = hidden_in.size(1), V = weight.size(0);
  const Tensor targets = targets_in.to(at::kLong).contiguous();
  Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(dt).contiguous();
  constexpr acc_t ninf = -std::numeric_limits<acc_t>::infinity();

  const auto opts = hidden_in.options().dtype(dt);
  Tensor lse = at::empty({N}, opts);
  Tensor logprobs = at::empty({N}, opts);
  Tensor entropy = at::empty({with_entropy ? N : 0}, opts);
  if (N == 0) return {logprobs, entropy, lse};

  const Plan p = make_plan(N, V, H);
  Tensor pm = at::full({p.tasks, N}, ninf, opts);
  Tensor ps = at::zeros({p.tasks, N}, opts);
  Tensor pa = at::zeros({p.tasks, N}, opts);
  Tensor tgt = at::zeros({N}, opts);
  RowInputs<acc_t> in;
  in.targets = targets.data_ptr<int64_t>();
  in.bias = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;
  in.inv_t = static_cast<acc_t>(inv_temperature);
  set_cap(in, softcap, inv_temperature);
  acc_t *pmp = pm.data_ptr<acc_t>(), *psp = ps.data_ptr<acc_t>(), *pap = pa.data_ptr<acc_t>();
  acc_t* tgt_p = tgt.data_ptr<acc_t>();

  const Path path = choose_path<acc_t>(hidden_in, weight);
  if constexpr (std::is_same_v<acc_t, float>) {
    if (path == Path::kBf16) {
      const Bf16Hidden hid(hidden_in.contiguous(), p, false);
      forward_tiles<acc_t>(p, [&] { return Bf16Tiles(hid, weight, nullptr, p); }, N, V, in,
                           with_entropy, pmp, psp, pap, tgt_p);
    } else if (path == Path::kF32) {
      const Tensor h = hidden_in.contiguous();
      const float* hp = h.const_data_ptr<float>();
      Reused<float> ht(N * H);
      transpose_row_tiles(hp, N, H, p.rows, ht.data());
      forward_tiles<acc_t>(p, [&] { return F32Tiles(hp, ht.data(), N, weight, nullptr, p); },
                           N, V, in, with_entropy, pmp, psp, pap, tgt_p);
    }
  }
  if (path == Path::kBlas) {
    const Tensor h = hidden_in.to(dt).contiguous();
    forward_tiles<acc_t>(p, [&] { return BlasTiles<acc_t>(h, weight, nullptr, p); }, N, V, in,
                         with_entropy, pmp, psp, pap, tgt_p);
  }

  // Combine the task partials in task order (deterministic), then the outputs.
  acc_t* lse_p = lse.data_ptr<acc_t>();
  acc_t* lp_p = logprobs.data_ptr<acc_t>();
  acc_t* ent_p = with_entropy ? entropy.data_ptr<acc_t>() : nullptr;
  for (int64_t r = 0; r < N; ++r) {
    acc_t m = ninf, s = 0, a = 0;
    for (int64_t task = 0; task < p.tasks; ++task)
      merge(m, s, a, pmp[task * N + r], psp[task * N + r], pap[task * N + r]);
    const acc_t log_s = std::log(s);
    lse_p[r] = m + log_s;
    const bool valid = in.targets[r] != ignore_index;
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
    double inv_temperature, int64_t ignore_index, bool need_weight_grad,
    std::optional<double> softcap) {
  const auto dt = compute_dtype(hidden_in);
  const int64_t N = hidden_in.size(0), H = hidden_in.size(1), V = weight.size(0);
  const Tensor targets = targets_in.to(at::kLong).contiguous();
  const Tensor lse = lse_in.to(dt).contiguous();
  const bool with_entropy = grad_entropy.has_value() && entropy_in.has_value();
  Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(dt).contiguous();
  const acc_t inv_t = static_cast<acc_t>(inv_temperature);
  const auto opts = hidden_in.options().dtype(dt);

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
  RowInputs<acc_t> in;
  in.targets = tp;
  in.bias = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;
  in.inv_t = inv_t;
  set_cap(in, softcap, inv_temperature);
  in.lse = lse.data_ptr<acc_t>();
  in.g = gp;
  in.ge = gep;
  in.ent = with_entropy ? ent.data_ptr<acc_t>() : nullptr;
  const bool need_bias_grad = need_weight_grad && bias.defined();

  const Path path = choose_path<acc_t>(hidden_in, weight);
  const bool bf16 = path == Path::kBf16;
  // grad_w in weight's dtype on the bf16 path (rounded per block), else in acc_t.
  Tensor grad_w = need_weight_grad ? at::empty({V, H}, bf16 ? weight.options() : opts) : Tensor();
  Tensor grad_b = need_bias_grad ? at::zeros({V}, opts) : Tensor();
  if (N == 0 && need_weight_grad) grad_w.zero_();
  const Plan p = make_plan(std::max<int64_t>(N, 1), V, H);
  acc_t* gbp = need_bias_grad ? grad_b.data_ptr<acc_t>() : nullptr;

  // One dh partial per task (tasks split the vocabulary, dh sums over it); the bf16
  // engine accumulates dhᵀ, the fp32 one dhᵀ or dh (F32Tiles::dh_transposed).
  const bool dh_t =
      path == Path::kBf16 || (path == Path::kF32 && F32Tiles::dh_transposed(N, H));
  Reused<acc_t> dh_part(p.tasks * N * H);  // [tasks, H, N] when dh_t, else [tasks, N, H]
  acc_t* dhp = dh_part.data();
  if constexpr (std::is_same_v<acc_t, float>) {
    if (N > 0 && path == Path::kBf16) {
      const Bf16Hidden hid(hidden_in.contiguous(), p, need_weight_grad);
      uint16_t* gwp =
          need_weight_grad ? reinterpret_cast<uint16_t*>(grad_w.data_ptr()) : nullptr;
      // dW rows are written by end_block's rounding loop, which takes its page faults
      // more cheaply than a GEMM does: no prefault (it measured 1.5% slower at N=256).
      backward_tiles<acc_t>(p, [&] { return Bf16Tiles(hid, weight, gwp, p); }, N, V, H, in,
                            dhp, gbp, nullptr, 0);
    } else if (N > 0 && path == Path::kF32) {
      const Tensor h = hidden_in.contiguous();
      const float* hp = h.const_data_ptr<float>();
      Reused<float> ht(N * H);
      transpose_row_tiles(hp, N, H, p.rows, ht.data());
      float* gwp = need_weight_grad ? grad_w.data_ptr<float>() : nullptr;
      backward_tiles<acc_t>(p, [&] { return F32Tiles(hp, ht.data(), N, weight, gwp, p); }, N,
                            V, H, in, dhp, gbp, gwp, H * sizeof(float));
    }
  }
  if (N > 0 && path == Path::kBlas) {
    const Tensor h = hidden_in.to(dt).contiguous();
    acc_t* gwp = need_weight_grad ? grad_w.data_ptr<acc_t>() : nullptr;
    backward_tiles<acc_t>(p, [&] { return BlasTiles<acc_t>(h, weight, gwp, p); }, N, V, H, in,
                          dhp, gbp, gwp, H * sizeof(acc_t));
  }

  Tensor grad_h = at::empty({N, H}, hidden_in.options());  // contiguous
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_h.scalar_type(), "combine",
                                    [&] {
                                      combine_partials(dhp, p.tasks, N, H, dh_t,
                                                       grad_h.data_ptr<scalar_t>());
                                    });
  }
  if (need_weight_grad) grad_w = grad_w.to(weight.scalar_type());
  else grad_w = at::empty({0}, weight.options());
  if (need_bias_grad) grad_b = grad_b.to(bias_in->scalar_type());
  else grad_b = at::empty({0}, weight.options());
  return {grad_h, grad_w, grad_b};
}

}  // namespace

namespace sgsd_native {

std::tuple<Tensor, Tensor, Tensor> linear_logprobs_forward(
    const Tensor& hidden, const Tensor& weight, const std::optional<Tensor>& bias,
    const Tensor& targets, double inv_temperature, int64_t ignore_index, bool with_entropy,
    std::optional<double> softcap) {
  check_inputs(hidden, weight, bias, targets);
  const Tensor hd = hidden.detach(), wd = weight.detach().contiguous();
  std::optional<Tensor> bd;
  if (bias.has_value()) bd = bias->detach();
  if (compute_dtype(hidden) == at::kDouble)
    return forward_impl<double>(hd, wd, bd, targets, inv_temperature, ignore_index, with_entropy,
                                softcap);
  return forward_impl<float>(hd, wd, bd, targets, inv_temperature, ignore_index, with_entropy,
                             softcap);
}

std::tuple<Tensor, Tensor, Tensor> linear_logprobs_backward(
    const Tensor& grad_logprobs, const std::optional<Tensor>& grad_entropy, const Tensor& hidden,
    const Tensor& weight, const std::optional<Tensor>& bias, const Tensor& targets,
    const Tensor& lse, const std::optional<Tensor>& entropy, double inv_temperature,
    int64_t ignore_index, bool need_weight_grad, std::optional<double> softcap) {
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
                                 need_weight_grad, softcap);
  return backward_impl<float>(grad_logprobs.detach(), grad_entropy, hd, wd, bd, targets,
                              lse.detach(), entropy, inv_temperature, ignore_index,
                              need_weight_grad, softcap);
}

bool bf16_gemms() { return bf16_tiles_available(); }

std::vector<int64_t> tile_plan(int64_t N, int64_t V, int64_t H) {
  TORCH_CHECK(N >= 1 && V >= 1 && H >= 1, "sgsd native: tile_plan needs N, V, H >= 1");
  const Plan p = make_plan(N, V, H);
  return {p.rows, p.vblock};
}

}  // namespace sgsd_native
