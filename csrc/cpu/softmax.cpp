// Fused scale -> mask -> softmax -> dropout on CPU, forward and backward.
//
// Kernel-level contract (same in every backend; see fastlm/reference/softmax.py):
//   softmax_forward(x (R, N) contiguous, mask? (D0, D1, D2, N) stride view, scale,
//                   dropout_p, seed?) -> (out, probs)   probs: pre-dropout y if p > 0, else empty
//   softmax_backward(grad (R, N), y (R, N), scale, dropout_p, seed?) -> dx = scale * y * (g - sum(g y))
//
// Rows are split over threads with at::parallel_for.  Per row, x is read once into an
// fp32 scratch row (L1/L2 resident), which takes the max, exp/sum and normalise
// passes; out (and probs) are written once: 1 read + 1 (2 with dropout) writes of
// the row from memory, against ~8 passes for PyTorch's unfused chain.  The row loops
// use GCC/Clang vector extensions, 8 floats wide (a polynomial exp, branch-free
// fp16/bf16 conversions), compiled twice: for AVX2+FMA+F16C and for the baseline
// ISA (where the compiler splits the vectors), picked at run time.
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
#include <cstring>
#include <limits>
#include <vector>

namespace {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FASTLM_X86_CLONES 1
#define FASTLM_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif
#define FASTLM_INLINE inline __attribute__((always_inline))

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int W = 8;  // lanes per vector

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef uint32_t u8 __attribute__((vector_size(32)));
typedef uint16_t h8 __attribute__((vector_size(16)));
typedef uint8_t b8 __attribute__((vector_size(8)));
typedef uint64_t q4 __attribute__((vector_size(32)));

FASTLM_INLINE f8 splat(float v) { return f8{} + v; }
// memcpy of `cnt` of `full` bytes: constant-size (one vector move) for whole vectors,
// a library call only for a row's tail.
FASTLM_INLINE void copy_part(void* dst, const void* src, int cnt, int full, int elem) {
  if (cnt == full) std::memcpy(dst, src, size_t(full) * elem);
  else std::memcpy(dst, src, size_t(cnt) * elem);
}
// Lane-wise select: m is a comparison result (all ones / all zeros per lane).
template <class V>
FASTLM_INLINE V sel(i8 m, V a, V b) { return (V)(((i8)a & m) | ((i8)b & ~m)); }
FASTLM_INLINE i8 lanes_below(int cnt) { return (i8)(i8{0, 1, 2, 3, 4, 5, 6, 7} < cnt); }

// ------------------------------------------------------------- element conversions
// Storage types: float, and uint16_t bits standing for at::BFloat16 / at::Half.
// Loads of cnt < W elements leave the other lanes 0; stores write cnt elements.
struct F32 { using storage = float; };
struct Bf16 { using storage = uint16_t; };
struct F16 { using storage = uint16_t; };

FASTLM_INLINE f8 to_f8(F32, const float* p, int cnt) {
  f8 v{};
  copy_part(&v, p, cnt, W, sizeof(float));
  return v;
}
FASTLM_INLINE h8 load_h8(const uint16_t* p, int cnt) {
  h8 v{};
  copy_part(&v, p, cnt, W, sizeof(uint16_t));
  return v;
}
FASTLM_INLINE f8 to_f8(Bf16, const uint16_t* p, int cnt) {
  return (f8)(__builtin_convertvector(load_h8(p, cnt), u8) << 16);
}
FASTLM_INLINE f8 to_f8(F16, const uint16_t* p, int cnt) {
  // Shift exponent+mantissa into float position and rebias by 2^112 (127 - 15): exact
  // for normals and subnormals; inf/nan get the all-ones exponent put back.
  const u8 h = __builtin_convertvector(load_h8(p, cnt), u8);
  const u8 em = (h & 0x7fffu) << 13;
  u8 bits = (u8)((f8)em * 0x1.0p+112f);
  bits |= (u8)(em >= (0x7c00u << 13)) & 0x7f800000u;
  return (f8)(bits | ((h & 0x8000u) << 16));
}

FASTLM_INLINE void store(F32, float* p, f8 v, int cnt) { copy_part(p, &v, cnt, W, sizeof(float)); }
FASTLM_INLINE void store_h8(uint16_t* p, u8 v, int cnt) {
  const h8 h = __builtin_convertvector(v, h8);
  copy_part(p, &h, cnt, W, sizeof(uint16_t));
}
FASTLM_INLINE void store(Bf16, uint16_t* p, f8 f, int cnt) {
  const u8 u = (u8)f;
  const u8 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
  store_h8(p, sel((i8)(f != f), u8{} + 0x7fc0u, rounded), cnt);
}
FASTLM_INLINE void store(F16, uint16_t* p, f8 f, int cnt) {
  // Round-to-nearest-even fp32 -> fp16 by letting the FPU round at the right bit
  // position (the method of the FP16 library, which c10::Half also uses).
  const u8 w = (u8)f;
  const u8 shl1_w = w + w;
  const u8 sign = w & 0x80000000u;
  u8 bias = shl1_w & 0xff000000u;
  bias = sel((i8)(bias < 0x71000000u), u8{} + 0x71000000u, bias);
  f8 base = ((f8)(w & 0x7fffffffu) * 0x1.0p+112f) * 0x1.0p-110f;
  base = (f8)((bias >> 1) + 0x07800000u) + base;
  const u8 bits = (u8)base;
  const u8 nonsign = ((bits >> 13) & 0x00007c00u) + (bits & 0x00000fffu);
  store_h8(p, (sign >> 16) | sel((i8)(shl1_w > 0xff000000u), u8{} + 0x7e00u, nonsign), cnt);
}

// exp(x) for x <= 0 (softmax arguments are z - max): exp(x) = 2^k * exp(r) with
// r = x - k ln2, |r| <= ln2/2, Cephes' degree-6 polynomial (< 1e-7 relative error).
// x < -87.3 (result near the smallest normal float) gives exactly 0, so -inf -> 0;
// NaN stays NaN.
FASTLM_INLINE f8 exp_nonpos(f8 x) {
  f8 xc = sel((i8)(x > 0.f), f8{}, x);
  xc = sel((i8)(xc < -87.3f), splat(-87.3f), xc);
  const f8 k = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  f8 r = xc - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  f8 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const f8 two_k = (f8)((__builtin_convertvector(k, i8) + 127) << 23);
  return sel((i8)(x < -87.3f), f8{}, p * two_k);
}

FASTLM_INLINE float hmax(f8 v) {
  float m = v[0];
  for (int k = 1; k < W; ++k) m = v[k] > m ? v[k] : m;
  return m;
}

// Sums of thousands of terms accumulate in double (a float sum would be off by
// ~1e-6 relative, several times PyTorch's error): float partials per lane over at
// most 16 vectors, flushed into double lanes.
struct DoubleSum {
  double acc[W] = {};
  f8 part{};
  int pending = 0;
  FASTLM_INLINE void add(f8 v) {
    part += v;
    if (++pending == 16) flush();
  }
  FASTLM_INLINE void flush() {
    for (int k = 0; k < W; ++k) acc[k] += part[k];
    part = f8{};
    pending = 0;
  }
  FASTLM_INLINE double total() {
    flush();
    double t = 0.0;
    for (int k = 0; k < W; ++k) t += acc[k];
    return t;
  }
};

// ------------------------------------------------------------------------- dropout
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

template <class U>
FASTLM_INLINE U mix64(U z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct Dropout {
  bool on = false;
  uint64_t seed = 0;
  uint32_t threshold = 0;  // keep when uniform32 >= threshold
  float keep_scale = 1.f;  // 1 / (1 - p)

  Dropout(double p, const std::optional<at::Tensor>& seed_t) {
    if (p <= 0.0) return;
    TORCH_CHECK(seed_t.has_value() && seed_t->defined() && seed_t->numel() == 1 &&
                    seed_t->scalar_type() == at::kLong && seed_t->device().is_cpu(),
                "softmax: dropout_p > 0 needs seed, an int64 CPU tensor with one element");
    on = true;
    seed = uint64_t(seed_t->data_ptr<int64_t>()[0]);
    threshold = uint32_t(std::min(std::llround(p * 4294967296.0), 4294967295LL));
    keep_scale = float(1.0 / (1.0 - p));
  }

  // Row `row`'s multipliers (0 or 1/(1-p)) for columns [0, n) into mult (padded to W).
  // Column 2j takes the low and 2j+1 the high half of mix64(key + j * golden); on a
  // little-endian machine a vector of 4 hashes read as 8 uint32 is columns 2j..2j+7.
  FASTLM_INLINE void row_multipliers(int64_t row, int64_t n, float* mult) const {
    const uint64_t key = mix64(seed + uint64_t(row) * kGolden);
    for (int64_t c = 0; c < n; c += W) {
      const q4 j = q4{0, 1, 2, 3} + uint64_t(c / 2);
      const u8 r = (u8)mix64(key + j * kGolden);
      const f8 m = sel((i8)(r >= threshold), splat(keep_scale), f8{});
      std::memcpy(mult + c, &m, sizeof(m));
    }
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

// The mask row as additive fp32 values (bool: 0 keep / -inf drop) into madd.
template <class Tag>
FASTLM_INLINE void load_mask_row(const MaskView& m, int64_t base, int64_t n, float* madd) {
  const int64_t s = m.s3;
  if (m.is_bool) {
    const bool* p = static_cast<const bool*>(m.data) + base;
    if (s != 1) {
      for (int64_t c = 0; c < n; ++c) madd[c] = p[c * s] ? 0.f : kNegInf;
      return;
    }
    for (int64_t c = 0; c < n; c += W) {
      const int cnt = int(std::min<int64_t>(W, n - c));
      b8 b{};
      copy_part(&b, p + c, cnt, W, 1);
      const f8 v = sel((i8)(__builtin_convertvector(b, i8) != 0), f8{}, splat(kNegInf));
      std::memcpy(madd + c, &v, sizeof(v));
    }
  } else {
    using S = typename Tag::storage;
    const S* p = static_cast<const S*>(m.data) + base;
    if (s != 1) {
      for (int64_t c = 0; c < n; ++c) madd[c] = to_f8(Tag{}, p + c * s, 1)[0];
      return;
    }
    for (int64_t c = 0; c < n; c += W) {
      const f8 v = to_f8(Tag{}, p + c, int(std::min<int64_t>(W, n - c)));
      std::memcpy(madd + c, &v, sizeof(v));
    }
  }
}

FASTLM_INLINE f8 load_f8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
FASTLM_INLINE void store_f8(float* p, f8 v) { std::memcpy(p, &v, sizeof(v)); }

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
FASTLM_INLINE void forward_rows(const ForwardArgs<Tag>& a, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  const int64_t padded = (n + W - 1) / W * W;
  // Scratch rows (fp32, padded to whole vectors): z then exp(z - max), the additive
  // mask (0 without one), the dropout multipliers.
  std::vector<float> scratch(3 * padded, 0.f);
  float* z = scratch.data();
  float* madd = z + padded;
  float* mult = madd + padded;
  int64_t mask_base = -1;  // mask rows repeat across heads / queries: reload only on change
  const f8 scale = splat(a.scale);
  for (int64_t r = begin; r < end; ++r) {
    const auto* xr = a.x + r * n;
    auto* outr = a.out + r * n;
    if (a.mask.data != nullptr) {
      const int64_t b = a.mask.base(r);
      if (b != mask_base) load_mask_row<Tag>(a.mask, b, n, madd);
      mask_base = b;
    }
    // Pass 1 (reads x): z = x * scale + mask, running max; padding lanes are -inf.
    f8 mx = splat(kNegInf);
    for (int64_t c = 0; c < n; c += W) {
      const int cnt = int(std::min<int64_t>(W, n - c));
      f8 v = to_f8(Tag{}, xr + c, cnt) * scale + load_f8(madd + c);
      if (cnt < W) v = sel(lanes_below(cnt), v, splat(kNegInf));
      store_f8(z + c, v);
      mx = sel((i8)(v > mx), v, mx);
    }
    const float row_max = hmax(mx);
    if (row_max == kNegInf) {  // fully masked (or all -inf) row: zeros, documented exception
      std::memset(static_cast<void*>(outr), 0, n * sizeof(*outr));
      if (a.probs) std::memset(static_cast<void*>(a.probs + r * n), 0, n * sizeof(*outr));
      continue;
    }
    // Pass 2 (scratch only): exp and sum.
    DoubleSum sum;
    const f8 m8 = splat(row_max);
    for (int64_t c = 0; c < padded; c += W) {
      const f8 e = exp_nonpos(load_f8(z + c) - m8);
      store_f8(z + c, e);
      sum.add(e);
    }
    const f8 inv = splat(float(1.0 / sum.total()));  // sum >= 1: the max contributes exp(0)
    // Pass 3 (writes out, and probs with dropout).
    if (a.drop.on) {
      auto* pr = a.probs + r * n;
      a.drop.row_multipliers(r, n, mult);
      for (int64_t c = 0; c < n; c += W) {
        const int cnt = int(std::min<int64_t>(W, n - c));
        const f8 y = load_f8(z + c) * inv;
        store(Tag{}, pr + c, y, cnt);
        store(Tag{}, outr + c, y * load_f8(mult + c), cnt);
      }
    } else {
      for (int64_t c = 0; c < n; c += W) store(Tag{}, outr + c, load_f8(z + c) * inv, int(std::min<int64_t>(W, n - c)));
    }
  }
}

template <class Tag>
struct BackwardArgs {
  const typename Tag::storage* grad;
  const typename Tag::storage* y;
  typename Tag::storage* dx;
  Dropout drop;
  float scale;
  int64_t n;
};

template <class Tag>
FASTLM_INLINE void backward_rows(const BackwardArgs<Tag>& a, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  const int64_t padded = (n + W - 1) / W * W;
  std::vector<float> scratch(2 * padded, 1.f);
  float* g = scratch.data();
  float* mult = g + padded;  // stays 1 without dropout
  const f8 scale = splat(a.scale);
  for (int64_t r = begin; r < end; ++r) {
    const auto* gr = a.grad + r * n;
    const auto* yr = a.y + r * n;
    auto* dxr = a.dx + r * n;
    if (a.drop.on) a.drop.row_multipliers(r, n, mult);
    // Pass 1: g = grad * keep / (1 - p) into scratch, dot = sum(g * y) (loads past n are 0).
    DoubleSum dot;
    for (int64_t c = 0; c < n; c += W) {
      const int cnt = int(std::min<int64_t>(W, n - c));
      const f8 gv = to_f8(Tag{}, gr + c, cnt) * load_f8(mult + c);
      store_f8(g + c, gv);
      dot.add(gv * to_f8(Tag{}, yr + c, cnt));
    }
    // Pass 2: dx = scale * y * (g - dot)  (y re-read from cache).
    const f8 d8 = splat(float(dot.total()));
    for (int64_t c = 0; c < n; c += W) {
      const int cnt = int(std::min<int64_t>(W, n - c));
      store(Tag{}, dxr + c, scale * to_f8(Tag{}, yr + c, cnt) * (load_f8(g + c) - d8), cnt);
    }
  }
}

// Each row kernel compiled for the baseline ISA and (x86) for AVX2+FMA+F16C.
template <class Tag>
void forward_rows_base(const ForwardArgs<Tag>& a, int64_t b, int64_t e) { forward_rows(a, b, e); }
template <class Tag>
void backward_rows_base(const BackwardArgs<Tag>& a, int64_t b, int64_t e) { backward_rows(a, b, e); }
#ifdef FASTLM_X86_CLONES
template <class Tag>
FASTLM_AVX2 void forward_rows_avx2(const ForwardArgs<Tag>& a, int64_t b, int64_t e) { forward_rows(a, b, e); }
template <class Tag>
FASTLM_AVX2 void backward_rows_avx2(const BackwardArgs<Tag>& a, int64_t b, int64_t e) { backward_rows(a, b, e); }

bool cpu_has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return yes;
}
#endif

template <class Tag, class Args>
void run_rows(void (*base)(const Args&, int64_t, int64_t), void (*avx2)(const Args&, int64_t, int64_t),
              const Args& a, int64_t rows) {
  auto fn = base;
#ifdef FASTLM_X86_CLONES
  if (cpu_has_avx2()) fn = avx2;
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
  run_rows<Tag>(&forward_rows_base<Tag>, &forward_rows_avx2<Tag>, a, x.size(0));
#else
  run_rows<Tag>(&forward_rows_base<Tag>, &forward_rows_base<Tag>, a, x.size(0));
#endif
}

template <class Tag>
void backward_typed(const at::Tensor& grad, const at::Tensor& y, const Dropout& drop, float scale, at::Tensor& dx) {
  BackwardArgs<Tag> a{reinterpret_cast<const Storage<Tag>*>(grad.const_data_ptr()),
                      reinterpret_cast<const Storage<Tag>*>(y.const_data_ptr()),
                      reinterpret_cast<Storage<Tag>*>(dx.mutable_data_ptr()), drop, scale, y.size(1)};
#ifdef FASTLM_X86_CLONES
  run_rows<Tag>(&backward_rows_base<Tag>, &backward_rows_avx2<Tag>, a, y.size(0));
#else
  run_rows<Tag>(&backward_rows_base<Tag>, &backward_rows_base<Tag>, a, y.size(0));
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
                                                       double scale, double dropout_p,
                                                       const std::optional<at::Tensor>& seed) {
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
                                const std::optional<at::Tensor>& seed) {
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
  m.def("softmax_forward(Tensor x, Tensor? mask, float scale, float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  m.def("softmax_backward(Tensor grad, Tensor y, float scale, float dropout_p, Tensor? seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlm_C, CPU, m) {
  m.impl("softmax_forward", &softmax_forward_cpu);
  m.impl("softmax_backward", &softmax_backward_cpu);
}
