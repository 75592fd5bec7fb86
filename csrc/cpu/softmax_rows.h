// The CPU softmax row kernels (vector-extension code), included by softmax.cpp once per
// instruction set: inside `namespace base_isa` and, on x86, inside `namespace avx2_isa`
// under `#pragma GCC target("avx2,fma,f16c")` with FASTLM_ROWS_F16C defined (hardware
// fp16 conversions).  No include guard on purpose; it relies on the types and
// includes that softmax.cpp declares before including it.

FASTLM_INLINE f8 splat(float v) { return f8{} + v; }
// Lane counts: `Full` (a whole vector, known at compile time) or an int < W (a row's
// tail).  Every row loop runs `vector_loop`: whole vectors first, then at most one
// tail, so the hot loop has constant-size loads and stores (single vector moves, no
// branches, no round trip through the stack) and only the tail pays for a partial copy.
struct Full {};
FASTLM_INLINE void copy_part(void* dst, const void* src, Full, int elem) { std::memcpy(dst, src, size_t(W) * elem); }
FASTLM_INLINE void copy_part(void* dst, const void* src, int cnt, int elem) { std::memcpy(dst, src, size_t(cnt) * elem); }
template <class F>
FASTLM_INLINE void vector_loop(int64_t n, F&& body) {
  int64_t c = 0;
  for (; c + W <= n; c += W) body(c, Full{});
  if (c < n) body(c, int(n - c));
}
// Lane-wise select: m is a comparison result (all ones / all zeros per lane); one
// blend instruction with AVX.
template <class V>
FASTLM_INLINE V sel(i8 m, V a, V b) { return m ? a : b; }
FASTLM_INLINE f8 pad_tail(f8 v, Full, float) { return v; }
FASTLM_INLINE f8 pad_tail(f8 v, int cnt, float fill) {  // lanes >= cnt := fill
  return sel((i8)(i8{0, 1, 2, 3, 4, 5, 6, 7} < cnt), v, splat(fill));
}

// ------------------------------------------------------------- element conversions
// Loads of cnt < W elements leave the other lanes 0; stores write cnt elements.
template <class Cnt>
FASTLM_INLINE f8 to_f8(F32, const float* p, Cnt cnt) {
  f8 v{};
  copy_part(&v, p, cnt, sizeof(float));
  return v;
}
template <class Cnt>
FASTLM_INLINE h8 load_h8(const uint16_t* p, Cnt cnt) {
  h8 v{};
  copy_part(&v, p, cnt, sizeof(uint16_t));
  return v;
}
// 16 <-> 32-bit lanes (values < 2^16).  The generic conversions compile to split
// halves with GCC; AVX2 has one instruction (plus a lane fix-up for the pack).
#if defined(FASTLM_ROWS_F16C)
FASTLM_INLINE u8 widen(h8 h) { return (u8)_mm256_cvtepu16_epi32((__m128i)h); }
FASTLM_INLINE h8 narrow(u8 v) {
  const __m256i packed = _mm256_packus_epi32((__m256i)v, (__m256i)v);  // v0-3 v0-3 | v4-7 v4-7
  return (h8)_mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}
#else
FASTLM_INLINE u8 widen(h8 h) { return __builtin_convertvector(h, u8); }
FASTLM_INLINE h8 narrow(u8 v) { return __builtin_convertvector(v, h8); }
#endif
template <class Cnt>
FASTLM_INLINE f8 to_f8(Bf16, const uint16_t* p, Cnt cnt) {
  // bf16 bits are the high half of the float (zero-extend, shift: vpmovzxwd + vpslld).
  return (f8)(widen(load_h8(p, cnt)) << 16);
}
#if defined(FASTLM_ROWS_F16C)
template <class Cnt>
FASTLM_INLINE f8 to_f8(F16, const uint16_t* p, Cnt cnt) { return (f8)_mm256_cvtph_ps((__m128i)load_h8(p, cnt)); }
#else
template <class Cnt>
FASTLM_INLINE f8 to_f8(F16, const uint16_t* p, Cnt cnt) {
  // Shift exponent+mantissa into float position and rebias by 2^112 (127 - 15): exact
  // for normals and subnormals; inf/nan get the all-ones exponent put back.
  const u8 h = widen(load_h8(p, cnt));
  const u8 em = (h & 0x7fffu) << 13;
  u8 bits = (u8)((f8)em * 0x1.0p+112f);
  bits |= (u8)(em >= (0x7c00u << 13)) & 0x7f800000u;
  return (f8)(bits | ((h & 0x8000u) << 16));
}
#endif

