#include "server/engine/gemm.h"

#include <omp.h>

#include <algorithm>

#include "server/engine/types.h"

#ifdef GRADSERVE_HAVE_ONEDNN
#include <oneapi/dnnl/dnnl.h>
#endif

namespace gradserve::engine {
namespace {

#ifdef GRADSERVE_HAVE_ONEDNN
// m n k below which oneDNN's per-call cost outweighs its faster kernel (measured: at 64^3 Eigen
// still wins, from 128x64x64 up oneDNN does).
constexpr int64_t kOneDnnMinWork = int64_t{1} << 19;

bool UsesOneDnn(int64_t m, int64_t n, int64_t k) { return m * n * k >= kOneDnnMinWork; }
#else
bool UsesOneDnn(int64_t, int64_t, int64_t) { return false; }
#endif

template <typename T, typename A, typename B>
void Assign(MatrixMap<T>& out, const A& a, const B& b, Into into) {
  if (into == Into::kAccumulate) {
    out.noalias() += a * b;
  } else {
    out.noalias() = a * b;
  }
}

// Products with m + n + k under Eigen's EIGEN_GEMM_TO_COEFFBASED_THRESHOLD Eigen evaluates
// coefficient by coefficient, and whether a coefficient takes its vector path (one multiply-add
// per k) or its scalar path (a vectorised reduction over k) depends on the destination's
// address modulo 64: the bits of a tiny layer's dW would depend on where the response buffer
// landed. These are computed here instead, each coefficient in one order, k ascending.
// The transposes are template parameters so that the inner loop has no branch.
template <bool kTransposeA, bool kTransposeB, typename T>
void TinyGemm(int64_t m, int64_t n, int64_t k, const T* a, const T* b, T* c, Into into) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      T sum = 0;
      for (int64_t p = 0; p < k; ++p) {
        sum += (kTransposeA ? a[p * m + i] : a[i * k + p]) *
               (kTransposeB ? b[j * k + p] : b[p * n + j]);
      }
      c[i * n + j] = into == Into::kAccumulate ? c[i * n + j] + sum : sum;
    }
  }
}

template <typename T>
void TinyGemm(Op op_a, Op op_b, int64_t m, int64_t n, int64_t k, const T* a, const T* b, T* c,
              Into into) {
  const bool ta = op_a == Op::kTransposed;
  const bool tb = op_b == Op::kTransposed;
  if (!ta && !tb) TinyGemm<false, false>(m, n, k, a, b, c, into);
  if (!ta && tb) TinyGemm<false, true>(m, n, k, a, b, c, into);
  if (ta && !tb) TinyGemm<true, false>(m, n, k, a, b, c, into);
  if (ta && tb) TinyGemm<true, true>(m, n, k, a, b, c, into);
}

template <typename T>
void EigenGemm(Op op_a, Op op_b, int64_t m, int64_t n, int64_t k, const T* a, const T* b, T* c,
               Into into) {
  if (m + n + k < EIGEN_GEMM_TO_COEFFBASED_THRESHOLD) {
    TinyGemm(op_a, op_b, m, n, k, a, b, c, into);
    return;
  }
  MatrixMap<T> out(c, m, n);
  const bool ta = op_a == Op::kTransposed;
  const bool tb = op_b == Op::kTransposed;
  ConstMatrixMap<T> a_map(a, ta ? k : m, ta ? m : k);
  ConstMatrixMap<T> b_map(b, tb ? n : k, tb ? k : n);
  if (!ta && !tb) Assign(out, a_map, b_map, into);
  if (!ta && tb) Assign(out, a_map, b_map.transpose(), into);
  if (ta && !tb) Assign(out, a_map.transpose(), b_map, into);
  if (ta && tb) Assign(out, a_map.transpose(), b_map.transpose(), into);
}

}  // namespace

template <>
void Gemm<double>(Op op_a, Op op_b, int64_t m, int64_t n, int64_t k, const double* a,
                  const double* b, double* c, Into into) {
  EigenGemm(op_a, op_b, m, n, k, a, b, c, into);
}

#ifdef GRADSERVE_HAVE_ONEDNN
// Note [Split GEMMs]
// With a team of T > 1 threads, a product of at least kSplitMinWork multiply-adds is cut into T
// blocks of C along its longer side (multiples of 16 rows or columns), each a one-thread
// dnnl_sgemm on its own thread, A or B addressed through oneDNN's leading dimensions. oneDNN's
// own threading ran slower on a 2-core Zen 4 (1024 x 256 x 1024: 177 vs 208 GFLOP/s; 1024 x
// 1024 x 256: 207 vs 225; 256 x 1024 x 1024 with A transposed: 155 vs ~210). The cut depends
// only on the shape and the team size, so a product's bits still depend only on those.
constexpr int64_t kSplitMinWork = int64_t{1} << 22;

