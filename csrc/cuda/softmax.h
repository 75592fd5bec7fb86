// Launchers of the CUDA fused scale -> mask -> softmax -> dropout kernels (softmax.cu).
// Plain C++ and CUDA runtime types only (no torch headers): softmax_ops.cpp does the
// tensor checks and calls these with raw pointers and the current stream.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastlm_softmax {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };
enum class MaskKind : int { kNone = 0, kBool = 1, kAdditive = 2 };

// The (D0, D1, D2, N) broadcast view of the mask over the (R, N) rows (element strides,
// 0 where broadcast); an additive mask has x's dtype.
struct MaskView {
  const void* data;
  MaskKind kind;
  int64_t d1, d2, s0, s1, s2, s3;
};

// Floats of device workspace the launchers need for (rows, n) (0 for rows that fit a
// block's registers; long rows pass per-segment partial results through it).
int64_t softmax_workspace_floats(DType dtype, int64_t rows, int64_t n);

// out, probs: (rows, n); probs is written only when dropout_p > 0.
cudaError_t softmax_forward(DType dtype, const void* x, void* out, void* probs, MaskView mask, float scale,
                            float dropout_p, uint64_t seed, int64_t rows, int64_t n, float* workspace,
                            cudaStream_t stream);

// dx = scale * y * (g - sum(g * y)), g = grad * keep / (1 - p).
cudaError_t softmax_backward(DType dtype, const void* grad, const void* y, void* dx, float scale, float dropout_p,
                             uint64_t seed, int64_t rows, int64_t n, float* workspace, cudaStream_t stream);

}  // namespace fastlm_softmax
