// Native CPU kernels for the top-k local support terms (docs/design.md §3.2, the "native"
// backend of linear_gated_kd_loss(..., local_support_top_k=k)). The teacher logits GEMMs
// stay in Python (torch.mm over row chunks, ops/native_backend/local_support.py); these
// kernels replace everything around them:
//
//   local_support_teacher   per chunk of teacher logits, stored vocabulary-major
//                           ([V, R] = W·hᵀ, the faster GEMM layout here), ONE sweep over V
//                           keeps every row's running top-k (a per-row bar and a small
//                           candidate buffer), then adds y_t to the support and writes the
//                           teacher's local log-probs: no torch.topk, no merge of per-block
//                           top-k lists, no element-wise passes over the chunk;
//   local_support_student   the student's k + 1 support logits (gathered dot products),
//                           its local log-softmax, Δ̃ and the local KL, per row;
//   local_support_backward  recomputes the support logits, forms the logit gradient
//                           g/T·(p̃_S − p̃_T), then dh, dW, db by gather/scatter sums.
//
// One file over ~450 lines on purpose: the three kernels share the support helpers (local
// log-softmax, argument checks, StudentView); splitting them would move those helpers into
// a header of their own.
//
// Measured on the loaded 2-core AMD EPYC dev box (N = 1024, V = 32768, H = 256, k = 100,
// fp32, 2 threads, interleaved in one process): the whole native forward 137 ms against
// 134 ms for the bare full teacher GEMM and 198 ms for the torch backend's forward.
//
// Top-k order: larger value first, NaN above every number (as torch.topk), equal values by
// lower vocabulary index. torch.topk leaves the order of equal values unspecified (on CPU
// it depends on k/V through partial_sort vs nth_element), so the lower-index rule is this
// backend's definition of ties at the k-th place; it does not depend on chunking or
// threads.
//
// Sweep cost: an element enters the candidate buffer only when it beats its row's k-th
// value as of the last compaction (~850 times per row at V = 32768, k = 100 for logits in
// random order), so the sweep is one vectorised compare per element, with a bit mask of
// the rows that pass going to the scalar path.
//
// Determinism: every row is computed by one thread with the same code, and the backward's
// sums run per output row (dh per student row, dW/db per vocabulary row) over its entries
// in a fixed order (a stable counting sort), so results are bitwise identical whatever the
// thread count.
//
// Dtypes: the teacher chunk arrives in the compute dtype (fp32 for fp32/bf16/fp16 inputs,
// fp64 for fp64); the student kernels read hidden states and W in their own dtype and
// accumulate in that compute dtype (at::opmath_type).

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "ops.h"

