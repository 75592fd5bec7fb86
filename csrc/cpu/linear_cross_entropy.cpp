// Linear + cross-entropy in chunks of rows: fastlm_C::linear_cross_entropy_forward / _backward.
//
// Contract (see fastlm/reference/linear_cross_entropy.py, which runs the same loop in Python):
//   linear_cross_entropy_forward(hidden (M, H), weight (V, H), bias (V,)?, labels (M,), ignore_index,
//                                label_smoothing, z_loss, chunk_rows) -> loss_rows (M,) float32
//   linear_cross_entropy_backward(..., scale (M,) float32, ...) -> (grad_hidden, grad_weight, grad_bias)
//
// Per chunk of `chunk_rows` rows: logits = at::addmm/at::mm (BLAS, multithreaded), then
// the fused cross-entropy kernel fastlm_C::cross_entropy_forward called through the
// dispatcher, so this one loop serves the CPU kernel and, on CUDA tensors, the CUDA
// kernel (registered as CompositeExplicitAutograd).  At most one (chunk, V) logits
// block and one gradient block exist at a time.  The backward recomputes each chunk's
// logits instead of keeping gradients from the forward (reasons in the Python file);
// the weight and bias gradients accumulate in fp32 across chunks.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace {

using CeForward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t, double, double,
                                                     bool);
using CeBackward = at::Tensor(const at::Tensor&, const at::Tensor&);

const c10::TypedOperatorHandle<CeForward>& ce_forward() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastlm_C::cross_entropy_forward", "").typed<CeForward>();
  return op;
}

const c10::TypedOperatorHandle<CeBackward>& ce_backward() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastlm_C::cross_entropy_backward", "").typed<CeBackward>();
  return op;
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& labels, int64_t chunk_rows) {
  TORCH_CHECK_VALUE(hidden.dim() == 2 && hidden.is_contiguous(), "hidden must be contiguous (M, H), got ",
                    hidden.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == hidden.size(1) && weight.is_contiguous(),
                    "weight must be contiguous (V, H) with H = ", hidden.size(1), ", got ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(), "weight and hidden dtypes differ");
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == hidden.size(0) && labels.is_contiguous(),
                    "labels must be contiguous (M,)");
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must be (V,)");
    TORCH_CHECK_TYPE(bias->scalar_type() == hidden.scalar_type(), "bias and hidden dtypes differ");
  }
  TORCH_CHECK_VALUE(chunk_rows > 0, "chunk_rows must be positive, got ", chunk_rows);
}

at::Tensor chunk_logits(const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  return bias ? at::addmm(*bias, h, weight.t()) : at::mm(h, weight.t());
}

at::Tensor linear_cross_entropy_forward(const at::Tensor& hidden, const at::Tensor& weight,
                                        const std::optional<at::Tensor>& bias, const at::Tensor& labels,
                                        int64_t ignore_index, double label_smoothing, double z_loss,
                                        int64_t chunk_rows) {
  check_inputs(hidden, weight, bias, labels, chunk_rows);
  const int64_t m = hidden.size(0);
  auto loss = at::empty({m}, hidden.options().dtype(at::kFloat));
  for (int64_t start = 0; start < m; start += chunk_rows) {
    const int64_t len = std::min(chunk_rows, m - start);
    auto logits = chunk_logits(hidden.narrow(0, start, len), weight, bias);
    auto rows = std::get<0>(
        ce_forward().call(logits, labels.narrow(0, start, len), ignore_index, label_smoothing, z_loss, false));
    loss.narrow(0, start, len).copy_(rows);
  }
  return loss;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, const at::Tensor& scale, int64_t ignore_index, double label_smoothing, double z_loss,
    int64_t chunk_rows) {
  check_inputs(hidden, weight, bias, labels, chunk_rows);
  TORCH_CHECK_VALUE(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == hidden.size(0),
                    "scale must be float32 (M,)");
  const int64_t m = hidden.size(0);
  const bool fp32 = weight.scalar_type() == at::kFloat;
  auto grad_hidden = at::empty_like(hidden);
  auto grad_weight = at::zeros(weight.sizes(), weight.options().dtype(at::kFloat));
  auto grad_bias = bias ? at::zeros({weight.size(0)}, weight.options().dtype(at::kFloat)) : at::empty({0}, hidden.options());
  for (int64_t start = 0; start < m; start += chunk_rows) {
    const int64_t len = std::min(chunk_rows, m - start);
    auto h = hidden.narrow(0, start, len);
    auto g = std::get<1>(ce_forward().call(chunk_logits(h, weight, bias), labels.narrow(0, start, len), ignore_index,
                                           label_smoothing, z_loss, true));
    g = ce_backward().call(g, scale.narrow(0, start, len));
    auto gh = grad_hidden.narrow(0, start, len);
    at::mm_out(gh, g, weight);
    if (fp32) {
      grad_weight.addmm_(g.t(), h);
    } else {  // bf16/fp16: the GEMM accumulates in fp32 within a chunk, grad_weight across chunks
      grad_weight.add_(at::mm(g.t(), h));
    }
    if (bias) grad_bias.add_(g.sum(0, /*keepdim=*/false, at::kFloat));
  }
  return {grad_hidden, fp32 ? grad_weight : grad_weight.to(weight.scalar_type()),
          bias ? grad_bias.to(bias->scalar_type()) : grad_bias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm_C, m) {
  m.def(
      "linear_cross_entropy_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index, "
      "float label_smoothing, float z_loss, int chunk_rows) -> Tensor");
  m.def(
      "linear_cross_entropy_backward(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor scale, "
      "int ignore_index, float label_smoothing, float z_loss, int chunk_rows) -> (Tensor, Tensor, Tensor)");
}

// Device-generic: the matmuls are ATen's and the cross-entropy goes through the dispatcher.
TORCH_LIBRARY_IMPL(fastlm_C, CompositeExplicitAutograd, m) {
  m.impl("linear_cross_entropy_forward", &linear_cross_entropy_forward);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward);
}
