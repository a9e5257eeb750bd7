// Shared pieces of the native CPU kernels (linear_logprobs.cpp): the vectorisable exp,
// the one-BLAS-thread guard, the tile plan, input checks, W-block conversion and the
// merge of partial softmax statistics. See linear_logprobs.cpp for the kernel design.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <dlfcn.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace sgsd_native {

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

#if defined(__AVX512F__)
// exp_approx on 16 lanes, with the same polynomial, clamps and NaN behaviour, round to
// nearest for n and AVX-512's scalef for y·2^n: 18 µs per 256×256 tile against 27 µs for
// the compiler-vectorised exp_approx loop (single thread, best of 200, AMD EPYC dev box),
// at 1.2e-7 largest relative error on [-87, 0] (exp_approx: 7.9e-8).
inline __m512 exp16(__m512 x) {
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_set1_ps(88.0f), x);  // x second: a NaN x stays NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  const __m512 r2 = _mm512_mul_ps(r, r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~underflow), y, n);
}

// The lanes of a row vector from element i on: all 16, or the tail's first nr − i.
inline __mmask16 lanes_from(int64_t i, int64_t nr) {
  const int64_t left = nr - i;
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}
#endif

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

// Fault in [data, data + bytes) of a fresh output before the GEMMs write it: one
// madvise(MADV_POPULATE_WRITE) per task (Linux ≥ 5.14), else zeros written. Left to the
// dW GEMM's stores, first-touch page faults cost ~12 ms per thread of the fp32 backward at
// N=256, V=32768, H=256 (grads 51 → 39 ms per thread with dW pre-faulted; AMD EPYC dev
// box; 0.97× the fp32 backward's CPU time there, 0.98× at V=151936, H=1024). madvise
// faults in whole pages (one shared with the neighbouring task's rows is faulted in, never
// written); the fallback zeroes exactly the task's bytes.
inline void prefault(void* data, size_t bytes) {
  if (bytes == 0) return;
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  constexpr uintptr_t kPage = 4096;
  const uintptr_t b = reinterpret_cast<uintptr_t>(data) & ~(kPage - 1);
  const uintptr_t e = reinterpret_cast<uintptr_t>(data) + bytes;
  if (madvise(reinterpret_cast<void*>(b), e - b, MADV_POPULATE_WRITE) == 0) return;
#endif
  std::memset(data, 0, bytes);
}

// Pull [data, data + bytes) into cache ahead of the GEMM that reads it. For a W block that
// only one row tile uses (N ≤ rows), the fp32 logits GEMM otherwise takes its A operand's
// misses one by one: the fp32 forward at N=256, V=32768, H=256 went 21.8 → 21.0 ms with the
// block prefetched at set_block (AMD EPYC dev box, medians of 7, two runs each). No gain
// measured for bf16 at that shape, nor with several row tiles per block (N=1024, 4096).
inline void prefetch(const void* data, size_t bytes) {
  const char* p = static_cast<const char*>(data);
  for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
}

struct Plan {
  int64_t rows;    // rows per tile
  int64_t vblock;  // vocabulary entries per tile
  int64_t nvb;     // number of vocabulary blocks
  int64_t tasks;   // parallel tasks (each owns a contiguous range of vocabulary blocks)
};

// Tile sizes from single-thread sweeps of the engines' own GEMMs (tile_gemm_seconds) on
// the AMD EPYC dev box (Zen 4, 1 MiB L2 per core), fp32 brgemm:
// H=256: 256×256 tiles ~103 GFLOP/s for all three GEMMs (64-row tiles ~97);
// H=1024: 128 rows × 128 vocabulary: logits 117, dh + dW 111 GFLOP/s per core, against
// 115 / 105 at 256 × 128 and 115 / 100 at 256 × 256 (the W block is 4 KiB per entry, so
// 128 entries keep it in L2 next to a 128-row tile). At N=256, V=151936 fwd+bwd took
// 0.91× the CPU time of 256 × 128 tiles (interleaved, loaded box). With the wide-head
// gradient GEMMs of F32Tiles::wide, 256-row and 64-row tiles, and 64- or 256-entry
// blocks, gave the same time within 1% (1673–1683 ms, quiet box).
inline Plan make_plan(int64_t N, int64_t V, int64_t H) {
  Plan p;
  p.vblock = std::min<int64_t>(V, H <= 512 ? 256 : 128);
  p.rows = std::max<int64_t>(1, std::min<int64_t>(N, H <= 512 ? 256 : 128));
  p.nvb = (V + p.vblock - 1) / p.vblock;
  p.tasks = std::max<int64_t>(1, std::min<int64_t>(p.nvb, at::get_num_threads()));
  return p;
}

inline int64_t block_begin(const Plan& p, int64_t task) { return task * p.nvb / p.tasks; }

inline at::ScalarType compute_dtype(const Tensor& hidden) {
  return hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_inputs(const Tensor& hidden, const Tensor& weight,
                         const std::optional<Tensor>& bias, const Tensor& targets) {
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
inline void convert(const src_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename acc_t>
inline Tensor weight_block(const Tensor& weight, Tensor& buf, int64_t v0, int64_t nv) {
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

// grad_h [N, H] (out_t) = Σ_task part[task] in task order (deterministic), part being
// [tasks, N, H], or [tasks, H, N] when transposed. One pass, rounded once into out_t;
// parallel over row chunks only when large (at N = 256, H = 256 the three ATen ops it
// replaces each forked the OpenMP team: ~4 ms per backward of bf16 on the loaded dev box).
template <typename acc_t, typename out_t>
void combine_partials(const acc_t* part, int64_t tasks, int64_t N, int64_t H, bool transposed,
                      out_t* out) {
  constexpr int64_t kRows = 64;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / (kRows * H));
  const int64_t chunks = (N + kRows - 1) / kRows;
  at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    const int64_t r0 = c0 * kRows, r1 = std::min(N, c1 * kRows);
    if (!transposed) {
      for (int64_t i = r0 * H; i < r1 * H; ++i) {
        acc_t acc = part[i];
        for (int64_t t = 1; t < tasks; ++t) acc += part[t * N * H + i];
        out[i] = static_cast<out_t>(acc);
      }
      return;
    }
    for (int64_t b = r0; b < r1; b += kRows) {
      const int64_t e = std::min(r1, b + kRows);
      for (int64_t k = 0; k < H; ++k) {
        for (int64_t r = b; r < e; ++r) {
          acc_t acc = part[k * N + r];
          for (int64_t t = 1; t < tasks; ++t) acc += part[t * N * H + k * N + r];
          out[r * H + k] = static_cast<out_t>(acc);
        }
      }
    }
  });
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

}  // namespace sgsd_native