namespace {

using at::Tensor;

// fp64 candidates: (value, index), ranked by ranks_above.
struct Cand {
  double v;
  int64_t i;
};

// True when a ranks above b in the top-k order (see the header comment).
inline bool ranks_above(const Cand& a, const Cand& b) {
  const bool an = std::isnan(a.v), bn = std::isnan(b.v);
  if (an != bn) return an;
  if (!an && a.v != b.v) return a.v > b.v;
  return a.i < b.i;
}

// How candidates of a dtype are stored and ranked. fp32 packs (value, index) into one
// uint64 whose unsigned order IS the rank order (value bits mapped to an order-preserving
// uint32, NaN above +inf, −0 as +0; then the complemented index, so the lower index is the
// larger key): nth_element and sort then compare plain integers. The fp32 sweep of 128
// rows, V = 32768, k = 100 on 1 thread of the loaded 2-core AMD EPYC took 2.2 ns per
// element with the (value, index) comparator and 1.0 with packed keys (separate runs; a
// row max: 0.13). fp64 keeps the comparator: its 64 value bits leave no room for the index.
template <typename T>
struct Keys;

template <>
struct Keys<float> {
  using key_t = uint64_t;
  static key_t make(float v, int64_t i) {
    uint32_t b;
    if (std::isnan(v)) {
      b = 0xFFFFFFFFu;
    } else {
      if (v == 0.0f) v = 0.0f;  // −0 ranks as +0 (they compare equal)
      std::memcpy(&b, &v, sizeof(b));
      b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    }
    return (uint64_t(b) << 32) | uint64_t(~uint32_t(i));
  }
  static int64_t index(key_t key) { return int64_t(~uint32_t(key)); }
  static bool above(key_t a, key_t b) { return a > b; }
};

template <>
struct Keys<double> {
  using key_t = Cand;
  static key_t make(double v, int64_t i) { return {v, i}; }
  static int64_t index(const key_t& key) { return key.i; }
  static bool above(const key_t& a, const key_t& b) { return ranks_above(a, b); }
};

// Running top-k of rows [r0, r1) of a vocabulary-major logits chunk zt [V, R] (k < V):
// row r's buffer buf[r·cap, r·cap + cap) ends with its k best entries first, sorted by
// rank. Per vocabulary entry v the row segment zt[v, r0:r1] is compared against the rows'
// bars at once (vectorised across rows, as both are contiguous); only rows that pass go
// to the scalar path, which appends a candidate while it beats the row's k-th entry as of
// its last compaction, and cuts a full buffer back to its k best (nth_element), raising
// the bar.
template <typename T>
void chunk_top_k(const T* zt, int64_t V, int64_t R, int64_t r0, int64_t r1, int64_t k,
                 int64_t cap, typename Keys<T>::key_t* buf) {
  using K = Keys<T>;
  using key_t = typename K::key_t;
  const auto by_rank = [](const key_t& a, const key_t& b) { return K::above(a, b); };
  const int64_t nr = r1 - r0;
  std::vector<int64_t> fill(nr, k);
  std::vector<key_t> kth(nr);
  std::vector<T> bar(nr);
  for (int64_t i = 0; i < nr; ++i) {
    key_t* b = buf + i * cap;
    for (int64_t v = 0; v < k; ++v) b[v] = K::make(zt[v * R + r0 + i], v);
    std::nth_element(b, b + k - 1, b + k, by_rank);
    kth[i] = b[k - 1];
    bar[i] = zt[K::index(kth[i]) * R + r0 + i];
  }
  const auto offer = [&](int64_t i, int64_t v) {
    const key_t c = K::make(zt[v * R + r0 + i], v);
    if (!K::above(c, kth[i])) return;
    key_t* b = buf + i * cap;
    b[fill[i]++] = c;
    if (fill[i] == cap) {
      std::nth_element(b, b + k - 1, b + cap, by_rank);
      fill[i] = k;
      kth[i] = b[k - 1];
      bar[i] = zt[K::index(kth[i]) * R + r0 + i];
    }
  };
  constexpr int64_t kBlock = 32;
  const T* bars = bar.data();
  for (int64_t v = k; v < V; ++v) {
    const T* zv = zt + v * R + r0;
    for (int64_t i0 = 0; i0 < nr; i0 += kBlock) {
      const int64_t w = std::min(kBlock, nr - i0);
      // Bit u set when !(z <= bar): z > bar, or a NaN on either side (offer() sorts it out).
      uint32_t hits = 0;
#pragma omp simd reduction(| : hits)
      for (int64_t u = 0; u < w; ++u) hits |= uint32_t(!(zv[i0 + u] <= bars[i0 + u])) << u;
      while (hits != 0) {
        const int u = __builtin_ctz(hits);
        hits &= hits - 1;
        offer(i0 + u, v);
      }
    }
  }
  for (int64_t i = 0; i < nr; ++i) {
    key_t* b = buf + i * cap;
    std::nth_element(b, b + k - 1, b + fill[i], by_rank);
    std::sort(b, b + k, by_rank);
  }
}

// Local log-softmax of x[0:n] over the entries with keep set (−inf elsewhere), written
// like torch.log_softmax: x − max − log Σ exp(x − max).
template <typename T>
void local_log_softmax(const T* x, const bool* keep, int64_t n, T* out) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t c = 0; c < n; ++c)
    if (keep[c] && !(x[c] <= m)) m = x[c];  // NaN propagates as in torch.max
  T s = 0;
  for (int64_t c = 0; c < n; ++c)
    if (keep[c]) s += std::exp(x[c] - m);
  const T log_s = std::log(s);
  for (int64_t c = 0; c < n; ++c)
    out[c] = keep[c] ? (x[c] - m) - log_s : -std::numeric_limits<T>::infinity();
}

