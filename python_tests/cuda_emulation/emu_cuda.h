// A CPU emulation of the small part of CUDA that the kernel headers csrc/cuda/*.cuh use
// (masked_attention_tc.cuh and the *_kernels.cuh of input_embedding, weighted_rmse and the scalar
// attention), so that the very same kernel source runs under g++ (C++20) on a machine without a
// GPU. Include it before the kernel header; it defines ASTROMER_FAST_CUDA_EMULATION, which makes
// that header skip the CUDA includes and compile its kernel bodies.
//
// Threads. Every CUDA thread of a block is its own execution context with its own stack:
//  * default: user-space fibers (ucontext), one OS thread per block in flight (blocks run in
//    parallel over the cores). A thread runs until it reaches a barrier (__syncthreads,
//    __syncwarp, a shuffle) or exits; then the scheduler resumes a RANDOM runnable thread
//    (seeded, reproducible). Between two barriers the threads of a block thus run in a random
//    order, so a write by one lane and a read by another that no barrier separates see both
//    orders over a run: the missing-barrier bugs that a GPU would show as races show up here as
//    wrong results. Fast: no OS scheduling (an OS-thread barrier costs ~2 context switches per
//    thread; a kernel with shuffle reductions runs ~20x slower that way on 2 cores).
//    A barrier that can never complete (divergent __syncthreads) is reported at once.
//  * -DEMU_OS_THREADS: one std::thread per CUDA thread, std::barrier-like barriers (condition
//    variables) with a timeout; the OS decides the interleaving. Slow; run on small cases.
// A thread that leaves the kernel drops out of its block's and warp's barriers.
//
// WMMA (nvcuda::wmma, bf16 m16n16k16, float accumulator): every lane holds the WHOLE 16 x 16 tile.
// load_matrix_sync: every lane reads the whole tile itself. mma_sync: every lane computes it in
// fp32 (bf16 products are exact in fp32); in fiber mode a lane whose inputs are bit-identical to
// those of an earlier lane of its warp at the same call reuses that result (same function of the
// same bits, so nothing is hidden). store_matrix_sync: only lane 0 of the warp writes, so a lane
// that reads a stored tile without a __syncwarp after the store reads stale data. Tile pointers
// must be 32-byte aligned and ldm a multiple of 16 bytes, as on the GPU; violations are errors.
//
// Shared memory is filled with 0xFF bytes (NaN as float and as bf16) before every block and
// followed by a guard area that is checked after it: reads of never-written shared memory and
// writes past the requested size show up.
//
// Static shared arrays: a kernel header declares them with ASTROMER_FAST_SHARED_ARRAY(T, name, n),
// which its own fallback turns into `__shared__ T name[n]` for nvcc (same code as before) and this
// file into a per-block allocation: the k-th declaration a thread executes gets the k-th array of
// its block (all threads of a block share it, as on the GPU), 0xFF-filled, each array followed by
// a guard that is checked after the block, and their sum capped at CUDA's 48 KB static limit.
// ASTROMER_FAST_DYNAMIC_SHARED(T, name) (for `extern __shared__ T name[]`) is the dynamic buffer.
//
// Arithmetic. Emulated intrinsics are those whose result is fully specified: __fdiv_rn (IEEE
// division), __ldg (a plain load: the read-only path changes no value), bf16 <-> float with
// round-to-nearest-even, __uint_as_float. Standard math functions (expf, logf, pow, sqrt, rint,
// fma, fmaf, fminf, fmaxf, ...) come from the host's libm: exact where IEEE requires it (sqrt,
// fma, rint, fmin/fmax), otherwise within an ulp, while CUDA documents up to 2 ulp (expf) and
// 1 ulp (logf) without fast math, so results are close to the GPU's, not bit-identical. The host
// compiler here does not contract a * b + c into an FMA (x86-64 without -mfma) while nvcc does by
// default: another last-bit difference. The fast-math intrinsics (__expf, __sinf, __fdividef,
// ...) have hardware-specific approximation errors that the CPU cannot reproduce; glibc declares
// functions with several of those very names (its exact internal versions), which would compile
// silently, so each is defined below as a macro that makes any use a compile error. Other CUDA
// functions (atomics, __shfl_sync, ...) are simply not declared: using one fails to compile.
//
// Errors (misaligned WMMA pointer, deadlock, guard overwritten) end the launch: emu::launch
// returns the message (fiber mode) or the process aborts (OS-thread mode).
#pragma once

