// The benchmark's GEMM yardstick for the native engines (benchmarks/sgsd_bench/yardstick.py):
// the rate of an engine's own tile GEMMs, timed in C++ on every thread at once, as the
// kernels in linear_logprobs.cpp run them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <limits>
#include <vector>

#include "engines.h"
#include "tiles.h"

namespace sgsd_native {

// The benchmark's yardstick for an engine: every thread builds its own engine over the
// same hidden [M, H] and weight [Vb, H] (one vocabulary block, one row tile) and times
// `reps` calls of its logits GEMM and of its gradient GEMMs (dh and dW together), all
// threads at once as in the kernels. Returns, for each of the two, the slowest thread's
// best seconds per call (the machine then does threads × the GEMM's FLOPs in that time).
// make_engine(grad_w) builds an engine writing dW into that thread's own [Vb, H] buffer.
template <typename Make>
std::vector<double> time_engine_gemms(const Plan& p, int64_t H, int64_t reps,
                                      const Make& make_engine) {
  std::vector<double> best(2 * p.tasks, std::numeric_limits<double>::infinity());
  at::parallel_for(0, p.tasks, 1, [&](int64_t t0, int64_t t1) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    OneBlasThread one_blas_thread;
    std::vector<float> grad_w(static_cast<size_t>(p.vblock * H));
    auto engine = make_engine(grad_w.data());
    std::vector<float> tile(static_cast<size_t>(p.rows * p.vblock));
    std::vector<float> dh(static_cast<size_t>(p.rows * H));
    for (int64_t task = t0; task < t1; ++task) {
      engine.set_block(0, p.vblock, true);
      for (int64_t rep = 0; rep <= reps; ++rep) {  // rep 0 is the warm-up
        const auto a = std::chrono::steady_clock::now();
        engine.logits(0, p.rows, tile.data());
        const auto b = std::chrono::steady_clock::now();
        engine.grads(0, p.rows, tile.data(), true, dh.data());
        const auto c = std::chrono::steady_clock::now();
        if (rep == 0) continue;
        best[2 * task] = std::min(best[2 * task], std::chrono::duration<double>(b - a).count());
        best[2 * task + 1] =
            std::min(best[2 * task + 1], std::chrono::duration<double>(c - b).count());
      }
      engine.end_block();
    }
    engine.finish();
  });
  std::vector<double> out{0.0, 0.0};
  for (int64_t task = 0; task < p.tasks; ++task)
    for (int k = 0; k < 2; ++k) out[k] = std::max(out[k], best[2 * task + k]);
  return out;
}

// Best seconds per call of this machine's engine for hidden/weight's dtype, its logits
// GEMM and its two gradient GEMMs (dh + dW), at one [M, H] row tile against a [Vb, H]
// vocabulary block, every thread at once (time_engine_gemms, above): the engine's own
// GEMM rate, one of the benchmark's yardsticks.
inline std::vector<double> tile_gemm_seconds(const Tensor& hidden, const Tensor& weight,
                                             int64_t reps) {
  check_inputs(hidden, weight, std::nullopt, at::empty({hidden.size(0)}, at::kLong));
  TORCH_CHECK(hidden.scalar_type() != at::kDouble,
              "sgsd native: tile_gemm_seconds takes fp32, bf16 or fp16 inputs");
  TORCH_CHECK(hidden.size(0) >= 1 && reps >= 1,
              "sgsd native: tile_gemm_seconds needs M >= 1 rows and reps >= 1");
  const Tensor h = hidden.detach().contiguous(), w = weight.detach().contiguous();
  const int64_t M = h.size(0), H = h.size(1);
  Plan p;
  p.rows = M, p.vblock = w.size(0), p.nvb = p.tasks = at::get_num_threads();
  const Path path = choose_path<float>(h, w);
  if (path == Path::kBf16) {
    const Bf16Hidden hid(h, p, true);
    return time_engine_gemms(p, H, reps, [&](float* gw) {
      return Bf16Tiles(hid, w, reinterpret_cast<uint16_t*>(gw), p);
    });
  }
  if (path == Path::kF32) {
    const float* hp = h.const_data_ptr<float>();
    Reused<float> ht(M * H);
    transpose_row_tiles(hp, M, H, M, ht.data());
    return time_engine_gemms(
        p, H, reps, [&](float* gw) { return F32Tiles(hp, ht.data(), M, w, gw, p); });
  }
  const Tensor hf = h.to(at::kFloat).contiguous();
  return time_engine_gemms(p, H, reps, [&](float* gw) { return BlasTiles<float>(hf, w, gw, p); });
}

}  // namespace sgsd_native