template <typename T>
void teacher_impl(const Tensor& logits_t, const Tensor& targets, int64_t k, double inv_temperature,
                  const Tensor& columns, const Tensor& t_local, const Tensor& in_support) {
  using K = Keys<T>;
  const int64_t V = logits_t.size(0), R = logits_t.size(1), k1 = k + 1;
  const T* zt = logits_t.const_data_ptr<T>();
  const int64_t* yp = targets.const_data_ptr<int64_t>();
  int64_t* cp = columns.data_ptr<int64_t>();
  T* tp = t_local.data_ptr<T>();
  bool* sp = in_support.data_ptr<bool>();
  const T inv_t = static_cast<T>(inv_temperature);
  // Never more than V slots: a row offers at most V candidates in all, so a larger buffer
  // (2k for k near V) would only waste memory (2·V keys per row instead of V).
  const int64_t cap = k < V ? std::min<int64_t>(std::max<int64_t>(2 * k, k + 64), V) : V;
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    std::vector<typename K::key_t> buf((r1 - r0) * cap);
    if (k < V) {
      chunk_top_k(zt, V, R, r0, r1, k, cap, buf.data());
    } else {  // k = V: every column, in rank order
      for (int64_t i = 0; i < r1 - r0; ++i) {
        auto* b = buf.data() + i * cap;
        for (int64_t v = 0; v < V; ++v) b[v] = K::make(zt[v * R + r0 + i], v);
        std::sort(b, b + V, [](const auto& x, const auto& y) { return K::above(x, y); });
      }
    }
    std::vector<T> tz(k1);
    for (int64_t r = r0; r < r1; ++r) {
      const auto* b = buf.data() + (r - r0) * cap;
      const int64_t y = yp[r];
      int64_t* col = cp + r * k1;
      bool* keep = sp + r * k1;
      bool y_in_top = false;
      for (int64_t c = 0; c < k; ++c) {
        col[c] = K::index(b[c]);
        tz[c] = zt[col[c] * R + r] * inv_t;
        keep[c] = true;
        y_in_top |= col[c] == y;
      }
      col[k] = y;
      tz[k] = zt[y * R + r] * inv_t;
      keep[k] = !y_in_top;
      local_log_softmax(tz.data(), keep, k1, tp + r * k1);
    }
  });
}

// f(scalar_t{}) for the input dtype: a plain switch, not AT_DISPATCH (a macro argument
// cannot hold the `#pragma omp simd` lines of the kernel bodies).
template <typename F>
void dispatch_input(at::ScalarType type, const F& f) {
  switch (type) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "sgsd native local support: unsupported dtype ", type);
  }
}

// The arguments the student kernels share, checked once.
struct StudentArgs {
  Tensor hidden, weight, bias, rows, columns, t_local, in_support;
  int64_t N = 0, H = 0, V = 0, M = 0, k1 = 0;
  double inv_temperature = 1.0;
};

