// The MLP's backward matmul with cuBLASLt's DGELU epilogue, as an XLA FFI custom call:
//
//   d_pre = (dy @ w) * gelu'(pre)       (N, F), bf16; gelu is the tanh approximation
//
// dy (N, D), w (D, F) and pre (N, F) are row-major bf16. XLA has no such epilogue: without it
// d(h) = dy @ w is written, then read again with pre by a separate GELU-backward pass. With the
// attribute bias_grad = 1 the epilogue is DGELU_BGRAD and d_bias (F,) = d_pre summed over rows is
// written too, in bf16; on an H100 it is 2.3x slower than DGELU with XLA's reduction
// (bench/HISTORY.md, item 44), so gptjax/cublaslt.py uses it only in bench/mlp_backward.py.
// The layout is apex's (A = w untransposed): a first form with A transposed, the aux data type
// set and a float32 bias gradient got CUBLAS_STATUS_INVALID_VALUE from cuBLASLt 13.
// Built and registered by gptjax/cublaslt.py; the workspace is a third result that the caller
// drops, so XLA allocates it and the call stays capturable in a CUDA graph.
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "xla/ffi/api/ffi.h"

// The part of cuBLASLt's C API used here, declared compatibly with cublasLt.h (CUDA 12 and 13:
// the same signatures and values; the descriptors are opaque, used only through pointers), so
// that the build needs no CUDA headers: only a C++ compiler, JAX's FFI headers and the
// libcublasLt that JAX's CUDA wheels install (linked by gptjax/cublaslt.py). One device per
// process: the handle and the algorithms chosen belong to the device of the first call, as the
// model uses this op only with one GPU (gptjax.kernels.enabled).
extern "C" {
typedef struct CUstream_st* cudaStream_t;
typedef int cublasStatus_t;  // CUBLAS_STATUS_SUCCESS = 0
typedef struct cublasLtContext* cublasLtHandle_t;
typedef struct { uint64_t data[8]; }* cublasLtMatmulDesc_t;
typedef struct { uint64_t data[8]; }* cublasLtMatrixLayout_t;
typedef struct { uint64_t data[8]; }* cublasLtMatmulPreference_t;
typedef struct { uint64_t data[8]; } cublasLtMatmulAlgo_t;
typedef struct {
  cublasLtMatmulAlgo_t algo;
  size_t workspaceSize;
  cublasStatus_t state;
  float wavesCount;
  int reserved[4];
} cublasLtMatmulHeuristicResult_t;
cublasStatus_t cublasLtCreate(cublasLtHandle_t*);
cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t*, int compute_type, int scale_type);
cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t);
cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t, int attr, const void*, size_t);
cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t*, int type, uint64_t rows,
                                          uint64_t cols, int64_t ld);
cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t);
cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t*);
cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t);
cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t, int attr,
                                                    const void*, size_t);
cublasStatus_t cublasLtMatmulAlgoGetHeuristic(
    cublasLtHandle_t, cublasLtMatmulDesc_t, cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
    cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d, cublasLtMatmulPreference_t,
    int requested, cublasLtMatmulHeuristicResult_t results[], int* returned);
cublasStatus_t cublasLtMatmul(cublasLtHandle_t, cublasLtMatmulDesc_t, const void* alpha,
                              const void* a, cublasLtMatrixLayout_t, const void* b,
                              cublasLtMatrixLayout_t, const void* beta, const void* c,
                              cublasLtMatrixLayout_t, void* d, cublasLtMatrixLayout_t,
                              const cublasLtMatmulAlgo_t*, void* workspace, size_t workspace_bytes,
                              cudaStream_t);
}

// Enum values from cublasLt.h, cublas_api.h and library_types.h.
constexpr int CUBLAS_STATUS_SUCCESS = 0;
constexpr int CUBLAS_COMPUTE_32F = 68;
constexpr int CUDA_R_32F = 0, CUDA_R_16BF = 14;
constexpr int32_t CUBLAS_OP_N = 0;
constexpr uint32_t CUBLASLT_EPILOGUE_DGELU = 64 | 128, CUBLASLT_EPILOGUE_DGELU_BGRAD = 64 | 128 | 16;
constexpr int CUBLASLT_MATMUL_DESC_TRANSA = 3, CUBLASLT_MATMUL_DESC_TRANSB = 4,
              CUBLASLT_MATMUL_DESC_EPILOGUE = 7, CUBLASLT_MATMUL_DESC_BIAS_POINTER = 8,
              CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER = 11,
              CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD = 12,
              CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE = 26;
constexpr int CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES = 1;

namespace ffi = xla::ffi;

