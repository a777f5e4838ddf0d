// Host runtime for executing the kernel bodies of kernels/ on the CPU (tests/test_kernels_host.py).
//
// A block kernel runs as TPB std::threads, one per virtual thread; blocks run one after another,
// each thread looping over them with a block-wide barrier between blocks, so the `static` shared
// arrays (MLXG_SHARED) behave as one block's __shared__ memory. Grid-stride kernels (no shared
// memory, no barriers, no shuffles) run their virtual threads sequentially. Every global-memory
// access goes through Ptr: bounds-checked, 16-byte vector loads alignment-checked (a misaligned
// vector load faults on CUDA), and every output element must be written exactly once.
// A failed check, or a barrier/shuffle not reached by all its threads within the watchdog
// limit (a hang on the GPU), makes the launch return 1 with mlxg_h_last_error() set.
// Included once per shared object (it defines the two extern "C" helpers at its end).
#pragma once

#include <math.h>

#include <atomic>
#include <bit>
#include <chrono>
#include <concepts>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <ucontext.h>
#include <vector>

// Built with -fvisibility=hidden: only the launchers are exported, so several builds (e.g. the
// mutants of tests/test_kernels_host.py) loaded at once never share a symbol.
#define MLXG_H_EXPORT __attribute__((visibility("default")))

namespace mlxg_h {

constexpr float bits_f32(uint32_t u) { return std::bit_cast<float>(u); }

// bfloat16 as CUDA's __nv_bfloat16: the upper 16 bits of a float; float -> bf16 rounds to
// nearest even (__float2bfloat16), NaN stays a quiet NaN.
struct bf16 {
  uint16_t bits;
  bf16() = default;
  explicit bf16(float f) {
    uint32_t u = std::bit_cast<uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = static_cast<uint16_t>((u >> 16) | 0x40u);
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      bits = static_cast<uint16_t>(u >> 16);
    }
  }
  explicit operator float() const { return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16); }
};
static_assert(sizeof(bf16) == 2);
static_assert(sizeof(_Float16) == 2);

// __expf: ex2.approx(x * log2(e)) with the product rounded to float, which is the dominant
// error (relative ~|x| 2^-24). exp2f itself is closer than ex2.approx's ~2^-22; denormal
// results are not flushed.
// With MLXG_H_EXP_FAST_DROP_BITS = k, the result's k low significand bits are cleared and
// subnormal results flushed (ex2.approx.ftz): an error at least ex2.approx's, all one way.
inline float expf_approx(float x) {
  const float t = x * bits_f32(0x3fb8aa3bu);  // log2(e) as a float, as in __expf
  float r = exp2f(t);
#ifdef MLXG_H_EXP_FAST_DROP_BITS
  r = std::bit_cast<float>(std::bit_cast<uint32_t>(r) & ~((1u << MLXG_H_EXP_FAST_DROP_BITS) - 1u));
  if (r < bits_f32(0x00800000u)) r = 0.0f;
#endif
  return r;
}

struct Abort {};

inline std::atomic<bool> g_abort{false};
inline std::mutex g_err_mu;
inline std::string g_err;

inline void record(const std::string& msg) {
  {
    std::lock_guard<std::mutex> lk(g_err_mu);
    if (g_err.empty()) g_err = msg;
  }
  g_abort.store(true);
}

[[noreturn]] inline void fail(const std::string& msg) {
  record(msg);
  throw Abort{};
}

// Fiber mode: every virtual thread of a block is a ucontext fiber on the launching thread,
// resumed by a round-robin scheduler (in an order shuffled per pass when seeded); a barrier
// arrival yields until the barrier's generation moves on. Much cheaper than OS threads
// (no kernel wake-ups); the real-thread mode stays for free-running interleavings.
inline bool g_fibers = false;
inline uint64_t g_seed = 0;
inline ucontext_t g_sched_ctx;
inline ucontext_t* g_cur_ctx = nullptr;
inline uint64_t g_progress = 0;  // barrier arrivals and finished fibers, for hang detection

inline void fiber_yield() { swapcontext(g_cur_ctx, &g_sched_ctx); }