// C block = op(A) op(B) on Eigen, through strided maps: a block whose oneDNN call failed.
void StridedEigenGemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a,
                      int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                      bool accumulate) {
  using Row = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Stride = Eigen::OuterStride<>;
  Eigen::Map<Row, Eigen::Unaligned, Stride> out(c, m, n, Stride(ldc));
  Eigen::Map<const Row, Eigen::Unaligned, Stride> am(a, ta ? k : m, ta ? m : k, Stride(lda));
  Eigen::Map<const Row, Eigen::Unaligned, Stride> bm(b, tb ? n : k, tb ? k : n, Stride(ldb));
  const auto assign = [&](const auto& x, const auto& y) {
    if (accumulate) {
      out.noalias() += x * y;
    } else {
      out.noalias() = x * y;
    }
  };
  if (!ta && !tb) assign(am, bm);
  if (!ta && tb) assign(am, bm.transpose());
  if (ta && !tb) assign(am.transpose(), bm);
  if (ta && tb) assign(am.transpose(), bm.transpose());
}

// Note [oneDNN set-up on the main thread]
// oneDNN generates its GEMM kernels once, on the first thread that calls it, and probes with
// dlopen on the way; glibc keeps that thread's dlerror state in a buffer it frees when the thread
// exits. Split GEMMs (Note [Split GEMMs]) and graph ops call oneDNN from OpenMP workers, which
// never exit: LeakSanitizer then reported the buffer as a leak whenever a worker happened to be
// first (1 run in 12). One small product at start-up, on the main thread, does the set-up there.
[[maybe_unused]] const bool kOneDnnReady = [] {
  float a[16 * 16] = {}, b[16 * 16] = {}, c[16 * 16];
  return dnnl_sgemm('N', 'N', 16, 16, 16, 1.0f, a, 16, b, 16, 0.0f, c, 16) == dnnl_success;
}();

// Whether oneDNN computed the product (else nothing of C was written).
bool OneDnnGemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, const float* b,
                float* c, bool accumulate) {
  // Leading dimensions are the stored row lengths (dnnl_sgemm is row-major).
  const int64_t lda = ta ? m : k, ldb = tb ? k : n;
  const float beta = accumulate ? 1.0f : 0.0f;
  const int threads = omp_in_parallel() ? 1 : omp_get_max_threads();
  if (threads <= 1 || m * n * k < kSplitMinWork) {
    return dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, 1.0f, a, lda, b, ldb, beta, c, n) ==
           dnnl_success;
  }
  const bool by_rows = m >= n;
  const int64_t length = by_rows ? m : n;
  const int64_t per = ((length + threads - 1) / threads + 15) / 16 * 16;
#pragma omp parallel for schedule(static, 1) num_threads(threads)
  for (int t = 0; t < threads; ++t) {
    const int64_t s0 = std::min(length, t * per);
    const int64_t s1 = std::min(length, s0 + per);
    if (s1 <= s0) continue;
    const int64_t rows = by_rows ? s1 - s0 : m, cols = by_rows ? n : s1 - s0;
    const float* ab = by_rows ? a + (ta ? s0 : s0 * k) : a;
    const float* bb = by_rows ? b : b + (tb ? s0 * k : s0);
    float* cb = c + (by_rows ? s0 * n : s0);
    // oneDNN fails only when it cannot allocate its packing buffers, before computing: then
    // Eigen computes this block (equal to rounding) instead.
    if (dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', rows, cols, k, 1.0f, ab, lda, bb, ldb, beta, cb,
                   n) != dnnl_success) {
      StridedEigenGemm(ta, tb, rows, cols, k, ab, lda, bb, ldb, cb, n, accumulate);
    }
  }
  return true;
}
#endif

template <>
void Gemm<float>(Op op_a, Op op_b, int64_t m, int64_t n, int64_t k, const float* a, const float* b,
                 float* c, Into into) {
#ifdef GRADSERVE_HAVE_ONEDNN
  // Arguments are valid by construction; oneDNN fails only when it cannot allocate its packing
  // buffers, which it does before computing, and then Eigen computes the product (equal to
  // rounding) instead.
  if (UsesOneDnn(m, n, k) && OneDnnGemm(op_a == Op::kTransposed, op_b == Op::kTransposed, m, n, k,
                                        a, b, c, into == Into::kAccumulate)) {
    return;
  }
#endif
  EigenGemm(op_a, op_b, m, n, k, a, b, c, into);
}

const char* GemmBackend(int64_t m, int64_t n, int64_t k) {
  return UsesOneDnn(m, n, k) ? "onednn" : "eigen";
}

std::string GemmKernel() {
  const std::string isa = OneDnnIsa();
  return isa.empty() ? "eigen" : "onednn " + isa;
}

const char* OneDnnIsa() {
#ifdef GRADSERVE_HAVE_ONEDNN
  switch (dnnl_get_effective_cpu_isa()) {
    case dnnl_cpu_isa_sse41:
      return "sse41";
    case dnnl_cpu_isa_avx:
      return "avx";
    case dnnl_cpu_isa_avx2:
      return "avx2";
    case dnnl_cpu_isa_avx2_vnni:
      return "avx2_vnni";
    case dnnl_cpu_isa_avx512_core:
      return "avx512_core";
    case dnnl_cpu_isa_avx512_core_vnni:
      return "avx512_core_vnni";
    case dnnl_cpu_isa_avx512_core_bf16:
      return "avx512_core_bf16";
    case dnnl_cpu_isa_avx512_core_amx:
      return "avx512_core_amx";
    default:
      return "other";
  }
#else
  return "";
#endif
}

}  // namespace gradserve::engine