namespace {

std::string StatusText(cublasStatus_t status) { return std::to_string(status); }

#define GPTJAX_CUBLAS(expr)                                                              \
  do {                                                                                   \
    cublasStatus_t status_ = (expr);                                                     \
    if (status_ != CUBLAS_STATUS_SUCCESS)                                                \
      return ffi::Error::Internal(std::string(#expr) + ": cuBLAS status " + StatusText(status_)); \
  } while (0)

// Descriptors, destroyed with the scope that made them.
struct Descriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t preference = nullptr;
  ~Descriptors() {
    if (preference) cublasLtMatmulPreferenceDestroy(preference);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

// Pointer alignment (up to 256 bytes), on which the heuristic's choice depends.
int64_t Alignment(std::initializer_list<const void*> pointers) {
  uintptr_t all = 256;
  for (const void* p : pointers) all |= reinterpret_cast<uintptr_t>(p);
  return static_cast<int64_t>(all & (~all + 1));
}

std::mutex mutex;
cublasLtHandle_t handle = nullptr;
// The heuristic's algorithm per (n, d, f, epilogue, alignment, workspace, rank), chosen once.
std::map<std::tuple<int64_t, int64_t, int64_t, uint32_t, int64_t, int64_t, int64_t>,
         cublasLtMatmulAlgo_t> algos;

ffi::Error DgeluBgrad(cudaStream_t stream, ffi::Buffer<ffi::BF16> dy, ffi::Buffer<ffi::BF16> w,
                      ffi::Buffer<ffi::BF16> pre, ffi::ResultBuffer<ffi::BF16> d_pre,
                      ffi::ResultBuffer<ffi::BF16> d_bias, ffi::ResultBuffer<ffi::U8> workspace,
                      int64_t algo_rank, int64_t bias_grad) {
  auto dy_dims = dy.dimensions(), w_dims = w.dimensions(), pre_dims = pre.dimensions();
  if (dy_dims.size() != 2 || w_dims.size() != 2 || pre_dims.size() != 2)
    return ffi::Error::InvalidArgument("dgelu_bgrad: dy, w and pre must be 2-D");
  const int64_t n = dy_dims[0], d = dy_dims[1], f = w_dims[1];
  if (w_dims[0] != d || pre_dims[0] != n || pre_dims[1] != f)
    return ffi::Error::InvalidArgument("dgelu_bgrad: shapes must be dy (N, D), w (D, F), pre (N, F)");
  if (algo_rank < 0 || algo_rank >= 16)
    return ffi::Error::InvalidArgument("dgelu_bgrad: algo_rank must be in 0..15");
  const int64_t workspace_bytes = static_cast<int64_t>(workspace->size_bytes());
  const uint32_t epilogue = bias_grad ? CUBLASLT_EPILOGUE_DGELU_BGRAD : CUBLASLT_EPILOGUE_DGELU;
  void* out = d_pre->untyped_data();
  void* bias = bias_grad ? d_bias->untyped_data() : nullptr;
  const void* aux = pre.untyped_data();

  std::lock_guard<std::mutex> lock(mutex);
  if (handle == nullptr) GPTJAX_CUBLAS(cublasLtCreate(&handle));
  // Column-major, as cuBLAS sees the row-major buffers: D (F x N) = A (F x D) . B (D x N), with
  // A = w read as (F x D), B = dy read as (D x N), aux = pre read as (F x N); none transposed.
  Descriptors desc;
  const int32_t trans = CUBLAS_OP_N;
  const int64_t aux_ld = f;
  GPTJAX_CUBLAS(cublasLtMatmulDescCreate(&desc.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  GPTJAX_CUBLAS(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSA, &trans, sizeof(trans)));
  GPTJAX_CUBLAS(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_TRANSB, &trans, sizeof(trans)));
  GPTJAX_CUBLAS(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
  GPTJAX_CUBLAS(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &aux, sizeof(aux)));
  GPTJAX_CUBLAS(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &aux_ld, sizeof(aux_ld)));
  if (bias) {   // the bias gradient in bf16, the output's type
    const int32_t bias_type = CUDA_R_16BF;
    GPTJAX_CUBLAS(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    GPTJAX_CUBLAS(cublasLtMatmulDescSetAttribute(desc.op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof(bias_type)));
  }
  GPTJAX_CUBLAS(cublasLtMatrixLayoutCreate(&desc.a, CUDA_R_16BF, f, d, f));
  GPTJAX_CUBLAS(cublasLtMatrixLayoutCreate(&desc.b, CUDA_R_16BF, d, n, d));
  GPTJAX_CUBLAS(cublasLtMatrixLayoutCreate(&desc.d, CUDA_R_16BF, f, n, f));

  const auto key = std::make_tuple(n, d, f, epilogue,
                                   Alignment({w.untyped_data(), dy.untyped_data(), out, bias, aux}),
                                   workspace_bytes, algo_rank);
  auto found = algos.find(key);
  if (found == algos.end()) {
    GPTJAX_CUBLAS(cublasLtMatmulPreferenceCreate(&desc.preference));
    const uint64_t max_workspace = static_cast<uint64_t>(workspace_bytes);
    GPTJAX_CUBLAS(cublasLtMatmulPreferenceSetAttribute(
        desc.preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_workspace, sizeof(max_workspace)));
    cublasLtMatmulHeuristicResult_t results[16] = {};
    int count = 0;
    GPTJAX_CUBLAS(cublasLtMatmulAlgoGetHeuristic(handle, desc.op, desc.a, desc.b, desc.d, desc.d,
                                                 desc.preference, 16, results, &count));
    if (count <= algo_rank)
      return ffi::Error::Internal("dgelu_bgrad: cuBLASLt offers " + std::to_string(count) +
                                  " algorithms for this problem, asked for rank " + std::to_string(algo_rank));
    found = algos.emplace(key, results[algo_rank].algo).first;
  }
  const float alpha = 1.0f, beta = 0.0f;
  GPTJAX_CUBLAS(cublasLtMatmul(handle, desc.op, &alpha, w.untyped_data(), desc.a, dy.untyped_data(),
                               desc.b, &beta, out, desc.d, out, desc.d, &found->second,
                               workspace->untyped_data(), workspace_bytes, stream));
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GptjaxDgeluBgrad, DgeluBgrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // dy
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // w
                                  .Arg<ffi::Buffer<ffi::BF16>>()  // pre
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // d_pre
                                  .Ret<ffi::Buffer<ffi::BF16>>()  // d_bias
                                  .Ret<ffi::Buffer<ffi::U8>>()    // workspace
                                  .Attr<int64_t>("algo_rank")
                                  .Attr<int64_t>("bias_grad"),
                              {ffi::Traits::kCmdBufferCompatible});

