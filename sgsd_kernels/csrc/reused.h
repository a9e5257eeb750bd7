// Per-thread scratch memory that outlives a call: Reused<T> is a fixed-size array whose
// storage comes from the constructing thread's stack of grow-only blocks and goes back to it
// on destruction, so the next call on that thread finds it already faulted in.
//
// Why: every call of the native kernels needs O(tile) scratch per thread (the logits tile,
// transposed W blocks, gradient tiles) and O(N·H) shared copies of hidden. Taken fresh from
// malloc, a block glibc serves by mmap (≥ 128 KiB by default, ≥ 64 KiB under the
// benchmark's MALLOC_MMAP_THRESHOLD_) is page-faulted in and zeroed again on every call:
// ~600 faults per fp32 forward at N=1024, V=32768, H=256, which cost 3.6 ms of its 81 ms
// (4.4%) on the 2-core AMD EPYC dev box (a VM, where faults are dear).
//
// Blocks are handed out strictly last-in, first-out, which C++ scoping gives (members are
// destroyed in reverse order, locals likewise, also while unwinding an exception), and the
// type can be neither copied nor moved (returning a prvalue engine is fine: C++17 elides
// it). A thread's k-th live buffer always takes its k-th block, so after the first call
// each block has its steady size. A request above kKeepBytes (2 MiB), or one that would
// take the thread's kept blocks past kKeepTotal (16 MiB), gets memory of its own, freed on
// destruction, and leaves the stack alone: a long-lived process keeps at most 16 MiB per
// thread (in practice a few: the O(tile) buffers, the hidden copies and dh partials of
// small batches), and the backward's peak does not carry the forward's large copies (with
// a 16 MiB per-block bound the SGSD loss at K=8, B·T=1024 peaked 7 MiB higher, at the same
// speed). The destructor checks the order and the thread, and aborts on a violation.
#pragma once

#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

namespace sgsd_native {

class ThreadBlocks {
 public:
  static constexpr size_t kKeepBytes = size_t(2) << 20;    // largest block kept
  static constexpr size_t kKeepTotal = size_t(16) << 20;   // most a thread keeps in all

  // A Reused used against its contract (a bug in this library, never in the caller's
  // inputs); called from destructors, so it aborts rather than throws.
  [[noreturn]] static void broken(const char* what) {
    std::fprintf(stderr, "sgsd native: internal error: scratch %s\n", what);
    std::abort();
  }

  static ThreadBlocks& mine() {
    thread_local ThreadBlocks blocks;
    return blocks;
  }

  // The next block, at least `bytes` long (64-byte aligned, contents unspecified), and its
  // position for pop(); nullptr (nothing taken) when keeping it would pass kKeepTotal.
  void* push(size_t bytes, size_t& position) {
    if (used_ == blocks_.size()) blocks_.emplace_back();
    Block& b = blocks_[used_];
    if (b.bytes < bytes) {
      if (kept_ - b.bytes + bytes > kKeepTotal) return nullptr;
      b.data.reset();  // the old block goes before the new one comes (peak: one of them)
      kept_ -= b.bytes;
      b.bytes = 0;
      b.data.reset(static_cast<std::byte*>(::operator new(bytes, std::align_val_t(64))));
      b.bytes = bytes;
      kept_ += bytes;
    }
    position = used_++;
    return b.data.get();
  }

  // Give back the block at `position`, which must be the last one taken on this thread.
  void pop(size_t position) {
    if (used_ == 0 || position != used_ - 1) broken("released out of order");
    --used_;
  }

 private:
  struct Free {
    void operator()(std::byte* p) const { ::operator delete(p, std::align_val_t(64)); }
  };
  struct Block {
    std::unique_ptr<std::byte, Free> data;
    size_t bytes = 0;
  };
  std::vector<Block> blocks_;
  size_t used_ = 0, kept_ = 0;
};

template <typename T>
class Reused {
 public:
  Reused() = default;
  explicit Reused(size_t n) : n_(n) {
    const size_t bytes = n * sizeof(T);
    if (bytes == 0) return;
    if (bytes <= ThreadBlocks::kKeepBytes) {
      owner_ = &ThreadBlocks::mine();
      data_ = static_cast<T*>(owner_->push(bytes, position_));
      if (data_ != nullptr) return;
      owner_ = nullptr;
    }
    own_.reset(static_cast<T*>(::operator new(bytes, std::align_val_t(64))));
    data_ = own_.get();
  }
  // n elements, every one set to `fill`.
  Reused(size_t n, T fill) : Reused(n) {
    for (size_t i = 0; i < n_; ++i) data_[i] = fill;
  }
  ~Reused() {
    if (owner_ == nullptr) return;
    if (owner_ != &ThreadBlocks::mine()) ThreadBlocks::broken("released on another thread");
    owner_->pop(position_);
  }
  Reused(const Reused&) = delete;
  Reused& operator=(const Reused&) = delete;

  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return n_; }
  T& operator[](size_t i) { return data_[i]; }
  const T& operator[](size_t i) const { return data_[i]; }

 private:
  struct Free {
    void operator()(T* p) const { ::operator delete(p, std::align_val_t(64)); }
  };
  size_t n_ = 0;
  T* data_ = nullptr;
  std::unique_ptr<T, Free> own_;
  ThreadBlocks* owner_ = nullptr;  // set when the storage is a block of owner_'s stack
  size_t position_ = 0;
};

}  // namespace sgsd_native
