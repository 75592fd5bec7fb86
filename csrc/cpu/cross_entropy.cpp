// Cross-entropy CPU kernels: fastlm_C::cross_entropy_forward / cross_entropy_backward.
//
// Contract (same for every backend, see fastlm/reference/cross_entropy.py):
//   cross_entropy_forward(logits (N, V), labels (N,) int64, ignore_index, label_smoothing, z_loss,
//                         with_grad) -> (loss_rows (N,) float32, grad_rows (N, V) logits dtype | empty)
//   cross_entropy_backward(grad_rows (N, V), scale (N,) float32) -> grad_rows * scale[:, None]
//
// One task per row (at::parallel_for over rows).  A row is swept in blocks of kBlock
// floats (4 KiB, L1-resident): each block's max updates an online log-sum-exp (the
// running sum is rescaled only when the max grows, so one exp per element), and for
// label smoothing the running sum of x - m.  The gradient sweep then re-reads the row,
// which at up to a few hundred KiB is still in L2: DRAM sees one read of the logits
// and one write of the gradient.  bf16/fp16 are widened to fp32 block by block; all
// arithmetic is fp32.
//
// Numerics: x - m (m the row max) is never mixed with log(s), s = sum exp(x - m): the
// loss is log(s) - (1 - eps)(x[y] - m) - eps mean(x - m) + z lse^2 and the gradient
// exp(x - m) * ((1 + 2 z lse) / s), as PyTorch's log_softmax.  Subtracting a rounded
// lse = m + log(s) from the logits instead loses ulp(lse): ~1e-3 for logits near 1e4.
// The hot loops are plain float loops with an inline polynomial exp so the compiler
// vectorises them; target_clones adds AVX-512 and AVX2 copies picked at load time (the
// build itself uses no -march flag).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

constexpr int64_t kBlock = 1024;
constexpr float kInf = std::numeric_limits<float>::infinity();

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTLM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTLM_CLONES
#endif
#if defined(__GNUC__)
#define FASTLM_INLINE inline __attribute__((always_inline))
#else
#define FASTLM_INLINE inline
#endif

// The hot loops.  Float compares may not trap in them, so GCC may if-convert the
// clamps and selects and vectorise (it will not under the default -ftrapping-math).
// They call no library function (std::max & co. would not be inlined across the
// differing optimisation options).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

// exp(x) to ~2 ulp (Cephes expf polynomial), branch-free so loops over it vectorise;
// exactly 0 below -87.3 (including -inf); a NaN input propagates through the polynomial.
FASTLM_INLINE float fast_exp(float x) {
  float xc = x < -87.3365f ? -87.3365f : x;
  xc = xc > 88.7228f ? 88.7228f : xc;
  const float n = (xc * 1.44269504f + 12582912.f) - 12582912.f;  // round(x / ln 2)
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float pow2;
  std::memcpy(&pow2, &bits, sizeof(float));
  return x < -87.3365f ? 0.0f : p * pow2;
}

FASTLM_CLONES float block_max(const float* x, int64_t n) {
  float m = -kInf;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// sum(x - shift): every term <= 0 when shift is the running max (no cancellation)
FASTLM_CLONES float block_sum_shifted(const float* x, int64_t n, float shift) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i] - shift;
  return s;
}

FASTLM_CLONES float block_sum_exp(const float* x, int64_t n, float shift) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += fast_exp(x[i] - shift);
  return s;
}

// g = exp(x - m) * p_scale - eps / V, p_scale folding 1 / s and the z-loss factor
// (the label's -(1 - eps) is added by the caller)
FASTLM_CLONES void block_grad(const float* x, float* g, int64_t n, float m, float p_scale, float uniform) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) g[i] = fast_exp(x[i] - m) * p_scale - uniform;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

template <typename T>
inline const float* widen(const T* src, float* buf, int64_t n) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
  return buf;
}
template <>
inline const float* widen<float>(const float* src, float*, int64_t) { return src; }

template <typename T>
inline float* grad_buffer(T*, float* buf) { return buf; }
inline float* grad_buffer(float* dst, float*) { return dst; }

template <typename T>
inline void narrow(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}
inline void narrow(const float*, float*, int64_t) {}

