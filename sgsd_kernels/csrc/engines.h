// The tile GEMMs of the native kernels, one engine per compute path (linear_logprobs.cpp
// owns the epilogues). Every engine computes, for a vocabulary block W[v0:v0+nv] and a row
// tile h[r0:r0+nr], the TRANSPOSED logits tile zt[nv, nr] = W_blk·h_tileᵀ (fp32 or fp64)
// and, from the gradient tile gt[nv, nr] = (∂loss/∂z)ᵀ, the updates
// dW_blk += gt·h_tile and dh_tile += gtᵀ·W_blk. The transposed tile is what lets the bf16
// engine run without packing W for the logits GEMM (W rows are its plain A operand) and
// keeps the epilogue's per-token statistics as contiguous vectors over the row tile.
//
//   BlasTiles<acc_t>: fp64, and fp16 (bf16 without bf16 GEMMs) on fp32 copies, through
//     ATen's BLAS (MKL on x86 wheels); low-precision W blocks are converted per block.
//     ~103 GFLOP/s per core at 256×256×256 fp32 on the AMD EPYC dev box (Zen 4, 1 MiB L2),
//     the same for all three GEMM shapes.
//   F32Tiles: fp32 through ATen's oneDNN brgemm micro-kernel, ~117 GFLOP/s per core there.
//   Bf16Tiles: bf16 inputs with fp32 accumulation and fp32 output through ATen's oneDNN
//     brgemm micro-kernel (at::native::cpublas::brgemm, VNNI-packed B): ~232 GFLOP/s per
//     core on the same box (avx512_bf16), vs ~100 for MKL's cblas_gemm_bf16bf16f32 and for
//     fp32. The gradient tile is rounded to bf16 for the dh and dW GEMMs (as eager bf16
//     does with every operand); logits, softmax and all accumulations stay fp32.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "reused.h"
#include "tiles.h"

namespace sgsd_native {

// ---------------------------------------------------------------- fp32 / fp64 via BLAS

template <typename acc_t>
class BlasTiles {
 public:
  // h: [N, H] in acc_t, contiguous; weight: contiguous [V, H]; grad_w: [V, H] in acc_t
  // (each block's rows written by the task that owns it) or nullptr.
  BlasTiles(const Tensor& h, const Tensor& weight, acc_t* grad_w, const Plan& p)
      : h_(h),
        weight_(weight),
        grad_w_(grad_w),
        wbuf_(weight.scalar_type() == h.scalar_type()
                  ? Tensor()
                  : at::empty({p.vblock, h.size(1)}, h.options())) {}

  void set_block(int64_t v0, int64_t nv, bool /*backward*/) {
    v0_ = v0, nv_ = nv;
    w_ = weight_block<acc_t>(weight_, wbuf_, v0, nv);
  }

  void logits(int64_t r0, int64_t nr, acc_t* zt) {
    Tensor z = at::from_blob(zt, {nv_, nr}, h_.options());
    at::mm_out(z, w_, h_.narrow(0, r0, nr).t());
  }

  // first: the block's first row tile (dW overwritten); dh: the task's [N, H].
  void grads(int64_t r0, int64_t nr, acc_t* gt, bool first, acc_t* dh) {
    const int64_t H = h_.size(1);
    const Tensor g = at::from_blob(gt, {nv_, nr}, h_.options());
    const Tensor hb = h_.narrow(0, r0, nr);
    at::from_blob(dh + r0 * H, {nr, H}, h_.options()).addmm_(g.t(), w_);
    if (grad_w_ == nullptr) return;
    Tensor d = at::from_blob(grad_w_ + v0_ * H, {nv_, H}, h_.options());
    if (first) {
      at::mm_out(d, g, hb);
    } else {
      d.addmm_(g, hb);
    }
  }

  void end_block() {}
  void finish() {}

 private:
  Tensor h_, weight_, wbuf_, w_;
  acc_t* grad_w_;
  int64_t v0_ = 0, nv_ = 0;
};

// ---------------------------------------------------------------- fp32 via oneDNN brgemm

#if defined(__AVX512F__)
// One full 16×16 block of 32-bit elements through registers: rows in, unpack 32- and 64-bit
// pairs, then two 128-bit-lane shuffles leave column k in register k.
inline void transpose16x16(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));      // column 4L   of rows i..i+3
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));  // column 4L+1
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));  // column 4L+2
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));  // column 4L+3
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    _mm512_storeu_ps(dst + j * ld_dst, _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88));
    _mm512_storeu_ps(dst + (j + 8) * ld_dst, _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd));
  }
}
#endif

