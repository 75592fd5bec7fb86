// Fused scale -> mask -> softmax -> dropout on CPU, forward and backward.
//
// Kernel-level contract (same in every backend; see fastlm/reference/softmax.py):
//   softmax_forward(x (R, N) contiguous, mask? (D0, D1, D2, N) stride view, scale,
//                   dropout_p, seed) -> (out, probs)   probs: pre-dropout y if p > 0, else empty
//   softmax_backward(grad (R, N), y (R, N), scale, dropout_p, seed) -> dx = scale * y * (g - sum(g y))
//
// Rows are split over threads with at::parallel_for.  Per row, x is read once into an
// fp32 scratch row (L1/L2 resident), which takes the max, exp/sum and normalise
// passes; out (and probs) are written once: 1 read + 1 (2 with dropout) writes of
// the row from memory, against ~8 passes for PyTorch's unfused chain.  The row loops
// (softmax_rows.h) use GCC/Clang vector extensions, 8 floats wide (a polynomial exp,
// branch-free bf16 and fp16 conversions, F16C instructions for fp16 where available),
// compiled twice: for AVX2+FMA+F16C and for the baseline ISA (where the compiler
// splits the vectors), picked at run time.
//
// Dropout bits come from a counter-based hash of (seed, row, column): splitmix64 of
// a per-row key stepped by the column pair gives two 32-bit uniforms per hash; a
// column is kept when its uniform >= p * 2^32.  The backward regenerates the mask.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FASTLM_X86_CLONES 1
#include <immintrin.h>  // F16C conversions in the AVX2 build of softmax_rows.h
#endif

namespace {

// The baseline build of softmax_rows.h passes 32-byte vectors between inlined helpers.
#pragma GCC diagnostic ignored "-Wpsabi"
#define FASTLM_INLINE inline __attribute__((always_inline))

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int W = 8;  // lanes per vector

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef uint32_t u8 __attribute__((vector_size(32)));
typedef uint16_t h8 __attribute__((vector_size(16)));
typedef uint8_t b8 __attribute__((vector_size(8)));
typedef uint64_t q4 __attribute__((vector_size(32)));
typedef double d4 __attribute__((vector_size(32)));

// Storage types: float, and uint16_t bits standing for at::BFloat16 / at::Half.
struct F32 { using storage = float; };
struct Bf16 { using storage = uint16_t; };
struct F16 { using storage = uint16_t; };

// ------------------------------------------------------------------------- dropout
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

struct Dropout {
  bool on = false;
  uint64_t seed = 0;
  uint32_t threshold = 0;  // keep when uniform32 >= threshold
  float keep_scale = 1.f;  // 1 / (1 - p)

  Dropout(double p, int64_t seed_value) {
    if (p <= 0.0) return;
    on = true;
    seed = uint64_t(seed_value);
    threshold = uint32_t(std::min(std::llround(p * 4294967296.0), 4294967295LL));
    keep_scale = float(1.0 / (1.0 - p));
  }
};

// ---------------------------------------------------------------------------- mask
// The (D0, D1, D2, N) stride view; row r's mask row starts at base(r).
struct MaskView {
  const void* data = nullptr;
  bool is_bool = false;
  int64_t d1 = 1, d2 = 1, s0 = 0, s1 = 0, s2 = 0, s3 = 0;

  FASTLM_INLINE int64_t base(int64_t r) const {
    const int64_t inner = d1 * d2;
    const int64_t rem = r % inner;
    return (r / inner) * s0 + (rem / d2) * s1 + (rem % d2) * s2;
  }
};

// --------------------------------------------------------------------- row kernels
template <class Tag>
struct ForwardArgs {
  const typename Tag::storage* x;
  typename Tag::storage* out;
  typename Tag::storage* probs;  // nullptr without dropout
  MaskView mask;
  Dropout drop;
  float scale;
  int64_t n;
};

template <class Tag>
struct BackwardArgs {
  const typename Tag::storage* grad;
  const typename Tag::storage* y;
  typename Tag::storage* dx;
  Dropout drop;
  float scale;
  int64_t n;
};

// The row kernels, compiled for the baseline instruction set and (x86) for AVX2+FMA+F16C.
namespace base_isa {
#include "softmax_rows.h"
}  // namespace base_isa
#ifdef FASTLM_X86_CLONES
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FASTLM_ROWS_F16C 1  // (g++ does not update __F16C__ after a target pragma)
namespace avx2_isa {
#include "softmax_rows.h"
}  // namespace avx2_isa
#undef FASTLM_ROWS_F16C
#pragma GCC pop_options

// FASTLM_CPU_BASELINE=1 forces the baseline build (the tests run it that way too).
bool use_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c") && std::getenv("FASTLM_CPU_BASELINE") == nullptr;
  return yes;
}
#endif

template <class Tag, class Args>
void run_rows(void (*base)(const Args&, int64_t, int64_t), void (*avx2)(const Args&, int64_t, int64_t),
              const Args& a, int64_t rows) {
  auto fn = base;
#ifdef FASTLM_X86_CLONES
  if (use_avx2()) fn = avx2;
#else
  (void)avx2;
#endif
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(a.n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) { fn(a, b, e); });
}