template <typename T>
void forward_rows(const T* logits, const int64_t* labels, float* loss, T* grad, int64_t n, int64_t v,
                  int64_t ignore_index, float eps, float z_loss) {
  const int64_t grain = std::max<int64_t>(1, 65536 / v);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    float xbuf[kBlock];
    float gbuf[kBlock];
    for (int64_t row = begin; row < end; ++row) {
      const T* x = logits + row * v;
      T* g = grad ? grad + row * v : nullptr;
      const int64_t y = labels[row];
      if (y == ignore_index) {
        loss[row] = 0.f;
        if (g) std::fill(g, g + v, T(0));
        continue;
      }
      // m: running max; shift: m, or 0 while every logit so far is -inf (keeps s = 0);
      // s = sum exp(x - shift); t = sum (x - shift), label smoothing only.  When the max
      // grows, s is rescaled and t shifted by (elements so far) * (old - new shift):
      // every term of t stays <= 0, so it sums without cancellation.
      float m = -kInf, shift = 0.f, s = 0.f, t = 0.f;
      for (int64_t b = 0; b < v; b += kBlock) {
        const int64_t len = std::min(kBlock, v - b);
        const float* xf = widen(x + b, xbuf, len);
        const float m_new = std::max(m, block_max(xf, len));
        const float shift_new = m_new == -kInf ? 0.f : m_new;
        s = s * std::exp(m - shift_new) + block_sum_exp(xf, len, shift_new);
        if (eps > 0.f) {
          if (shift_new != shift) t += static_cast<float>(b) * (shift - shift_new);
          t += block_sum_shifted(xf, len, shift_new);
        }
        m = m_new;
        shift = shift_new;
      }
      const float log_s = std::log(s);
      const float lse = shift + log_s;  // only in the z-loss terms, whose scale is lse itself
      const float xy = static_cast<float>(x[y]) - shift;
      loss[row] = log_s - (1.f - eps) * xy + z_loss * lse * lse - (eps > 0.f ? eps * t / v : 0.f);
      if (!g) continue;
      const float p_scale = (1.f + 2.f * z_loss * lse) / s;
      for (int64_t b = 0; b < v; b += kBlock) {
        const int64_t len = std::min(kBlock, v - b);
        float* gf = grad_buffer(g + b, gbuf);
        block_grad(widen(x + b, xbuf, len), gf, len, shift, p_scale, eps / v);
        if (y >= b && y < b + len) gf[y - b] -= 1.f - eps;
        narrow(gf, g + b, len);
      }
    }
  });
}

template <typename T>
void scale_rows(const T* g, const float* scale, T* out, int64_t n, int64_t v) {
  at::parallel_for(0, n, std::max<int64_t>(1, 65536 / v), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float s = scale[row];
      const T* src = g + row * v;
      T* dst = out + row * v;
      for (int64_t i = 0; i < v; ++i) dst[i] = static_cast<T>(static_cast<float>(src[i]) * s);
    }
  });
}

// float32, bfloat16, float16 only: few template instantiations.
template <typename F>
void dispatch_float_types(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", dtype);
  }
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D (N, V), got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
  const auto dt = t.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, name,
                   " must be float32, bfloat16 or float16, got ", dt);
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_forward(const at::Tensor& logits, const at::Tensor& labels,
                                                         int64_t ignore_index, double label_smoothing,
                                                         double z_loss, bool with_grad) {
  check_rows(logits, "logits");
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64");
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == logits.size(0) && labels.is_contiguous(),
                    "labels must be contiguous with shape (N,) = (", logits.size(0), ",), got ", labels.sizes());
  const int64_t n = logits.size(0), v = logits.size(1);
  const int64_t* y = labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(y[i] == ignore_index || (y[i] >= 0 && y[i] < v), "labels must be in [0, ", v,
                      ") or equal ignore_index=", ignore_index, "; labels[", i, "] = ", y[i]);
  }
  auto loss = at::empty({n}, logits.options().dtype(at::kFloat));
  auto grad = with_grad ? at::empty_like(logits) : at::empty({0}, logits.options());
  dispatch_float_types(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    forward_rows<scalar_t>(logits.const_data_ptr<scalar_t>(), y, loss.data_ptr<float>(),
                           with_grad ? grad.data_ptr<scalar_t>() : nullptr, n, v, ignore_index,
                           static_cast<float>(label_smoothing), static_cast<float>(z_loss));
  });
  return {loss, grad};
}

at::Tensor cross_entropy_backward(const at::Tensor& grad_rows, const at::Tensor& scale) {
  check_rows(grad_rows, "grad_rows");
  TORCH_CHECK_VALUE(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == grad_rows.size(0) &&
                        scale.is_contiguous(),
                    "scale must be a contiguous float32 (N,) tensor");
  auto out = at::empty_like(grad_rows);
  dispatch_float_types(grad_rows.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scale_rows<scalar_t>(grad_rows.const_data_ptr<scalar_t>(), scale.const_data_ptr<float>(),
                         out.data_ptr<scalar_t>(), grad_rows.size(0), grad_rows.size(1));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm_C, m) {
  m.def(
      "cross_entropy_forward(Tensor logits, Tensor labels, int ignore_index, float label_smoothing, "
      "float z_loss, bool with_grad) -> (Tensor, Tensor)");
  m.def("cross_entropy_backward(Tensor grad_rows, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlm_C, CPU, m) {
  m.impl("cross_entropy_forward", &cross_entropy_forward);
  m.impl("cross_entropy_backward", &cross_entropy_backward);
}