#define ASTROMER_FAST_CUDA_EMULATION 1

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#ifndef EMU_OS_THREADS
#include <ucontext.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// A bare `__shared__` variable is not emulated (there is no per-block storage class on the CPU):
// kernels use emu::dynamic_smem() or the two macros below, defined after namespace emu.

// Fast-math intrinsics: a compile error, never a silent approximation (see the top of the file).
#define __expf(...) __expf_is_a_fast_math_intrinsic_the_cuda_emulation_cannot_reproduce
#define __exp10f(...) __exp10f_is_a_fast_math_intrinsic_the_cuda_emulation_cannot_reproduce
#define __logf(...) __logf_is_a_fast_math_intrinsic_the_cuda_emulation_cannot_reproduce
#define __log2f(...) __log2f_is_a_fast_math_intrinsic_the_cuda_emulation_cannot_reproduce
#define __log10f(...) __log10f_is_a_fast_math_intrinsic_the_cuda_emulation_cannot_reproduce
#define __powf(...) __powf_is_a_fast_math_intrinsic_the_cuda_emulation_cannot_reproduce
#define __sinf(...) __sinf_is_a_fast_math_intrinsic_the_cuda_emulation_cannot_reproduce
#define __cosf(...) __cosf_is_a_fast_math_intrinsic_the_cuda_emulation_cannot_reproduce
#define __tanf(...) __tanf_is_a_fast_math_intrinsic_the_cuda_emulation_cannot_reproduce
#define __sincosf(...) __sincosf_is_a_fast_math_intrinsic_the_cuda_emulation_cannot_reproduce
#define __fdividef(...) __fdividef_is_a_fast_math_intrinsic_the_cuda_emulation_cannot_reproduce
#define __saturatef(...) __saturatef_is_not_emulated

#ifndef EMU_DEADLOCK_SECONDS
#define EMU_DEADLOCK_SECONDS 120
#endif
#ifndef EMU_FIBER_STACK
#define EMU_FIBER_STACK (256 * 1024)
#endif

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// bfloat16: the bit pattern, with round-to-nearest-even conversion from float (NaN stays NaN).
struct __nv_bfloat16 {
  std::uint16_t bits;
};
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }

// The device-side integer min/max that CUDA code calls unqualified, one overload per type as in
// CUDA's headers, so that an argument is never silently narrowed (mixed types are ambiguous here:
// a compile error; float arguments too, where CUDA would call fminf/fmaxf).
#define EMU_MIN_MAX(T)                                  \
  inline T min(T a, T b) { return a < b ? a : b; }      \
  inline T max(T a, T b) { return a > b ? a : b; }
EMU_MIN_MAX(int)
EMU_MIN_MAX(unsigned)
EMU_MIN_MAX(long long)
EMU_MIN_MAX(unsigned long long)
#undef EMU_MIN_MAX

// IEEE round-to-nearest division: what the host's float division is (SSE, no fast math).
inline float __fdiv_rn(float a, float b) { return a / b; }

