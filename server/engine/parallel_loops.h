// The OpenMP loops every element-wise pass of the engine runs on: the chain's layers
// (layers.cc) and the graph's operators (graph/kernels.h) share them, so a graph's activation
// is split, vectorised and rounded exactly as the chain's layer is.
#ifndef GRADSERVE_ENGINE_PARALLEL_LOOPS_H_
#define GRADSERVE_ENGINE_PARALLEL_LOOPS_H_

#include <cstdint>

namespace gradserve::engine {

// Loops are split across the OpenMP team only when there is enough work to pay for waking it.
// Below that they run inline: even a parallel region whose `if` is false costs ~0.3 us, which
// for the smallest models is half a training step.
inline constexpr int64_t kParallelElements = 1 << 15;

// fn(i) for i in [0, n), split across the team if `parallel`.
template <typename Fn>
void ForEachIndex(int64_t n, bool parallel, const Fn& fn) {
  if (!parallel || n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) fn(i);
}

// Element-wise loops, vectorised (Note [Vectorised element-wise math] in elementwise_math.h).
// `fn` captures its pointers by value; each thread runs its own copy, a local the loop's stores
// cannot alias, so the compiler keeps the pointers in registers and vectorises the loop. Files
// that use it are compiled with -ffp-contract=off (server/CMakeLists.txt), so every lane and
// the remainder round alike.
template <typename Fn>
void ForEachElement(int64_t n, const Fn& fn) {
  if (n < kParallelElements) {
    const Fn local = fn;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) local(j);
    return;
  }
#pragma omp parallel
  {
    const Fn local = fn;
#pragma omp for simd schedule(static)
    for (int64_t j = 0; j < n; ++j) local(j);
  }
}

}  // namespace gradserve::engine

#endif  // GRADSERVE_ENGINE_PARALLEL_LOOPS_H_