StudentArgs student_args(const char* name, const Tensor& hidden, const Tensor& weight,
                         const std::optional<Tensor>& bias, const Tensor& student_row,
                         const Tensor& columns, const Tensor& t_local,
                         const Tensor& in_support, double inv_temperature) {
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0, name,
              ": inv_temperature must be finite and > 0, got ", inv_temperature);
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1), name,
              ": hidden [N, H] and weight [V, H] must share H, got ", hidden.sizes(), " and ",
              weight.sizes());
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), name,
              ": hidden and weight must share a dtype, got ", hidden.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(at::isFloatingType(hidden.scalar_type()), name,
              ": hidden must be floating point, got ", hidden.scalar_type());
  // The kernels read column k (y_t's slot) of every row, so k + 1 >= 1 columns are
  // required; the dim check comes before any size() so a wrong rank gets this message.
  TORCH_CHECK(columns.dim() == 2 && columns.size(1) >= 1 && columns.scalar_type() == at::kLong,
              name, ": columns must be [M, k+1] int64 with k + 1 >= 1, got ", columns.sizes(),
              " ", columns.scalar_type());
  StudentArgs a;
  a.N = hidden.size(0), a.H = hidden.size(1), a.V = weight.size(0);
  a.M = columns.size(0), a.k1 = columns.size(1);
  a.inv_temperature = inv_temperature;
  const auto acc = at::toOpMathType(hidden.scalar_type());
  TORCH_CHECK(t_local.sizes() == columns.sizes() && t_local.scalar_type() == acc, name,
              ": t_local must be [M, k+1] in ", acc, ", got ", t_local.sizes(), " ",
              t_local.scalar_type());
  TORCH_CHECK(in_support.sizes() == columns.sizes() && in_support.scalar_type() == at::kBool,
              name, ": in_support must be [M, k+1] bool");
  TORCH_CHECK(student_row.dim() == 1 && student_row.size(0) == a.M, name,
              ": student_row must be [M] = [", a.M, "]");
  // As for the teacher's targets: float row ids would be truncated silently.
  TORCH_CHECK(at::isIntegralType(student_row.scalar_type(), /*includeBool=*/false), name,
              ": student_row must be an integer tensor, got ", student_row.scalar_type());
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == a.V, name, ": bias must be [V] = [", a.V,
                "]");
  a.hidden = hidden.detach().contiguous();
  a.weight = weight.detach().contiguous();
  if (bias.has_value()) a.bias = bias->detach().to(acc).contiguous();
  a.rows = student_row.detach().to(at::kLong).contiguous();
  a.columns = columns.detach().contiguous();
  a.t_local = t_local.detach().contiguous();
  a.in_support = in_support.detach().contiguous();
  if (a.M > 0) {
    const auto [rlo, rhi] = at::aminmax(a.rows);
    TORCH_CHECK(rlo.item<int64_t>() >= 0 && rhi.item<int64_t>() < a.N, name,
                ": student_row must be in [0, N) = [0, ", a.N, ")");
    const auto [clo, chi] = at::aminmax(a.columns);
    TORCH_CHECK(clo.item<int64_t>() >= 0 && chi.item<int64_t>() < a.V, name,
                ": columns must be in [0, V) = [0, ", a.V, ")");
  }
  return a;
}

// Asks for the W row `row` (H entries) ahead of its use: the support columns are scattered
// over W, and without it each gathered row stalls on its first cache lines. Four columns
// ahead took the student kernel from 11.3 to 7.7 ms (best of 15, 1 thread, M = 1024,
// k = 100, V = 32768, H = 256, fp32, interleaved with other distances on the loaded
// 2-core AMD EPYC; 2 and 8 ahead were within 0.9 ms of 4).
template <typename scalar_t>
inline void prefetch_row(const scalar_t* w, int64_t row, int64_t H) {
  const char* p = reinterpret_cast<const char*>(w + row * H);
  const int64_t bytes = H * int64_t(sizeof(scalar_t));
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o);
}

// z[c] = (h · W[col[c]] + b[col[c]]) / T for the support entries of one row.
template <typename scalar_t, typename acc_t>
void support_logits(const scalar_t* h, const scalar_t* w, const acc_t* b, int64_t H,
                    const int64_t* col, const bool* keep, int64_t k1, acc_t inv_t, acc_t* z) {
  constexpr int64_t kAhead = 4;
  for (int64_t c = 0; c < std::min(kAhead, k1); ++c) prefetch_row(w, col[c], H);
  for (int64_t c = 0; c < k1; ++c) {
    if (c + kAhead < k1) prefetch_row(w, col[c + kAhead], H);
    if (!keep[c]) {
      z[c] = -std::numeric_limits<acc_t>::infinity();
      continue;
    }
    const scalar_t* wr = w + col[c] * H;
    acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < H; ++i) dot += static_cast<acc_t>(h[i]) * static_cast<acc_t>(wr[i]);
    z[c] = (b ? dot + b[col[c]] : dot) * inv_t;
  }
}