// A load through the read-only data path: the same value as a plain load.
template <class T>
inline T __ldg(const T* p) {
  return *p;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<std::uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<std::uint16_t>(u >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 h) {
  const std::uint32_t u = static_cast<std::uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

struct Block;

// Per OS thread: the block being run and, in fiber mode, the fiber currently running.
struct ThreadState {
  Block* block = nullptr;
  int tid = 0;
};
inline thread_local ThreadState tls;

[[noreturn]] inline void fail(const char* what);

// ------------------------------------------------------------------------------------------------
// Barriers
// ------------------------------------------------------------------------------------------------
#ifdef EMU_OS_THREADS
class Barrier {
 public:
  void init(int n) { expected_ = n; }
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lk(m_);
    const unsigned long long gen = gen_;
    if (++arrived_ == expected_) {
      release_locked();
      return;
    }
    if (!cv_.wait_for(lk, std::chrono::seconds(EMU_DEADLOCK_SECONDS), [&] { return gen_ != gen; }))
      fail("barrier timeout (divergent __syncthreads/__syncwarp/shuffle?)");
  }
  void arrive_and_drop() {
    std::unique_lock<std::mutex> lk(m_);
    --expected_;
    if (expected_ > 0 && arrived_ == expected_) release_locked();
  }

 private:
  void release_locked() {
    arrived_ = 0;
    ++gen_;
    cv_.notify_all();
  }
  std::mutex m_;
  std::condition_variable cv_;
  int expected_ = 0;
  int arrived_ = 0;
  unsigned long long gen_ = 0;
};
#else
class Barrier {
 public:
  void init(int n) { expected_ = n; }
  void arrive_and_wait();
  void arrive_and_drop();

 private:
  friend struct Block;
  int expected_ = 0;
  std::vector<int> waiting_;
};
#endif

// ------------------------------------------------------------------------------------------------
// A block: its threads, barriers, shuffle slots and shared memory
// ------------------------------------------------------------------------------------------------
struct MmaMemo {  // one mma_sync call of one warp (fiber mode)
  long long call = -1;
  float in[3 * 256];
  float out[256];
};
constexpr int kMemoSlots = 256;  // > the mma calls a lane can be ahead of its warp's last lane

struct Warp {
  Barrier bar;
  std::uint64_t slots[2][32] = {};
  std::unique_ptr<MmaMemo[]> memo;
};

struct Fiber {
#ifndef EMU_OS_THREADS
  ucontext_t ctx;
#endif
  unsigned shfl_gen = 0;
  long long mma_calls = 0;
  int static_decls = 0;  // static shared arrays this thread has declared so far
  bool done = false;
};

struct Block {
  int threads = 0;
  std::size_t size = 0;
  unsigned char* base = nullptr;
  std::vector<unsigned char> smem;
  Barrier bar;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<Fiber> fibers;
  std::atomic<int> or_acc{0};
  static constexpr std::size_t kGuard = 256;

  // Static shared arrays: one arena, reserved once (pointers into it stay valid), each array
  // followed by kStaticGuard 0xFF bytes.
  static constexpr std::size_t kStaticLimit = 48 * 1024;  // CUDA's static __shared__ limit
  static constexpr std::size_t kStaticGuard = 64;
  static constexpr std::size_t kMaxStaticArrays = 64;
  struct StaticArray {
    std::size_t offset, bytes;
  };
  std::vector<unsigned char> static_arena;
  unsigned char* static_base = nullptr;
  std::vector<StaticArray> static_arrays;
  std::size_t static_end = 0;    // arena bytes used, guards included
  std::size_t static_bytes = 0;  // array bytes (with alignment), against kStaticLimit
#ifdef EMU_OS_THREADS
  std::mutex static_mutex;
#endif

#ifndef EMU_OS_THREADS
  ucontext_t sched;
  std::vector<int> runnable;
  std::mt19937_64 rng;
  std::string error;
  char* stacks = nullptr;
#endif

  void reset(int nthreads, std::size_t smem_bytes) {
    threads = nthreads;
    bar.init(nthreads);
    const int nw = (nthreads + 31) / 32;
    warps.resize(nw);
    for (int w = 0; w < nw; ++w) {
      if (!warps[w]) warps[w].reset(new Warp());
      warps[w]->bar.init(nthreads - 32 * w < 32 ? nthreads - 32 * w : 32);
      std::memset(warps[w]->slots, 0, sizeof(warps[w]->slots));
#ifndef EMU_OS_THREADS
      if (!warps[w]->memo) warps[w]->memo.reset(new MmaMemo[kMemoSlots]);
      for (int i = 0; i < kMemoSlots; ++i) warps[w]->memo[i].call = -1;
#endif
    }
    fibers.assign(nthreads, Fiber{});
    smem.resize(smem_bytes + kGuard + 128);
    const auto addr = reinterpret_cast<std::uintptr_t>(smem.data());
    base = smem.data() + ((128 - addr % 128) % 128);  // 128-byte aligned, as extern __shared__
    std::memset(base, 0xff, smem_bytes + kGuard);
    size = smem_bytes;
    or_acc = 0;
    if (static_arena.empty()) {
      static_arena.resize(kStaticLimit + kMaxStaticArrays * (kStaticGuard + 16) + 128);
      const auto a = reinterpret_cast<std::uintptr_t>(static_arena.data());
      static_base = static_arena.data() + ((128 - a % 128) % 128);
    }
    static_arrays.clear();
    static_end = 0;
    static_bytes = 0;
  }
  bool guard_intact() const {
    for (std::size_t i = 0; i < kGuard; ++i)
      if (base[size + i] != 0xff) return false;
    for (const StaticArray& a : static_arrays)
      for (std::size_t i = 0; i < kStaticGuard; ++i)
        if (static_base[a.offset + a.bytes + i] != 0xff) return false;
    return true;
  }

#ifndef EMU_OS_THREADS
  // Back to the scheduler; returns when this fiber is resumed.
  void yield() {
    Fiber& f = fibers[tls.tid];
    swapcontext(&f.ctx, &sched);
  }
  void make_runnable(int tid) { runnable.push_back(tid); }
#endif
};

inline unsigned char* dynamic_smem() { return tls.block->base; }
inline int lane_id() { return tls.tid & 31; }
inline Warp& my_warp() { return *tls.block->warps[tls.tid >> 5]; }
inline Fiber& my_fiber() { return tls.block->fibers[tls.tid]; }

// The k-th static shared array this thread declares is the k-th array of its block: the first
// thread to get there allocates it (0xFF-filled, guard behind), the others must ask for the same
// size. On the GPU every declaration of a kernel is one fixed array per block; threads that
// declared them in a different order or with different sizes would be an emulation bug.
inline void* static_shared_bytes(std::size_t bytes, std::size_t align);

#ifdef EMU_OS_THREADS
[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s\n", what);
  std::fflush(stderr);
  std::abort();
}
#else
[[noreturn]] inline void fail(const char* what) {
  Block* b = tls.block;
  if (b == nullptr) {
    std::fprintf(stderr, "cuda emulation: %s\n", what);
    std::abort();
  }
  if (b->error.empty()) b->error = what;
  setcontext(&b->sched);  // abandon this thread; the launch reports the error
  std::abort();
}
inline void Barrier::arrive_and_wait() {
  Block& b = *tls.block;
  waiting_.push_back(tls.tid);
  if (static_cast<int>(waiting_.size()) == expected_) {
    for (int t : waiting_) b.make_runnable(t);
    waiting_.clear();
  }
  b.yield();  // also when released: the next thread to run is drawn at random
}
inline void Barrier::arrive_and_drop() {
  Block& b = *tls.block;
  --expected_;
  if (expected_ > 0 && static_cast<int>(waiting_.size()) == expected_) {
    for (int t : waiting_) b.make_runnable(t);
    waiting_.clear();
  }
}
#endif

inline void* static_shared_bytes(std::size_t bytes, std::size_t align) {
  Block& b = *tls.block;
#ifdef EMU_OS_THREADS
  std::lock_guard<std::mutex> lk(b.static_mutex);
#endif
  const std::size_t k = static_cast<std::size_t>(my_fiber().static_decls++);
  if (k < b.static_arrays.size()) {
    if (b.static_arrays[k].bytes != bytes)
      fail("static shared array declared with different sizes by threads of one block");
    return b.static_base + b.static_arrays[k].offset;
  }
  if (align < 16) align = 16;
  const std::size_t offset = (b.static_end + align - 1) / align * align;
  b.static_bytes += (offset - b.static_end) + bytes;
  if (b.static_bytes > Block::kStaticLimit) fail("static shared memory over CUDA's 48 KB limit");
  if (b.static_arrays.size() == Block::kMaxStaticArrays || align > 128 ||
      offset + bytes + Block::kStaticGuard > b.static_arena.size() - 128)
    fail("too many static shared arrays for the emulation's arena");
  std::memset(b.static_base + offset, 0xff, bytes + Block::kStaticGuard);
  b.static_arrays.push_back({offset, bytes});
  b.static_end = offset + bytes + Block::kStaticGuard;
  return b.static_base + offset;
}

template <class T>
inline T* static_shared(std::size_t count) {
  static_assert(std::is_trivially_copyable_v<T>, "shared arrays hold plain data");
  return static_cast<T*>(static_shared_bytes(count * sizeof(T), alignof(T)));
}

}  // namespace emu