// Generation-counting barrier over n threads (futex waits via std::atomic::wait). poke()
// releases every waiter after an abort so a deadlocked launch can be torn down.
struct Barrier {
  explicit Barrier(uint32_t n_) : n(n_) {}
  uint32_t n;
  std::atomic<uint32_t> count{0};
  std::atomic<uint32_t> gen{0};
  void wait() {
    if (g_abort.load(std::memory_order_relaxed)) throw Abort{};
    if (g_fibers) {
      const uint32_t g = gen.load(std::memory_order_relaxed);
      ++g_progress;
      if (count.fetch_add(1) + 1 == n) {
        count.store(0);
        gen.fetch_add(1);
      } else {
        while (gen.load(std::memory_order_relaxed) == g) {
          fiber_yield();
          if (g_abort.load(std::memory_order_relaxed)) throw Abort{};
        }
      }
      return;
    }
    const uint32_t g = gen.load(std::memory_order_acquire);
    if (count.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
      count.store(0, std::memory_order_relaxed);
      gen.fetch_add(1, std::memory_order_release);
      gen.notify_all();
    } else {
      while (gen.load(std::memory_order_acquire) == g) gen.wait(g, std::memory_order_acquire);
    }
    if (g_abort.load(std::memory_order_relaxed)) throw Abort{};
  }
  void poke() {
    gen.fetch_add(1, std::memory_order_release);
    gen.notify_all();
  }
};

struct Warp {
  Warp() : bar(32) {}
  Barrier bar;
  float slot[2][32];  // double-buffered: one barrier per shuffle is enough
};

// One virtual thread's place in its block (real-thread mode: thread_local; fiber mode: the
// scheduler points at the fiber it resumes).
struct VThread {
  Warp* warp = nullptr;
  Barrier* block = nullptr;
  int lane = 0;
  unsigned phase = 0;
};
inline thread_local VThread* tl_vt = nullptr;

// __shfl_xor_sync(0xffffffff, v, m): every lane of the warp must arrive (else: hang, reported).
inline float shfl_xor(float v, int m) {
  VThread* vt = tl_vt;
  if (vt == nullptr || vt->warp == nullptr) fail("shuffle outside a block kernel");
  if (m < 0 || m > 31) fail("shuffle xor mask out of range");
  Warp& w = *vt->warp;
  const unsigned b = vt->phase++ & 1u;
  w.slot[b][vt->lane] = v;
  w.bar.wait();
  return w.slot[b][vt->lane ^ m];
}

inline void block_barrier() {
  if (tl_vt == nullptr || tl_vt->block == nullptr) fail("barrier in a grid-stride kernel");
  tl_vt->block->wait();
}

// A global-memory pointer: base, element count, offset; writes counted for outputs.
template <class U>
struct Ptr {
  U* base = nullptr;
  int64_t n = 0;
  int64_t off = 0;
  uint32_t* writes = nullptr;
  const char* name = "";

  template <std::integral I>
  Ptr operator+(I i) const {
    Ptr r = *this;
    r.off += static_cast<int64_t>(i);
    return r;
  }
  template <std::integral I>
  U& operator[](I j) const {
    const int64_t k = off + static_cast<int64_t>(j);
    if (k < 0 || k >= n) {
      fail(std::string("out-of-bounds access to ") + name + "[" + std::to_string(k) + "] (size " +
           std::to_string(n) + ")");
    }
    if (writes != nullptr) std::atomic_ref<uint32_t>(writes[k]).fetch_add(1);
    return base[k];
  }
  size_t addr() const { return reinterpret_cast<size_t>(base) + static_cast<size_t>(off) * sizeof(U); }
};

template <class U>
size_t addr(const Ptr<U>& p) { return p.addr(); }
template <class U>
size_t addr(U* p) { return reinterpret_cast<size_t>(p); }

// One vector load of `Vec` (VEC elements, alignas 16 on CUDA) at p.
template <class Vec, class U>
Vec load_vec(const Ptr<U>& p, int count) {
  if (p.off < 0 || p.off + count > p.n) {
    fail(std::string("out-of-bounds vector load from ") + p.name + "[" + std::to_string(p.off) +
         ".." + std::to_string(p.off + count) + ") (size " + std::to_string(p.n) + ")");
  }
  if (p.addr() % alignof(Vec) != 0) {
    fail(std::string("misaligned vector load from ") + p.name + "[" + std::to_string(p.off) + "]");
  }
  Vec v;
  std::memcpy(&v, p.base + p.off, sizeof(Vec));
  return v;
}

struct Ix {
  int tid;
  size_t block;
  size_t bdim;
  size_t grid;
};

}  // namespace mlxg_h

// MLXG_SHARED arrays live in one section, so each block can start from poisoned (NaN) shared
// memory, as uninitialised __shared__ memory would be.
#define MLXG_H_SHARED_SECTION __attribute__((section("mlxg_shared")))
extern "C" char __start_mlxg_shared[] __attribute__((weak));
extern "C" char __stop_mlxg_shared[] __attribute__((weak));