// dst[c * ld_dst + r] = src[r * ld_src + c] for a rows × cols block of 32-bit elements,
// through 16×16 blocks: in AVX-512 registers where the block is full (a 256×256 fp32 W
// block took 3 ns per element through the scalar path, 16% of the fp32 backward at N=256,
// H=256 on the AMD EPYC dev box), else element by element (contiguous reads and writes).
template <typename T>
inline void transpose(const T* src, int64_t ld_src, int64_t rows, int64_t cols, T* dst,
                      int64_t ld_dst) {
  static_assert(sizeof(T) == 4, "transpose moves 32-bit elements");
  T blk[16][16];
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t nr = std::min<int64_t>(16, rows - r0);
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int64_t nc = std::min<int64_t>(16, cols - c0);
#if defined(__AVX512F__)
      if (nr == 16 && nc == 16) {
        transpose16x16(reinterpret_cast<const float*>(src + r0 * ld_src + c0), ld_src,
                       reinterpret_cast<float*>(dst + c0 * ld_dst + r0), ld_dst);
        continue;
      }
#endif
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t c = 0; c < nc; ++c) blk[r][c] = src[(r0 + r) * ld_src + c0 + c];
      for (int64_t c = 0; c < nc; ++c)
        for (int64_t r = 0; r < nr; ++r) dst[(c0 + c) * ld_dst + r0 + r] = blk[r][c];
    }
  }
}

// Hidden's row tiles transposed once per call into ht [N·H], the B operand of the logits
// GEMM: tile r0 is [H, nr] at r0·H.
inline void transpose_row_tiles(const float* h, int64_t N, int64_t H, int64_t rows, float* ht) {
  for (int64_t r0 = 0; r0 < N; r0 += rows) {
    const int64_t nr = std::min(rows, N - r0);
    transpose(h + r0 * H, H, nr, H, ht + r0 * H, nr);
  }
}

// fp32 operands through ATen's oneDNN brgemm micro-kernel (plain row-major B, no packing):
// ~117 GFLOP/s per core at 256×256×256 on the dev box against ~104 for MKL through
// at::mm_out (best of 30, interleaved). Where oneDNN's fp32 kernel is unavailable brgemm
// falls back to ATen's BLAS GEMM with the same operands, so this path is always correct.
class F32Tiles {
 public:
  // h: fp32 contiguous [N, H]; ht: transpose_row_tiles of h; weight: fp32 contiguous [V, H];
  // grad_w: fp32 [V, H] or nullptr.
  F32Tiles(const float* h, const float* ht, int64_t N, const Tensor& weight, float* grad_w,
           const Plan& p)
      : h_(h),
        ht_(ht),
        w_(weight.const_data_ptr<float>()),
        grad_w_(grad_w),
        N_(N),
        H_(weight.size(1)),
        rows_(p.rows),
        dh_t_(dh_transposed(N, weight.size(1))),
        dw_t_(grad_w != nullptr && wide(weight.size(1))),
        gt_t_(!dh_t_ || dw_t_),
        wt_(dh_t_ ? static_cast<size_t>(p.vblock * weight.size(1)) : 0),
        gtt_(gt_t_ ? static_cast<size_t>(p.vblock * p.rows) : 0),
        dwt_(dw_t_ ? static_cast<size_t>(p.vblock * weight.size(1)) : 0) {}

  // A GEMM whose B and C rows are H fp32 apart runs slowly once H ≥ 1024 (4 KiB strides
  // alias in L1): single-thread brgemm 128×1024×128 (M×N×K, ldb = ldc = 1024) 80–110
  // GFLOP/s from run to run, against a steady 115 for 1024×128×128 with 128-wide rows
  // (AMD EPYC dev box). Wide heads therefore keep H as the M side of both gradient GEMMs.
  static bool wide(int64_t H) { return H > 512; }

  // The dh GEMM needs one operand transposed: either the W block (once per block, nv·H
  // elements; dh partials are then dhᵀ [H, N]) or each gradient tile (nv·nr per row tile,
  // nv·N per block; dh partials are [N, H]). The smaller of the two while N ≥ H; W for a
  // wide head whatever N (the [N, H] form is the slow wide-row GEMM).
  static bool dh_transposed(int64_t N, int64_t H) { return N >= H || wide(H); }