template <class Cnt>
FASTLM_INLINE void store(F32, float* p, f8 v, Cnt cnt) { copy_part(p, &v, cnt, sizeof(float)); }
template <class Cnt>
FASTLM_INLINE void store_h8(uint16_t* p, u8 v, Cnt cnt) {
  const h8 h = narrow(v);
  copy_part(p, &h, cnt, sizeof(uint16_t));
}
template <class Cnt>
FASTLM_INLINE void store(Bf16, uint16_t* p, f8 f, Cnt cnt) {
  const u8 u = (u8)f;
  const u8 rounded = u + 0x7fffu + ((u >> 16) & 1u);  // round to nearest even (high halves)
  store_h8(p, sel((i8)(f != f), u8{} + 0x7fc0u, rounded >> 16), cnt);  // NaN stays (quiet) NaN
}
#if defined(FASTLM_ROWS_F16C)
template <class Cnt>
FASTLM_INLINE void store(F16, uint16_t* p, f8 f, Cnt cnt) {
  const __m128i h = _mm256_cvtps_ph((__m256)f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  copy_part(p, &h, cnt, sizeof(uint16_t));
}
#else
template <class Cnt>
FASTLM_INLINE void store(F16, uint16_t* p, f8 f, Cnt cnt) {
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
#endif

// exp(x) for x <= 0 or NaN (softmax arguments are z - max): exp(x) = 2^k * exp(r) with
// r = x - k ln2, |r| <= ln2/2, Cephes' degree-6 polynomial (< 1e-7 relative error).
// x < -87.3 (result near the smallest normal float) gives exactly 0, so -inf -> 0;
// NaN stays NaN (the clamp and the final select keep NaN lanes).
FASTLM_INLINE f8 exp_nonpos(f8 x) {
  const f8 xc = sel((i8)(x < -87.3f), splat(-87.3f), x);
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
// ~1e-6 relative, several times PyTorch's error): two float partials per lane
// (alternating, so consecutive adds do not wait on each other), each over at most
// 16 vectors, flushed into two 4-lane double vectors.
struct DoubleSum {
  d4 lo{}, hi{};
  f8 part{}, other{};
  int pending = 0;
  FASTLM_INLINE void add(f8 v) {
    const f8 next = other;
    other = part + v;
    part = next;
    if (++pending == 32) flush();
  }
  FASTLM_INLINE void flush() {
    const f8 both = part + other;
    lo += __builtin_convertvector(__builtin_shufflevector(both, both, 0, 1, 2, 3), d4);
    hi += __builtin_convertvector(__builtin_shufflevector(both, both, 4, 5, 6, 7), d4);
    part = other = f8{};
    pending = 0;
  }
  FASTLM_INLINE double total() {
    flush();
    const d4 t = lo + hi;
    return (t[0] + t[1]) + (t[2] + t[3]);
  }
};

// ------------------------------------------------------------------------- dropout
// Row `row`'s multipliers (0 or 1/(1-p)) for columns [0, n) into mult (padded to W).
// Column 2j takes the low and 2j+1 the high half of mix64(key + j * golden); on a
// little-endian machine a vector of 4 hashes read as 8 uint32 is columns 2j..2j+7.
FASTLM_INLINE void row_multipliers(const Dropout& d, int64_t row, int64_t n, float* mult) {
  const uint64_t key = fastlm_softmax_dropout_row(d.seed, uint64_t(row));
  for (int64_t c = 0; c < n; c += W) {
    const q4 j = q4{0, 1, 2, 3} + uint64_t(c / 2);
    const u8 r = (u8)fastlm_mix64(key + j * kFastlmGolden);
    const f8 m = sel((i8)(r >= d.threshold), splat(d.keep_scale), f8{});
    std::memcpy(mult + c, &m, sizeof(m));
  }
}

// ---------------------------------------------------------------------------- mask
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
    vector_loop(n, [&](int64_t c, auto cnt) {
      b8 b{};
      copy_part(&b, p + c, cnt, 1);
      const f8 v = sel((i8)(__builtin_convertvector(b, i8) != 0), f8{}, splat(kNegInf));
      std::memcpy(madd + c, &v, sizeof(v));
    });
  } else {
    using S = typename Tag::storage;
    const S* p = static_cast<const S*>(m.data) + base;
    if (s != 1) {
      for (int64_t c = 0; c < n; ++c) madd[c] = to_f8(Tag{}, p + c * s, 1)[0];
      return;
    }
    vector_loop(n, [&](int64_t c, auto cnt) {
      const f8 v = to_f8(Tag{}, p + c, cnt);
      std::memcpy(madd + c, &v, sizeof(v));
    });
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
void forward_rows(const ForwardArgs<Tag>& a, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  const int64_t padded = (n + W - 1) / W * W;
  // Scratch rows (fp32, padded to whole vectors): z then exp(z - max), the additive
  // mask (0 without one), the dropout multipliers.
  std::vector<float> scratch(3 * padded, 0.f);
  float* z = scratch.data();
  float* madd = z + padded;
  float* mult = madd + padded;
  int64_t mask_base = -1;  // mask rows repeat across heads / queries: reload only on change
  const bool replace = a.mask.data != nullptr && a.mask.is_bool;
  const f8 scale = splat(a.scale);
  for (int64_t r = begin; r < end; ++r) {
    const auto* xr = a.x + r * n;
    auto* outr = a.out + r * n;
    if (a.mask.data != nullptr) {
      const int64_t b = a.mask.base(r);
      if (b != mask_base) load_mask_row<Tag>(a.mask, b, n, madd);
      mask_base = b;
    }
    // Pass 1 (reads x): z = x * scale + mask, running max; padding lanes are -inf.  A
    // bool mask replaces dropped scores (even inf or NaN ones, as masked_fill does).
    f8 mx = splat(kNegInf);
    vector_loop(n, [&](int64_t c, auto cnt) {
      const f8 m = load_f8(madd + c);
      f8 v = to_f8(Tag{}, xr + c, cnt) * scale + m;
      if (replace) v = sel((i8)(m == kNegInf), m, v);
      v = pad_tail(v, cnt, kNegInf);
      store_f8(z + c, v);
      mx = sel((i8)(v > mx), v, mx);
    });
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
      row_multipliers(a.drop, r, n, mult);
      vector_loop(n, [&](int64_t c, auto cnt) {
        const f8 y = load_f8(z + c) * inv;
        store(Tag{}, pr + c, y, cnt);
        store(Tag{}, outr + c, y * load_f8(mult + c), cnt);
      });
    } else {
      vector_loop(n, [&](int64_t c, auto cnt) { store(Tag{}, outr + c, load_f8(z + c) * inv, cnt); });
    }
  }
}

template <class Tag>
void backward_rows(const BackwardArgs<Tag>& a, int64_t begin, int64_t end) {
  const int64_t n = a.n;
  const int64_t padded = (n + W - 1) / W * W;
  std::vector<float> mult(a.drop.on ? padded : 0);
  const f8 scale = splat(a.scale);
  for (int64_t r = begin; r < end; ++r) {
    const auto* gr = a.grad + r * n;
    const auto* yr = a.y + r * n;
    auto* dxr = a.dx + r * n;
    // g = grad * keep / (1 - p): the gradient of the pre-dropout probabilities y.
    if (a.drop.on) row_multipliers(a.drop, r, n, mult.data());
    const auto g = [&](int64_t c, auto cnt) {
      const f8 gv = to_f8(Tag{}, gr + c, cnt);
      return a.drop.on ? gv * load_f8(mult.data() + c) : gv;
    };
    // Pass 1: dot = sum(g * y) (loads past n are 0).
    DoubleSum dot;
    vector_loop(n, [&](int64_t c, auto cnt) { dot.add(g(c, cnt) * to_f8(Tag{}, yr + c, cnt)); });
    // Pass 2: dx = scale * y * (g - dot)  (grad and y re-read from cache).
    const f8 d8 = splat(float(dot.total()));
    vector_loop(n, [&](int64_t c, auto cnt) {
      store(Tag{}, dxr + c, scale * to_f8(Tag{}, yr + c, cnt) * (g(c, cnt) - d8), cnt);
    });
  }
}