// The kernel headers' spellings of `__shared__ T name[n]` and `extern __shared__ T name[]`.
#define ASTROMER_FAST_SHARED_ARRAY(T, name, n) T* const name = ::emu::static_shared<T>((n))
#define ASTROMER_FAST_DYNAMIC_SHARED(T, name) \
  T* const name = reinterpret_cast<T*>(::emu::dynamic_smem())

inline void __syncthreads() { emu::tls.block->bar.arrive_and_wait(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) emu::fail("__syncwarp with a partial mask is not emulated");
  emu::my_warp().bar.arrive_and_wait();
}
inline int __syncthreads_or(int pred) {
  emu::Block* b = emu::tls.block;
  b->bar.arrive_and_wait();  // every thread has read the previous result
  if (threadIdx.x == 0) b->or_acc.store(0);
  b->bar.arrive_and_wait();
  if (pred) b->or_acc.store(1);
  b->bar.arrive_and_wait();
  return b->or_acc.load();
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  if (mask != 0xffffffffu) emu::fail("__shfl_xor_sync with a partial mask is not emulated");
  emu::Warp& w = emu::my_warp();
  // Two alternating slot sets: a lane writes set g only after everyone passed the barrier of
  // exchange g-1, i.e. after every read of set g (exchange g-2).
  const unsigned g = emu::my_fiber().shfl_gen++ & 1u;
  const int lane = emu::lane_id();
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  w.slots[g][lane] = bits;
  w.bar.arrive_and_wait();
  const int src = lane ^ lane_mask;
  if (src < 0 || src >= 32) emu::fail("__shfl_xor_sync: source lane out of range");
  T out;
  bits = w.slots[g][src];
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// Every lane holds the whole tile; x[r * 16 + c] is element (row r, column c) of the logical
// matrix (a: M x K, b: K x N, accumulator: M x N).
template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "only m16n16k16 is emulated");
  static constexpr int num_elements = 256;
  T x[256];
};