  void set_block(int64_t v0, int64_t nv, bool backward) {
    v0_ = v0, nv_ = nv;
    // (only blocks that fit in L2 with room to spare: at H = 256 a block is 256 KiB)
    const size_t block_bytes = nv * H_ * sizeof(float);
    if (N_ <= rows_ && block_bytes <= (size_t(512) << 10)) prefetch(w_ + v0 * H_, block_bytes);
    if (backward && dh_t_) transpose(w_ + v0 * H_, H_, nv, H_, wt_.data(), nv);  // Wᵀ [H, nv]
  }

  void logits(int64_t r0, int64_t nr, float* zt) {
    at::native::cpublas::brgemm(nv_, nr, H_, H_, nr, nr, false, w_ + v0_ * H_, ht_ + r0 * H_,
                                zt, false);
  }

  // dh: the task's partial, [H, N] when dh_transposed(N, H), else [N, H].
  void grads(int64_t r0, int64_t nr, const float* gt, bool first, float* dh) {
    if (gt_t_) transpose(gt, nr, nv_, nr, gtt_.data(), nv_);  // gtᵀ [nr, nv]
    if (dh_t_) {
      // dhᵀ[:, r0:r0+nr] += Wᵀ·gt  (M = H, N = nr, K = nv)
      at::native::cpublas::brgemm(H_, nr, nv_, nv_, nr, N_, true, wt_.data(), gt, dh + r0,
                                  false);
    } else {
      // dh[r0:r0+nr] += gtᵀ·W_blk  (M = nr, N = H, K = nv)
      at::native::cpublas::brgemm(nr, H_, nv_, nv_, H_, H_, true, gtt_.data(), w_ + v0_ * H_,
                                  dh + r0 * H_, false);
    }
    if (grad_w_ == nullptr) return;
    if (dw_t_) {
      // dW_blkᵀ (+)= h_tileᵀ·gtᵀ  (M = H, N = nv, K = nr) into the block's [H, nv] scratch,
      // transposed into grad_w by end_block.
      at::native::cpublas::brgemm(H_, nv_, nr, nr, nv_, nv_, !first, ht_ + r0 * H_,
                                  gtt_.data(), dwt_.data(), false);
      return;
    }
    // dW_blk (+)= gt·h_tile  (M = nv, N = H, K = nr)
    at::native::cpublas::brgemm(nv_, H_, nr, nr, H_, H_, !first, gt, h_ + r0 * H_,
                                grad_w_ + v0_ * H_, false);
  }

  void end_block() {
    if (dw_t_) transpose(dwt_.data(), nv_, H_, nv_, grad_w_ + v0_ * H_, H_);
  }
  void finish() {}

 private:
  const float *h_, *ht_, *w_;
  float* grad_w_;
  int64_t N_, H_, rows_, v0_ = 0, nv_ = 0;
  bool dh_t_, dw_t_;
  bool gt_t_;  // the gradient tile is also needed transposed: by the [N, H] dh or by dWᵀ
  Reused<float> wt_, gtt_, dwt_;
};

// ---------------------------------------------------------------- bf16 via oneDNN brgemm

inline uint16_t bf16_bits(float x) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return x != x ? uint16_t(0x7FC0) : static_cast<uint16_t>(r);
}

// True when ATen's brgemm runs the bf16 VNNI micro-kernel here and the CPU has native bf16
// dot products (without avx512_bf16 oneDNN emulates them, slower than fp32 BLAS). Probed
// once with a 2×2×2 product; re-checks torch.backends.mkldnn.enabled (brgemm honours it).
inline bool bf16_tiles_available() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool probed = [] {
    if (!__builtin_cpu_supports("avx512bf16")) return false;
    try {
      const at::BFloat16 a[4] = {1.f, 2.f, 3.f, 4.f};  // A = [[1, 2], [3, 4]]
      // B = [[5, 6], [7, 8]] in VNNI pairs: (B[0][0], B[1][0]), (B[0][1], B[1][1]).
      const at::BFloat16 b[4] = {5.f, 7.f, 6.f, 8.f};
      float c[4] = {0, 0, 0, 0};
      at::native::cpublas::brgemm(2, 2, 2, 2, 2, 2, false, a, b, c, true);
      at::native::cpublas::brgemm_release(true);
      return c[0] == 19.f && c[1] == 22.f && c[2] == 43.f && c[3] == 50.f;
    } catch (const std::exception&) {
      return false;
    }
  }();
  return probed && at::globalContext().userEnabledMkldnn();
#else
  return false;
#endif
}

