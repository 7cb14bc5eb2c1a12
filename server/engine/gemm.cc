#include "server/engine/gemm.h"

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

template <>
void Gemm<float>(Op op_a, Op op_b, int64_t m, int64_t n, int64_t k, const float* a, const float* b,
                 float* c, Into into) {
#ifdef GRADSERVE_HAVE_ONEDNN
  if (UsesOneDnn(m, n, k)) {
    const bool ta = op_a == Op::kTransposed;
    const bool tb = op_b == Op::kTransposed;
    // Leading dimensions are the stored row lengths (dnnl_sgemm is row-major).
    const float beta = into == Into::kAccumulate ? 1.0f : 0.0f;
    const dnnl_status_t status = dnnl_sgemm(ta ? 'T' : 'N', tb ? 'T' : 'N', m, n, k, 1.0f, a,
                                            ta ? m : k, b, tb ? k : n, beta, c, n);
    // Arguments are valid by construction; oneDNN fails only when it cannot allocate its
    // packing buffers, which it does before computing, and then Eigen computes the product
    // (equal to rounding) instead.
    if (status == dnnl_success) return;
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