namespace mlxg_h {

inline void poison_shared() {
  if (__start_mlxg_shared != nullptr && __stop_mlxg_shared != nullptr)
    std::memset(__start_mlxg_shared, 0xff, static_cast<size_t>(__stop_mlxg_shared - __start_mlxg_shared));
}

inline double g_watchdog_s = 60.0;

// A non-owning callable reference: one launcher per item instantiates only a tiny thunk.
struct FnRef {
  void* obj;
  void (*call)(void*, const Ix&);
  template <class F>
  FnRef(F& f) : obj(&f), call([](void* o, const Ix& ix) { (*static_cast<F*>(o))(ix); }) {}
  void operator()(const Ix& ix) const { call(obj, ix); }
};

// One launch: buffers from the caller, write counters for outputs, then the run.
struct Launch {
  void* const* bufs;
  const int64_t* counts;
  int n_in;
  int n_out;
  std::vector<std::vector<uint32_t>> writes;

  Launch(void* const* b, const int64_t* c, int ni, int no) : bufs(b), counts(c), n_in(ni), n_out(no) {
    g_abort.store(false);
    std::lock_guard<std::mutex> lk(g_err_mu);
    g_err.clear();
  }
  template <class U>
  Ptr<const U> in(int i, const char* nm) const {
    return Ptr<const U>{static_cast<const U*>(bufs[i]), counts[i], 0, nullptr, nm};
  }
  template <class U>
  Ptr<U> out(int i, const char* nm) {
    writes.emplace_back(static_cast<size_t>(counts[i]), 0u);
    return Ptr<U>{static_cast<U*>(bufs[i]), counts[i], 0, writes.back().data(), nm};
  }

  int finish(const char* const* out_names) {
    if (g_abort.load()) return 1;
    for (size_t o = 0; o < writes.size(); ++o) {
      for (size_t k = 0; k < writes[o].size(); ++k) {
        if (writes[o][k] != 1) {
          record(std::string("output ") + out_names[o] + "[" + std::to_string(k) + "] written " +
                 std::to_string(writes[o][k]) + " times");
          return 1;
        }
      }
    }
    return 0;
  }

  // Grid-stride kernel: every (block, thread) in order, on this thread.
  void run_flat(int64_t blocks, int bdim, FnRef body) {
    try {
      for (int64_t b = 0; b < blocks; ++b)
        for (int t = 0; t < bdim; ++t)
          body(Ix{t, static_cast<size_t>(b), static_cast<size_t>(bdim), static_cast<size_t>(blocks)});
    } catch (const Abort&) {
    } catch (const std::exception& e) {
      record(e.what());
    }
  }

  // Block kernel: bdim virtual threads (OS threads or fibers); blocks in sequence, with
  // barriers between them and shared memory poisoned at each block's start.
  void run_blocks(int64_t blocks, int bdim, FnRef body) {
    if (bdim % 32 != 0) {
      record("block size must be a multiple of 32");
      return;
    }
    Barrier block(static_cast<uint32_t>(bdim));
    std::vector<std::unique_ptr<Warp>> warps;
    for (int w = 0; w < bdim / 32; ++w) warps.push_back(std::make_unique<Warp>());
    std::vector<VThread> vts(static_cast<size_t>(bdim));
    for (int t = 0; t < bdim; ++t) vts[static_cast<size_t>(t)] = VThread{warps[static_cast<size_t>(t >> 5)].get(), &block, t & 31, 0};
    auto thread_main = [&](int t) {
      try {
        for (int64_t b = 0; b < blocks; ++b) {
          if (t == 0) poison_shared();
          block.wait();
          body(Ix{t, static_cast<size_t>(b), static_cast<size_t>(bdim), static_cast<size_t>(blocks)});
          block.wait();
        }
      } catch (const Abort&) {
      } catch (const std::exception& e) {
        record(e.what());
      }
    };
    try {
      if (g_fibers) {
        run_fibers(bdim, vts, thread_main);
      } else {
        run_threads(bdim, vts, warps, block, thread_main);
      }
    } catch (const std::exception& e) {  // no memory for stacks, no more threads
      record(std::string("launch failed: ") + e.what());
    }
  }

