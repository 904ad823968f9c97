// A minimal parallel-for on std::thread. OpenMP is avoided on purpose: torch wheels bundle their
// own libgomp, and a second OpenMP runtime in the same process oversubscribes or crashes.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace astromer_fast {
namespace cpu {

// Splits [0, n) into at most num_threads contiguous chunks of at least `grain` items and calls
// fn(begin, end) for each; the calling thread takes the first chunk. The first exception thrown by
// any chunk is rethrown here after all threads have joined.
template <class Fn>
void parallel_for(std::int64_t n, std::int64_t grain, int num_threads, Fn&& fn) {
  if (n <= 0) return;
  grain = std::max<std::int64_t>(grain, 1);
  const std::int64_t max_chunks = (n + grain - 1) / grain;
  const std::int64_t chunks = std::max<std::int64_t>(1, std::min<std::int64_t>(num_threads, max_chunks));
  if (chunks == 1) {
    fn(std::int64_t{0}, n);
    return;
  }
  const std::int64_t step = (n + chunks - 1) / chunks;
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(chunks));
  std::vector<std::thread> workers;
  workers.reserve(static_cast<std::size_t>(chunks - 1));
  auto run = [&](std::int64_t c) {
    const std::int64_t begin = c * step;
    const std::int64_t end = std::min(n, begin + step);
    if (begin >= end) return;
    try {
      fn(begin, end);
    } catch (...) {
      errors[static_cast<std::size_t>(c)] = std::current_exception();
    }
  };
  for (std::int64_t c = 1; c < chunks; ++c) {
    // Running out of threads must not terminate the process: do that chunk here instead.
    try {
      workers.emplace_back(run, c);
    } catch (...) {
      run(c);
    }
  }
  run(0);
  for (auto& th : workers) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace cpu
}  // namespace astromer_fast