// Operands shared by all tasks, packed once per call (N·H elements each): hidden as the
// logits GEMM's B (K = Hp, N = nr per row tile, VNNI pairs along H) and as the dW GEMM's B
// (K = nr rounded up to even, N = H, VNNI pairs of rows). Hp = H rounded up to even; pads
// are zeros.
struct Bf16Hidden {
  int64_t N = 0, H = 0, Hp = 0, rows = 0;
  Reused<uint16_t> fwd, bwd;

  Bf16Hidden(const Tensor& hidden /*bf16 contiguous*/, const Plan& p, bool need_bwd)
      : N(hidden.size(0)),
        H(hidden.size(1)),
        Hp(H + (H & 1)),
        rows(p.rows),
        fwd(static_cast<size_t>(N * Hp), 0),
        bwd(need_bwd ? static_cast<size_t>((N + 1) * H) : 0, 0) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(hidden.const_data_ptr());
    for (int64_t r0 = 0; r0 < N; r0 += rows) {
      const int64_t nr = std::min(rows, N - r0);
      uint16_t* f = fwd.data() + r0 * Hp;
      for (int64_t i = 0; i < nr; ++i)
        for (int64_t k = 0; k < H; ++k) f[((k >> 1) * nr + i) * 2 + (k & 1)] = h[(r0 + i) * H + k];
      if (!need_bwd) continue;
      uint16_t* b = bwd.data() + r0 * H;
      for (int64_t i = 0; i < nr; ++i)
        for (int64_t k = 0; k < H; ++k) b[((i >> 1) * H + k) * 2 + (i & 1)] = h[(r0 + i) * H + k];
    }
  }
};

class Bf16Tiles {
 public:
  // weight: bf16 contiguous [V, H]; grad_w: bf16 [V, H] or nullptr. Each block's dW is
  // accumulated in fp32 over all row tiles and rounded once into grad_w (no fp32 [V, H]).
  Bf16Tiles(const Bf16Hidden& hid, const Tensor& weight, uint16_t* grad_w, const Plan& p)
      : hid_(hid),
        w_(reinterpret_cast<const uint16_t*>(weight.const_data_ptr())),
        grad_w_(grad_w),
        dw_(grad_w != nullptr ? p.vblock * hid.H : 0),
        wpad_(hid.Hp != hid.H ? p.vblock * hid.Hp : 0),
        wt_(hid.H * (p.vblock + 1)),
        gt_(p.vblock * (p.rows + 1)),
        gtv_((p.vblock + 1) * p.rows) {}

  // dh partials are dhᵀ [H, N]
  void set_block(int64_t v0, int64_t nv, bool backward) {
    v0_ = v0, nv_ = nv, nvp_ = nv + (nv & 1);
    const int64_t H = hid_.H, Hp = hid_.Hp;
    const uint16_t* w = w_ + v0 * H;
    if (Hp != H) {  // odd H: rows padded with a zero column for the even VNNI depth
      for (int64_t j = 0; j < nv; ++j) {
        std::memcpy(wpad_.data() + j * Hp, w + j * H, H * sizeof(uint16_t));
        wpad_[j * Hp + H] = 0;
      }
    }
    if (!backward) return;
    // Wᵀ [H, nvp] (A of dhᵀ += Wᵀ·gt), built from 32-bit words (W[j][k], W[j+1][k]) in
    // 16×16-word blocks (a zero high half pads an odd nv): a scalar 16-bit transpose cost
    // ~3 ns per element, 12% of the bf16 backward at N=256 on the dev box.
    const int64_t half = nvp_ / 2;
    uint32_t* wt = reinterpret_cast<uint32_t*>(wt_.data());
    uint32_t blk[16][16];
    for (int64_t p0 = 0; p0 < half; p0 += 16) {
      const int64_t np = std::min<int64_t>(16, half - p0);
      for (int64_t k0 = 0; k0 < H; k0 += 16) {
        const int64_t nk = std::min<int64_t>(16, H - k0);
        for (int64_t q = 0; q < np; ++q) {
          const int64_t j = 2 * (p0 + q);
          const uint16_t* lo = w + j * H + k0;
          if (j + 1 < nv) {
            const uint16_t* hi = lo + H;
#pragma omp simd
            for (int64_t k = 0; k < nk; ++k) blk[q][k] = uint32_t(lo[k]) | uint32_t(hi[k]) << 16;
          } else {
            for (int64_t k = 0; k < nk; ++k) blk[q][k] = uint32_t(lo[k]);
          }
        }
#if defined(__AVX512F__)
        if (np == 16 && nk == 16) {
          transpose16x16(reinterpret_cast<const float*>(&blk[0][0]), 16,
                         reinterpret_cast<float*>(wt + k0 * half + p0), half);
          continue;
        }
#endif
        for (int64_t k = 0; k < nk; ++k) {
          uint32_t* out = wt + (k0 + k) * half + p0;
#pragma omp simd
          for (int64_t q = 0; q < np; ++q) out[q] = blk[q][k];
        }
      }
    }
  }