  template <class M>
  static void run_fibers(int bdim, std::vector<VThread>& vts, M& thread_main) {
    constexpr size_t kStack = 256 * 1024;
    struct Fiber {
      ucontext_t ctx;
      std::unique_ptr<char[]> stack;
      bool done = false;
    };
    static thread_local M* s_main;
    static thread_local Fiber* s_fiber;
    static thread_local int s_tid;
    s_main = &thread_main;
    std::vector<Fiber> fibers(static_cast<size_t>(bdim));
    for (int t = 0; t < bdim; ++t) {
      Fiber& f = fibers[static_cast<size_t>(t)];
      f.stack.reset(new char[kStack]);
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.get();
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = &g_sched_ctx;
      makecontext(&f.ctx, +[] {
        Fiber* me = s_fiber;
        (*s_main)(s_tid);
        me->done = true;
        ++g_progress;
      }, 0);
    }
    std::vector<int> order(static_cast<size_t>(bdim));
    for (int t = 0; t < bdim; ++t) order[static_cast<size_t>(t)] = t;
    uint64_t rng = g_seed * 0x9e3779b97f4a7c15ull + 1;
    int live = bdim;
    while (live > 0) {
      if (g_seed != 0) {  // Fisher-Yates with xorshift64
        for (int i = bdim - 1; i > 0; --i) {
          rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
          std::swap(order[static_cast<size_t>(i)], order[static_cast<size_t>(rng % static_cast<uint64_t>(i + 1))]);
        }
      }
      const uint64_t before = g_progress;
      for (int t : order) {
        Fiber& f = fibers[static_cast<size_t>(t)];
        if (f.done) continue;
        tl_vt = &vts[static_cast<size_t>(t)];
        s_fiber = &f;
        s_tid = t;
        g_cur_ctx = &f.ctx;
        swapcontext(&g_sched_ctx, &f.ctx);
        tl_vt = nullptr;
        if (f.done) --live;
      }
      if (live > 0 && g_progress == before) {
        // Every live fiber is waiting at a barrier nobody else will reach; resume each once
        // more so it sees the abort and unwinds.
        record("deadlock: a barrier or shuffle was not reached by all its threads (a hang on the GPU)");
      }
    }
  }

  template <class M>
  static void run_threads(int bdim, std::vector<VThread>& vts, std::vector<std::unique_ptr<Warp>>& warps,
                          Barrier& block, M& thread_main) {
    std::mutex mu;
    std::condition_variable cv;
    int finished = 0;
    std::vector<std::thread> threads;
    threads.reserve(static_cast<size_t>(bdim));
    try {
      for (int t = 0; t < bdim; ++t) {
        threads.emplace_back([&, t] {
          tl_vt = &vts[static_cast<size_t>(t)];
          thread_main(t);
          tl_vt = nullptr;
          std::lock_guard<std::mutex> lk(mu);
          ++finished;
          cv.notify_all();
        });
      }
    } catch (const std::exception& e) {
      // Fewer threads than the block needs: release the started ones and report.
      record(std::string("could not start ") + std::to_string(bdim) + " threads: " + e.what());
      for (;;) {
        block.poke();
        for (auto& w : warps) w->bar.poke();
        std::unique_lock<std::mutex> lk2(mu);
        if (cv.wait_for(lk2, std::chrono::milliseconds(10), [&] { return finished == static_cast<int>(threads.size()); })) break;
      }
      for (auto& th : threads) th.join();
      return;
    }
    {
      std::unique_lock<std::mutex> lk(mu);
      const auto limit = std::chrono::duration<double>(g_watchdog_s);
      if (!cv.wait_for(lk, limit, [&] { return finished == bdim; })) {
        lk.unlock();
        record("watchdog: a barrier or shuffle was not reached by all its threads (a hang on the GPU)");
        for (;;) {
          block.poke();
          for (auto& w : warps) w->bar.poke();
          std::unique_lock<std::mutex> lk2(mu);
          if (cv.wait_for(lk2, std::chrono::milliseconds(10), [&] { return finished == bdim; })) break;
        }
      }
    }
    for (auto& th : threads) th.join();
  }
};

}  // namespace mlxg_h

extern "C" MLXG_H_EXPORT const char* mlxg_h_last_error() {
  std::lock_guard<std::mutex> lk(mlxg_h::g_err_mu);
  return mlxg_h::g_err.c_str();
}
// MLXG_EXP_FAST as built, for checking the build's exp model from Python.
extern "C" MLXG_H_EXPORT float mlxg_h_exp_fast(float x) { return mlxg_h::expf_approx(x); }
extern "C" MLXG_H_EXPORT void mlxg_h_set_watchdog(double seconds) { mlxg_h::g_watchdog_s = seconds; }
// fibers = 1: block kernels run as fibers, resumed in an order shuffled by seed (0: in order);
// fibers = 0: one OS thread per virtual thread.
extern "C" MLXG_H_EXPORT void mlxg_h_set_mode(int fibers, uint64_t seed) {
  mlxg_h::g_fibers = fibers != 0;
  mlxg_h::g_seed = seed;
}
