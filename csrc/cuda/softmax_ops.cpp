// CUDA implementations of fastlm_C::softmax_forward / softmax_backward (schemas in
// csrc/cpu/softmax.cpp): tensor checks, then the raw-pointer launchers of softmax.cu
// on the current stream (c10::cuda::getCurrentCUDAStream: ATen/cuda/CUDAContext.h would
// pull in cuSPARSE / cuBLAS headers).  Compiled, unverified (never run on a GPU).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "softmax.h"

namespace {

using fastlm_softmax::DType;
using fastlm_softmax::MaskKind;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat;
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "softmax (cuda): dtype must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "softmax (cuda): ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), "softmax (cuda): ", name, " must be a contiguous (R, N) matrix, got ",
              t.sizes());
}

uint64_t seed_of(double dropout_p, int64_t seed) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "softmax (cuda): dropout_p must be in [0, 1), got ", dropout_p);
  return dropout_p == 0.0 ? 0 : uint64_t(seed);
}

// The launchers' float workspace (long rows only; empty otherwise).
at::Tensor workspace_for(DType dtype, const at::Tensor& like) {
  const int64_t floats = fastlm_softmax::softmax_workspace_floats(dtype, like.size(0), like.size(1));
  return at::empty({floats}, like.options().dtype(at::kFloat));
}

std::tuple<at::Tensor, at::Tensor> softmax_forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                                        double scale, double dropout_p, int64_t seed) {
  check_rows(x, "x");
  const DType dtype = dtype_of(x);
  const uint64_t seed_value = seed_of(dropout_p, seed);
  fastlm_softmax::MaskView mv{nullptr, MaskKind::kNone, 1, 1, 0, 0, 0, 0};
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device() == x.device() && m.dim() == 4 && m.size(0) * m.size(1) * m.size(2) == x.size(0) &&
                    m.size(3) == x.size(1),
                "softmax (cuda): mask must be a (D0, D1, D2, N) view on x's device with D0*D1*D2 == R, got ",
                m.sizes());
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == x.scalar_type(),
                "softmax (cuda): mask must be bool or x's dtype, got ", m.scalar_type());
    mv = {m.const_data_ptr(), m.scalar_type() == at::kBool ? MaskKind::kBool : MaskKind::kAdditive,
          m.size(1), m.size(2), m.stride(0), m.stride(1), m.stride(2), m.stride(3)};
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x);
  at::Tensor probs = dropout_p > 0.0 ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor workspace = workspace_for(dtype, x);
  const cudaError_t err = fastlm_softmax::softmax_forward(
      dtype, x.const_data_ptr(), out.mutable_data_ptr(), dropout_p > 0.0 ? probs.mutable_data_ptr() : nullptr, mv,
      float(scale), float(dropout_p), seed_value, x.size(0), x.size(1), workspace.mutable_data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "softmax (cuda): forward launch failed: ", cudaGetErrorString(err));
  return {out, probs};
}

at::Tensor softmax_backward_cuda(const at::Tensor& grad, const at::Tensor& y, double scale, double dropout_p,
                                 int64_t seed) {
  check_rows(grad, "grad");
  check_rows(y, "y");
  TORCH_CHECK(grad.sizes() == y.sizes() && grad.scalar_type() == y.scalar_type() && grad.device() == y.device(),
              "softmax (cuda): grad and y must have the same shape, dtype and device");
  const DType dtype = dtype_of(y);
  const uint64_t seed_value = seed_of(dropout_p, seed);
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor dx = at::empty_like(y);
  at::Tensor workspace = workspace_for(dtype, y);
  const cudaError_t err = fastlm_softmax::softmax_backward(
      dtype, grad.const_data_ptr(), y.const_data_ptr(), dx.mutable_data_ptr(), float(scale), float(dropout_p),
      seed_value, y.size(0), y.size(1), workspace.mutable_data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "softmax (cuda): backward launch failed: ", cudaGetErrorString(err));
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlm_C, CUDA, m) {
  m.impl("softmax_forward", &softmax_forward_cuda);
  m.impl("softmax_backward", &softmax_backward_cuda);
}
