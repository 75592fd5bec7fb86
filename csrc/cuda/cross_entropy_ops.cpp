// CUDA implementations of fastlm_C::cross_entropy_forward / cross_entropy_backward
// (schemas in csrc/cpu/cross_entropy.cpp): tensor checks, then the raw-pointer
// launchers of cross_entropy.cu on the current stream.  Compiled, unverified (never
// run on a GPU).  Labels are NOT range-checked here (that would cost a host sync):
// the kernel flags an out-of-range label by writing NaN (see fastlm/ops/cross_entropy.py).
// fastlm.ops.linear_cross_entropy calls these kernels on each chunk of logits.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cross_entropy.h"

namespace {

using fastlm_cross_entropy::DType;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat;
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "cross_entropy (cuda): dtype must be float32, float16 or bfloat16, got ",
                       t.scalar_type());
  }
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "cross_entropy (cuda): ", name, " must be a CUDA tensor");
  TORCH_CHECK_VALUE(t.dim() == 2 && t.is_contiguous(), "cross_entropy (cuda): ", name,
                    " must be a contiguous (N, V) matrix, got ", t.sizes());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "cross_entropy (cuda): ", what, " launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& labels,
                                                         int64_t ignore_index, double label_smoothing,
                                                         double z_loss, bool with_grad) {
  check_rows(logits, "logits");
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "cross_entropy (cuda): labels must be int64");
  TORCH_CHECK_VALUE(labels.is_cuda() && labels.dim() == 1 && labels.size(0) == logits.size(0) && labels.is_contiguous(),
                    "cross_entropy (cuda): labels must be a contiguous CUDA tensor of shape (N,)");
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t n = logits.size(0), v = logits.size(1);
  auto loss = at::empty({n}, logits.options().dtype(at::kFloat));
  auto grad = with_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  check_launch(fastlm_cross_entropy::forward(dtype_of(logits), logits.const_data_ptr(), labels.const_data_ptr<int64_t>(),
                                             loss.data_ptr<float>(), with_grad ? grad.data_ptr() : nullptr, n, v,
                                             ignore_index, static_cast<float>(label_smoothing),
                                             static_cast<float>(z_loss), c10::cuda::getCurrentCUDAStream()),
               "forward");
  return {loss, grad};
}

at::Tensor cross_entropy_backward(const at::Tensor& grad_rows, const at::Tensor& scale) {
  check_rows(grad_rows, "grad_rows");
  TORCH_CHECK_VALUE(scale.is_cuda() && scale.scalar_type() == at::kFloat && scale.dim() == 1 &&
                        scale.size(0) == grad_rows.size(0) && scale.is_contiguous(),
                    "cross_entropy (cuda): scale must be a contiguous float32 CUDA tensor of shape (N,)");
  const c10::cuda::CUDAGuard guard(grad_rows.device());
  auto out = at::empty_like(grad_rows);
  check_launch(fastlm_cross_entropy::backward(dtype_of(grad_rows), grad_rows.const_data_ptr(),
                                              scale.const_data_ptr<float>(), out.data_ptr(), grad_rows.size(0),
                                              grad_rows.size(1), c10::cuda::getCurrentCUDAStream()),
               "backward");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm_C, CUDA, m) {
  m.impl("cross_entropy_forward", &cross_entropy_forward);
  m.impl("cross_entropy_backward", &cross_entropy_backward);
}