namespace detail {
template <class T>
inline void check_ptr(const T* p, unsigned ldm, const char* what) {
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0) emu::fail(what);
  if ((ldm * sizeof(T)) % 16 != 0) emu::fail(what);
}
inline float to_f(float x) { return x; }
inline float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
}  // namespace detail

template <class Use, class T, class Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout");
  detail::check_ptr(p, ldm, "load_matrix_sync: pointer not 32-byte aligned or bad ldm");
  constexpr bool row = std::is_same_v<Layout, row_major>;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = row ? p[r * ldm + c] : p[c * ldm + r];
}

template <class T>
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, T>& f, const T* p, unsigned ldm,
                             layout_t layout) {
  detail::check_ptr(p, ldm, "load_matrix_sync (accumulator): pointer not aligned or bad ldm");
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.x[r * 16 + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}

template <class T>
inline void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T>& f, unsigned ldm,
                              layout_t layout) {
  detail::check_ptr(p, ldm, "store_matrix_sync: pointer not 32-byte aligned or bad ldm");
  if (emu::lane_id() != 0) return;  // one writer: other lanes must __syncwarp before reading
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) {
      if (layout == mem_row_major) p[r * ldm + c] = f.x[r * 16 + c];
      else p[c * ldm + r] = f.x[r * 16 + c];
    }
}

