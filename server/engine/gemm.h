// The engine's one matrix product: C = op(A) op(B) on row-major, contiguous buffers.
//
// Note [GEMM backend]
// float32 products with enough work go to oneDNN's sgemm when the build has it
// (GRADSERVE_ONEDNN): on the AVX-512 build machines its 1024^3 product runs at 76-88% of the
// FMA peak on one core where Eigen 3.4's own kernel reaches 50-65% (bench/results/bench.md,
// "Machine peak and best GEMM"). oneDNN picks its kernel for the CPU it runs on (AVX-512,
// AVX2, SSE4.1) and packs its operands, so for a given CPU and thread count a product's bits do
// not depend on where the operands sit in memory: recomputing a checkpointed segment into other
// buffers reproduces every bit. (Across thread counts they may differ: the AVX2 kernels split
// some shapes by k.) Smaller products, where oneDNN's per-call set-up (~0.3 us) would dominate,
// and float64 stay on Eigen's GEMM and GEMV, which pack or stream their operands the same way
// wherever they sit; the tiniest, which Eigen would evaluate with address-dependent rounding,
// run a fixed-order loop (TinyGemm). gemm_test checks every path at every alignment.
#ifndef GRADSERVE_ENGINE_GEMM_H_
#define GRADSERVE_ENGINE_GEMM_H_

#include <cstdint>
#include <string>

namespace gradserve::engine {

enum class Op { kPlain, kTransposed };

enum class Into { kOverwrite, kAccumulate };

// c[m, n] = op_a(a) op_b(b) (kOverwrite) or c[m, n] += op_a(a) op_b(b) (kAccumulate), where
// op_a(a) is [m, k] and op_b(b) is [k, n]; a is stored as [m, k] (kPlain) or [k, m]
// (kTransposed), b as [k, n] or [n, k]. c must not overlap a or b. Uses the calling thread's
// OpenMP team size.
template <typename T>
void Gemm(Op op_a, Op op_b, int64_t m, int64_t n, int64_t k, const T* a, const T* b, T* c,
          Into into = Into::kOverwrite);

// Which kernel float32 products of this size use: "onednn" or "eigen" (reported by benchmarks).
const char* GemmBackend(int64_t m, int64_t n, int64_t k);

// The kernel large float32 products run on here: "onednn <isa>" or "eigen" (a build without
// oneDNN). Replicas that report different kernels may round float32 results differently.
std::string GemmKernel();

// The instruction set oneDNN's kernels use on this CPU ("avx512_core", "avx2", "sse41", ...;
// DNNL_MAX_CPU_ISA in the environment lowers it), or "" when the build has no oneDNN.
const char* OneDnnIsa();

}  // namespace gradserve::engine

#endif  // GRADSERVE_ENGINE_GEMM_H_