// The student kernels' view of checked StudentArgs in one input dtype: raw pointers, the
// per-row slices, and row m's student local log-probs over its k + 1 support columns.
template <typename scalar_t>
struct StudentView {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *h, *w;
  const acc_t* b;
  const int64_t *rows, *cols;
  const acc_t* t_local;
  const bool* keep;
  int64_t H, k1;
  acc_t inv_t;

  explicit StudentView(const StudentArgs& a)
      : h(a.hidden.const_data_ptr<scalar_t>()),
        w(a.weight.const_data_ptr<scalar_t>()),
        b(a.bias.defined() ? a.bias.const_data_ptr<acc_t>() : nullptr),
        rows(a.rows.const_data_ptr<int64_t>()),
        cols(a.columns.const_data_ptr<int64_t>()),
        t_local(a.t_local.const_data_ptr<acc_t>()),
        keep(a.in_support.const_data_ptr<bool>()),
        H(a.H),
        k1(a.k1),
        inv_t(static_cast<acc_t>(a.inv_temperature)) {}

  const int64_t* columns(int64_t m) const { return cols + m * k1; }
  const bool* kept(int64_t m) const { return keep + m * k1; }
  const acc_t* teacher(int64_t m) const { return t_local + m * k1; }

  // s = the student's local log-softmax over row m's support (z: [k1] scratch).
  void student_log_probs(int64_t m, acc_t* z, acc_t* s) const {
    support_logits(h + rows[m] * H, w, b, H, columns(m), kept(m), k1, inv_t, z);
    local_log_softmax(z, kept(m), k1, s);
  }
};

// Stable counting sort of keys [n] in [0, buckets): (offsets [buckets + 1], order [n]).
std::pair<std::vector<int64_t>, std::vector<int64_t>> group_by(const int64_t* key, int64_t n,
                                                               int64_t buckets,
                                                               const bool* keep) {
  std::vector<int64_t> off(buckets + 1, 0), order;
  for (int64_t e = 0; e < n; ++e)
    if (keep == nullptr || keep[e]) ++off[key[e] + 1];
  for (int64_t v = 0; v < buckets; ++v) off[v + 1] += off[v];
  order.resize(off[buckets]);
  std::vector<int64_t> next(off.begin(), off.end() - 1);
  for (int64_t e = 0; e < n; ++e)
    if (keep == nullptr || keep[e]) order[next[key[e]]++] = e;
  return {std::move(off), std::move(order)};
}

}  // namespace