template <class Tag>
using Storage = typename Tag::storage;

template <class Tag>
void forward_typed(const at::Tensor& x, const MaskView& mask, const Dropout& drop, float scale, at::Tensor& out,
                   at::Tensor& probs) {
  ForwardArgs<Tag> a{reinterpret_cast<const Storage<Tag>*>(x.const_data_ptr()),
                     reinterpret_cast<Storage<Tag>*>(out.mutable_data_ptr()),
                     drop.on ? reinterpret_cast<Storage<Tag>*>(probs.mutable_data_ptr()) : nullptr,
                     mask, drop, scale, x.size(1)};
#ifdef FASTLM_X86_CLONES
  run_rows<Tag>(&base_isa::forward_rows<Tag>, &avx2_isa::forward_rows<Tag>, a, x.size(0));
#else
  run_rows<Tag>(&base_isa::forward_rows<Tag>, &base_isa::forward_rows<Tag>, a, x.size(0));
#endif
}

template <class Tag>
void backward_typed(const at::Tensor& grad, const at::Tensor& y, const Dropout& drop, float scale, at::Tensor& dx) {
  BackwardArgs<Tag> a{reinterpret_cast<const Storage<Tag>*>(grad.const_data_ptr()),
                      reinterpret_cast<const Storage<Tag>*>(y.const_data_ptr()),
                      reinterpret_cast<Storage<Tag>*>(dx.mutable_data_ptr()), drop, scale, y.size(1)};
#ifdef FASTLM_X86_CLONES
  run_rows<Tag>(&base_isa::backward_rows<Tag>, &avx2_isa::backward_rows<Tag>, a, y.size(0));
#else
  run_rows<Tag>(&base_isa::backward_rows<Tag>, &base_isa::backward_rows<Tag>, a, y.size(0));
#endif
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "softmax (cpu): ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), "softmax (cpu): ", name, " must be a contiguous (R, N) matrix, got ",
              t.sizes());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, "softmax (cpu): ", name,
              " must be float32, float16 or bfloat16, got ", dt);
}

template <class F>
void dispatch_dtype(at::ScalarType dt, F&& f) {
  if (dt == at::kFloat) f(F32{});
  else if (dt == at::kHalf) f(F16{});
  else f(Bf16{});
}

std::tuple<at::Tensor, at::Tensor> softmax_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                                       double scale, double dropout_p, int64_t seed) {
  check_rows(x, "x");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "softmax (cpu): dropout_p must be in [0, 1), got ", dropout_p);
  MaskView mv;
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.device().is_cpu() && m.dim() == 4 && m.size(0) * m.size(1) * m.size(2) == x.size(0) &&
                    m.size(3) == x.size(1),
                "softmax (cpu): mask must be a CPU (D0, D1, D2, N) view with D0*D1*D2 == R, got ", m.sizes());
    TORCH_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == x.scalar_type(),
                "softmax (cpu): mask must be bool or x's dtype, got ", m.scalar_type());
    mv.data = m.const_data_ptr();
    mv.is_bool = m.scalar_type() == at::kBool;
    mv.d1 = m.size(1); mv.d2 = m.size(2);
    mv.s0 = m.stride(0); mv.s1 = m.stride(1); mv.s2 = m.stride(2); mv.s3 = m.stride(3);
  }
  const Dropout drop(dropout_p, seed);
  at::Tensor out = at::empty_like(x);
  at::Tensor probs = drop.on ? at::empty_like(x) : at::empty({0}, x.options());
  if (x.numel() > 0) {
    dispatch_dtype(x.scalar_type(), [&](auto tag) {
      forward_typed<decltype(tag)>(x, mv, drop, float(scale), out, probs);
    });
  }
  return {out, probs};
}

at::Tensor softmax_backward_cpu(const at::Tensor& grad, const at::Tensor& y, double scale, double dropout_p,
                                int64_t seed) {
  check_rows(grad, "grad");
  check_rows(y, "y");
  TORCH_CHECK(grad.sizes() == y.sizes() && grad.scalar_type() == y.scalar_type(),
              "softmax (cpu): grad and y must have the same shape and dtype");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "softmax (cpu): dropout_p must be in [0, 1), got ", dropout_p);
  const Dropout drop(dropout_p, seed);
  at::Tensor dx = at::empty_like(y);
  if (y.numel() > 0) {
    dispatch_dtype(y.scalar_type(), [&](auto tag) { backward_typed<decltype(tag)>(grad, y, drop, float(scale), dx); });
  }
  return dx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm_C, m) {
  m.def("softmax_forward(Tensor x, Tensor? mask, float scale, float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def("softmax_backward(Tensor grad, Tensor y, float scale, float dropout_p, int seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlm_C, CPU, m) {
  m.impl("softmax_forward", &softmax_forward_cpu);
  m.impl("softmax_backward", &softmax_backward_cpu);
}