template <class Use, class T, class Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const T& v) {
  for (int i = 0; i < 256; ++i) f.x[i] = v;
}

template <class TA, class LA, class TB, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                     const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TB, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  float in[3 * 256];
  float* av = in;
  float* bv = in + 256;
  for (int i = 0; i < 256; ++i) {
    av[i] = detail::to_f(a.x[i]);
    bv[i] = detail::to_f(b.x[i]);
    in[512 + i] = c.x[i];
  }
#ifndef EMU_OS_THREADS
  const long long call = emu::my_fiber().mma_calls++;
  emu::MmaMemo& memo = emu::my_warp().memo[call % emu::kMemoSlots];
  if (memo.call == call && std::memcmp(memo.in, in, sizeof(in)) == 0) {
    for (int i = 0; i < 256; ++i) d.x[i] = memo.out[i];
    return;
  }
#endif
  float acc[256];
  for (int i = 0; i < 256; ++i) acc[i] = in[512 + i];
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 16; ++k) {
      const float ark = av[r * 16 + k];
      for (int n = 0; n < 16; ++n) acc[r * 16 + n] += ark * bv[k * 16 + n];
    }
  for (int i = 0; i < 256; ++i) d.x[i] = acc[i];
#ifndef EMU_OS_THREADS
  memo.call = call;
  std::memcpy(memo.in, in, sizeof(in));
  std::memcpy(memo.out, acc, sizeof(acc));
#endif
}

}  // namespace wmma
}  // namespace nvcuda