namespace sgsd_native {

// local_support_teacher(logits_t [V, R] (a chunk of teacher logits, vocabulary-major),
// targets [R], k, inv_t) -> (columns [R, k+1] int64: the top-k then y_t; teacher local
// log-probs [R, k+1], −inf off the support; in_support [R, k+1] bool: all but the last
// slot, which is off when y_t is among the top-k).
std::tuple<Tensor, Tensor, Tensor> local_support_teacher(const Tensor& logits_in,
                                                         const Tensor& targets_in, int64_t k,
                                                         double inv_temperature) {
  TORCH_CHECK(logits_in.dim() == 2, "local_support_teacher: logits must be [V, R], got ",
              logits_in.sizes());
  TORCH_CHECK(logits_in.scalar_type() == at::kFloat || logits_in.scalar_type() == at::kDouble,
              "local_support_teacher: logits must be float32 or float64, got ",
              logits_in.scalar_type());
  const int64_t V = logits_in.size(0), R = logits_in.size(1);
  TORCH_CHECK(V >= 1 && V < (int64_t(1) << 32),
              "local_support_teacher: the vocabulary size must be in [1, 2^32), got ", V);
  TORCH_CHECK(k >= 1 && k <= V, "local_support_teacher: k must be in [1, V] = [1, ", V,
              "], got ", k);
  TORCH_CHECK(targets_in.dim() == 1 && targets_in.size(0) == R,
              "local_support_teacher: targets must be [R] = [", R, "], got ", targets_in.sizes());
  // Finite too: an infinite 1/T turns every logit into ±inf or NaN.
  TORCH_CHECK(std::isfinite(inv_temperature) && inv_temperature > 0,
              "local_support_teacher: inv_temperature must be finite and > 0, got ",
              inv_temperature);
  // Integer ids only: .to(kLong) would silently truncate float ids (2.9 -> 2) and read
  // bools as 0/1.
  TORCH_CHECK(at::isIntegralType(targets_in.scalar_type(), /*includeBool=*/false),
              "local_support_teacher: targets must be an integer tensor, got ",
              targets_in.scalar_type());
  const Tensor logits = logits_in.detach().contiguous();
  const Tensor targets = targets_in.detach().to(at::kLong).contiguous();
  if (R > 0) {
    const auto [lo, hi] = at::aminmax(targets);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < V,
                "local_support_teacher: targets must be in [0, V) = [0, ", V, ")");
  }
  Tensor columns = at::empty({R, k + 1}, targets.options());
  Tensor t_local = at::empty({R, k + 1}, logits.options());
  Tensor in_support = at::empty({R, k + 1}, logits.options().dtype(at::kBool));
  if (logits.scalar_type() == at::kDouble)
    teacher_impl<double>(logits, targets, k, inv_temperature, columns, t_local, in_support);
  else
    teacher_impl<float>(logits, targets, k, inv_temperature, columns, t_local, in_support);
  return {columns, t_local, in_support};
}

// local_support_student(...) -> (Δ̃ [M], local KL [M]) in the compute dtype.
std::tuple<Tensor, Tensor> local_support_student(const Tensor& hidden, const Tensor& weight,
                                                 const std::optional<Tensor>& bias,
                                                 const Tensor& student_row, const Tensor& columns,
                                                 const Tensor& t_local, const Tensor& in_support,
                                                 double inv_temperature) {
  const StudentArgs a = student_args("local_support_student", hidden, weight, bias, student_row,
                                     columns, t_local, in_support, inv_temperature);
  Tensor delta = at::empty({a.M}, a.t_local.options());
  Tensor kl = at::empty({a.M}, a.t_local.options());
  dispatch_input(a.hidden.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const StudentView<scalar_t> view(a);
    acc_t *dp = delta.data_ptr<acc_t>(), *kp = kl.data_ptr<acc_t>();
    const int64_t k1 = a.k1;
    at::parallel_for(0, a.M, 16, [&](int64_t m0, int64_t m1) {
      std::vector<acc_t> z(k1), s(k1);
      for (int64_t m = m0; m < m1; ++m) {
        const int64_t* col = view.columns(m);
        const bool* keep = view.kept(m);
        const acc_t* t = view.teacher(m);
        view.student_log_probs(m, z.data(), s.data());
        // y_t is the last column; when it is among the top-k its slot is off and the
        // top-k entry holding it counts (as the reference's is_sampled mask).
        const int64_t y = col[k1 - 1];
        acc_t d = 0, sum = 0;
        for (int64_t c = 0; c < k1; ++c) {
          if (!keep[c]) continue;
          if (col[c] == y) d += t[c] - s[c];
          sum += std::exp(t[c]) * (t[c] - s[c]);
        }
        dp[m] = d, kp[m] = sum;
      }
    });
  });
  return {delta, kl};
}