  void logits(int64_t r0, int64_t nr, float* zt) {
    const bool padded = hid_.Hp != hid_.H;
    const uint16_t* a = padded ? wpad_.data() : w_ + v0_ * hid_.H;
    at::native::cpublas::brgemm(nv_, nr, hid_.Hp, hid_.Hp, nr, nr, false, bf(a),
                                bf(hid_.fwd.data() + r0 * hid_.Hp), zt, true);
  }

  // first: the block's first row tile; dht: the task's fp32 [H, N].
  void grads(int64_t r0, int64_t nr, const float* gt, bool first, float* dht) {
    const int64_t nrp = nr + (nr & 1), H = hid_.H, N = hid_.N;
    uint16_t* g = gt_.data();
    uint16_t* gv = gtv_.data();
    // Rows j, j+1 of gt at once: bf16 rows of the plain copy and 32-bit VNNI words
    // (gt[j][i], gt[j+1][i]) of the paired copy (high half 0 past an odd nv), all
    // contiguous vector stores.
    uint32_t* gv32 = reinterpret_cast<uint32_t*>(gv);
    for (int64_t j = 0; j < nv_; j += 2) {
      const float* lo = gt + j * nr;
      uint16_t* plo = g + j * nrp;
      uint32_t* pair = gv32 + (j >> 1) * nr;
      if (j + 1 < nv_) {
        const float* hi = lo + nr;
        uint16_t* phi = plo + nrp;
#pragma omp simd
        for (int64_t i = 0; i < nr; ++i) {
          const uint16_t a = bf16_bits(lo[i]), b = bf16_bits(hi[i]);
          plo[i] = a, phi[i] = b;
          pair[i] = uint32_t(a) | (uint32_t(b) << 16);
        }
        if (nrp != nr) phi[nr] = 0;
      } else {
#pragma omp simd
        for (int64_t i = 0; i < nr; ++i) {
          const uint16_t a = bf16_bits(lo[i]);
          plo[i] = a;
          pair[i] = uint32_t(a);
        }
      }
      if (nrp != nr) plo[nr] = 0;
    }
    // dhᵀ[:, r0:r0+nr] += Wᵀ·gt  (M = H, N = nr, K = nvp)
    at::native::cpublas::brgemm(H, nr, nvp_, nvp_, nr, N, true, bf(wt_.data()), bf(gv),
                                dht + r0, true);
    // dW_blk (+)= gt·h_tile  (M = nv, N = H, K = nrp)
    if (grad_w_ != nullptr)
      at::native::cpublas::brgemm(nv_, H, nrp, nrp, H, H, !first, bf(g),
                                  bf(hid_.bwd.data() + r0 * H), dw_.data(), true);
  }

  void end_block() {
    if (grad_w_ == nullptr) return;
    uint16_t* out = grad_w_ + v0_ * hid_.H;
    const float* acc = dw_.data();
    const int64_t n = nv_ * hid_.H;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = bf16_bits(acc[i]);
  }

  void finish() { at::native::cpublas::brgemm_release(true); }

 private:
  static const at::BFloat16* bf(const uint16_t* p) {
    return reinterpret_cast<const at::BFloat16*>(p);
  }

  const Bf16Hidden& hid_;
  const uint16_t* w_;
  uint16_t* grad_w_;
  Reused<float> dw_;
  Reused<uint16_t> wpad_, wt_, gt_, gtv_;
  int64_t v0_ = 0, nv_ = 0, nvp_ = 0;
};

// ---------------------------------------------------------------- engine choice

// Which engine runs a call: bf16 GEMMs for bf16 where the CPU has them, oneDNN fp32
// brgemm for fp32, ATen BLAS on fp32 copies for fp16 (and bf16 elsewhere), fp64 BLAS.
enum class Path { kBf16, kF32, kBlas };

template <typename acc_t>
Path choose_path(const Tensor& hidden, const Tensor& weight) {
  if (!std::is_same_v<acc_t, float>) return Path::kBlas;
  if (hidden.scalar_type() == at::kFloat) return Path::kF32;
  if (hidden.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 &&
      bf16_tiles_available())
    return Path::kBf16;
  return Path::kBlas;
}

}  // namespace sgsd_native
