// Cross-entropy: the CUDA launchers of cross_entropy.cu, called by cross_entropy_ops.cpp.
// Compiled, unverified (never run on a GPU).  No torch includes: nvcc stays fast.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastlm_cross_entropy {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// loss[i] and grad row i (grad may be null: no gradient) of logits row i (rows of v
// contiguous elements), as in fastlm/reference/cross_entropy.py.  A label outside
// [0, v) that is not ignore_index makes its loss and gradient row NaN.
cudaError_t forward(DType dtype, const void* logits, const int64_t* labels, float* loss, void* grad, int64_t n,
                    int64_t v, int64_t ignore_index, float label_smoothing, float z_loss, cudaStream_t stream);

// out[i, :] = grad_rows[i, :] * scale[i]  (fp32 arithmetic)
cudaError_t backward(DType dtype, const void* grad_rows, const float* scale, void* out, int64_t n, int64_t v,
                     cudaStream_t stream);

}  // namespace fastlm_cross_entropy