// local_support_backward(grad [M], ...) -> (dh [N, H], dW [V, H] or [0], db [V] or [0]) in
// the compute dtype, for Σ_m grad[m]·KL̃[m].
std::tuple<Tensor, Tensor, Tensor> local_support_backward(
    const Tensor& grad, const Tensor& hidden, const Tensor& weight,
    const std::optional<Tensor>& bias, const Tensor& student_row, const Tensor& columns,
    const Tensor& t_local, const Tensor& in_support, double inv_temperature,
    bool need_weight_grad) {
  const StudentArgs a = student_args("local_support_backward", hidden, weight, bias, student_row,
                                     columns, t_local, in_support, inv_temperature);
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == a.M,
              "local_support_backward: grad must be [M] = [", a.M, "]");
  const auto opts = a.t_local.options();
  const Tensor g = grad.detach().to(opts.dtype()).contiguous();
  const int64_t M = a.M, k1 = a.k1, H = a.H, V = a.V, N = a.N;
  Tensor gz = at::empty({M, k1}, opts);
  Tensor gh = at::empty({N, H}, opts);
  Tensor gw = need_weight_grad ? at::empty({V, H}, opts) : at::empty({0}, opts);
  Tensor gb = need_weight_grad && a.bias.defined() ? at::empty({V}, opts) : at::empty({0}, opts);
  dispatch_input(a.hidden.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = at::opmath_type<scalar_t>;
    const StudentView<scalar_t> view(a);
    const scalar_t *hp = view.h, *wp = view.w;
    const int64_t *rp = view.rows, *cp = view.cols;
    const bool* sp = view.keep;
    const acc_t* gp = g.const_data_ptr<acc_t>();
    acc_t* gzp = gz.data_ptr<acc_t>();
    // gz = grad/T · (p̃_S − p̃_T) on the support, 0 off it.
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      std::vector<acc_t> z(k1), s(k1);
      for (int64_t m = m0; m < m1; ++m) {
        const bool* keep = view.kept(m);
        const acc_t* t = view.teacher(m);
        acc_t* out = gzp + m * k1;
        view.student_log_probs(m, z.data(), s.data());
        const acc_t scale = gp[m] * view.inv_t;
        for (int64_t c = 0; c < k1; ++c)
          out[c] = keep[c] ? scale * (std::exp(s[c]) - std::exp(t[c])) : acc_t(0);
      }
    });
    // dh[n] = Σ over its rows m (in order) of Σ_c gz[m, c]·W[col[m, c]].
    const auto [row_off, row_order] = group_by(rp, M, N, nullptr);
    acc_t* ghp = gh.data_ptr<acc_t>();
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        acc_t* out = ghp + n * H;
        std::fill(out, out + H, acc_t(0));
        for (int64_t e = row_off[n]; e < row_off[n + 1]; ++e) {
          const int64_t m = row_order[e];
          for (int64_t c = 0; c < k1; ++c) {
            if (c + 4 < k1) prefetch_row(wp, cp[m * k1 + c + 4], H);
            const acc_t gv = gzp[m * k1 + c];
            if (!sp[m * k1 + c]) continue;
            const scalar_t* wr = wp + cp[m * k1 + c] * H;
#pragma omp simd
            for (int64_t i = 0; i < H; ++i) out[i] += gv * static_cast<acc_t>(wr[i]);
          }
        }
      }
    });
    if (!need_weight_grad) return;
    // dW[v] = Σ over the support entries (m, c) holding v (in order) of gz·h[row m].
    const auto [col_off, col_order] = group_by(cp, M * k1, V, sp);
    acc_t* gwp = gw.data_ptr<acc_t>();
    acc_t* gbp = gb.numel() ? gb.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, V, 64, [&](int64_t v0, int64_t v1) {
      for (int64_t v = v0; v < v1; ++v) {
        acc_t* out = gwp + v * H;
        std::fill(out, out + H, acc_t(0));
        acc_t bsum = 0;
        for (int64_t e = col_off[v]; e < col_off[v + 1]; ++e) {
          const int64_t entry = col_order[e];
          const acc_t gv = gzp[entry];
          const scalar_t* hr = hp + rp[entry / k1] * H;
          bsum += gv;
#pragma omp simd
          for (int64_t i = 0; i < H; ++i) out[i] += gv * static_cast<acc_t>(hr[i]);
        }
        if (gbp) gbp[v] = bsum;
      }
    });
  });
  return {gh, gw, gb};
}

}  // namespace sgsd_native