namespace emu {

inline std::string& last_error() {
  static std::string e;
  return e;
}

#ifdef EMU_OS_THREADS
// Runs kernel(args...) on `grid` blocks of `threads` threads, one block at a time.
template <class Kernel, class... Args>
const char* launch(unsigned grid, unsigned threads, std::size_t smem_bytes, Kernel kernel,
                   Args... args) {
  if (threads == 0 || threads > 1024) return "bad block size";
  Block block;
  for (unsigned b = 0; b < grid; ++b) {
    block.reset(static_cast<int>(threads), smem_bytes);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        tls = ThreadState{&block, static_cast<int>(t)};
        threadIdx = dim3{t, 0, 0};
        blockIdx = dim3{b, 0, 0};
        blockDim = dim3{threads, 1, 1};
        gridDim = dim3{grid, 1, 1};
        kernel(args...);
        block.warps[t / 32]->bar.arrive_and_drop();
        block.bar.arrive_and_drop();
      });
    }
    for (auto& th : pool) th.join();
    if (!block.guard_intact()) return "shared memory written past the requested size";
  }
  return nullptr;
}
#else
namespace detail {
inline thread_local std::function<void()>* fiber_body = nullptr;

inline void fiber_entry() {
  Block& b = *tls.block;
  (*fiber_body)();
  Fiber& f = b.fibers[tls.tid];
  f.done = true;
  b.warps[tls.tid >> 5]->bar.arrive_and_drop();
  b.bar.arrive_and_drop();
  // returning resumes uc_link, the scheduler
}

// Out of line: getcontext "returns twice" as far as the compiler knows (it never does here, since
// makecontext replaces the saved context), which must not clobber the caller's loop.
[[gnu::noinline]] inline void init_fiber(Fiber& f, char* stack, ucontext_t* link) {
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stack;
  f.ctx.uc_stack.ss_size = EMU_FIBER_STACK;
  f.ctx.uc_link = link;
  makecontext(&f.ctx, fiber_entry, 0);
}

// Runs one block on this OS thread; "" on success.
inline std::string run_block(Block& b, unsigned block_id, unsigned grid, unsigned threads,
                             std::function<void()>& body, std::uint64_t seed) {
  b.rng.seed(seed * 0x9e3779b97f4a7c15ull + block_id);
  b.error.clear();
  b.runnable.clear();
  for (unsigned t = 0; t < threads; ++t) {
    init_fiber(b.fibers[t], b.stacks + static_cast<std::size_t>(t) * EMU_FIBER_STACK, &b.sched);
    b.runnable.push_back(static_cast<int>(t));
  }
  tls.block = &b;
  fiber_body = &body;
  blockIdx = dim3{block_id, 0, 0};
  blockDim = dim3{threads, 1, 1};
  gridDim = dim3{grid, 1, 1};
  while (!b.runnable.empty() && b.error.empty()) {
    const std::size_t i = b.rng() % b.runnable.size();
    const int tid = b.runnable[i];
    b.runnable[i] = b.runnable.back();
    b.runnable.pop_back();
    tls.tid = tid;
    threadIdx = dim3{static_cast<unsigned>(tid), 0, 0};
    swapcontext(&b.sched, &b.fibers[tid].ctx);
  }
  tls.block = nullptr;
  if (!b.error.empty()) return b.error;
  for (unsigned t = 0; t < threads; ++t)
    if (!b.fibers[t].done)
      return "deadlock: threads wait at a barrier that the others never reach "
             "(divergent __syncthreads/__syncwarp/shuffle)";
  if (!b.guard_intact()) return "shared memory written past the requested size";
  return "";
}
}  // namespace detail

// Runs kernel(args...) on `grid` blocks of `threads` threads; blocks are spread over the cores.
// EMU_SEED (environment) changes the interleaving. Returns nullptr or the first error.
template <class Kernel, class... Args>
const char* launch(unsigned grid, unsigned threads, std::size_t smem_bytes, Kernel kernel,
                   Args... args) {
  if (threads == 0 || threads > 1024) return "bad block size";
  const char* env = std::getenv("EMU_SEED");
  const std::uint64_t seed = env ? std::strtoull(env, nullptr, 10) : 1;
  unsigned workers = std::thread::hardware_concurrency();
  if (workers == 0) workers = 1;
  if (workers > grid) workers = grid;
  if (workers > 8) workers = 8;
  std::atomic<unsigned> next{0};
  std::atomic<bool> failed{false};
  std::mutex err_mutex;
  std::string first_error;
  auto work = [&] {
    Block block;
    std::unique_ptr<char[]> stacks(new char[static_cast<std::size_t>(threads) * EMU_FIBER_STACK]);
    block.stacks = stacks.get();
    std::function<void()> body = [&] { kernel(args...); };
    for (unsigned b; !failed && (b = next.fetch_add(1)) < grid;) {
      block.reset(static_cast<int>(threads), smem_bytes);
      const std::string e = detail::run_block(block, b, grid, threads, body, seed);
      if (!e.empty()) {
        std::lock_guard<std::mutex> lk(err_mutex);
        if (first_error.empty()) first_error = e;
        failed = true;
      }
    }
  };
  std::vector<std::thread> pool;
  for (unsigned w = 1; w < workers; ++w) pool.emplace_back(work);
  work();
  for (auto& th : pool) th.join();
  if (first_error.empty()) return nullptr;
  last_error() = first_error;
  return last_error().c_str();
}
#endif

}  // namespace emu
